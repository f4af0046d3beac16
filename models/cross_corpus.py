"""Cross-corpus experiments: why a model trained on one corpus fails on another, and leave-one-corpus-out.

    python -m models.cross_corpus ablation --out docs/results/cross-corpus --seeds 0,1,2
    python -m models.cross_corpus loco     --out docs/results/cross-corpus --seeds 0,1,2

``ablation`` trains the CNN on RAVDESS (actors 1-18 train, 19-20 pick the epoch) once per variant and seed,
changing one thing at a time from the bundled model's recipe, and scores each model on RAVDESS actors 21-24 and
on all of nEMO (9 speakers, never trained on). ``loco`` trains on one corpus and tests on the other, both ways:
RAVDESS-only (1-18 train, 19-20 validate) and nEMO-only (the six speakers other than IC0, MK0, TP0; one of them
validates), each scored on the held-out speakers of its own corpus and on the whole other corpus. Named test
speakers (RAVDESS 21-24, nEMO IC0, MK0, TP0) never train or validate. Every figure is a mean over seeds with its
standard error (sd / sqrt(n)); ``results.jsonl`` keeps every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

__all__ = ["VARIANTS", "main", "prior_correction"]

BASE_FEATURES = {"kind": "logmel", "speaker_norm": True}  # log-mel and speaker normalisation, as every shipped model
BASE_TRAIN = {"epochs": 40, "patience": 10}

# name -> (what changes, FeatureConfig changes, TrainConfig changes)
VARIANTS = {
    "base": ("bundled recipe: log-mel, speaker norm, trim 30 dB, 300 frames", {}, {}),
    "level": ("+ per-utterance level (gain) normalisation", {"utterance_norm": "level"}, {}),
    "mean": ("+ per-utterance mean per band (CMN)", {"utterance_norm": "mean"}, {}),
    "meanvar": ("+ per-utterance mean and variance per band", {"utterance_norm": "meanvar"}, {}),
    "global-norm": ("training-set statistics instead of speaker norm", {"speaker_norm": False}, {}),
    "frames-500": ("500 frames (5 s) instead of 300: no clip cut", {"max_frames": 500}, {}),
    "no-trim": ("no silence trimming", {"trim_db": 0.0}, {}),
    "mfcc": ("MFCC instead of log-mel", {"kind": "mfcc"}, {}),
    "gain-aug": ("+ 2 copies per clip with random gain +-12 dB (no speed, no noise)", {},
                 {"augmentation": {"copies": 2, "gain_db": (-12.0, 12.0), "speed": (1.0, 1.0),
                                   "snr_db": (90.0, 90.0)}}),
    "masked": ("masked pooling: the CNN pools over the utterance's frames, not the zero padding", {},
               {"architecture": {"masked_pooling": True}}),
    "level+masked": ("level normalisation + masked pooling", {"utterance_norm": "level"},
                     {"architecture": {"masked_pooling": True}}),
    "level+masked+calm": ("level + masked pooling + RAVDESS calm trains as neutral (tests keep neutral only)",
                          {"utterance_norm": "level"}, {"architecture": {"masked_pooling": True}, "calm": True}),
    "level+speed": ("level normalisation + 2 copies per clip at speed 0.8-1.25 (resampled: tempo and pitch)",
                    {"utterance_norm": "level"},
                    {"augmentation": {"copies": 2, "gain_db": (0.0, 0.0), "speed": (0.8, 1.25),
                                      "snr_db": (90.0, 90.0)}}),
    "level+speed+calm": ("level + speed copies + RAVDESS calm trains as neutral", {"utterance_norm": "level"},
                         {"augmentation": {"copies": 2, "gain_db": (0.0, 0.0), "speed": (0.8, 1.25),
                                           "snr_db": (90.0, 90.0)}, "calm": True}),
    "level+ref-neutral": ("level + training/validation speakers normalised by the statistics of their neutral clips "
                          "(RAVDESS: and calm clips, statistics only)",
                          {"utterance_norm": "level"}, {"speaker_reference": "neutral"}),
    "level+ref-balanced": ("level + training/validation speakers' statistics with every class weighing the same",
                           {"utterance_norm": "level"}, {"speaker_reference": "balanced"}),
    "level+specaug": ("level normalisation + SpecAugment 2 masks", {"utterance_norm": "level"},
                      {"spec_augment": 2}),
}


def _clips():
    from models.datasets import default_nemo_root, default_ravdess_root, load_corpus

    r, n = default_ravdess_root(), default_nemo_root()
    if r is None or n is None:
        raise SystemExit("needs ../shared/data/ravdess and ../shared/data/nemo (or $FEDSER_RAVDESS, $FEDSER_NEMO)")
    return load_corpus("ravdess", r), load_corpus("nemo", n)


def _configs(feat_changes: dict, train_changes: dict, seed: int):
    from edge_sdk.features import FeatureConfig
    from models.architectures import preset
    from models.features import Augmentation
    from models.train import TrainConfig

    features = FeatureConfig(**{**BASE_FEATURES, **feat_changes})
    train_changes = dict(train_changes)
    aug = train_changes.pop("augmentation", None)
    train_changes.pop("calm", None)
    arch = preset("cnn", **train_changes.pop("architecture", {}))
    config = TrainConfig(**{**BASE_TRAIN, **train_changes}, seed=seed)
    if aug:
        config = replace(config, augmentation=Augmentation(**aug, seed=seed))
    return features, config, arch


def _row(name: str, seed: int, report: dict) -> dict:
    out = {"variant": name, "seed": seed, "epochs_run": report["epochs_run"], "best_val_uar": report["best_val_uar"],
           "calibrated_uar": report.get("calibrated", {}),
           "calibrated_recall": report.get("calibrated_recall", {}), "mean_probs": report.get("mean_probs", {})}
    for corpus, t in report["test_by_corpus"].items():
        out[corpus] = {"uar": t["uar"], "accuracy": t["accuracy"],
                       "recall": {k: v["recall"] for k, v in t["per_class"].items()},
                       "confusion_matrix": t["confusion_matrix"], "num_examples": t["num_examples"]}
    return out


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def _fmt(values) -> str:
    m, se = _mean_se(values)
    return f"{m:.3f} ± {se:.3f}" if len(values) > 1 else f"{m:.3f}"


def prior_correction(logits: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Class biases that make the mean predicted probabilities over ``logits`` equal (no label used): what a
    device can compute from its own user's unlabelled clips. Returns the bias to add to the logits."""
    z = np.asarray(logits, np.float64)
    bias = np.zeros(z.shape[1])
    for _ in range(iterations):
        p = np.exp(z + bias - (z + bias).max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        bias -= np.log(p.mean(axis=0) * z.shape[1])
    return bias


def _train(train, val, test, features, config, arch, cache, out_dir=None, name=""):
    """The training report, with ``calibrated`` (per corpus, the UAR after an unsupervised prior correction
    fitted on each test speaker's own clips: :func:`prior_correction`), ``calibrated_recall`` and
    ``mean_probs``."""
    from models.features import NEUTRAL_REFERENCES, compute_features
    from models.metrics import by_corpus
    from models.train import train_baseline

    result = train_baseline(train, val, test, features=features, architecture=arch, config=config, cache_dir=cache,
                            out_dir=out_dir, dataset_name=name, progress=False,
                            reference_clips=_calm_clips() if config.speaker_reference in NEUTRAL_REFERENCES else ())
    report = result.report
    train_fs = compute_features(train, features, cache_dir=cache)
    test_fs = compute_features(test, features, cache_dir=cache)
    x = test_fs.model_inputs(features, train_fs.normalization())
    logits = result.head.predict(result.encoder.predict(x, batch_size=256, verbose=0), batch_size=256, verbose=0)
    corpora = np.array([c.speaker.split("-", 1)[0] for c in test_fs.clips])
    speakers = np.array([c.speaker for c in test_fs.clips])
    labels = report["labels"]
    y = test_fs.labels(labels)
    pred = np.zeros(len(y), int)
    for spk in set(speakers.tolist()):
        z = logits[speakers == spk]
        pred[speakers == spk] = np.argmax(z + prior_correction(z), axis=1)
    mean_probs = {}
    for corpus in set(corpora.tolist()):
        z = logits[corpora == corpus].astype(np.float64)
        p0 = np.exp(z - z.max(axis=1, keepdims=True))
        mean_probs[corpus] = (p0 / p0.sum(axis=1, keepdims=True)).mean(axis=0).tolist()
    cal = by_corpus(test_fs.clips, y, pred, labels)
    report["calibrated"] = {k: v["uar"] for k, v in cal.items()}
    report["calibrated_recall"] = {k: {c: v["per_class"][c]["recall"] for c in labels} for k, v in cal.items()}
    report["mean_probs"] = mean_probs
    return report


def _calm_clips():
    """RAVDESS's calm clips: with ``speaker_reference: neutral`` they join their actor's statistics only."""
    from models.datasets import LabelMap, default_ravdess_root, load_corpus

    return [c for c in load_corpus("ravdess", default_ravdess_root(), LabelMap(("calm", "neutral")))
            if c.label == "calm"]


def _ravdess_training(calm: bool):
    """(train 1-18, validate 19-20, test 21-24) of RAVDESS; with ``calm`` the training and validation clips
    include calm as neutral (the test clips never do)."""
    from models.datasets import LabelMap, default_ravdess_root, load_corpus, split_by_speaker

    ravdess = load_corpus("ravdess", default_ravdess_root(), LabelMap(calm_as_neutral=calm))
    rest, _ = split_by_speaker(ravdess, [f"ravdess-{a}" for a in (21, 22, 23, 24)])
    train, val = split_by_speaker(rest, ["ravdess-19", "ravdess-20"])
    return train, val


def ablation(args) -> list[dict]:
    from models.datasets import split_by_speaker

    ravdess, nemo = _clips()
    _, r_test = split_by_speaker(ravdess, [f"ravdess-{a}" for a in (21, 22, 23, 24)])
    rows = []
    for name in args.variants.split(","):
        _, fch, tch = VARIANTS[name]
        train, val = _ravdess_training(bool(tch.get("calm")))
        for seed in args.seeds:
            features, config, arch = _configs(fch, tch, seed)
            report = _train(train, val, r_test + nemo, features, config, arch, args.cache,
                            name="RAVDESS 1-18 -> RAVDESS 21-24 + nEMO")
            row = _row(name, seed, report)
            rows.append(row)
            logging.info("%s seed %d: RAVDESS 21-24 UAR %.3f, nEMO UAR %.3f recall %s", name, seed,
                         row["ravdess"]["uar"], row["nemo"]["uar"], row["nemo"]["recall"])
            with open(args.out / "results.jsonl", "a") as f:
                f.write(json.dumps({"experiment": "ablation", **row}) + "\n")
    return rows


def _calibrated(rs: list[dict]) -> str:
    """The prior-corrected nEMO UAR and neutral recall: per test speaker in runs that record
    ``calibrated_recall``; earlier runs corrected the whole corpus at once (marked "corpus")."""
    if all(r.get("calibrated_recall") for r in rs):
        return (_fmt([r["calibrated_uar"]["nemo"] for r in rs]) + " | "
                + _fmt([r["calibrated_recall"]["nemo"]["neutral"] for r in rs]))
    if all(r.get("calibrated_uar") for r in rs):
        return _fmt([r["calibrated_uar"]["nemo"] for r in rs]) + " (corpus) | -"
    return "- | -"


def ablation_markdown(rows: list[dict], labels=("angry", "happy", "neutral", "sad")) -> str:
    lines = ["| variant | what changes from the bundled recipe | seeds | RAVDESS 21-24 UAR | nEMO (all 9) UAR | "
             + " | ".join(f"nEMO {lab} recall" for lab in labels) + " | nEMO UAR after prior correction "
             "| nEMO neutral recall after it | nEMO UAR, seed 0 |", "| --- " * (8 + len(labels)) + "|"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        lines.append(f"| {name} | {VARIANTS[name][0]} | {','.join(str(r['seed']) for r in rs)} "
                     f"| {_fmt([r['ravdess']['uar'] for r in rs])} | {_fmt([r['nemo']['uar'] for r in rs])} | "
                     + " | ".join(_fmt([r["nemo"]["recall"][lab] for r in rs]) for lab in labels) + " | "
                     + _calibrated(rs) + " | "
                     + "".join(f"{r['nemo']['uar']:.3f}" for r in rs if r["seed"] == 0) + " |")
    return "\n".join(lines) + "\n"


def loco(args) -> list[dict]:
    from models.compare import validation_speakers
    from models.datasets import split_by_speaker

    ravdess, nemo = _clips()
    _, fch, tch = VARIANTS[args.variant]
    rows = []
    r_rest, r_test = split_by_speaker(ravdess, [f"ravdess-{a}" for a in (21, 22, 23, 24)])
    r_train, r_val = _ravdess_training(bool(tch.get("calm")))
    n_rest, n_test = split_by_speaker(nemo, ["nemo-IC0", "nemo-MK0", "nemo-TP0"])
    for seed in args.seeds:
        features, config, arch = _configs(fch, tch, seed)
        if "ravdess->nemo" in args.directions:
            # RAVDESS only: 1-18 train, 19-20 validate; tested on 21-24 and all of nEMO
            out_dir = args.export / f"seed{seed}" if args.export else None
            rep = _train(r_train, r_val, r_test + nemo, features, config, arch, args.cache, out_dir=out_dir,
                         name="RAVDESS actors 1-18 (19-20 validate)")
            rows.append({"experiment": "loco", "direction": "ravdess->nemo", "variant": args.variant,
                         **_row(args.variant, seed, rep)})
        if "nemo->ravdess" in args.directions:
            # nEMO only: the six speakers other than IC0, MK0, TP0 (one validates); tested on IC0/MK0/TP0 and RAVDESS
            val_spk = validation_speakers(n_rest, count=1, seed=seed)
            train, val = split_by_speaker(n_rest, val_spk)
            rep = _train(train, val, n_test + ravdess, features, config, arch, args.cache, name="nEMO (6 speakers)")
            rows.append({"experiment": "loco", "direction": "nemo->ravdess", "variant": args.variant, "val": val_spk,
                         **_row(args.variant, seed, rep)})
        with open(args.out / "results.jsonl", "a") as f:
            for r in rows[-len(args.directions):]:
                f.write(json.dumps(r) + "\n")
        logging.info("loco seed %d: %s", seed, [(r["direction"], r["ravdess"]["uar"], r["nemo"]["uar"])
                                                 for r in rows[-len(args.directions):]])
    return rows


def loco_markdown(rows: list[dict], labels=("angry", "happy", "neutral", "sad")) -> str:
    lines = ["| trained on | variant | seeds | tested on | UAR (mean ± SE) | accuracy | "
             + " | ".join(f"{lab} recall" for lab in labels) + " |", "| --- " * (6 + len(labels)) + "|"]
    for direction in ("ravdess->nemo", "nemo->ravdess"):
        rs = [r for r in rows if r["direction"] == direction]
        if not rs:
            continue
        src = "RAVDESS 1-18" if direction.startswith("ravdess") else "nEMO EB0, KD0, KS0, MP0, SM0, WR0"
        seeds = ",".join(str(r["seed"]) for r in rs)
        tests = (("ravdess", "RAVDESS 21-24 (in-corpus)"), ("nemo", "**all of nEMO (unseen corpus)**")) \
            if direction.startswith("ravdess") else \
            (("nemo", "nEMO IC0, MK0, TP0 (in-corpus)"), ("ravdess", "**all of RAVDESS (unseen corpus)**"))
        for corpus, title in tests:
            lines.append(f"| {src} | {rs[0]['variant']} | {seeds} | {title} | {_fmt([r[corpus]['uar'] for r in rs])} "
                         f"| {_fmt([r[corpus]['accuracy'] for r in rs])} | "
                         + " | ".join(_fmt([r[corpus]["recall"][lab] for r in rs]) for lab in labels) + " |")
    return "\n".join(lines) + "\n"


def measure(cache) -> str:
    """Per corpus and class, from the bundled recipe's raw log-mel features (trimmed clips): duration, loudness
    relative to the speaker's mean, spectral tilt relative to the speaker, energy peaks per second (a syllable-rate
    proxy) and spectral flux; and the speaker normalisation's prior weight."""
    from edge_sdk.features import FeatureConfig, SpeakerStats
    from models.features import compute_features

    cfg = FeatureConfig(**BASE_FEATURES)
    labels = ("angry", "happy", "neutral", "sad")
    lines = ["| corpus | class | clips | trimmed s (mean) | share cut at 300 frames | level rel. speaker dB "
             "| high-low band tilt rel. speaker dB | energy peaks / s | spectral flux dB/frame |",
             "| --- " * 9 + "|"]
    prior = []
    for name, clips in zip(("RAVDESS", "nEMO"), _clips(), strict=True):
        fs = compute_features(clips, cfg, cache_dir=cache)
        spk = np.array([c.speaker for c in fs.clips])
        lab = np.array([c.label for c in fs.clips])
        frames = np.array([len(r) for r in fs.raw])
        level = np.array([r.mean() for r in fs.raw])
        tilt = np.array([r[:, 20:].mean() - r[:, :20].mean() for r in fs.raw])
        for s in set(spk.tolist()):
            level[spk == s] -= level[spk == s].mean()
            tilt[spk == s] -= tilt[spk == s].mean()
        peaks, flux = [], []
        for r in fs.raw:
            e = np.convolve(r.mean(axis=1), np.ones(5) / 5, "same")
            p = (e[1:-1] > e[:-2]) & (e[1:-1] >= e[2:]) & (e[1:-1] > e.max() - 25)
            peaks.append(p.sum() / (len(r) / 100))
            flux.append(np.abs(np.diff(r, axis=0)).mean())
        peaks, flux = np.array(peaks), np.array(flux)
        for lb in labels:
            m = lab == lb
            lines.append(f"| {name} | {lb} | {m.sum()} | {frames[m].mean() / 100:.2f} | {np.mean(frames[m] > 300):.2f} "
                         f"| {level[m].mean():+.1f} | {tilt[m].mean():+.1f} | {peaks[m].mean():.1f} "
                         f"| {flux[m].mean():.2f} |")
        per_speaker = [frames[spk == s].sum() for s in sorted(set(spk.tolist()))]
        prior.append(f"{name}: {min(per_speaker)}-{max(per_speaker)} frames per speaker, so the "
                     f"{SpeakerStats.PRIOR_FRAMES} prior pseudo-frames weigh "
                     f"{SpeakerStats.PRIOR_FRAMES / (max(per_speaker) + SpeakerStats.PRIOR_FRAMES):.1%}-"
                     f"{SpeakerStats.PRIOR_FRAMES / (min(per_speaker) + SpeakerStats.PRIOR_FRAMES):.1%}")
    return "\n".join(lines) + "\n\n" + "; ".join(prior) + ".\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.cross_corpus", description=__doc__.split("\n")[0])
    p.add_argument("experiment", choices=("ablation", "loco", "tables", "measure"),
                   help="tables: rewrite ablation.md and loco-*.md from every run in OUT/results.jsonl")
    p.add_argument("--out", type=Path, default=Path("docs/results/cross-corpus"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS), help="ablation: which variants")
    p.add_argument("--variant", default="level", help="loco: the recipe")
    p.add_argument("--export", type=Path, default=None, help="loco: export each RAVDESS-only model to EXPORT/seedN")
    p.add_argument("--directions", default="ravdess->nemo,nemo->ravdess", help="loco: which directions")
    p.add_argument("--cache", type=Path, default=Path(".cache/features"))
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.experiment == "measure":
        text = measure(args.cache)
        (args.out / "measurements.md").write_text(text)
        print(text)
        return 0
    if args.experiment == "tables":
        rows = [json.loads(line) for line in (args.out / "results.jsonl").read_text().splitlines() if line.strip()]
        abl = [r for r in rows if r["experiment"] == "ablation"]
        if abl:
            (args.out / "ablation.md").write_text(ablation_markdown(abl))
            print(ablation_markdown(abl))
        for variant in dict.fromkeys(r["variant"] for r in rows if r["experiment"] == "loco"):
            text = loco_markdown([r for r in rows if r["experiment"] == "loco" and r["variant"] == variant])
            (args.out / f"loco-{variant}.md").write_text(text)
            print(text)
        return 0
    if args.experiment == "ablation":
        rows = ablation(args)
        (args.out / f"ablation-{'-'.join(map(str, args.seeds))}.md").write_text(ablation_markdown(rows))
        print(ablation_markdown(rows))
    else:
        rows = loco(args)
        (args.out / f"loco-{args.variant}.md").write_text(loco_markdown(rows))
        print(loco_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
