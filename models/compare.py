"""The architectures side by side on speaker-independent folds, with the studies' figures for reference.

``fedser-train compare`` trains every architecture on every fold (whole
speakers held out for test, two more for validation), and writes
``compare.json``, ``compare.md`` and a pooled confusion-matrix PNG per
architecture.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_sdk.features import FeatureConfig
from models.architectures import preset
from models.datasets import FOUR_CLASSES, Clip, split_by_speaker
from models.metrics import classification_report
from models.report import hardware_line

log = logging.getLogger("models")

__all__ = ["PRIOR_WORK", "compare_architectures", "compare_markdown", "corpus_markdown", "validation_speakers",
           "write_comparison"]

# shared/notes/prior-work.md: the bar to clear (none of it is speaker-independent RAVDESS 4-class except study 3)
PRIOR_WORK = [
    {"study": "1 (Chau & Garces)", "data": "IEMOCAP 4-class", "model": "dense", "setup": "centralised",
     "accuracy": 0.26, "uar": None, "macro_f1": 0.22},
    {"study": "1 (Chau & Garces)", "data": "IEMOCAP 4-class", "model": "CNN", "setup": "centralised",
     "accuracy": 0.32, "uar": None, "macro_f1": 0.16},
    {"study": "1 (Chau & Garces)", "data": "IEMOCAP 4-class", "model": "LSTM", "setup": "centralised",
     "accuracy": 0.41, "uar": None, "macro_f1": 0.31},
    {"study": "1 (Chau & Garces)", "data": "IEMOCAP 4-class", "model": "dense", "setup": "federated, random split",
     "accuracy": 0.51, "uar": None, "macro_f1": 0.49},
    {"study": "2 (Latif et al.)", "data": "IEMOCAP 4-class", "model": "LSTM", "setup": "federated, 200 rounds",
     "accuracy": None, "uar": 0.548, "macro_f1": None},
    {"study": "3 (Gans et al.)", "data": "RAVDESS 4-class, 5 folds", "model": "attention-FCN",
     "setup": "centralised", "accuracy": 0.512, "uar": 0.419, "macro_f1": None},
]


def validation_speakers(train: Sequence[Clip], count: int = 2, *, seed: int = 0) -> list[str]:
    """``count`` training speakers (seeded) to pick the best epoch on; they leave training."""
    speakers = sorted({c.speaker for c in train})
    if len(speakers) <= count:
        return speakers[:1]
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(speakers, size=count, replace=False).tolist())


def compare_architectures(
    folds: Sequence[tuple[list[Clip], list[Clip]]],
    architectures: Sequence[str] = ("dnn", "cnn", "lstm", "afcn"),
    *,
    features: FeatureConfig = FeatureConfig(),
    config=None,
    labels: Sequence[str] = FOUR_CLASSES,
    cache_dir: str | os.PathLike | None = None,
    dataset_name: str = "",
    progress: bool | None = None,
    masked_pooling: bool = False,
) -> dict:
    """Train each architecture on each (train, test) fold; per-fold and pooled test metrics."""
    from models.train import TrainConfig, train_baseline

    config = config or TrainConfig()
    results = {}
    for name in architectures:
        arch = preset(name, **({"masked_pooling": True} if masked_pooling and name in ("cnn", "dnn") else {}))
        folds_out, true_all, pred_all, corpus_cm = [], [], [], {}
        started = time.perf_counter()
        for i, (train, test) in enumerate(folds):
            val_spk = validation_speakers(train, seed=config.seed + i)
            fit, val = split_by_speaker(train, val_spk)
            r = train_baseline(fit, val, test, features=features, architecture=arch, config=config, labels=labels,
                               cache_dir=cache_dir, dataset_name=dataset_name, progress=progress)
            t = r.report["test"]
            cm = np.asarray(t["confusion_matrix"])
            for a in range(len(labels)):
                for b in range(len(labels)):
                    true_all += [a] * int(cm[a, b])
                    pred_all += [b] * int(cm[a, b])
            for corpus, ct in r.report.get("test_by_corpus", {}).items():
                corpus_cm[corpus] = corpus_cm.get(corpus, 0) + np.asarray(ct["confusion_matrix"])
            folds_out.append({"fold": i, "test_speakers": r.report["split"]["test_speakers"], "val_speakers": val_spk,
                              "accuracy": t["accuracy"], "uar": t["uar"], "macro_f1": t["macro_f1"],
                              "epochs_run": r.report["epochs_run"], "seconds_per_epoch": r.report["seconds_per_epoch"],
                              "train_seconds": r.report["train_seconds"]})
            log.info("%s fold %d: UAR %.3f accuracy %.3f", name, i, t["uar"], t["accuracy"])
        pooled = classification_report(true_all, pred_all, labels)
        results[name] = {
            "architecture": arch.to_dict(),
            "params": {"encoder": r.report["encoder_params"], "head": r.report["head_params"]},
            "folds": folds_out,
            "mean": {k: float(np.mean([f[k] for f in folds_out])) for k in ("accuracy", "uar", "macro_f1")},
            "std": {k: float(np.std([f[k] for f in folds_out])) for k in ("accuracy", "uar", "macro_f1")},
            "pooled": pooled,
            "pooled_by_corpus": {corpus: _report_of_confusion(cm, labels) for corpus, cm in sorted(corpus_cm.items())},
            "seconds_per_epoch": float(np.mean([f["seconds_per_epoch"] for f in folds_out])),
            "seconds": time.perf_counter() - started,
        }
    best = max(results, key=lambda n: results[n]["mean"]["uar"])
    return {"kind": "comparison", "dataset": dataset_name, "labels": list(labels), "features": features.to_dict(),
            "train_config": config.to_dict(), "hardware": r.report["hardware"], "folds": len(folds),
            "results": results, "best": best, "prior_work": PRIOR_WORK}


def _report_of_confusion(cm, labels) -> dict:
    cm = np.asarray(cm)
    true = [a for a in range(len(labels)) for b in range(len(labels)) for _ in range(int(cm[a, b]))]
    pred = [b for a in range(len(labels)) for b in range(len(labels)) for _ in range(int(cm[a, b]))]
    return classification_report(true, pred, labels)


def corpus_markdown(by_corpus: dict, labels, title: str = "corpus") -> list[str]:
    """A table of UAR, accuracy and per-class recall per corpus (reports' ``test_by_corpus``)."""
    lines = [f"| {title} | clips | UAR % | accuracy % | " + " | ".join(f"recall {lab} %" for lab in labels) + " |",
             "| --- " * (4 + len(labels)) + "|"]
    for corpus, t in by_corpus.items():
        lines.append(f"| {corpus or '-'} | {t['num_examples']} | {_pct(t['uar'])} | {_pct(t['accuracy'])} | "
                     + " | ".join(_pct(t["per_class"][lab]["recall"]) for lab in labels) + " |")
    return lines


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def compare_markdown(report: dict, *, target_uar: float = 0.70) -> str:
    labels = report["labels"]
    hw = report["hardware"]
    lines = [f"# Architectures on {report['dataset']}", "",
             f"Speaker-independent: {report['folds']} folds by speaker (every speaker tested once, never trained on); "
             f"two training speakers per fold pick the epoch. Hardware: {hardware_line(hw)}.", "",
             "| architecture | params (encoder + head) | UAR % (mean ± sd over folds) | accuracy % | macro-F1 % | "
             + " | ".join(f"F1 {lab} %" for lab in labels) + " | s/epoch |",
             "| --- " * (6 + len(labels)) + "|"]
    for name, r in report["results"].items():
        f1 = [r["pooled"]["per_class"][lab]["f1"] for lab in labels]
        lines.append(
            f"| {name}{' (best)' if name == report['best'] else ''} | {r['params']['encoder']} + {r['params']['head']} "
            f"| {_pct(r['mean']['uar'])} ± {_pct(r['std']['uar'])} | {_pct(r['mean']['accuracy'])} "
            f"| {_pct(r['mean']['macro_f1'])} | " + " | ".join(_pct(v) for v in f1)
            + f" | {r['seconds_per_epoch']:.2f} |")
    best = report["results"][report["best"]]["mean"]["uar"]
    verdict = "meets" if best >= target_uar else "misses"
    lines += ["", f"Best: **{report['best']}, UAR {_pct(best)} %**: {verdict} the {_pct(target_uar)} % target.", "",
              "Per fold (UAR %):", "",
              "| architecture | " + " | ".join(f"fold {i}" for i in range(report["folds"])) + " |",
              "| --- " * (report["folds"] + 1) + "|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | " + " | ".join(_pct(f["uar"]) for f in r["folds"]) + " |")
    if any(len(r.get("pooled_by_corpus", {})) > 1 for r in report["results"].values()):
        lines += ["", "Per corpus, pooled over folds:", ""]
        for name, r in report["results"].items():
            lines += corpus_markdown(r["pooled_by_corpus"], labels, title=f"{name}: corpus") + [""]
    lines += ["", "Reference figures of the studies (shared/notes/prior-work.md; other data and splits, "
              "not directly comparable):", "", "| study | data | model | setup | accuracy % | UAR % | macro-F1 % |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in report["prior_work"]:
        lines.append(f"| {p['study']} | {p['data']} | {p['model']} | {p['setup']} | {_pct(p['accuracy'])} "
                     f"| {_pct(p['uar'])} | {_pct(p['macro_f1'])} |")
    return "\n".join(lines) + "\n"


def write_comparison(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    import json

    from edge_sdk.storage import atomic_write
    from models.report import confusion_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "compare.json", "md": out_dir / "compare.md"}
    for name, r in report["results"].items():
        paths[name] = confusion_png(r["pooled"], out_dir / f"confusion-{name}.png",
                                    title=f"{name}: pooled over folds, UAR {r['pooled']['uar']:.3f}")
    atomic_write(paths["json"], json.dumps(report, indent=2, sort_keys=True).encode())
    atomic_write(paths["md"], compare_markdown(report).encode())
    return paths
