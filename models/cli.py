"""``fedser-train``: baseline training, evaluation and architecture comparison.

    fedser-train train    --out runs/cnn [--corpus ravdess --data DIR | --synthetic]
                          [--architecture cnn] [--test-speakers 21,22,23,24 --val-speakers 19,20 | --folds 5 --fold 0]
    fedser-train evaluate --model runs/cnn/model.tflite --corpus manifest --data clips.csv --out runs/eval
    fedser-train compare  --out runs/compare [--architectures dnn,cnn,lstm,afcn] [--folds 5]

``train`` writes ``model.tflite``, ``model.json`` (metadata), ``report.json``,
``report.md`` and ``report-confusion.png``. ``fedser-train --out DIR`` (no
subcommand) means ``train``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main", "resolve_corpus", "corpus_clips"]

DEFAULT_TEST_SPEAKERS = "21,22,23,24"
DEFAULT_VAL_SPEAKERS = "19,20"
# named test speakers of each corpus: never trained on, never validating, whatever the command
CORPUS_TEST_SPEAKERS = {"ravdess": ("21", "22", "23", "24"), "nemo": ("IC0", "MK0", "TP0")}
CORPUS_VAL_SPEAKERS = {"ravdess": ("19", "20")}


def corpus_list(corpus: str) -> list[str]:
    """``ravdess,nemo`` -> ``["ravdess", "nemo"]``, each a known corpus, no repeats."""
    from models.datasets import CORPORA

    names = [c.strip().lower() for c in corpus.split(",") if c.strip()]
    if not names:
        raise SystemExit("--corpus names no corpus")
    for name in names:
        if name not in CORPORA:
            raise SystemExit(f"unknown corpus {name!r}; choose from {', '.join(sorted(CORPORA))} (comma-separated)")
    if len(set(names)) != len(names):
        raise SystemExit(f"--corpus names a corpus twice: {corpus}")
    if len(names) > 1 and "manifest" in names:
        raise SystemExit("a manifest cannot be combined with other corpora (list them in the manifest instead)")
    return names


def data_roots(data: str | None, corpora: list[str]) -> dict[str, Path | None]:
    """The folder of each corpus: ``--data DIR`` (one corpus), ``--data DIR1,DIR2`` (in --corpus order) or
    ``--data ravdess=DIR1,nemo=DIR2``; a corpus not given is found where ``default_corpus_root`` looks."""
    from models.datasets import default_corpus_root

    given: dict[str, str] = {}
    items = [d.strip() for d in (data or "").split(",") if d.strip()] if len(corpora) > 1 else (
        [data] if data else [])
    if items and all("=" in d and d.split("=", 1)[0].strip().lower() in corpora for d in items):
        given = {d.split("=", 1)[0].strip().lower(): d.split("=", 1)[1].strip() for d in items}
    elif items:
        if len(items) != len(corpora):
            raise SystemExit(f"--data names {len(items)} folders for {len(corpora)} corpora ({', '.join(corpora)}); "
                             "give one per corpus in order, or name=DIR pairs")
        given = dict(zip(corpora, items, strict=True))
    return {c: Path(given[c]) if c in given else default_corpus_root(c) for c in corpora}


def resolve_corpus(data: str | None, synthetic: bool, work_dir: Path, *, corpus: str = "ravdess", label_map=None):
    """(clips, name): the corpora given or found (RAVDESS by default; ``ravdess,nemo`` for several, speaker ids
    prefixed by corpus), else the labelled synthetic corpus."""
    from models.datasets import LabelMap, corpus_guidance, load_corpus, synthetic_corpus

    label_map = label_map or LabelMap()
    corpora = corpus_list(corpus)
    if not synthetic:
        roots = data_roots(data, corpora)
        if all(root is not None for root in roots.values()):
            clips, names = [], []
            for kind, root in roots.items():
                if not root.exists():
                    raise SystemExit(f"data not found: {root}\n{corpus_guidance([kind])}")
                clips += load_corpus(kind, root, label_map)
                names.append(f"{kind.upper() if kind != 'nemo' else 'nEMO'} ({root})")
            return clips, " + ".join(names)
        missing = [c for c, r in roots.items() if r is None]
        if data or corpora != ["ravdess"]:
            raise SystemExit(f"no folder for {', '.join(missing)}: give --data (corpus {corpus})\n"
                             + corpus_guidance(missing))
        print(corpus_guidance() + "\nWithout one, this run uses a labelled SYNTHETIC tone corpus (a pipeline check: "
              "its figures say nothing about emotion recognition).", file=sys.stderr, flush=True)
    clips = synthetic_corpus(work_dir / "synthetic-audio", labels=label_map.classes)
    return clips, "SYNTHETIC tones (no real corpus found; figures say nothing about emotion recognition)"


def _speakers(text: str, clips) -> list[str]:
    names = sorted({c.speaker for c in clips})
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        match = [n for n in names if n == item or n.endswith(f"-{int(item):02d}" if item.isdigit() else f"-{item}")]
        if not match:
            raise SystemExit(f"speaker {item!r} is not in the corpus (speakers: {', '.join(names[:8])}...)")
        out.extend(match)
    return out


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    from models.datasets import CORPORA

    g = p.add_argument_group("corpus")
    g.add_argument("--corpus", default="ravdess",
                   help=f"on-disk layout of --data, one of {', '.join(sorted(CORPORA))} (manifest: a CSV "
                        "path,speaker,label[,split]); several comma-separated, e.g. ravdess,nemo")
    g.add_argument("--data", default=None,
                   help="corpus folder or manifest CSV; for several corpora DIR1,DIR2 or ravdess=DIR1,nemo=DIR2 "
                        "(default: ../shared/data/ravdess, ../shared/data/nemo, or $FEDSER_RAVDESS, $FEDSER_NEMO)")
    g.add_argument("--synthetic", action="store_true", help="use the labelled synthetic corpus (pipeline tests only)")
    g.add_argument("--classes", default="angry,happy,neutral,sad")
    g.add_argument("--calm-as-neutral", action="store_true", help="RAVDESS calm joins neutral (default: left out)")
    g.add_argument("--no-excited-as-happy", action="store_true", help="IEMOCAP excitement stays out of happy")


def _add_split_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speaker-independent split")
    g.add_argument("--test-speakers", default=None,
                   help=f"held-out speakers (default RAVDESS {DEFAULT_TEST_SPEAKERS}, nEMO IC0,MK0,TP0; these "
                        "named test speakers are held out whatever is given)")
    g.add_argument("--val-speakers", default=None,
                   help=f"speakers that pick the epoch (RAVDESS default {DEFAULT_VAL_SPEAKERS}); 'none': every "
                        "non-test speaker trains and all --epochs run (a refit once the recipe is chosen)")
    g.add_argument("--folds", type=int, default=0, help="k folds by speaker instead of named test speakers")
    g.add_argument("--fold", type=int, default=0, help="which fold to train (with --folds)")
    g.add_argument("--test-corpora", default=None,
                   help="every speaker of these corpora is a test speaker (leave-one-corpus-out), e.g. nemo")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from edge_sdk.features import UTTERANCE_NORMS

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=40)
    g.add_argument("--patience", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--learning-rate", type=float, default=1e-3)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--augment", type=int, default=0, metavar="COPIES",
                   help="augmented copies per training clip (speed, gain, noise); 0 = off")
    g.add_argument("--augment-speed", default="0.9,1.1", metavar="LO,HI", help="--augment copies: speed factor range")
    g.add_argument("--augment-gain-db", default="-6,6", metavar="LO,HI", help="--augment copies: gain range (dB)")
    g.add_argument("--augment-snr-db", default="15,40", metavar="LO,HI",
                   help="--augment copies: white-noise SNR range (dB; 90,90: no noise)")
    g.add_argument("--spec-augment", type=int, default=0, metavar="MASKS",
                   help="SpecAugment: time and frequency masks per training example; 0 = off")
    g.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="mixup of training pairs; 0 = off")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--swa-epochs", type=int, default=0, metavar="N",
                   help="train every epoch (no early stopping) and keep the average weights of the last N; 0 = off")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine: the learning rate falls along a half cosine to 0 over --epochs")
    g.add_argument("--freq-warp", type=float, default=0.0, metavar="W",
                   help="feature augmentation: mel axis read at f * a, a in [1-W, 1+W], redrawn per epoch; 0 = off")
    g.add_argument("--time-stretch", type=float, default=0.0, metavar="S",
                   help="feature augmentation: frames read at t * r, r in [1-S, 1+S]; 0 = off")
    g.add_argument("--spectral-tilt", type=float, default=0.0, metavar="T",
                   help="feature augmentation: a random tilt across the bands, up to +-T normalised units; 0 = off")
    g.add_argument("--offset-shrink", type=float, default=0.0, metavar="O",
                   help="feature augmentation: each clip's mean frame (its offset from the speaker's reference) "
                        "times a in [1-O, 1], a weaker expression; 0 = off")
    g.add_argument("--spread-shrink", type=float, default=0.0, metavar="P",
                   help="feature augmentation: each band's spread over time pulled toward the speaker's by up to "
                        "P; 0 = off")
    g.add_argument("--reference-blend", type=float, default=0.0, metavar="B",
                   help="with --speaker-reference other than all: training inputs blend the reference's "
                        "normalisation with all-clips normalisation, weight of the latter up to B; 0 = off")
    g.add_argument("--mixed-precision", choices=("auto", "on", "off"), default="auto")
    # the defaults are the front end every shipped model uses (docs/results/recipe-search/stop31: paired over seeds
    # 0-2 on the bundled split, validation UAR +9.7 +- 2.1 points over MFCC with no per-utterance normalisation)
    g.add_argument("--features", choices=("mfcc", "logmel"), default="logmel",
                   help="40 log-mel bands (default) or MFCCs (as in the prior studies)")
    g.add_argument("--utterance-norm", choices=UTTERANCE_NORMS, default="level",
                   help="per-utterance normalisation (level, the default: remove the recording's gain only; none: "
                        "keep it)")
    g.add_argument("--pitch", action="store_true",
                   help="two more feature columns: pitch in semitones and periodicity (numpy, on the device too)")
    g.add_argument("--speaker-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="normalise with each speaker's own statistics (a device keeps its user's running ones)")
    from models.features import SPEAKER_REFERENCES

    g.add_argument("--speaker-reference", choices=SPEAKER_REFERENCES, default="all",
                   help="training and validation speakers' normalisation statistics from all their clips, their "
                        "neutral clips only (RAVDESS: and calm), all with every class weighing the same, or the "
                        "neutral clips' mean with all clips' spread (test speakers and devices: always all their "
                        "clips)")
    g.add_argument("--max-frames", type=int, default=300)
    g.add_argument("--masked-pooling", action="store_true",
                   help="cnn/dnn: pool over the utterance's frames only, not the zero padding")
    g.add_argument("--cache", type=Path, default=Path(".cache/features"), help="feature cache folder")
    g.add_argument("--no-progress", action="store_true")


def corpus_clips(args, work_dir: Path):
    from models.datasets import LabelMap

    label_map = LabelMap(tuple(filter(None, (c.strip() for c in args.classes.split(",")))),
                         calm_as_neutral=args.calm_as_neutral, excited_as_happy=not args.no_excited_as_happy)
    clips, name = resolve_corpus(args.data, args.synthetic, work_dir, corpus=args.corpus, label_map=label_map)
    return clips, name, label_map


def named_test_speakers(clips) -> list[str]:
    """The speaker ids among ``clips`` that are a corpus's named test speakers (RAVDESS 21-24, nEMO IC0, MK0,
    TP0): they never train or validate, in any command."""
    names = {f"{corpus}-{spk}" for corpus, spks in CORPUS_TEST_SPEAKERS.items() for spk in spks}
    return sorted({c.speaker for c in clips} & names)


def _default_val(train, corpora: list[str], seed: int) -> list[str]:
    """Validation speakers from each corpus's training speakers: RAVDESS 19 and 20, else one (up to 8 training
    speakers) or two drawn with the seed."""
    from models.compare import validation_speakers
    from models.datasets import corpus_of

    out = []
    for corpus in sorted({corpus_of(c.speaker) for c in train}):
        part = [c for c in train if corpus_of(c.speaker) == corpus]
        fixed = [f"{corpus}-{s}" for s in CORPUS_VAL_SPEAKERS.get(corpus, ())]
        if fixed and all(any(c.speaker == f for c in part) for f in fixed):
            out += fixed
        else:
            count = 1 if len({c.speaker for c in part}) <= 8 else 2
            out += validation_speakers(part, count=count, seed=seed)
    return out if len(corpora) > 1 else out or validation_speakers(train)


def _split(args, clips):
    """(train, val, test) holding out whole speakers; every corpus's named test speakers are always in test
    (or, with --folds, left out of every fold)."""
    from models.compare import validation_speakers
    from models.datasets import corpus_of, manifest_split, speaker_folds, split_by_speaker

    corpora = corpus_list(args.corpus)
    synthetic = all(c.speaker.startswith("synthetic-") for c in clips)
    named = named_test_speakers(clips)
    test_corpora = corpus_list(args.test_corpora) if getattr(args, "test_corpora", None) else []
    no_validation = (args.val_speakers or "").strip().lower() == "none"
    if no_validation:
        args = argparse.Namespace(**{**vars(args), "val_speakers": None})
    if args.folds:
        if not 0 <= args.fold < args.folds:
            raise SystemExit(f"--fold must be in 0..{args.folds - 1}")
        pool = [c for c in clips if c.speaker not in named]
        train, test = speaker_folds(pool, args.folds, seed=args.seed)[args.fold]
        val_spk = _speakers(args.val_speakers, train) if args.val_speakers else validation_speakers(train)
    elif args.corpus == "manifest" and args.test_speakers is None and all(c.split for c in clips):
        train, val, test = manifest_split(clips)
        return (train + val, [], test) if no_validation else (train, val, test)
    elif synthetic and args.test_speakers is None:
        speakers = sorted({c.speaker for c in clips})
        train, test = split_by_speaker(clips, speakers[-2:])
        val_spk = speakers[-3:-2]
    else:
        if args.test_speakers is None and not named and not test_corpora:
            raise SystemExit("name --test-speakers (or --folds K) for this corpus")
        test_spk = set(_speakers(args.test_speakers, clips) if args.test_speakers else named) | set(named)
        test_spk |= {c.speaker for c in clips if corpus_of(c.speaker) in test_corpora}
        train, test = split_by_speaker(clips, test_spk)
        if not train:
            raise SystemExit("every speaker is a test speaker: nothing left to train on")
        val_spk = _speakers(args.val_speakers, train) if args.val_speakers else _default_val(train, corpora, args.seed)
    if no_validation:
        return train, [], test
    train, val = split_by_speaker(train, val_spk)
    return train, val, test


def split_summary(train, val, test) -> dict:
    """Who trains, validates and tests, with clip counts in all and per corpus (``train --dry-run``; the names
    match the training report's ``split``)."""
    from models.datasets import corpus_of

    parts = {"train": train, "val": val, "test": test}
    out = {f"{part}_speakers": sorted({c.speaker for c in clips}) for part, clips in parts.items()}
    out.update({f"{part}_clips": len(clips) for part, clips in parts.items()})
    corpora = sorted({corpus_of(c.speaker) for clips in parts.values() for c in clips})
    out["clips_by_corpus"] = {corpus: {part: sum(corpus_of(c.speaker) == corpus for c in clips)
                                       for part, clips in parts.items()} for corpus in corpora}
    return out


def _pair(text: str, option: str = "the range") -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option} takes two numbers LO,HI, got {text!r}") from None
    return lo, hi


