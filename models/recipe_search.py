"""Recipe search for issue 14: the RAVDESS-only model on nEMO (task A) and the bundled model (task B).

    python -m models.recipe_search run --task A --recipes A0,A-warp --seeds 0,1,2
    python -m models.recipe_search run --task B --recipes B0 --seeds 0 --export runs/recipe-B
    python -m models.recipe_search table

Task A: CNN trained on RAVDESS actors 1-18 (19-20 pick the epoch). The recipe is chosen on the six nEMO speakers
that are not test speakers (EB0, KD0, KS0, MP0, SM0, WR0: ``nemo_dev``); reported there, on IC0/MK0/TP0
(``nemo_test``), on all of nEMO and on RAVDESS 21-24.
Task B: CNN trained on RAVDESS 1-18 + nEMO EB0, KD0, KS0, MP0, SM0; validation RAVDESS 19-20 + nEMO WR0 for
every seed (the epoch and the recipe are chosen on the mean of the two corpora's validation UARs,
``best_val_uar``); test RAVDESS 21-24 and nEMO IC0, MK0, TP0.
Named test speakers never train, validate or choose anything. Every run is one line of
``docs/results/recipe-search/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("models")

__all__ = ["RECIPES", "main"]

NEMO_TEST = ("nemo-IC0", "nemo-MK0", "nemo-TP0")
NEMO_DEV = ("nemo-EB0", "nemo-KD0", "nemo-KS0", "nemo-MP0", "nemo-SM0", "nemo-WR0")
RAVDESS_TEST = tuple(f"ravdess-{a}" for a in (21, 22, 23, 24))
# task B cross-validation (``--cv-folds K``): fold K holds out two of the six non-test nEMO speakers and RAVDESS 19-20
# (those in every fold), scored after a fixed number of epochs: choosing a recipe for a refit on non-test speakers,
# six nEMO speakers deep instead of WR0 alone. The named test speakers are not even scored.
NEMO_CV_FOLDS = (("nemo-EB0", "nemo-KD0"), ("nemo-KS0", "nemo-MP0"), ("nemo-SM0", "nemo-WR0"))
RAVDESS_CV = ("ravdess-19", "ravdess-20")
LABELS = ("angry", "happy", "neutral", "sad")

# two speed-perturbed audio copies per training clip (0.8-1.25, resampled; no gain change, no noise)
_SPEED = {"copies": 2, "gain_db": (0.0, 0.0), "speed": (0.8, 1.25), "snr_db": (90.0, 90.0)}
_A = {"features": {"utterance_norm": "level"}, "train": {"epochs": 40, "patience": 10, "speaker_reference": "neutral"}}
_B = {"features": {"utterance_norm": "level"}, "train": {"epochs": 40, "patience": 15}}


def _r(base: dict, what: str, features=None, train=None, arch=None) -> dict:
    return {"what": what, "features": {**base["features"], **(features or {})},
            "train": {**base["train"], **(train or {})}, "arch": arch or {}}


# name -> recipe: what changes (from A0 / B0, today's recipes), FeatureConfig, TrainConfig and preset changes (the
# cnn's, or those of arch["name"])
RECIPES = {
    "A0": _r(_A, "today: level + speaker reference neutral, 40 epochs, patience 10"),
    "A-warp": _r(_A, "+ mel-axis warp 0.15", train={"freq_warp": 0.15}),
    "A-stretch": _r(_A, "+ time stretch 0.2", train={"time_stretch": 0.2}),
    "A-tilt": _r(_A, "+ spectral tilt 1.0", train={"spectral_tilt": 1.0}),
    "A-faug": _r(_A, "+ warp 0.15, stretch 0.2, tilt 1.0",
                 train={"freq_warp": 0.15, "time_stretch": 0.2, "spectral_tilt": 1.0}),
    "A-long": _r(_A, "80 epochs, patience 20, cosine learning rate",
                 train={"epochs": 80, "patience": 20, "lr_schedule": "cosine"}),
    "A-drop5": _r(_A, "dropout 0.5", arch={"dropout": 0.5}),
    "A-wide": _r(_A, "channels 96,160,160", arch={"channels": (96, 160, 160)}),
    "A-spec": _r(_A, "+ SpecAugment 2 masks", train={"spec_augment": 2}),
    "A-blend": _r(_A, "+ reference blend 1.0: lam * (neutral reference) + (1 - lam) * (all clips), lam in [0, 1]",
                  train={"reference_blend": 1.0}),
    "A-blend5": _r(_A, "+ reference blend 0.5 (lam in [0.5, 1])", train={"reference_blend": 0.5}),
    "A-swa": _r(_A, "30 epochs, weights averaged over the last 10 (no early stopping)",
                train={"epochs": 30, "swa_epochs": 10}),
    "A-long-faug": _r(_A, "A-long + warp 0.15, stretch 0.2, tilt 1.0",
                      train={"epochs": 80, "patience": 20, "lr_schedule": "cosine", "freq_warp": 0.15,
                             "time_stretch": 0.2, "spectral_tilt": 1.0}),
    "A-long-wide": _r(_A, "A-long + channels 96,160,160",
                      train={"epochs": 80, "patience": 20, "lr_schedule": "cosine"}, arch={"channels": (96, 160, 160)}),
    "A-swa-long": _r(_A, "50 epochs, weights averaged over the last 20 (no early stopping)",
                     train={"epochs": 50, "swa_epochs": 20}),
    "A-swa-faug": _r(_A, "A-swa + warp 0.15, stretch 0.2, tilt 1.0",
                     train={"epochs": 30, "swa_epochs": 10, "freq_warp": 0.15, "time_stretch": 0.2,
                            "spectral_tilt": 1.0}),
    "A-swa-speed": _r(_A, "A-swa + 2 audio copies per training clip at speed 0.8-1.25 (resampled; no gain, no noise)",
                      train={"epochs": 30, "swa_epochs": 10, "augmentation": _SPEED}),
    "A-swa-long-speed": _r(_A, "A-swa-long + 2 audio copies per training clip at speed 0.8-1.25",
                           train={"epochs": 50, "swa_epochs": 20, "augmentation": _SPEED}),
    "B0": _r(_B, "today: level, 40 epochs, patience 15"),
    "B-long": _r(_B, "80 epochs, patience 20, cosine learning rate",
                 train={"epochs": 80, "patience": 20, "lr_schedule": "cosine"}),
    "B-faug": _r(_B, "+ warp 0.15, stretch 0.2, tilt 1.0",
                 train={"freq_warp": 0.15, "time_stretch": 0.2, "spectral_tilt": 1.0}),
    "B-long-faug": _r(_B, "B-long + warp 0.15, stretch 0.2, tilt 1.0",
                      train={"epochs": 80, "patience": 20, "lr_schedule": "cosine", "freq_warp": 0.15,
                             "time_stretch": 0.2, "spectral_tilt": 1.0}),
    "B-swa": _r(_B, "40 epochs, weights averaged over the last 15 (no early stopping)",
                train={"epochs": 40, "swa_epochs": 15}),
    "B-speed": _r(_B, "+ 2 audio copies per training clip at speed 0.8-1.25 (resampled; no gain, no noise)",
                  train={"augmentation": _SPEED}),
    "B-wide": _r(_B, "channels 96,160,160", arch={"channels": (96, 160, 160)}),
}


def add_recipe(name: str, spec: str) -> None:
    """Register a recipe from JSON: ``{"base": "A0", "what": "...", "features": {}, "train": {}, "arch": {}}``."""
    d = json.loads(spec)
    if not isinstance(d, dict):
        raise ValueError(f"the JSON must be an object, got a {type(d).__name__}")
    unknown = set(d) - {"base", "what", "features", "train", "arch"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; a recipe has base, what, features, train, arch")
    if d.get("base", "A0") not in RECIPES:
        raise ValueError(f"unknown base recipe {d.get('base')!r}")
    base = RECIPES[d.get("base", "A0")]
    arch, base_name = d.get("arch", {}), base["arch"].get("name", "cnn")
    same_architecture = arch.get("name", base_name) == base_name  # another one starts from its own preset's sizes
    RECIPES[name] = {"what": d.get("what", spec), "features": {**base["features"], **d.get("features", {})},
                     "train": {**base["train"], **d.get("train", {})},
                     "arch": {**(base["arch"] if same_architecture else {}), **arch}}


def _configs(recipe: dict, seed: int):
    from edge_sdk.features import FeatureConfig
    from models.architectures import preset
    from models.features import Augmentation
    from models.train import TrainConfig

    # log-mel with speaker normalisation unless the recipe says otherwise (it may change either)
    features = FeatureConfig(**{"kind": "logmel", "speaker_norm": True, **recipe["features"]})
    sizes = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe["arch"].items() if k != "name"}
    arch = preset(recipe["arch"].get("name", "cnn"), **sizes)  # "name": another architecture than the CNN
    train = dict(recipe["train"])
    if "augmentation" in train:
        train["augmentation"] = Augmentation(**train["augmentation"], seed=seed)
    return features, TrainConfig(**train, seed=seed), arch


def nemo_subset(k: int, seed: int) -> tuple[str, ...]:
    """``k`` of the six non-test nEMO speakers (:data:`NEMO_DEV`), drawn with ``seed``: a learning curve's training
    speakers (``run --task B --refit --nemo-speakers K``)."""
    if not 0 <= k <= len(NEMO_DEV):
        raise ValueError(f"nemo speakers must be 0..{len(NEMO_DEV)}, got {k}")
    pick = np.random.default_rng(seed).choice(len(NEMO_DEV), size=k, replace=False)
    return tuple(NEMO_DEV[i] for i in sorted(pick))


def _split(task: str, refit: bool = False, cv_fold: int | None = None, nemo_train: tuple[str, ...] | None = None):
    """(train, validation, test, calm reference clips); ``refit``: the validation speakers train too and there is
    no validation (the recipe's epochs all run); ``cv_fold`` (task B): fold K of :data:`NEMO_CV_FOLDS` and RAVDESS
    19-20 are the "test" part, the rest of the non-test speakers train, no validation; ``nemo_train`` (task B refit):
    only these non-test nEMO speakers train (the others are not used at all)."""
    from models.cross_corpus import _calm_clips, _clips
    from models.datasets import split_by_speaker

    if nemo_train is not None and (task != "B" or not refit or cv_fold is not None or set(nemo_train) - set(NEMO_DEV)):
        raise ValueError(f"nemo_train is for task B with refit (no cv_fold), of {NEMO_DEV}; got task {task}, refit "
                         f"{refit}, cv_fold {cv_fold}, {nemo_train}")
    ravdess, nemo = _clips()
    r_rest, r_test = split_by_speaker(ravdess, list(RAVDESS_TEST))
    r_train, r_val = split_by_speaker(r_rest, list(RAVDESS_CV))
    if cv_fold is not None:
        if task != "B" or refit or not 0 <= cv_fold < len(NEMO_CV_FOLDS):
            raise ValueError(f"cv_fold is for task B without refit, 0..{len(NEMO_CV_FOLDS) - 1}; got task {task}, "
                             f"refit {refit}, fold {cv_fold}")
        n_rest, _ = split_by_speaker(nemo, list(NEMO_TEST))
        n_train, n_held = split_by_speaker(n_rest, list(NEMO_CV_FOLDS[cv_fold]))
        return r_train + n_train, [], r_val + n_held, _calm_clips()
    if task == "A":
        return (r_rest, [], r_test + nemo, _calm_clips()) if refit else (r_train, r_val, r_test + nemo,
                                                                           _calm_clips())
    n_rest, n_test = split_by_speaker(nemo, list(NEMO_TEST))
    if nemo_train is not None:
        n_rest = [c for c in n_rest if c.speaker in nemo_train]
    if refit:
        return r_rest + n_rest, [], r_test + n_test, _calm_clips()
    n_train, n_val = split_by_speaker(n_rest, ["nemo-WR0"])
    return r_train + n_train, r_val + n_val, r_test + n_test, _calm_clips()


def _scores(y: np.ndarray, pred: np.ndarray) -> dict:
    from models.metrics import classification_report

    rep = classification_report(y, pred, list(LABELS))
    return {"uar": rep["uar"], "accuracy": rep["accuracy"], "n": int(len(y)),
            "recall": {k: rep["per_class"][k]["recall"] for k in LABELS}}


def _row_name(name: str, refit: bool, cv_fold: int | None = None, nemo_speakers: int | None = None) -> str:
    """A refit's rows, export folders and logits are NAME-refit (NAME-refit-nemoK with K nEMO training speakers), a
    cross-validation fold's NAME-cvK: they never overwrite the recipe's own."""
    base = f"{name}-refit" if refit else f"{name}-cv{cv_fold}" if cv_fold is not None else name
    return base if nemo_speakers is None else f"{base}-nemo{nemo_speakers}"


def run_one(task: str, name: str, seed: int, cache: Path, export: Path | None = None,
            trainable_embedding: bool = False, save_logits: Path | None = None, refit: bool = False,
            cv_fold: int | None = None, nemo_speakers: int | None = None) -> dict:
    from models.features import NEUTRAL_REFERENCES, compute_features
    from models.train import train_baseline

    recipe = RECIPES[name]
    features, config, arch = _configs(recipe, seed)
    nemo_train = nemo_subset(nemo_speakers, seed) if nemo_speakers is not None else None
    train, val, test, calm = _split(task, refit, cv_fold, nemo_train)
    if (refit or cv_fold is not None) and config.patience and not config.swa_epochs:
        log.info("no validation, so all %d epochs run (patience %d unused)", config.epochs, config.patience)
    row_name = _row_name(name, refit, cv_fold, nemo_speakers)
    out_dir = export / f"{row_name}-seed{seed}" if export else None
    result = train_baseline(train, val, test, features=features, architecture=arch, config=config, cache_dir=cache,
                            out_dir=out_dir, progress=False, dataset_name=f"recipe {name} (task {task})",
                            reference_clips=calm if config.speaker_reference in NEUTRAL_REFERENCES else (),
                            trainable_embedding=trainable_embedding)
    rep = result.report
    norm = result.metadata.normalization  # what the model trained with (augmented copies included)
    test_fs = compute_features(test, features, cache_dir=cache)
    x = test_fs.model_inputs(features, norm)  # test speakers: all their own clips
    logits = result.head.predict(result.encoder.predict(x, batch_size=256, verbose=0), batch_size=256, verbose=0)
    pred = np.argmax(logits, axis=1)
    y = test_fs.labels(list(LABELS))
    # the validation UAR of the model as kept (with swa_epochs: the averaged weights, not the best epoch seen)
    val_fs = compute_features(val, features, cache_dir=cache)
    ref = None
    if config.speaker_reference != "all":
        own = {c.speaker for c in train} | {c.speaker for c in val}
        extra = compute_features([c for c in calm if c.speaker in own], features, cache_dir=cache) \
            if config.speaker_reference in NEUTRAL_REFERENCES else None
        ref = val_fs.reference_stats(config.speaker_reference, extra)
    xv = val_fs.model_inputs(features, norm, ref)
    val_logits = (result.head.predict(result.encoder.predict(xv, batch_size=256, verbose=0), verbose=0) if len(xv)
                  else np.zeros((0, len(LABELS)), np.float32))
    pv = np.argmax(val_logits, axis=1)
    yv = val_fs.labels(list(LABELS))
    final_val = _val_uar(yv, pv, [c.speaker for c in val_fs.clips]) if len(yv) else None
    spk = np.array([c.speaker for c in test_fs.clips])
    if save_logits is not None:  # per-clip logits of the test and validation clips, for ensembles (no pickle)
        save_logits.mkdir(parents=True, exist_ok=True)
        np.savez(save_logits / f"{row_name}-seed{seed}.npz", speakers=spk.astype(str), labels=y, logits=logits,
                 paths=np.array([str(c.path) for c in test_fs.clips]),
                 val_speakers=np.array([c.speaker for c in val_fs.clips]),
                 val_paths=np.array([str(c.path) for c in val_fs.clips]), val_labels=yv,
                 val_logits=val_logits)
    row = {"task": task, "recipe": row_name, "seed": seed,
           "what": recipe["what"] + ("; refit: validation speakers train too, all epochs run" if refit else ""),
           "features": recipe["features"],
           "train": recipe["train"], "arch": recipe["arch"], "epochs_run": rep["epochs_run"],
           "best_val_uar": rep["best_val_uar"], "final_val_uar": final_val,
           "params": rep["encoder_params"] + rep["head_params"],
           "seconds_per_epoch": rep["seconds_per_epoch"], "val_speakers": rep["split"]["val_speakers"],
           **(_cv_scores(cv_fold, spk, y, pred) if cv_fold is not None else _group_scores(task, spk, y, pred))}
    if cv_fold is not None:
        row.update(base_recipe=name, cv_fold=cv_fold)
    if nemo_train is not None:
        row.update(base_recipe=name, nemo_train=list(nemo_train))
    return row


def _cv_scores(fold: int, spk: np.ndarray, y: np.ndarray, pred: np.ndarray) -> dict:
    """A cross-validation fold's scores: its two nEMO speakers and RAVDESS 19-20."""
    groups = {"nemo_cv": np.isin(spk, NEMO_CV_FOLDS[fold]), "ravdess_cv": np.isin(spk, RAVDESS_CV)}
    return {g: _scores(y[m], pred[m]) for g, m in groups.items()}


def cv_table(rows: list[dict]) -> str:
    """Cross-validated recipes side by side: per recipe and seed, the mean over folds of the held-out nEMO pair's
    UAR and of RAVDESS 19-20's, and paired differences against the first recipe on the same folds and seeds."""
    rows = [r for r in rows if "cv_fold" in r]
    if not rows:
        return ""
    names = list(dict.fromkeys(r["base_recipe"] for r in rows))
    cell = {(r["base_recipe"], r["seed"], r["cv_fold"]): r for r in rows}
    lines = ["| recipe | folds x seeds | nEMO held-out pair UAR | RAVDESS 19-20 UAR* | mean of the two* | "
             f"paired vs {names[0]}: nEMO | RAVDESS* | mean* |", "| --- " * 8 + "|"]
    for name in names:
        keys = sorted(k for k in cell if k[0] == name)
        shared = [k for k in keys if (names[0], *k[1:]) in cell]

        def values(n, group, ks):
            return np.array([cell[(n, *k[1:])][group]["uar"] for k in ks])

        n, r = values(name, "nemo_cv", keys), values(name, "ravdess_cv", keys)
        parts = [f"| {name} | {len(keys)} | {_mean_se(n)} | {_mean_se(r)} | {_mean_se((n + r) / 2)} |"]
        for group in ("nemo_cv", "ravdess_cv", None):
            if name == names[0] or len(shared) < 2:
                parts.append(" - |")
                continue
            if group is None:
                d = (values(name, "nemo_cv", shared) + values(name, "ravdess_cv", shared)
                     - values(names[0], "nemo_cv", shared) - values(names[0], "ravdess_cv", shared)) / 2
            else:
                d = values(name, group, shared) - values(names[0], group, shared)
            parts.append(f" {100 * d.mean():+.1f} ± {100 * d.std(ddof=1) / np.sqrt(len(d)):.1f} |")
        lines.append("".join(parts))
    return ("\n".join(lines) + "\n\n* RAVDESS 19-20 are the same two actors in every fold: their standard errors over "
            "folds are not over independent speakers and understate the uncertainty; the nEMO pairs differ by fold.\n")


def _val_uar(y: np.ndarray, pred: np.ndarray, speakers) -> float:
    """The validation UAR as selection reads it: the mean of each corpus's UAR over its validation speakers."""
    corpus = np.array([s.split("-", 1)[0] for s in speakers])
    return float(np.mean([_scores(y[corpus == k], pred[corpus == k])["uar"] for k in sorted(set(corpus.tolist()))]))


def _group_scores(task: str, spk: np.ndarray, y: np.ndarray, pred: np.ndarray) -> dict:
    """Scores of the reported speaker groups: RAVDESS and nEMO test speakers; for task A also nEMO dev and all of
    nEMO."""
    groups = {"ravdess_test": np.isin(spk, RAVDESS_TEST), "nemo_test": np.isin(spk, NEMO_TEST)}
    if task == "A":
        groups["nemo_dev"] = np.isin(spk, NEMO_DEV)
        groups["nemo_all"] = np.char.startswith(spk.astype(str), "nemo-")
    return {g: _scores(y[m], pred[m]) for g, m in groups.items()}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ensemble_rows(task: str, name: str, seeds: list[int], size: int, logits_dir: Path,
                  refit: bool = False) -> list[dict]:
    """Rows for ensembles of ``size`` models of one recipe (disjoint groups of ``seeds``, in order; seeds left over
    are named in a warning): each clip's class probabilities averaged over the group's models, scored like a single
    run. The row's ``seed`` is the group's index (the table's seeds column shows these indices); ``members`` names
    its seeds. ``refit``: the logits of ``run --refit`` (``NAME-refit-seed<N>.npz``; no validation figure)."""
    if size < 1 or len(seeds) < size:
        raise ValueError(f"an ensemble of {size} needs at least {size} seeds, got {len(seeds)}")
    if len(seeds) % size:
        log.warning("ensembles of %d: seeds %s left out", size, seeds[len(seeds) - len(seeds) % size:])
    rows = []
    for g in range(len(seeds) // size):
        members = seeds[g * size:(g + 1) * size]
        runs = []
        for s in members:  # strings are unicode arrays: no pickle
            with np.load(logits_dir / f"{_row_name(name, refit)}-seed{s}.npz") as f:
                runs.append({k: f[k] for k in f.files})
        for r in runs[1:]:
            if any(not np.array_equal(r[k], runs[0][k]) for k in ("paths", "val_paths", "labels", "val_labels")):
                raise ValueError(f"{name}: the seeds' logits are of different clips")
        probs = np.mean([_softmax(r["logits"]) for r in runs], axis=0)
        val_probs = np.mean([_softmax(r["val_logits"]) for r in runs], axis=0)
        row = {"task": task, "recipe": f"{_row_name(name, refit)}-ens{size}", "seed": g, "members": members,
               "what": f"{RECIPES[name]['what']}{'; refit' if refit else ''}; ensemble of {size} seeds "
                       "(probabilities averaged)",
               "features": RECIPES[name]["features"], "train": RECIPES[name]["train"], "arch": RECIPES[name]["arch"],
               "final_val_uar": _val_uar(runs[0]["val_labels"], np.argmax(val_probs, axis=1),
                                         runs[0]["val_speakers"]) if len(runs[0]["val_labels"]) else None,
               "params": None,
               **_group_scores(task, runs[0]["speakers"], runs[0]["labels"], np.argmax(probs, axis=1))}
        rows.append(row)
    return rows


def _val(r: dict) -> float:
    return r["final_val_uar"] if "final_val_uar" in r else r["best_val_uar"]


def _mean_se(values) -> str:
    if any(x is None for x in values):  # a refit has no validation
        return "-"
    v = np.asarray(values, float)
    if len(v) < 2:
        return f"{v.mean():.3f}"
    return f"{v.mean():.3f} ± {v.std(ddof=1) / np.sqrt(len(v)):.3f}"


def table(rows: list[dict], task: str) -> str:
    rows = [r for r in rows if r["task"] == task and "cv_fold" not in r]
    if task == "A":
        head = ("| recipe | what changes from A0 | seeds | selection: nEMO 6 dev speakers UAR "
                "| lowest dev class recall (mean over seeds) | RAVDESS 19-20 val UAR | nEMO IC0/MK0/TP0 UAR "
                "| all nEMO UAR | all nEMO recall "
                "a / h / n / s | lowest all-nEMO class recall in any seed | RAVDESS 21-24 UAR |")
        lines = [head, "| --- " * 11 + "|"]
    else:
        head = ("| recipe | what changes from B0 | seeds | selection: validation UAR (RAVDESS 19-20, nEMO WR0) "
                "| nEMO IC0/MK0/TP0 UAR | RAVDESS 21-24 UAR | params |")
        lines = [head, "| --- " * 7 + "|"]
    for name in dict.fromkeys(r["recipe"] for r in rows):
        rs = sorted([r for r in rows if r["recipe"] == name], key=lambda r: r["seed"])
        seeds = ",".join(str(r["seed"]) for r in rs)
        what = rs[0]["what"]
        if task == "A":
            dev_low = min(np.mean([r["nemo_dev"]["recall"][k] for r in rs]) for k in LABELS)
            rec = " / ".join(f"{np.mean([r['nemo_all']['recall'][k] for r in rs]):.2f}" for k in LABELS)
            low = min(min(r["nemo_all"]["recall"].values()) for r in rs)
            lines.append(f"| {name} | {what} | {seeds} | {_mean_se([r['nemo_dev']['uar'] for r in rs])} | "
                         f"{dev_low:.2f} | {_mean_se([_val(r) for r in rs])} | "
                         f"{_mean_se([r['nemo_test']['uar'] for r in rs])} | "
                         f"{_mean_se([r['nemo_all']['uar'] for r in rs])} | {rec} | {low:.2f} | "
                         f"{_mean_se([r['ravdess_test']['uar'] for r in rs])} |")
        else:
            lines.append(f"| {name} | {what} | {seeds} | {_mean_se([_val(r) for r in rs])} | "
                         f"{_mean_se([r['nemo_test']['uar'] for r in rs])} | "
                         f"{_mean_se([r['ravdess_test']['uar'] for r in rs])} | {rs[0]['params'] or 0:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.recipe_search", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("run", "table", "ensemble"))
    p.add_argument("--task", choices=("A", "B"), default="A")
    p.add_argument("--recipes", default="A0")
    p.add_argument("--define", action="append", default=[], metavar="NAME=JSON",
                   help='extra recipe, e.g. A-x={"base": "A0", "train": {"freq_warp": 0.1}}')
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", type=Path, default=Path("docs/results/recipe-search"))
    p.add_argument("--export", type=Path, default=None, help="export each model to EXPORT/<recipe>-seed<N>/")
    p.add_argument("--cache", type=Path, default=Path(".cache/features"))
    p.add_argument("--trainable-embedding", action="store_true",
                   help="export with the encoder's embedding layer in the trainable head (the deep head)")
    p.add_argument("--save-logits", type=Path, default=None, metavar="DIR",
                   help="run: write DIR/<recipe>-seed<N>.npz with every test and validation clip's logits; "
                        "ensemble: read them")
    p.add_argument("--size", type=int, default=3, help="ensemble: models per ensemble (disjoint groups of seeds)")
    p.add_argument("--refit", action="store_true",
                   help="run: the validation speakers train too, no validation, every epoch of the recipe runs "
                        "(set them with a --define'd recipe); the row's recipe, export folder and logits are "
                        "NAME-refit; ensemble: of those logits")
    p.add_argument("--cv-folds", default=None, metavar="K,K",
                   help="run, task B: cross-validation folds (0-2) instead of the usual split: fold K's two nEMO "
                        "speakers and RAVDESS 19-20 are scored after every epoch of the recipe has run on the rest of "
                        "the non-test speakers (rows NAME-cvK); the named test speakers are not scored")
    p.add_argument("--nemo-speakers", type=int, default=None, metavar="K",
                   help="run --task B --refit: only K of the six non-test nEMO speakers train, drawn with each seed "
                        "(a learning curve; rows NAME-refit-nemoK name them); the named test speakers are scored")
    args = p.parse_args(argv)
    if args.cv_folds is not None and (args.command != "run" or args.task != "B" or args.refit):
        p.error("--cv-folds is for run --task B, without --refit")
    if args.nemo_speakers is not None and (args.command != "run" or args.task != "B" or not args.refit
                                           or not 0 <= args.nemo_speakers <= len(NEMO_DEV)):
        p.error(f"--nemo-speakers is for run --task B --refit, 0..{len(NEMO_DEV)}; got {args.nemo_speakers}")
    folds = [None]  # the usual split
    if args.cv_folds is not None:
        try:
            folds = [int(k) for k in args.cv_folds.split(",")]
        except ValueError:
            folds = []
        if not folds or any(not 0 <= k < len(NEMO_CV_FOLDS) for k in folds):
            p.error(f"--cv-folds takes fold numbers 0..{len(NEMO_CV_FOLDS) - 1} separated by commas, "
                    f"got {args.cv_folds!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # every argument is checked here, before the first of what may be hours of runs
    for d in args.define:
        name, _, spec = d.partition("=")
        previous = RECIPES.get(name)
        try:
            if not name or not spec:
                raise ValueError("it is not NAME=JSON")
            add_recipe(name, spec)
            _configs(RECIPES[name], 0)  # the recipe's settings are valid (FeatureConfig, TrainConfig, preset)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            if previous is None:  # a built-in recipe of that name stays as it was
                RECIPES.pop(name, None)
            else:
                RECIPES[name] = previous
            p.error(f"--define {d[:200]!r}: {exc!r:.300}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        p.error(f"--seeds takes non-negative integers separated by commas, got {args.seeds!r}")
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if args.command != "table" and (not names or unknown):
        p.error(f"--recipes: unknown {unknown or '(none given)'}; known: {', '.join(sorted(RECIPES))} (or --define)")
    if args.command == "ensemble" and args.size < 1:
        p.error(f"--size must be at least 1, got {args.size}")
    results = args.out / "results.jsonl"
    if args.command == "table" and not results.is_file():
        p.error(f"no {results} to make tables of (run first, or name the folder with --out)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "table":
        rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
        text = "## Task A\n\n" + table(rows, "A") + "\n## Task B\n\n" + table(rows, "B")
        cv = cv_table(rows)
        if cv:
            text += "\n## Task B, cross-validated on non-test speakers (--cv-folds)\n\n" + cv
        (args.out / "tables.md").write_text(text)
        print(text)
        return 0
    if args.command == "ensemble":
        if args.save_logits is None:
            p.error("ensemble reads the logits of --save-logits DIR")
        for name in names:
            for row in ensemble_rows(args.task, name, seeds, args.size, args.save_logits, args.refit):
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                logging.info("%s: val %s | %s", row["recipe"], _mean_se([row["final_val_uar"]]),
                             {g: round(row[g]["uar"], 3) for g in ("nemo_dev", "nemo_test", "nemo_all",
                                                                   "ravdess_test") if g in row})
        return 0
    for name in names:
        for seed in seeds:
            for fold in folds:
                row = run_one(args.task, name, seed, args.cache, args.export, args.trainable_embedding,
                              args.save_logits, args.refit, fold, args.nemo_speakers)
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                logging.info("%s seed %d: val %s | %s", row["recipe"], seed, _mean_se([row["final_val_uar"]]),
                             {g: round(row[g]["uar"], 3) for g in ("nemo_dev", "nemo_test", "nemo_all",
                                                                   "ravdess_test", "nemo_cv", "ravdess_cv")
                              if g in row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
