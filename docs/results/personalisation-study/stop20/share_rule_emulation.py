"""Thumbs-up share as a keep-rule for bare thumbs-down fits, emulated on stop 19's trials (no new fits).

    python docs/results/personalisation-study/stop20/share_rule_emulation.py

Reads ../stop19/trials.json (validation speakers only: nEMO EB0, KD0, KS0, MP0, SM0, WR0 after 20 and 40 answers,
5 orders each; RAVDESS 19-20 after 20 answers, 20 orders each; the RAVDESS-only base; the study's numpy fine-tune
of each fit, see ../stop19/thumbs_guard_emulation.py) and writes share-rules.md: for each fit and rule, the mean
gain over the global head in points ± standard error over trials, (runs below -5 points, worst run). A rule keeps
a fit only when at least that share of the answers were thumbs-up (the global model confirmed); a fit it does not
keep gains 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
FITS = ("1e-4/300", "1e-3/300", "1e-3/100", "1e-2/100")
RULES = {"no rule": None, "share >= 0.3": 0.3, "share >= 0.4": 0.4, "share >= 0.5": 0.5}
CELLS = (("nemo", 20), ("nemo", 40), ("ravdess", 20))


def cell(rows: list[dict], fit: str, share: float | None) -> str:
    g = np.array([(r[fit] if share is None or r["ups"] >= share * r["answers"] else 0.0) * 100 for r in rows])
    return f"{g.mean():+.1f} ± {g.std(ddof=1) / np.sqrt(len(g)):.1f} ({int((g < -5).sum())}, worst {g.min():+.0f})"


def main() -> int:
    trials = json.loads((HERE.parent / "stop19" / "trials.json").read_text())
    lines = ["# Thumbs-up share as a keep-rule for bare thumbs-down fits (emulated on stop 19's trials)", "",
             "Gain over the global head in points, mean ± SE over trials (runs below -5, worst run). "
             "`python docs/results/personalisation-study/stop20/share_rule_emulation.py`", "",
             "| fit (Adam rate / steps) | rule | " + " | ".join(f"{c} after {a} (n)" for c, a in CELLS) + " |",
             "| --- " * (2 + len(CELLS)) + "|"]
    for fit in FITS:
        for rule, share in RULES.items():
            cells = []
            for c, a in CELLS:
                rows = [r for r in trials if r["corpus"] == c and r["answers"] == a]
                cells.append(f"{cell(rows, fit, share)} (n={len(rows)})")
            lines.append(f"| {fit} | {rule} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (HERE / "share-rules.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
