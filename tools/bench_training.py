"""Baseline training speed, CPU against GPU, on the same features and code.

    python -m tools.bench_training pack --task A --recipe A0 --out runs/pack-A0.npz
    python -m tools.bench_training train --pack runs/pack-A0.npz --recipe A0 --seed 0 --out runs/bench-A0
    KERAS_BACKEND=jax python -m tools.bench_training train --pack ... --tile 13 --epochs 5 --out ...

``pack`` computes a recipe's features here (librosa, the corpora under ``../shared/data``) and writes them into one
``.npz`` (:func:`models.features.save_feature_pack`): train, validation, the calm reference clips and, by default,
RAVDESS actors 21-24 as the test part (``--test none`` leaves it out; all of nEMO would make the pack too large to
ship). ``train`` runs :func:`models.train.train_baseline` on a pack: the same code as ``fedser-train train``, on
whatever Keras backend is set (``KERAS_BACKEND``: tensorflow, the default; jax where TensorFlow has no GPU build)
and on the GPU when that backend sees one. On another backend than TensorFlow the model is saved as
``trained.npz``; ``fedser-train export --trained OUT`` with the TensorFlow backend writes the ``.tflite``.

Timing: ``--tile N`` repeats the training examples N times (an epoch of N times the steps; scores are then not a
recipe's) and ``--epochs E`` trains E epochs with no early stopping, so that seconds per epoch and examples per
second compare across machines on equal work. Prints one JSON line (also ``OUT/bench.json``): backend, device,
seconds per epoch (the first epoch, which compiles, apart), examples per second, validation UAR.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def cmd_pack(args) -> int:
    from models.features import compute_features, save_feature_pack
    from models.recipe_search import RAVDESS_TEST, RECIPES, _configs, _split

    if args.recipe not in RECIPES:
        print(f"unknown recipe {args.recipe!r}; choose one of {sorted(RECIPES)}", file=sys.stderr)
        return 2
    features, config, _ = _configs(RECIPES[args.recipe], args.seed)
    try:
        train, val, test, calm = _split(args.task)
    except (FileNotFoundError, ValueError) as exc:  # no corpus here
        print(f"cannot pack: {exc}", file=sys.stderr)
        return 2
    if args.test == "ravdess":
        test = [c for c in test if c.speaker in RAVDESS_TEST]
    elif args.test == "none":
        test = []
    started = time.perf_counter()
    parts = {"train": compute_features(train, features, cache_dir=args.cache, augmentation=config.augmentation),
             "val": compute_features(val, features, cache_dir=args.cache)}
    if test:
        parts["test"] = compute_features(test, features, cache_dir=args.cache)
    if config.speaker_reference == "neutral":
        own = {c.speaker for c in train} | {c.speaker for c in val}
        parts["reference"] = compute_features([c for c in calm if c.speaker in own], features, cache_dir=args.cache)
    path = save_feature_pack(args.out, parts, features)
    print(json.dumps({"pack": str(path), "bytes": path.stat().st_size,
                      "seconds": round(time.perf_counter() - started, 1),
                      **{k: len(v.clips) for k, v in parts.items()}}))
    return 0


def _tiled(fs, n: int):
    from models.features import FeatureSet

    return fs if n <= 1 else FeatureSet(list(fs.clips) * n, list(fs.raw) * n, dict(fs.skipped))


def cmd_train(args) -> int:
    import keras

    from models.features import load_feature_pack
    from models.recipe_search import RECIPES, _configs
    from models.train import train_baseline

    if args.recipe not in RECIPES:
        print(f"unknown recipe {args.recipe!r}; choose one of {sorted(RECIPES)}", file=sys.stderr)
        return 2
    try:
        parts, pack_features = load_feature_pack(args.pack)
    except ValueError as exc:
        print(f"cannot train: {exc}", file=sys.stderr)
        return 2
    features, config, arch = _configs(RECIPES[args.recipe], args.seed)
    if features != pack_features or "train" not in parts or "val" not in parts:
        print(f"{args.pack} is not a pack of recipe {args.recipe} with train and val parts (features "
              f"{pack_features.to_dict()}, parts {sorted(parts)})", file=sys.stderr)
        return 2
    if args.epochs:  # fixed work: no early stopping
        config = replace(config, epochs=args.epochs, patience=args.epochs + 1)
    if args.mixed_precision:
        config = replace(config, mixed_precision=args.mixed_precision)
    parts["train"] = _tiled(parts["train"], args.tile)
    started = time.perf_counter()
    result = train_baseline((), (), precomputed=(parts, pack_features), features=features, architecture=arch,
                            config=config, out_dir=args.out, progress=False,
                            dataset_name=f"recipe {args.recipe} (task pack)",
                            trainable_embedding=args.trainable_embedding)
    wall = time.perf_counter() - started
    rep = result.report
    secs = [h["seconds"] for h in rep["history"]]
    steady = secs[1:] or secs
    examples = rep["split"]["train_examples"]
    row = {"recipe": args.recipe, "seed": args.seed, "tile": args.tile, "backend": keras.backend.backend(),
           "hardware": rep["hardware"], "mixed_precision": rep["mixed_precision"], "train_examples": examples,
           "batch_size": config.batch_size, "epochs_run": rep["epochs_run"],
           "first_epoch_seconds": round(secs[0], 3), "seconds_per_epoch": round(float(np.median(steady)), 3),
           "examples_per_second": round(examples / float(np.median(steady)), 1),
           "train_seconds": round(rep["train_seconds"], 2), "wall_seconds": round(wall, 2),
           "best_val_uar": None if rep["best_val_uar"] is None else round(rep["best_val_uar"], 4),
           "test_uar": round(rep["test"]["uar"], 4) if "test" in rep else None,
           "exported": "tflite_sha256" in rep}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_training", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("pack", help="compute a recipe's features here and write them into one .npz")
    q.add_argument("--task", choices=("A", "B"), default="A")
    q.add_argument("--recipe", default="A0")
    q.add_argument("--seed", type=int, default=0, help="the augmentation seed (recipes with audio copies)")
    q.add_argument("--test", choices=("ravdess", "all", "none"), default="ravdess")
    q.add_argument("--cache", type=Path, default=Path(".cache/features"))
    q.add_argument("--out", type=Path, required=True)
    q.set_defaults(func=cmd_pack)
    q = sub.add_parser("train", help="train a recipe on a pack with the current Keras backend; time it")
    q.add_argument("--pack", type=Path, required=True)
    q.add_argument("--recipe", default="A0")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--tile", type=int, default=1, help="repeat the training examples N times (timing only)")
    q.add_argument("--epochs", type=int, default=0, help="train exactly E epochs (default: the recipe's, early stop)")
    q.add_argument("--mixed-precision", choices=("auto", "on", "off"), default=None)
    q.add_argument("--trainable-embedding", action="store_true")
    q.add_argument("--out", type=Path, default=None)
    q.set_defaults(func=cmd_train)
    args = p.parse_args(argv)
    if getattr(args, "tile", 1) < 1 or getattr(args, "epochs", 0) < 0:
        p.error("--tile must be >= 1 and --epochs >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