def _configs(args):
    """(FeatureConfig, TrainConfig) of the command line; a value out of range is a SystemExit naming it, before
    any corpus is read."""
    try:
        return _build_configs(args)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"fedser-train: error: {exc}") from None


def _build_configs(args):
    from edge_sdk.features import FeatureConfig
    from models.features import Augmentation
    from models.train import TrainConfig

    features = FeatureConfig(kind=args.features, utterance_norm=args.utterance_norm, max_frames=args.max_frames,
                             speaker_norm=args.speaker_norm, pitch=args.pitch)
    config = TrainConfig(epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, seed=args.seed, mixed_precision=args.mixed_precision,
                         spec_augment=args.spec_augment, mixup=args.mixup, label_smoothing=args.label_smoothing,
                         augmentation=Augmentation(copies=args.augment, seed=args.seed,
                                                   speed=_pair(args.augment_speed, "--augment-speed"),
                                                   gain_db=_pair(args.augment_gain_db, "--augment-gain-db"),
                                                   snr_db=_pair(args.augment_snr_db, "--augment-snr-db")),
                         speaker_reference=args.speaker_reference, lr_schedule=args.lr_schedule,
                         swa_epochs=args.swa_epochs,
                         freq_warp=args.freq_warp, time_stretch=args.time_stretch, spectral_tilt=args.spectral_tilt,
                         offset_shrink=args.offset_shrink, spread_shrink=args.spread_shrink,
                         reference_blend=args.reference_blend)
    return features, config


