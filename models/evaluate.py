"""Evaluate an exported ``.tflite`` on any corpus or manifest, exactly as a device runs it.

Audio goes through ``edge_sdk`` (its reader, its numpy features, the model's
normalisation) and the model's ``infer`` signature on the TFLite runtime: the
figures are those of the artefact that ships, not of the Keras model.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_sdk.audio import load_audio
from edge_sdk.errors import AudioError, ParameterError
from edge_sdk.features import extract
from edge_sdk.model import ModelMetadata, TFLiteModel
from models.datasets import Clip
from models.metrics import classification_report

log = logging.getLogger("models")

__all__ = ["evaluate_tflite", "metadata_path_for"]


def metadata_path_for(model_path: str | os.PathLike) -> Path:
    """``model.json`` beside ``model.tflite``."""
    path = Path(model_path)
    meta = path.with_suffix(".json")
    if not meta.is_file():
        raise ParameterError(f"no metadata {meta.name} beside {path} (export writes both)")
    return meta


def evaluate_tflite(model_path: str | os.PathLike, clips: Sequence[Clip], *, dataset_name: str = "",
                    num_threads: int = 1) -> dict:
    """An evaluation report of the model on ``clips``; unreadable clips are skipped and counted."""
    model_path = Path(model_path)
    meta = ModelMetadata.load(metadata_path_for(model_path))
    model = TFLiteModel(model_path, meta, num_threads=num_threads)
    labels = list(meta.labels)
    y_true, y_pred, skipped, speakers = [], [], Counter(), set()
    started = time.perf_counter()
    for clip in clips:
        if clip.label not in labels:
            skipped["label_not_in_model"] += 1
            continue
        try:
            y = load_audio(clip.path, sample_rate=meta.features.sample_rate)
            if len(y) < meta.features.n_fft:
                raise AudioError("too short")
            x = extract(y, meta.features, meta.normalization)
        except (AudioError, ParameterError) as exc:
            reason = str(exc)
            key = ("missing" if "not found" in reason else "empty" if "empty" in reason or "no samples" in reason
                   else "too_short" if "too short" in reason else "corrupt")
            log.warning("skipping %s: %s", clip.path, reason)
            skipped[key] += 1
            continue
        probs, _ = model.infer(x)
        y_true.append(labels.index(clip.label))
        y_pred.append(int(np.argmax(probs)))
        speakers.add(clip.speaker)
    if not y_true:
        raise ParameterError(f"no clip of {dataset_name or 'the corpus'} could be evaluated (skipped: {dict(skipped)})")
    return {
        "kind": "evaluation",
        "model": str(model_path),
        "model_sha256": meta.extra.get("tflite_sha256", ""),
        "architecture": meta.architecture,
        "dataset": dataset_name,
        "speakers": sorted(speakers),
        "skipped": dict(skipped),
        "runtime": model.runtime,
        "seconds": time.perf_counter() - started,
        "test": classification_report(y_true, y_pred, labels),
    }
