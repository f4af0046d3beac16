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
from edge_sdk.features import raw_features, speaker_inputs, trim_silence
from edge_sdk.model import ModelMetadata, TFLiteModel
from models.datasets import Clip, per_class_sample
from models.metrics import by_corpus, classification_report

log = logging.getLogger("models")

__all__ = ["evaluate_tflite", "metadata_path_for", "device_inputs"]


def metadata_path_for(model_path: str | os.PathLike) -> Path:
    """``model.json`` beside ``model.tflite``."""
    path = Path(model_path)
    meta = path.with_suffix(".json")
    if not meta.is_file():
        raise ParameterError(f"no metadata {meta.name} beside {path} (export writes both)")
    return meta


def device_inputs(clips: Sequence[Clip], meta: ModelMetadata) -> tuple[list[Clip], list[np.ndarray], Counter]:
    """(clips kept, their model inputs, skip reasons) computed as a device computes them.

    edge_sdk's reader and numpy features; with ``speaker_norm`` each speaker's clips are normalised by that
    speaker's statistics, as a device that has heard them all would.
    """
    cfg = meta.features
    raws: dict[str, list[tuple[Clip, np.ndarray]]] = {}
    skipped: Counter = Counter()
    for clip in clips:
        try:
            y = load_audio(clip.path, sample_rate=cfg.sample_rate)
            if len(y) < cfg.n_fft:
                raise AudioError("too short")
            raw = raw_features(trim_silence(y, cfg), cfg)
        except (AudioError, ParameterError) as exc:
            reason = str(exc)
            key = ("missing" if "not found" in reason else "empty" if "empty" in reason or "no samples" in reason
                   else "too_short" if "too short" in reason else "corrupt")
            log.warning("skipping %s: %s", clip.path, reason)
            skipped[key] += 1
            continue
        raws.setdefault(clip.speaker if cfg.speaker_norm else "", []).append((clip, raw))
    kept, inputs = [], []
    for group in raws.values():
        kept += [c for c, _ in group]
        inputs += speaker_inputs([r for _, r in group], cfg, meta.normalization)
    return kept, inputs, skipped


def evaluate_tflite(model_path: str | os.PathLike, clips: Sequence[Clip], *, dataset_name: str = "",
                    num_threads: int = 1) -> dict:
    """An evaluation report of the model on ``clips``; unreadable clips are skipped and counted."""
    model_path = Path(model_path)
    meta = ModelMetadata.load(metadata_path_for(model_path))
    model = TFLiteModel(model_path, meta, num_threads=num_threads)
    labels = list(meta.labels)
    y_true, y_pred, speakers = [], [], set()
    started = time.perf_counter()
    kept, inputs, skipped = device_inputs([c for c in clips if c.label in labels], meta)
    skipped["label_not_in_model"] = sum(1 for c in clips if c.label not in labels)
    skipped = Counter({k: v for k, v in skipped.items() if v})
    for clip, x in zip(kept, inputs, strict=True):
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
        "test_by_corpus": by_corpus(kept, y_true, y_pred, labels),
    }


def add_replay_set(model_path: str | os.PathLike, clips: Sequence[Clip], *, per_class: int = 32,
                   seed: int = 0) -> dict[str, int]:
    """Write a replay set into the metadata beside ``model_path``: ``per_class`` embeddings per class of
    ``clips`` (the model's *training* clips: server data, never a device's), made by the model's own encoder
    through the device path. For a model exported before ``TrainConfig.replay_per_class`` existed. Returns
    the count per class."""
    model_path = Path(model_path)
    meta_path = metadata_path_for(model_path)
    meta = ModelMetadata.load(meta_path)
    model = TFLiteModel(model_path, meta)
    kept, inputs, _ = device_inputs([c for c in clips if c.label in meta.labels], meta)
    if not kept:
        raise ValueError("no readable clip with one of the model's labels")
    emb = np.stack([model.infer(x)[1] for x in inputs])
    y = np.array([meta.labels.index(c.label) for c in kept])
    picked = per_class_sample(y, per_class, seed)
    meta.extra["replay"] = ModelMetadata.replay_extra(emb[picked], y[picked])
    meta.save(meta_path)
    return {meta.labels[k]: int(np.sum(y[picked] == k)) for k in range(meta.num_classes)}