def _calm_reference(args, clips) -> list:
    """With ``--speaker-reference neutral`` and RAVDESS among the corpora: RAVDESS's calm clips, which join
    their actor's normalisation statistics only (RAVDESS has 4 neutral clips per actor, too few alone)."""
    from models.datasets import LabelMap, load_corpus
    from models.features import NEUTRAL_REFERENCES

    if args.speaker_reference not in NEUTRAL_REFERENCES or args.synthetic or "ravdess" not in corpus_list(args.corpus):
        return []
    root = data_roots(args.data, corpus_list(args.corpus))["ravdess"]
    if root is None or not any(c.speaker.startswith("ravdess-") for c in clips):
        return []
    return [c for c in load_corpus("ravdess", root, LabelMap(("calm", "neutral"))) if c.label == "calm"]


def cmd_train(args) -> int:
    from models.architectures import preset
    from models.report import report_markdown
    from models.train import check_device_options, train_baseline

    try:  # refused before the corpus is read and its features computed
        check_device_options(args.architecture, args.masked_pooling, input_affine_from=args.input_affine_from,
                             trainable_embedding=args.trainable_embedding)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    features, config = _configs(args)
    clips, name, label_map = corpus_clips(args, args.out)
    train, val, test = _split(args, clips)
    if args.dry_run:  # the split a run would use, before minutes of training
        print(json.dumps(split_summary(train, val, test), indent=1))
        return 0
    arch = preset(args.architecture, **({"masked_pooling": True} if args.masked_pooling else {}))
    result = train_baseline(train, val, test, features=features, architecture=arch,
                            config=config, labels=label_map.classes, cache_dir=args.cache, out_dir=args.out,
                            dataset_name=name, label_map=label_map.to_dict(),
                            progress=False if args.no_progress else None,
                            reference_clips=_calm_reference(args, clips),
                            trainable_embedding=args.trainable_embedding,
                            device_learning_rate=args.device_learning_rate,
                            input_affine_from=args.input_affine_from)
    print(report_markdown(result.report))
    made = "model.tflite, model.json" if result.export is not None else "trained.npz, trained.json"
    print(f"wrote {args.out}/{made}, report.json, report.md, report-confusion.png")
    return 0


