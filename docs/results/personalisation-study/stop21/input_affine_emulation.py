"""Does a per-user affine transform of the input features add to a head fine-tune? An offline emulation (Keras on
TensorFlow, gradients through the frozen encoder), on validation users only, before any device code is written.

Issue 14 names this builtin-ops-only route: x' = x * (1 + a) + b per mel band (a, b: 2 x 40 numbers per user,
speech frames only, padding rows stay zero), trained through the frozen encoder. The bundled model's misses on new
speakers are per-speaker shifts along the arousal axis (stop21/README.md), the kind of thing a per-user shift of the
input might place.

Two models are trained here with their shipped recipes and held-out users no test speaker is among:
  - "bundled": recipe B-speed on RAVDESS 1-16 + nEMO EB0, KD0, KS0, SM0, 20 epochs (train_validation_bundled.py's
    stand-in); users RAVDESS 17-20 (10 orders, 10 and 20 answers) and nEMO MP0, WR0 (5 orders, 10/20/40);
  - "ravdess-only": recipe A0 (level, neutral speaker reference) on RAVDESS 1-18 (19-20 pick the epoch); users the
    six non-test nEMO speakers (2 orders, 10/20/40).
Answers are corrections (every answer carries its true label, as in the study's corrections mode). Per trial, from
the global head, Adam (lr 0.01, 100 full-batch steps): "head" (the head's four arrays), "affine" (a, b only) and
"head+affine". Accuracy on the user's clips after the first 40 (nEMO) or 20 (RAVDESS) of the order.

    python docs/results/personalisation-study/stop21/input_affine_emulation.py --out DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

LABELS = ("angry", "happy", "neutral", "sad")


def _models(cache: Path, seed: int, only: str = ""):
    """The models trained here with their users: both, or ``only`` one ("bundled", "ravdess-only"). Each training
    seeds itself (train_baseline), so one does not depend on the other having run."""
    from models.cross_corpus import _calm_clips, _clips
    from models.datasets import split_by_speaker
    from models.recipe_search import NEMO_DEV, NEMO_TEST, RAVDESS_TEST, RECIPES, _configs
    from models.train import train_baseline

    ravdess, nemo = _clips()
    models = []
    if only in ("", "bundled"):
        rest, _test = split_by_speaker(ravdess + nemo, list(RAVDESS_TEST + NEMO_TEST))
        users_b = [f"ravdess-{a}" for a in (17, 18, 19, 20)] + ["nemo-MP0", "nemo-WR0"]
        train_b, val_b = split_by_speaker(rest, users_b)
        assert {c.speaker for c in val_b} == set(users_b)
        feats_b, config_b, arch_b = _configs(RECIPES["B-speed"], seed)
        bundled = train_baseline(train_b, val_b, (), features=feats_b, architecture=arch_b,
                                 config=replace(config_b, epochs=20, swa_epochs=1), cache_dir=cache, progress=False)
        models.append(("bundled", bundled, feats_b, val_b))
    if only in ("", "ravdess-only"):
        r_rest, _ = split_by_speaker(ravdess, list(RAVDESS_TEST))
        r_train, r_val = split_by_speaker(r_rest, ["ravdess-19", "ravdess-20"])
        feats_a, config_a, arch_a = _configs(RECIPES["A0"], seed)
        ravdess_only = train_baseline(r_train, r_val, (), features=feats_a, architecture=arch_a, config=config_a,
                                      cache_dir=cache, progress=False, reference_clips=_calm_clips())
        models.append(("ravdess-only", ravdess_only, feats_a, [c for c in nemo if c.speaker in NEMO_DEV]))
    for _, _, _, users in models:  # no test speaker is ever a user here
        assert not {c.speaker for c in users} & set(RAVDESS_TEST + NEMO_TEST)
    return models


def _fit(encoder, head, x, y, kind: str, lr=0.01, steps=100):
    """Adam from the global head on the answers (x, y); ``kind`` says what trains: "head" (w0, b0, w1, b1: the
    head's dense layers, as models.architectures.build_head; its dropout is off at inference and here), "affine"
    (a, b) or both. Returns a function from inputs to predicted classes."""
    import keras
    import tensorflow as tf

    w = [tf.Variable(v) for v in head.get_weights()]  # head_hidden kernel, bias; head_logits kernel, bias
    a, b = tf.Variable(tf.zeros([x.shape[2]])), tf.Variable(tf.zeros([x.shape[2]]))
    train = ([a, b] if "affine" in kind else []) + (w if "head" in kind else [])
    opt = keras.optimizers.Adam(lr)

    def logits(inputs):
        speech = tf.cast(tf.reduce_any(inputs != 0, axis=2, keepdims=True), tf.float32)  # padding rows stay 0
        emb = encoder((inputs * (1.0 + a) + b) * speech, training=False)
        return tf.matmul(tf.nn.relu(tf.matmul(emb, w[0]) + w[1]), w[2]) + w[3]

    xt, yt = tf.constant(x), tf.constant(y)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yt, logits(xt)))
        opt.apply_gradients(zip(tape.gradient(loss, train), train, strict=True))

    for _ in range(steps):
        step()
    return lambda inputs: np.argmax(logits(tf.constant(inputs)).numpy(), axis=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path(".cache/features"))
    p.add_argument("--table-only", action="store_true", help="rewrite table.md from OUT/trials.json")
    p.add_argument("--guard", action="store_true",
                   help="one model and one kind of fit (--model, --kind) with the SDK's accuracy guard emulated: "
                        "5-fold cross-validation of the fit on the answers against the global head (guard.md)")
    p.add_argument("--model", choices=("bundled", "ravdess-only"), default="bundled", help="with --guard")
    p.add_argument("--kind", choices=("head", "affine", "head+affine"), default="affine", help="with --guard")
    args = p.parse_args()
    if args.table_only:
        trials = json.loads((args.out / "trials.json").read_text())
        _write_tables(trials, args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from models.features import compute_features

    args.out.mkdir(parents=True, exist_ok=True)
    trials = []
    kinds = (args.kind,) if args.guard else ("head", "affine", "head+affine")
    for name, result, feats, clips in _models(args.cache, args.seed, only=args.model if args.guard else ""):
        assert len(result.head.get_weights()) == 4  # hidden kernel, bias, logits kernel, bias
        fs = compute_features(clips, feats, cache_dir=args.cache)
        x = fs.model_inputs(feats, result.metadata.normalization)  # each user normalised by all their clips
        y = fs.labels(list(LABELS))
        spk = np.array([c.speaker for c in fs.clips])
        base = np.argmax(result.head.predict(result.encoder.predict(x, verbose=0), verbose=0), axis=1)
        for si, s in enumerate(sorted(set(spk.tolist()))):
            mine = np.flatnonzero(spk == s)
            nemo = s.startswith("nemo-")
            orders = (5 if name == "bundled" else 2) if nemo else 10
            counts = (10, 20, 40) if nemo else (10, 20)
            last = 40 if nemo else 20
            for order in range(orders):
                rng = np.random.default_rng([args.seed, si, order, len(name)])
                perm = mine[rng.permutation(len(mine))]
                scored = perm[last:]
                for n in counts:
                    ans = perm[:n]
                    trial = {"model": name, "speaker": s, "order": order, "answers": n,
                             "global": float(np.mean(base[scored] == y[scored]))}
                    for kind in kinds:
                        started = time.perf_counter()
                        predict = _fit(result.encoder, result.head, x[ans], y[ans], kind)
                        trial[kind] = float(np.mean(predict(x[scored]) == y[scored]))
                        trial[f"s:{kind}"] = time.perf_counter() - started
                    if args.guard:  # the SDK's guard: out-of-fold answers right, the fit against the global head
                        fold_of = np.arange(n) % 5
                        right = np.zeros(n)
                        for f in range(5):
                            fit = _fit(result.encoder, result.head, x[ans[fold_of != f]], y[ans[fold_of != f]],
                                       args.kind)
                            right[fold_of == f] = fit(x[ans[fold_of == f]]) == y[ans[fold_of == f]]
                        trial[f"cv_{args.kind}"] = float(right.mean())
                        trial["cv_global"] = float(np.mean(base[ans] == y[ans]))
                    trials.append(trial)
                    logging.info("%s %s order %d n %d: %s", name, s, order, n,
                                 {k: round(v, 3) for k, v in trial.items() if isinstance(v, float)
                                  and not k.startswith("s:")})
            (args.out / "trials.json").write_text(json.dumps(trials))
    _write_tables(trials, args)


def _write_tables(trials: list[dict], args) -> None:
    if args.guard:
        write_guard_table(trials, args.out, args.kind)
    else:
        write_table(trials, args.out)


def _mse(v: np.ndarray) -> str:
    return f"{v.mean():+.1f} ± {v.std(ddof=1) / np.sqrt(len(v)):.1f}"


def write_guard_table(trials: list[dict], out: Path, kind: str = "affine") -> None:
    """guard.md: the affine fit unguarded, and kept only when the cross-validation shows the answers better than the
    global head shows them (margin 0), or better by the SDK's margin (0.5 x sqrt(n) answers: 0.5 / sqrt(n))."""
    lines = [f"| users | answers | trials | global % | {kind}, unguarded: gain (below -5) | guarded, margin 0: gain "
             "(below -5), kept | guarded, SDK margin: gain (below -5), kept |", "| --- " * 7 + "|"]
    cells = [(c, n, None) for c in ("nemo", "ravdess") for n in (10, 20, 40)]
    cells += [("ravdess", 20, s) for s in sorted({t["speaker"] for t in trials if t["speaker"].startswith("ravdess")})]
    for corpus, n, speaker in cells:
        cell = [t for t in trials if t["answers"] == n and t["speaker"].startswith(corpus)
                and (speaker is None or t["speaker"] == speaker)]
        if not cell:
            continue
        gain = 100 * np.array([t[kind] - t["global"] for t in cell])
        cols = [f"{_mse(gain)} ({int((gain < -5).sum())})"]
        for margin in (0.0, 0.5 / np.sqrt(n)):
            kept = np.array([t[f"cv_{kind}"] > t["cv_global"] + margin for t in cell])
            g = np.where(kept, gain, 0.0)
            cols.append(f"{_mse(g)} ({int((g < -5).sum())}), {int(kept.sum())} of {len(cell)}")
        lines.append(f"| {speaker or corpus} | {n} | {len(cell)} | {100 * np.mean([t['global'] for t in cell]):.1f} | "
                     + " | ".join(cols) + " |")
    (out / "guard.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_table(trials: list[dict], out: Path) -> None:
    """table.md from the trials: gains against the global head (± SE over trials), runs below -5, paired
    differences with the head fit."""
    lines = ["| model | users | answers | trials | global % | head: gain (below -5) | affine: gain (below -5) | "
             "head+affine: gain (below -5) | affine - head (paired) | head+affine - head (paired) |",
             "| --- " * 10 + "|"]
    for name in dict.fromkeys(t["model"] for t in trials):
        for corpus in ("nemo", "ravdess"):
            for n in (10, 20, 40):
                cell = [t for t in trials if t["model"] == name and t["answers"] == n
                        and t["speaker"].startswith(corpus)]
                if not cell:
                    continue
                g = {k: 100 * (np.array([t[k] for t in cell]) - np.array([t["global"] for t in cell]))
                     for k in ("head", "affine", "head+affine")}
                lines.append(f"| {name} | {corpus} | {n} | {len(cell)} | "
                             f"{100 * np.mean([t['global'] for t in cell]):.1f} | "
                             + " | ".join(f"{_mse(g[k])} ({int((g[k] < -5).sum())})" for k in g)
                             + f" | {_mse(g['affine'] - g['head'])} | {_mse(g['head+affine'] - g['head'])} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))



if __name__ == "__main__":
    main()
