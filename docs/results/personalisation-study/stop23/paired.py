"""Paired comparison of two policies of one personalisation-study run, per cell (corpus x mode x answers).

    python docs/results/personalisation-study/stop23/paired.py RESULTS.json BASE CANDIDATE [CANDIDATE ...]

Per cell: trials; the global head's accuracy; each policy's gain over it (points, mean +- SE over trials), its runs
below -5 points and how often it kept an input affine; each candidate's paired difference with BASE (mean +- SE);
median milliseconds per personalisation. Markdown on standard output."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np


def _mse(x) -> str:
    x = np.asarray(x, float)
    se = x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else 0.0
    return f"{x.mean():+.1f} ± {se:.1f}"


def main(argv: list[str]) -> None:
    path, base, *cands = argv
    trials = json.load(open(path))["trials"]
    cells = defaultdict(list)
    for t in trials:
        cells[(t["corpus"], t["mode"], t["answers"])].append(t)
    names = [base, *cands]
    head = ["corpus", "mode", "answers", "trials", "global %"]
    head += [f"{n}: gain (below -5), affine kept" for n in names]
    head += [f"{c} - {base} (paired)" for c in cands] + [f"median ms {n}" for n in names]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for (corpus, mode, answers), ts in sorted(cells.items()):
        row = [corpus, mode, str(answers), str(len(ts)), f"{100 * np.mean([t['global'] for t in ts]):.1f}"]
        for n in names:
            gain = [100 * (t[n] - t["global"]) for t in ts]
            kept = sum(bool((t.get(f"guard:{n}") or {}).get("input_affine")) for t in ts)
            row.append(f"{_mse(gain)} ({sum(g < -5 for g in gain)}), {kept}")
        for c in cands:
            row.append(_mse([100 * (t[c] - t[base]) for t in ts]))
        row += [f"{np.median([t[f'ms:{n}'] for t in ts]):.0f}" for n in names]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
