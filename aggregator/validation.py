"""The validation gate: a candidate model is evaluated on a server-side validation set before it is published.

Configured with ``VALIDATION_MANIFEST`` (a CSV ``path,speaker,label``, the
same format as ``fedser-train``'s manifest) and ``VALIDATION_MARGIN``. The
encoder of a base is frozen, so the embeddings of the validation clips are
computed once per base (device features, TFLite ``infer``) and cached in
``<instance>/validation/`` as ``.npz`` (no pickle): a cache each host builds
for itself from the model files in the database and the validation clips
(which every host that may close a round mounts at the same path); judging a
round's candidate head then takes milliseconds. A candidate whose UAR is more than the
margin below the current version's is refused, with both figures in the reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from aggregator.registry import BlobStore, current_version, head_arrays, load_manifest
from edge_sdk.errors import ParameterError
from edge_sdk.manifest import Manifest
from edge_sdk.model import ModelMetadata, TFLiteModel
from edge_sdk.signing import SigningKey
from edge_sdk.storage import atomic_write
from models.datasets import LabelMap, manifest_clips
from models.evaluate import device_inputs
from models.metrics import classification_report

log = logging.getLogger("aggregator")

__all__ = ["Validator"]


class Validator:
    def __init__(self, manifest_csv: str | os.PathLike, cache_dir: str | os.PathLike, blobs: BlobStore,
                 key: SigningKey, *, margin: float = 0.02) -> None:
        # Absolute now, so that the clips' relative paths (relative to the manifest's folder, the one rule of
        # models.datasets.manifest_clips) do not depend on the directory a worker runs in later.
        self.csv = Path(manifest_csv).resolve()
        if not self.csv.is_file():
            raise ParameterError(f"VALIDATION_MANIFEST not found: {self.csv}")
        self.csv_sha = hashlib.sha256(self.csv.read_bytes()).hexdigest()[:16]
        self.cache_dir = Path(cache_dir)
        self.blobs, self.key, self.margin = blobs, key, float(margin)
        self._lock = threading.Lock()

    def _embeddings(self, tflite: bytes, metadata: ModelMetadata) -> tuple[TFLiteModel, np.ndarray, np.ndarray]:
        """(model loaded from ``tflite``, embeddings [N, E], label indices [N]) of the validation clips."""
        sha = hashlib.sha256(tflite).hexdigest()
        tmp_dir = self.cache_dir / "models"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        model_path = tmp_dir / f"{sha}.tflite"
        if not model_path.exists():
            atomic_write(model_path, tflite)
        model = TFLiteModel(model_path, metadata)
        cache = self.cache_dir / f"emb-{sha[:24]}-{self.csv_sha}.npz"
        if cache.exists():
            with np.load(cache, allow_pickle=False) as data:
                return model, data["emb"], data["labels"]
        labels = list(metadata.labels)
        clips = manifest_clips(self.csv, label_map=LabelMap(tuple(labels)))
        kept, inputs, skipped_by = device_inputs(clips, metadata)
        skipped = sum(skipped_by.values())
        emb = [model.infer(x)[1] for x in inputs]
        ys = [labels.index(c.label) for c in kept]
        if not emb:
            raise ParameterError(f"no clip of the validation set {self.csv} could be read ({skipped} skipped)")
        emb_arr, ys_arr = np.stack(emb).astype(np.float32), np.asarray(ys, np.int64)
        with tempfile.NamedTemporaryFile(dir=self.cache_dir, suffix=".npz", delete=False) as f:
            np.savez(f, emb=emb_arr, labels=ys_arr)
        os.replace(f.name, cache)
        log.info("validation embeddings of base %s: %d clips (%d skipped)", sha[:12], len(ys), skipped)
        return model, emb_arr, ys_arr

    def evaluate(self, tflite: bytes, metadata: ModelMetadata, head: dict) -> dict:
        with self._lock:
            model, emb, ys = self._embeddings(tflite, metadata)
            model.set_weights(head)
            pred = np.argmax(model.head_probs(emb), axis=1)
        report = classification_report(ys, pred, list(metadata.labels))
        return {k: report[k] for k in ("accuracy", "uar", "macro_f1", "num_examples")}

    def _verdict(self, candidate: dict, current: dict | None) -> tuple[bool, dict]:
        detail = {"candidate": candidate, "current": current, "margin": self.margin, "set": str(self.csv)}
        if current is not None and candidate["uar"] < current["uar"] - self.margin:
            detail["reason"] = (f"validation UAR would drop from {current['uar']:.3f} to {candidate['uar']:.3f}, "
                                f"more than the margin {self.margin:.3f}")
            return False, detail
        return True, detail

    def gate(self, manifest: Manifest, new_head: dict) -> tuple[bool, dict]:
        """Round close: the candidate head on the round's base against the base version's own head."""
        tflite = self.blobs.get(manifest.base.sha256)
        current = self.evaluate(tflite, manifest.metadata, head_arrays(self.blobs, manifest))
        candidate = self.evaluate(tflite, manifest.metadata, new_head)
        return self._verdict(candidate, current)

    def check_base(self, session, tflite: bytes, metadata: ModelMetadata) -> tuple[bool, dict]:
        """New base: its own head against the current version (on the current version's base)."""
        from aggregator.registry import initial_head

        candidate = self.evaluate(tflite, metadata, initial_head(tflite, metadata))
        row = current_version(session)
        current = None
        if row is not None:
            m = load_manifest(row, self.key)
            current = self.evaluate(self.blobs.get(m.base.sha256), m.metadata, head_arrays(self.blobs, m))
        return self._verdict(candidate, current)
