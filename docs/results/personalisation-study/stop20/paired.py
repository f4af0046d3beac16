"""Per policy and cell: mean gain over the global head ± SE, runs below -5 points, worst run, and the paired
difference with the SDK default, from personalisation-study results.json files (stop 20's and 21's tables; a file
with several answer modes gets a line per mode).

    python docs/results/personalisation-study/stop20/paired.py docs/results/personalisation-study/stop20/*/results.json
"""

import json
import sys

import numpy as np


def se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def main(paths: list[str]) -> int:
    for path in paths:
        trials = json.load(open(path))["trials"]
        policies = [k[len("status:"):] for k in trials[0] if k.startswith("status:")]
        modes = sorted({r["mode"] for r in trials})  # a file of several answer modes: each on its own line
        for corpus, mode in [(c, m) for c in ("nemo", "ravdess") for m in modes]:
            for answers in sorted({r["answers"] for r in trials}):
                rows = [r for r in trials if r["corpus"] == corpus and r["answers"] == answers and r["mode"] == mode]
                if not rows:
                    continue
                label = f"{corpus} {mode}" if len(modes) > 1 else corpus
                out = [f"{path.split('/')[-2]} {label} after {answers} (n={len(rows)})"]
                base = np.array([r["SDK default"] - r["global"] for r in rows]) * 100
                for p in policies:
                    g = np.array([r[p] - r["global"] for r in rows]) * 100
                    d = g - base
                    out.append(f"{p}: {g.mean():+.1f} ± {se(g):.1f} ({int((g < -5).sum())} below -5, worst "
                               f"{g.min():+.0f}; - default {d.mean():+.1f} ± {se(d):.1f})")
                print(" | ".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