def cmd_evaluate(args) -> int:
    from models.evaluate import evaluate_tflite
    from models.report import report_markdown, write_report

    clips, name, _ = corpus_clips(args, args.out)
    if args.speakers:
        keep = set(_speakers(args.speakers, clips))
        clips = [c for c in clips if c.speaker in keep]
    elif args.corpus == "manifest" and any(c.split for c in clips):
        clips = [c for c in clips if c.split == "test"]
    report = evaluate_tflite(args.model, clips, dataset_name=name, num_threads=args.threads)
    write_report(report, args.out, stem="evaluation")
    print(report_markdown(report))
    print(f"wrote {args.out}/evaluation.json, evaluation.md, evaluation-confusion.png")
    return 0


def cmd_compare(args) -> int:
    from models.compare import compare_architectures, compare_markdown, write_comparison
    from models.datasets import speaker_folds

    if args.val_speakers:  # refused before the corpus is read
        raise SystemExit("compare picks each fold's validation speakers itself; --val-speakers is for train")
    features, config = _configs(args)
    clips, name, label_map = corpus_clips(args, args.out)
    named = set(named_test_speakers(clips))  # RAVDESS 21-24, nEMO IC0/MK0/TP0: in no fold
    folds = speaker_folds([c for c in clips if c.speaker not in named], args.folds or 5, seed=args.seed)
    archs = [a.strip() for a in args.architectures.split(",") if a.strip()]
    report = compare_architectures(folds, archs, features=features, config=config, labels=label_map.classes,
                                   masked_pooling=args.masked_pooling,
                                   cache_dir=args.cache, dataset_name=name,
                                   progress=False if args.no_progress else None)
    report["label_map"] = label_map.to_dict()
    write_comparison(report, args.out)
    print(compare_markdown(report))
    print(f"wrote {args.out}/compare.json, compare.md, confusion-*.png")
    return 0


