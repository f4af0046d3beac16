"""Bare thumbs-down answers fit as a per-user class bias only: an offline emulation on validation speakers.

    python docs/results/personalisation-study/stop28/thumbs_bias_emulation.py [--out DIR] [--model DIR]

Stop 19 found that no guard tells a harmful fit of the whole head on bare thumbs answers from a helpful one
(../stop19/rules.md). This emulation asks whether a smaller fit needs no such guard: four numbers, one added to each
class's logit, fit on the user's thumbs answers (cross-entropy toward the shown label for a thumbs-up,
``-log(1 - p)`` for a thumbs-down) with an L2 pull toward zero of strength ``lam`` (per answer): 400 steps of
gradient descent at rate 0.5 (with ``lam`` 0 and only thumbs-down answers the loss has no minimum; the steps bound
the bias). A bias says "this user is rarely what the model calls X"; it cannot learn a new boundary,
so it cannot learn one from noise either.

Users, answer orders and answers as in ../stop19/thumbs_guard_emulation.py (the same trials): nEMO EB0, KD0, KS0,
MP0, SM0, WR0 (5 orders, 20 and 40 answers) and RAVDESS actors 19-20 (20 orders, 20 answers); never IC0/MK0/TP0
or RAVDESS 21-24. Thumbs-up when the global head is right, else a bare thumbs-down. Base: the shipped RAVDESS-only
model (``--model``). Writes ``bias-trials.json`` and ``bias-rules.md`` to ``--out`` (default: this folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))

LAMS = (0.0, 0.003, 0.01, 0.03, 0.1)
USERS = (("nemo", ("EB0", "KD0", "KS0", "MP0", "SM0", "WR0"), 5, (10, 20, 40), 40),
         ("ravdess", ("19", "20"), 20, (10, 20), 20))


def fit_bias(z: np.ndarray, target: np.ndarray, sign: np.ndarray, lam: float, *, steps: int = 400,
             lr: float = 0.5) -> np.ndarray:
    """The bias b after ``steps`` of gradient descent on mean(loss(softmax(z + b))) + lam * |b|^2 (convex in b)."""
    from tools.personalisation_study import softmax

    b = np.zeros(z.shape[1])
    onehot = np.eye(z.shape[1])[target]
    for _ in range(steps):
        p = softmax(z + b)
        pt = np.clip((p * onehot).sum(axis=1, keepdims=True), 0.0, 1.0 - 1e-6)
        dz = np.where(sign[:, None] > 0, p - onehot, pt / (1.0 - pt) * (onehot - p))
        g = dz.mean(axis=0) + 2 * lam * b
        b -= lr * g
        b -= b.mean()  # only differences between classes matter
    return b


def trials(model_dir: Path) -> list[dict]:
    from edge_sdk.model import ModelMetadata, TFLiteModel
    from tools.personalisation_study import embeddings, head_logits, user_clips

    files = (model_dir / "model.tflite", model_dir / "model.json")
    meta = ModelMetadata.load(files[1])
    labels = list(meta.labels)
    w = TFLiteModel(files[0], meta).get_weights()
    rows = []
    for corpus, users, orders, counts, last in USERS:
        clips, emb, _ = embeddings(corpus, user_clips(corpus, users), files, REPO / ".cache/personalisation-study")
        y = np.array([labels.index(c.label) for c in clips])
        z = head_logits(w, emb)[0]
        pred = np.argmax(z, axis=1)
        for si, spk in enumerate(sorted({c.speaker for c in clips})):
            mine = np.array([i for i, c in enumerate(clips) if c.speaker == spk])
            for order in range(orders):
                perm = mine[np.random.default_rng([19, si, order, len(corpus)]).permutation(len(mine))]
                scored = perm[last:]
                before = float(np.mean(pred[scored] == y[scored]))
                for n in counts:
                    ans = perm[:n]
                    up = pred[ans] == y[ans]
                    sign = np.where(up, 1.0, -1.0)
                    row = {"corpus": corpus, "speaker": spk, "order": order, "answers": n, "ups": int(up.sum()),
                           "before": before}
                    for lam in LAMS:
                        b = fit_bias(z[ans], pred[ans], sign, lam)
                        row[f"lam {lam}"] = float(np.mean(np.argmax(z[scored] + b, axis=1) == y[scored]) - before)
                        row[f"lam {lam}:bias"] = [round(float(v), 3) for v in b]
                        # what a guard could see: thumbs-ups the fit flips, out of fold (5 folds)
                        fold, flipped = np.arange(n) % 5, 0
                        for k in range(5):
                            tr = fold != k
                            bk = fit_bias(z[ans][tr], pred[ans][tr], sign[tr], lam)
                            shown = np.argmax(z[ans][~tr] + bk, axis=1)
                            flipped += int(np.sum(up[~tr] & (shown != pred[ans][~tr])))
                        row[f"lam {lam}:cv flipped"] = flipped
                    rows.append(row)
        print(f"{corpus} done", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    cells = sorted({(r["corpus"], r["answers"]) for r in rows}, key=lambda c: (c[0] != "nemo", c[1]))
    out = ["| fit | rule | " + " | ".join(f"{c} {n} answers: gain (runs < -5, worst) kept" for c, n in cells)
           + " |", "| --- | --- | " + " | ".join("---" for _ in cells) + " |"]
    rules = {"none": lambda r, f: True, "cv flipped <= 1": lambda r, f: r[f"{f}:cv flipped"] <= 1}
    for f in (f"lam {lam}" for lam in LAMS):
        for rule, keep in rules.items():
            parts = []
            for c, n in cells:
                t = [r for r in rows if r["corpus"] == c and r["answers"] == n]
                g = 100 * np.array([r[f] if keep(r, f) else 0.0 for r in t])
                kept = sum(bool(keep(r, f)) for r in t)
                parts.append(f"{g.mean():+.1f} ± {g.std(ddof=1) / np.sqrt(len(g)):.1f} ({int((g < -5).sum())}, "
                             f"{g.min():+.0f}) {kept}/{len(t)}")
            out.append(f"| {f} | {rule} | " + " | ".join(parts) + " |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--model", type=Path, default=REPO / "docs/results/cross-corpus/ravdess-only")
    args = p.parse_args()
    rows = trials(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bias-trials.json").write_text(json.dumps(rows, indent=0))
    text = table(rows)
    (args.out / "bias-rules.md").write_text(
        "# Bare thumbs answers fit as a class bias, emulated (validation speakers)\n\n"
        "`python docs/results/personalisation-study/stop28/thumbs_bias_emulation.py --model "
        f"{args.model.resolve().relative_to(REPO) if args.model.resolve().is_relative_to(REPO) else args.model}`\n\n"
        "Mean gain in points ± SE over trials (runs below -5 points, worst run) and fits kept.\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
