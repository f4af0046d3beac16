"""``fedser-train``: train a baseline on a speaker-independent split and export it.

    fedser-train --out runs/cnn [--data ../shared/data/ravdess | --synthetic]
                 [--test-speakers 21,22,23,24] [--val-speakers 19,20] [--epochs 30]

Writes ``model.tflite``, ``model.json`` (metadata), ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main", "report_markdown", "resolve_corpus"]


def resolve_corpus(data: str | None, synthetic: bool, work_dir: Path):
    """(clips, name): the RAVDESS folder given or found, else the labelled synthetic corpus."""
    from models.datasets import default_ravdess_root, ravdess_clips, synthetic_corpus

    if not synthetic:
        root = Path(data) if data else default_ravdess_root()
        if root is not None:
            return ravdess_clips(root), f"RAVDESS ({root})"
        if data:
            raise SystemExit(f"data folder not found: {data}")
    clips = synthetic_corpus(work_dir / "synthetic-audio")
    return clips, "SYNTHETIC tones (no real corpus found; figures say nothing about emotion recognition)"


def _speakers(text: str, clips) -> list[str]:
    names = sorted({c.speaker for c in clips})
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        match = [n for n in names if n == item or n.endswith(f"-{int(item):02d}" if item.isdigit() else item)]
        if not match:
            raise SystemExit(f"speaker {item!r} is not in the corpus (speakers: {', '.join(names[:8])}...)")
        out.extend(match)
    return out


def report_markdown(report: dict) -> str:
    lines = [f"# Baseline report: {report['architecture']['name']} on {report['dataset']}", ""]
    split = report["split"]
    lines += [f"- train speakers: {len(split['train_speakers'])} ({split['train_clips']} clips); "
              f"validation: {', '.join(split['val_speakers'])}; test: {', '.join(split['test_speakers'])} "
              f"({split['test_clips']} clips)",
              f"- hardware: {report['hardware']['device']} ({report['hardware']['cpu']}), "
              f"TensorFlow {report['hardware']['tensorflow']}",
              f"- epochs run: {report['epochs_run']}, {report['seconds_per_epoch']:.2f} s/epoch, "
              f"training {report['train_seconds']:.1f} s, features {report['feature_seconds']:.1f} s",
              f"- skipped files: {report['skipped']}", ""]
    test = report.get("test")
    if test:
        lines += [f"**Test (held-out speakers): accuracy {test['accuracy']:.3f}, UAR {test['uar']:.3f}, "
                  f"macro-F1 {test['macro_f1']:.3f}**", "",
                  "| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
        for lab, m in test["per_class"].items():
            lines.append(f"| {lab} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
        lines += ["", "Confusion matrix (rows true, columns predicted: " + ", ".join(test["labels"]) + ")", ""]
        lines += ["    " + " ".join(f"{v:4d}" for v in row) for row in test["confusion_matrix"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedser-train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=None, help="RAVDESS folder (default: ../shared/data/ravdess)")
    parser.add_argument("--synthetic", action="store_true", help="use the labelled synthetic corpus")
    parser.add_argument("--test-speakers", default="21,22,23,24")
    parser.add_argument("--val-speakers", default="19,20")
    parser.add_argument("--architecture", default="cnn", choices=("cnn", "dnn"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(".cache/features"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from models.architectures import ArchitectureConfig
    from models.datasets import split_by_speaker
    from models.train import TrainConfig, train_baseline

    clips, name = resolve_corpus(args.data, args.synthetic, args.out)
    if args.synthetic or name.startswith("SYNTHETIC"):
        speakers = sorted({c.speaker for c in clips})
        test_spk, val_spk = speakers[-2:], speakers[-3:-2]
    else:
        test_spk, val_spk = _speakers(args.test_speakers, clips), _speakers(args.val_speakers, clips)
    train, test = split_by_speaker(clips, test_spk)
    train, val = split_by_speaker(train, val_spk)
    result = train_baseline(train, val, test, architecture=ArchitectureConfig(name=args.architecture),
                            config=TrainConfig(epochs=args.epochs, seed=args.seed), cache_dir=args.cache,
                            out_dir=args.out, dataset_name=name)
    (args.out / "report.json").write_text(json.dumps(result.report, indent=2))
    (args.out / "report.md").write_text(report_markdown(result.report))
    print(report_markdown(result.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