def cmd_replay(args) -> int:
    from models.evaluate import add_replay_set

    clips, name, _ = corpus_clips(args, args.model.parent)
    keep = set(_speakers(args.speakers, clips))
    counts = add_replay_set(args.model, [c for c in clips if c.speaker in keep], per_class=args.per_class,
                            seed=args.seed)
    print(f"replay set of {sum(counts.values())} embeddings ({counts}) from {name}, speakers {sorted(keep)}, "
          f"written into the metadata of {args.model}")
    return 0


def cmd_reexport(args) -> int:
    from models.export import reexport_tflite

    if args.out.resolve() == args.model.parent.resolve() and args.name == args.model.stem:
        raise SystemExit("reexport: --out and --name would overwrite --model; write elsewhere and compare first")
    result = reexport_tflite(args.model, None, args.out, name=args.name, input_affine_from=args.input_affine_from)
    print(f"re-exported {args.model} -> {result.tflite_path} ({result.size} bytes, sha256 {result.sha256})")
    return 0


def cmd_export(args) -> int:
    from models.export import export_trained

    result = export_trained(args.trained, args.out)
    print(f"wrote {result.tflite_path} ({result.size} bytes, sha256 {result.sha256[:12]}) and {result.metadata_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from models.architectures import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="fedser-train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one architecture on a speaker-independent split and export it")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true",
                   help="print the split (speakers and clips of train, validation and test, per corpus) and stop "
                        "(clips as listed: one whose audio cannot be read is skipped later, in training)")
    p.add_argument("--architecture", default="cnn", choices=ARCHITECTURES)
    p.add_argument("--trainable-embedding", action="store_true",
                   help="cnn/dnn: the exported head includes the encoder's embedding layer, so devices fine-tune "
                        "and federate it too (infer's embedding is then the pooled vector)")
    p.add_argument("--device-learning-rate", type=float, default=None,
                   help="SGD rate written into the model's metadata for devices' federated updates (a device policy "
                        "that sets one wins); default 0.01 with --trainable-embedding, none otherwise (devices: 0.05)")
    p.add_argument("--input-affine-from", type=int, default=None,
                   help="cnn: devices fit a per-user input affine from this many answers (metadata "
                        "input_affine_from; validated for the bundled recipe, on both corpora, at 20: "
                        "docs/results/personalisation-study/stop22 and stop27); default: off")
    _add_corpus_args(p)
    _add_split_args(p)
    _add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate", help="evaluate an exported .tflite (as a device runs it) on a corpus or manifest")
    p.add_argument("--model", type=Path, required=True, help="model.tflite (model.json beside it)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--speakers", default=None, help="only these speakers (default: all, or a manifest's test split)")
    p.add_argument("--threads", type=int, default=1)
    _add_corpus_args(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("compare", help="all architectures side by side on k folds by speaker (the benchmark)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--architectures", default=",".join(ARCHITECTURES))
    _add_corpus_args(p)
    _add_split_args(p)
    _add_train_args(p)
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("replay", help="add a replay set (training embeddings per class) to an exported model")
    p.add_argument("--model", type=Path, required=True, help="model.tflite (model.json beside it is rewritten)")
    p.add_argument("--speakers", required=True, help="the model's training speakers, e.g. 1,2,...,18")
    p.add_argument("--per-class", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    _add_corpus_args(p)
    p.set_defaults(func=cmd_replay)
    p = sub.add_parser("export", help="export a model trained where TensorFlow was missing (KERAS_BACKEND=jax or "
                                      "torch): its trained.npz and trained.json -> model.tflite, model.json")
    p.add_argument("--trained", type=Path, required=True, help="the training run's --out folder")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: the --trained folder)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("reexport", help="rebuild an exported cnn model from its .tflite and export it again with "
                                        "every signature this version writes (input_grad among them)")
    p.add_argument("--model", type=Path, required=True, help="model.tflite (model.json beside it)")
    p.add_argument("--out", type=Path, required=True, help="the folder to write model.tflite and model.json into")
    p.add_argument("--name", default="model", help="file names in --out (default model)")
    p.add_argument("--input-affine-from", type=int, default=None,
                   help="write into the metadata: devices fit the per-user input affine from this many answers "
                        "unless their policy says otherwise (only for a model you validated it on)")
    p.set_defaults(func=cmd_reexport)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")  # `fedser-train --out DIR` as before
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from edge_sdk.errors import FedserError

    try:
        return args.func(args)
    except FedserError as exc:
        print(f"fedser-train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
