"""Reports in the studies' format: JSON, Markdown and a confusion-matrix PNG.

A training report (``train_baseline``) and an evaluation report
(``fedser-train evaluate``) share :func:`write_report`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edge_sdk.storage import atomic_write

__all__ = ["report_markdown", "metrics_markdown", "confusion_png", "write_report"]


def metrics_markdown(test: dict, title: str = "Test (held-out speakers)") -> list[str]:
    """The accuracy/UAR/macro-F1 line, the per-class table and the confusion matrix as Markdown lines."""
    lines = [f"**{title}: accuracy (WA) {test['accuracy']:.3f}, UAR {test['uar']:.3f}, "
             f"macro-F1 {test['macro_f1']:.3f}** ({test['num_examples']} clips)", "",
             "| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
    for lab, m in test["per_class"].items():
        lines.append(f"| {lab} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    labels = test["labels"]
    lines += ["", "Confusion matrix (rows: true class, columns: predicted)", "",
              "| true \\ predicted | " + " | ".join(labels) + " |", "| --- " * (len(labels) + 1) + "|"]
    for lab, row in zip(labels, test["confusion_matrix"], strict=True):
        lines.append(f"| {lab} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def _skipped_line(skipped: dict) -> str:
    parts = []
    for split, reasons in skipped.items():
        total = sum(reasons.values())
        if total:
            parts.append(f"{split} {total} (" + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) + ")")
    return "; ".join(parts) if parts else "none"


def hardware_line(hw: dict) -> str:
    """"GPU NVIDIA H200 (AMD EPYC, 16 cores), Keras 3.15.1 on jax 0.11.2"; reports from before the backend field
    name TensorFlow."""
    device = hw["device"] + (f" {', '.join(hw['gpus'])}" if hw.get("gpus") else "")
    return (f"{device} ({hw['cpu']}, {hw['cpu_count']} cores), "
            f"{hw.get('framework') or 'TensorFlow ' + str(hw.get('tensorflow', '?'))}")


def report_markdown(report: dict) -> str:
    """Markdown of a training or evaluation report."""
    if report.get("kind") == "evaluation":
        lines = [f"# Evaluation: {report['model']} on {report['dataset']}", "",
                 f"- speakers: {len(report['speakers'])}; clips evaluated {report['test']['num_examples']}",
                 f"- skipped files: {_skipped_line({'eval': report['skipped']})}",
                 f"- runtime: {report['runtime']}, {report['seconds']:.1f} s", ""]
        lines += metrics_markdown(report["test"], "Evaluation")
        return "\n".join(lines + _by_corpus_lines(report)) + "\n"
    arch = report["architecture"]
    lines = [f"# Baseline report: {arch['name']} on {report['dataset']}", ""]
    split = report["split"]
    hw = report["hardware"]
    validation = (f"validation {', '.join(split['val_speakers'])} ({split['val_clips']})" if split["val_speakers"]
                  else "no validation (fixed epochs)")
    best = "" if report["best_val_uar"] is None else f" (best validation UAR {report['best_val_uar']:.3f})"
    lines += [f"- split (speaker-independent): {len(split['train_speakers'])} train speakers "
              f"({split['train_clips']} clips), {validation}, "
              f"test {', '.join(split['test_speakers'])} ({split['test_clips']} clips)",
              f"- classes: {', '.join(report['labels'])}; label map: {report.get('label_map', {})}",
              *([f"- export: {report['export']}"] if report.get("export") else []),
              f"- hardware: {hardware_line(hw)}"
              + (", mixed precision" if report.get("mixed_precision") else ""),
              f"- epochs run: {report['epochs_run']}{best}; "
              f"{report['seconds_per_epoch']:.2f} s/epoch; training {report['train_seconds']:.1f} s; "
              f"features {report['feature_seconds']:.1f} s",
              f"- augmentation: {report.get('augmentation') or 'off'}",
              f"- parameters: encoder {report.get('encoder_params', '?')}, head {report.get('head_params', '?')}",
              f"- skipped files: {_skipped_line(report['skipped'])}", ""]
    if report.get("test"):
        lines += metrics_markdown(report["test"]) + _by_corpus_lines(report)
    return "\n".join(lines) + "\n"


def _by_corpus_lines(report: dict) -> list[str]:
    """Per-corpus UAR, accuracy and recalls (``test_by_corpus``), with each corpus's confusion matrix."""
    from models.compare import corpus_markdown

    by = report.get("test_by_corpus") or {}
    if not by:
        return []
    labels = report["test"]["labels"]
    lines = ["", "Per corpus (speaker ids prefixed by corpus):", ""] + corpus_markdown(by, labels)
    if len(by) > 1:
        for corpus, t in by.items():
            lines += ["", f"{corpus}: rows true, columns predicted ({', '.join(labels)}): "
                      + "; ".join(f"{lab} {row}" for lab, row in zip(labels, t["confusion_matrix"], strict=True))]
    return lines


def confusion_png(test: dict, path: str | os.PathLike, title: str = "") -> Path:
    """A confusion-matrix heat map (row-normalised colour, counts written in each cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(test["confusion_matrix"], dtype=float)
    labels = test["labels"]
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.1 * len(labels) + 1.5), dpi=110)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_title(title or f"UAR {test['uar']:.3f}, accuracy {test['accuracy']:.3f}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: str | os.PathLike, *, stem: str = "report") -> dict[str, Path]:
    """``<stem>.json``, ``<stem>.md`` and, when there is a test result, ``<stem>-confusion.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    if report.get("test"):
        paths["png"] = confusion_png(report["test"], out_dir / f"{stem}-confusion.png")
        report = {**report, "confusion_png": paths["png"].name}
    atomic_write(paths["json"], json.dumps(report, indent=2, sort_keys=True).encode())
    atomic_write(paths["md"], report_markdown(report).encode())
    return paths
