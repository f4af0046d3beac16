"""Per-speaker UAR of two task-A recipes from their saved logits (``recipe_search run --save-logits DIR``), paired
by seed: which nEMO speakers (and RAVDESS test actors) a change helps.

    python docs/results/recipe-search/stop30/per_speaker.py DIR A-swa-long A-swa-long-f4k --seeds 0,1,2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from models.metrics import classification_report

LABELS = ["angry", "happy", "neutral", "sad"]
NEMO_GENDER = {"EB0": "f", "IC0": "f", "KD0": "f", "MK0": "f", "KS0": "m", "MP0": "m", "SM0": "m", "TP0": "m",
               "WR0": "m"}  # nEMO's README
TEST = {"nemo-IC0", "nemo-MK0", "nemo-TP0", "ravdess-21", "ravdess-22", "ravdess-23", "ravdess-24"}


def per_speaker(path: Path) -> dict[str, float]:
    z = np.load(path)
    pred, y, spk = np.argmax(z["logits"], axis=1), z["labels"], z["speakers"]
    return {s: classification_report(y[spk == s], pred[spk == s], LABELS)["uar"] for s in sorted(set(spk))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logits", type=Path)
    p.add_argument("control")
    p.add_argument("candidate")
    p.add_argument("--seeds", default="0,1,2")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    ctl = [per_speaker(a.logits / f"{a.control}-seed{s}.npz") for s in seeds]
    cand = [per_speaker(a.logits / f"{a.candidate}-seed{s}.npz") for s in seeds]
    print(f"| speaker | role | {a.control} | {a.candidate} | paired (points) |")
    print("| --- | --- | --- | --- | --- |")
    nemo = []
    for s in sorted(ctl[0], key=lambda k: (not k.startswith("nemo"), k in TEST, k)):
        c, d = np.array([r[s] for r in ctl]), np.array([r[s] for r in cand])
        diff = 100 * (d - c)
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        name = s.split("-", 1)[1]
        role = ("test" if s in TEST else "dev") + (f", {NEMO_GENDER[name]}" if s.startswith("nemo") else "")
        print(f"| {s} | {role} | {c.mean():.3f} | {d.mean():.3f} | {diff.mean():+.1f} ± {se:.1f} |")
        if s.startswith("nemo"):
            nemo.append(diff.mean())
    v = np.array(nemo)
    print(f"\nnEMO, the mean over its {len(v)} speakers of each one's paired difference: {v.mean():+.1f} ± "
          f"{v.std(ddof=1) / np.sqrt(len(v)):.1f} points (standard error over speakers); helped {int((v > 0).sum())}, "
          f"hurt {int((v < 0).sum())}")


if __name__ == "__main__":
    main()
