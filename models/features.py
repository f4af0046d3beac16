"""Training-side features: librosa is the reference implementation.

The feature *definition* is ``edge_sdk.features.FeatureConfig``; this module
computes the spectral part with librosa, and shares silence trimming,
normalisation and the fixed frame count with the device. Results are cached
on disk as ``.npz`` (``allow_pickle=False``) keyed by the feature config and
the clip list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_sdk.features import FeatureConfig, Normalization, fit_frames, trim_silence
from models.datasets import Clip

log = logging.getLogger("models")

__all__ = ["librosa_features", "load_clip_audio", "FeatureSet", "compute_features"]


def load_clip_audio(path: str, sample_rate: int) -> np.ndarray:
    """Any WAV/FLAC, any rate, mono or stereo, as float32 mono at ``sample_rate``."""
    import librosa
    import soundfile

    y, sr = soundfile.read(path, dtype="float32", always_2d=True)
    y = y.mean(axis=1)
    if sr != sample_rate:
        y = librosa.resample(y, orig_sr=sr, target_sr=sample_rate)
    return y.astype(np.float32)


def librosa_features(y: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """The spectral features of ``cfg`` computed by librosa: ``[T, n_features]`` float32."""
    import librosa

    mel = librosa.feature.melspectrogram(
        y=y, sr=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
        window="hann", center=True, pad_mode="constant", power=2.0, n_mels=cfg.n_mels, fmin=cfg.fmin,
        fmax=cfg.effective_fmax, htk=False, norm="slaney",
    )
    db = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=cfg.top_db if cfg.top_db > 0 else None)
    if cfg.kind == "logmel":
        return db.T.astype(np.float32)
    return librosa.feature.mfcc(S=db, n_mfcc=cfg.n_mfcc, dct_type=2, norm="ortho").T.astype(np.float32)


@dataclass
class FeatureSet:
    """Variable-length raw features of a clip list, and what was skipped."""

    clips: list[Clip]
    raw: list[np.ndarray]
    skipped: dict[str, int] = field(default_factory=dict)

    def normalization(self) -> Normalization:
        return Normalization.fit(np.concatenate(self.raw, axis=0))

    def model_inputs(self, cfg: FeatureConfig, norm: Normalization) -> np.ndarray:
        """``[N, max_frames, n_features]`` float32, normalised and cut/padded as on the device."""
        return np.stack([fit_frames(norm.apply(r), cfg.max_frames) for r in self.raw]) if self.raw else \
            np.zeros((0, cfg.max_frames, cfg.n_features), np.float32)

    def labels(self, label_names: Sequence[str]) -> np.ndarray:
        return np.array([list(label_names).index(c.label) for c in self.clips], dtype=np.int64)


def _cache_key(clips: Sequence[Clip], cfg: FeatureConfig) -> str:
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for c in clips:
        st = os.stat(c.path) if os.path.exists(c.path) else None
        h.update(f"{c.path}|{st.st_size if st else -1}|{int(st.st_mtime) if st else -1}\n".encode())
    return h.hexdigest()[:24]


def compute_features(
    clips: Sequence[Clip], cfg: FeatureConfig, *, cache_dir: str | os.PathLike | None = None
) -> FeatureSet:
    """Raw (un-normalised, trimmed) features of every readable clip.

    A clip that is missing, empty, undecodable or too short is skipped and
    counted by reason; the run goes on.
    """
    clips = list(clips)
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"features-{_cache_key(clips, cfg)}.npz"
        if cache_path.exists():
            with np.load(cache_path, allow_pickle=False) as data:  # never allow pickle
                keep = data["keep"]
                offsets = data["offsets"]
                frames = data["frames"]
                skipped = json.loads(str(data["skipped"]))
            kept = [c for c, k in zip(clips, keep, strict=False) if k]
            raw = [frames[offsets[i]: offsets[i + 1]] for i in range(len(kept))]
            log.info("features from cache %s (%d clips)", cache_path, len(kept))
            return FeatureSet(kept, raw, skipped)
    kept, raw, skipped, keep = [], [], Counter(), []
    min_samples = cfg.n_fft
    for clip in clips:
        reason = None
        try:
            if not os.path.exists(clip.path):
                reason = "missing"
            elif os.path.getsize(clip.path) == 0:
                reason = "empty"
            else:
                y = load_clip_audio(clip.path, cfg.sample_rate)
                if len(y) < min_samples:
                    reason = "too_short"
                elif not np.all(np.isfinite(y)):
                    reason = "non_finite"
        except Exception as exc:  # soundfile raises several types for corrupt files
            log.warning("skipping %s: cannot decode (%s)", clip.path, exc)
            reason = "corrupt"
        if reason is not None:
            if reason != "corrupt":
                log.warning("skipping %s: %s", clip.path, reason)
            skipped[reason] += 1
            keep.append(False)
            continue
        kept.append(clip)
        raw.append(librosa_features(trim_silence(y, cfg), cfg))
        keep.append(True)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        offsets = np.cumsum([0] + [len(r) for r in raw])
        frames = np.concatenate(raw) if raw else np.zeros((0, cfg.n_features), np.float32)
        tmp = cache_path.with_suffix(".tmp.npz")
        np.savez(tmp, keep=np.array(keep), offsets=offsets, frames=frames, skipped=json.dumps(dict(skipped)))
        os.replace(tmp, cache_path)
    return FeatureSet(kept, raw, dict(skipped))
