"""Can any guard tell a harmful bare-thumbs-down fit from a helpful one? An offline emulation on validation speakers.

    python docs/results/personalisation-study/stop19/thumbs_guard_emulation.py [--out DIR]

Users: nEMO EB0, KD0, KS0, MP0, SM0, WR0 (5 answer orders each, 20 and 40 answers) and RAVDESS actors 19-20 (20
orders each, 20 answers), never IC0/MK0/TP0 or RAVDESS 21-24. Answers as in ``tools.personalisation_study``'s
thumbs mode: thumbs-up when the global head (the shipped RAVDESS-only base) is right, else a bare thumbs-down.
Each fit is that study's plain fine-tune in numpy (Adam on the head from the global head; cross-entropy for a
thumbs-up, ``-log(1 - p)`` for a thumbs-down); variants: the rate and steps, the thumbs-up answers alone, and the
thumbs-ups repeated 3 times (thumbs-downs weigh a third as much). For every trial it records the gain on the user's
later clips and what a guard could see: the thumbs-up answers flipped and the thumbs-down answers moved away from
the rejected label out of fold (5 folds), and the thumbs-ups the fit on all answers flips. Then it scores guard
rules (keep the fit only when ...) by mean gain, runs below -5 points and fits kept.

Writes ``trials.json`` and ``rules.md`` to ``--out`` (default: this folder). Needs both corpora and the embedding
cache of the study (it computes it when missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))

FITS = {"1e-3/300": {"lr": 1e-3, "steps": 300}, "1e-2/100": {"lr": 1e-2, "steps": 100},
        "1e-3/100": {"lr": 1e-3, "steps": 100}, "1e-4/300": {"lr": 1e-4, "steps": 300},
        "ups only 1e-3/300": {"lr": 1e-3, "steps": 300}, "downs x1/3 1e-3/300": {"lr": 1e-3, "steps": 300}}
USERS = (("nemo", ("EB0", "KD0", "KS0", "MP0", "SM0", "WR0"), 5, (20, 40), 40),
         ("ravdess", ("19", "20"), 20, (20,), 20))


def fit(name: str, w: dict, e: np.ndarray, t: np.ndarray, sg: np.ndarray) -> dict:
    from tools.personalisation_study import plain_finetune

    kw = FITS[name]
    if name.startswith("ups only"):
        m = sg > 0
        return plain_finetune(w, e[m], t[m], sg[m], **kw) if m.any() else w
    if name.startswith("downs x1/3"):
        up = sg > 0
        return plain_finetune(w, np.concatenate([e[up]] * 3 + [e[~up]]), np.concatenate([t[up]] * 3 + [t[~up]]),
                              np.concatenate([sg[up]] * 3 + [sg[~up]]), **kw)
    return plain_finetune(w, e, t, sg, **kw)


def trials() -> list[dict]:
    from edge_sdk.model import ModelMetadata, TFLiteModel
    from tools.personalisation_study import embeddings, head_logits, user_clips

    base = REPO / "docs/results/cross-corpus/ravdess-only"
    files = (base / "model.tflite", base / "model.json")
    meta = ModelMetadata.load(files[1])
    labels = list(meta.labels)
    w = TFLiteModel(files[0], meta).get_weights()

    def predict(h, x):
        return np.argmax(head_logits(h, x)[0], axis=1)

    rows = []
    for corpus, users, orders, counts, last in USERS:
        clips, emb, _ = embeddings(corpus, user_clips(corpus, users), files, REPO / ".cache/personalisation-study")
        y = np.array([labels.index(c.label) for c in clips])
        pred = predict(w, emb)
        for si, spk in enumerate(sorted({c.speaker for c in clips})):
            mine = np.array([i for i, c in enumerate(clips) if c.speaker == spk])
            for order in range(orders):
                perm = mine[np.random.default_rng([19, si, order, len(corpus)]).permutation(len(mine))]
                scored = perm[last:]
                for n in counts:
                    ans = perm[:n]
                    up, target = pred[ans] == y[ans], pred[ans]
                    sign = np.where(up, 1.0, -1.0)
                    before = np.mean(pred[scored] == y[scored])
                    row = {"corpus": corpus, "speaker": spk, "order": order, "answers": n, "ups": int(up.sum())}
                    for name in FITS:
                        f = fit(name, w, emb[ans], target, sign)
                        row[name] = float(np.mean(predict(f, emb[scored]) == y[scored]) - before)
                        fold, flipped, moved = np.arange(n) % 5, 0, 0
                        for k in range(5):
                            tr = fold != k
                            shown = predict(fit(name, w, emb[ans][tr], target[tr], sign[tr]), emb[ans][~tr])
                            flipped += int(np.sum(up[~tr] & (shown != target[~tr])))
                            moved += int(np.sum(~up[~tr] & (shown != target[~tr])))
                        row[f"{name}:cv flipped"], row[f"{name}:cv moved"] = flipped, moved
                        row[f"{name}:fit flipped"] = int(np.sum(up & (predict(f, emb[ans]) != target)))
                    rows.append(row)
        print(f"{corpus} done", flush=True)
    return rows


RULES = {
    "no guard": lambda r, f: True,
    "out-of-fold thumbs-ups flipped = 0": lambda r, f: r[f"{f}:cv flipped"] == 0,
    "... <= 1": lambda r, f: r[f"{f}:cv flipped"] <= 1,
    "... <= 3": lambda r, f: r[f"{f}:cv flipped"] <= 3,
    "... <= a third of the thumbs-ups": lambda r, f: r[f"{f}:cv flipped"] <= r["ups"] / 3,
    "moved / 3 >= flipped (the SDK's down_credit)": lambda r, f: r[f"{f}:cv moved"] / 3 >= r[f"{f}:cv flipped"],
    "moved / 2 >= flipped": lambda r, f: r[f"{f}:cv moved"] / 2 >= r[f"{f}:cv flipped"],
    "the fit on all answers flips no thumbs-up": lambda r, f: r[f"{f}:fit flipped"] == 0,
}


def table(rows: list[dict]) -> str:
    cells = [(c, n) for c, _, _, counts, _ in USERS for n in counts]
    out = ["| rule | fit | " + " | ".join(f"{c} {n} answers: gain (runs < -5, worst) kept" for c, n in cells) + " |",
           "| --- | --- | " + " | ".join("---" for _ in cells) + " |"]
    for rule, keep in RULES.items():
        for f in FITS:
            parts = []
            for c, n in cells:
                t = [r for r in rows if r["corpus"] == c and r["answers"] == n]
                g = 100 * np.array([r[f] if keep(r, f) else 0.0 for r in t])
                kept = sum(bool(keep(r, f)) for r in t)
                parts.append(f"{g.mean():+.1f} ± {g.std(ddof=1) / np.sqrt(len(g)):.1f} ({int((g < -5).sum())}, "
                             f"{g.min():+.0f}) {kept}/{len(t)}")
            out.append(f"| {rule} | {f} | " + " | ".join(parts) + " |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = p.parse_args()
    rows = trials()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trials.json").write_text(json.dumps(rows, indent=0))
    text = table(rows)
    (args.out / "rules.md").write_text("# Thumbs-only guard rules, emulated (validation speakers)\n\n"
                                       "`python docs/results/personalisation-study/stop19/thumbs_guard_emulation.py`"
                                       "\n\nMean gain in points ± SE over trials (runs below -5 points, worst run) "
                                       "and fits kept.\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
