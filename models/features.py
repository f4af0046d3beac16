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
import tempfile
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_sdk.features import (
    FeatureConfig,
    Normalization,
    SpeakerStats,
    fit_frames,
    speaker_inputs,
    trim_silence,
    utterance_normalize,
    with_pitch,
)
from models.datasets import Clip

log = logging.getLogger("models")

# where a training or validation speaker's normalisation statistics come from (TrainConfig.speaker_reference,
# FeatureSet.reference_stats), and those of them that read the neutral (and reference) clips
SPEAKER_REFERENCES = ("all", "neutral", "balanced", "neutral-mean")
NEUTRAL_REFERENCES = ("neutral", "neutral-mean")

__all__ = ["librosa_features", "load_clip_audio", "FeatureSet", "compute_features", "Augmentation", "augment_audio",
           "augment_inputs"]


@dataclass(frozen=True)
class Augmentation:
    """Training-time audio augmentation; each training clip gets ``copies`` altered copies besides itself.

    Off by default (``copies=0``). Every copy draws, from a generator seeded by
    ``seed`` and the clip's position, a gain in ``gain_db``, a speed factor in
    ``speed`` (resampling: tempo and pitch change together, like Kaldi's speed
    perturbation) and white noise at an SNR in ``snr_db``. Only the training
    split is ever augmented.
    """

    copies: int = 0
    gain_db: tuple[float, float] = (-6.0, 6.0)
    speed: tuple[float, float] = (0.9, 1.1)
    snr_db: tuple[float, float] = (15.0, 40.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.copies < 0:
            raise ValueError(f"augmentation copies must be >= 0, got {self.copies}")
        if not all(np.isfinite(v) for pair in (self.speed, self.gain_db, self.snr_db) for v in pair):
            raise ValueError(f"augmentation ranges must be finite numbers, got speed {self.speed}, gain_db "
                             f"{self.gain_db}, snr_db {self.snr_db}")
        for name in ("gain_db", "speed", "snr_db"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"augmentation {name} range is reversed: ({lo}, {hi})")
            object.__setattr__(self, name, (float(lo), float(hi)))
        if self.speed[0] <= 0:
            raise ValueError("augmentation speed factors must be positive")

    def to_dict(self) -> dict:
        return {"copies": self.copies, "gain_db": list(self.gain_db), "speed": list(self.speed),
                "snr_db": list(self.snr_db), "seed": self.seed}


def augment_audio(y: np.ndarray, sample_rate: int, aug: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """One altered copy of ``y``: speed, then gain, then white noise at a random SNR."""
    import librosa

    speed = rng.uniform(*aug.speed)
    if abs(speed - 1.0) > 1e-3:
        y = librosa.resample(y, orig_sr=int(round(sample_rate * speed)), target_sr=sample_rate)
    y = y * 10 ** (rng.uniform(*aug.gain_db) / 20)
    power = float(np.mean(y**2)) + 1e-12
    noise = rng.standard_normal(len(y)) * np.sqrt(power / 10 ** (rng.uniform(*aug.snr_db) / 10))
    return np.clip(y + noise, -1.0, 1.0).astype(np.float32)


def _interpolate(x: np.ndarray, src: np.ndarray, axis: int) -> np.ndarray:
    """``x`` ``[N, T, F]`` read at fractional positions ``src`` ``[N, L]`` along ``axis`` (1 or 2), linearly;
    a position outside ``[0, size - 1]`` reads 0 (the training mean, as padding)."""
    size = x.shape[axis]
    valid = (src >= 0) & (src <= size - 1)
    s = np.clip(src, 0, size - 1)
    lo = np.floor(s).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    w = (s - lo).astype(x.dtype)
    n = np.arange(len(x))[:, None]
    if axis == 1:
        a, b = x[n, lo], x[n, hi]  # [N, L, F]
        out = a * (1 - w[..., None]) + b * w[..., None]
        return out * valid[..., None]
    a, b = np.take_along_axis(x, lo[:, None, :], 2), np.take_along_axis(x, hi[:, None, :], 2)  # [N, T, L]
    return (a * (1 - w[:, None, :]) + b * w[:, None, :]) * valid[:, None, :]


def augment_inputs(x: np.ndarray, rng: np.random.Generator, *, freq_warp: float = 0.0, time_stretch: float = 0.0,
                   spectral_tilt: float = 0.0, offset_shrink: float = 0.0, spread_shrink: float = 0.0,
                   spectral: int | None = None) -> np.ndarray:
    """Altered copies of normalised model inputs ``x`` ``[N, T, F]`` (one per example; training only).

    ``freq_warp``: the feature axis (mel bands) is read at ``f * a``, ``a`` uniform in ``[1 - w, 1 + w]`` per
    example (a vocal-tract-length-like warp; the top band repeats where ``a * f`` passes it).
    ``time_stretch``: the frame axis is read at ``t * r``, ``r`` uniform in ``[1 - s, 1 + s]`` (``r > 1``: faster
    speech); frames past the end become padding (zero rows).
    ``spectral_tilt``: adds ``g * (2 f / (F - 1) - 1)`` to every frame that is not padding, ``g`` uniform in
    ``[-t, t]`` (normalised units: a random tilt of the spectrum, like another microphone or voice effort).
    ``offset_shrink``: the example's mean frame ``m`` (per band, over the frames that are not padding: how far its
    average spectrum sits from the speaker's reference, which is 0 in normalised units) becomes ``a * m``, ``a``
    uniform in ``[1 - o, 1]``: a weaker expression of the same emotion (nEMO's classes sit about half as far apart
    as RAVDESS's; docs/results/recipe-search/stop29).
    ``spread_shrink``: each band's standard deviation over time ``s`` becomes ``1 + b * (s - 1)`` (toward the
    speaker's, 1), ``b`` uniform in ``[1 - p, 1]``, drawn apart from ``a``.
    Zero rows (padding) stay zero rows. With every amount 0, ``x`` is returned unchanged.
    ``spectral``: the warp, the tilt and the shrinks touch only the first ``spectral`` columns (the bands; the
    pitch columns of ``FeatureConfig.pitch`` follow them); None: all.
    """
    if not (freq_warp or time_stretch or spectral_tilt or offset_shrink or spread_shrink):
        return x
    x = np.asarray(x, np.float32)
    n, frames, width = x.shape
    feats = width if spectral is None else spectral
    pad = ~np.any(x != 0, axis=2)  # [N, T]
    out = x
    if freq_warp:
        a = rng.uniform(1 - freq_warp, 1 + freq_warp, size=(n, 1))
        src = np.minimum(np.arange(feats)[None, :] * a, feats - 1)
        out = np.concatenate([_interpolate(out[..., :feats], src, 2), out[..., feats:]], axis=2)
    if time_stretch:
        r = rng.uniform(1 - time_stretch, 1 + time_stretch, size=(n, 1))
        src = np.arange(frames)[None, :] * r
        out = _interpolate(out, src, 1)
        pad = _interpolate((~pad).astype(np.float32)[..., None], src, 1)[..., 0] < 0.5
        out = out * ~pad[..., None]
    if spectral_tilt:
        g = rng.uniform(-spectral_tilt, spectral_tilt, size=(n, 1, 1)).astype(np.float32)
        ramp = np.zeros(width, np.float32)
        ramp[:feats] = np.linspace(-1.0, 1.0, feats, dtype=np.float32)
        out = out + g * ramp[None, None, :] * ~pad[..., None]
    if offset_shrink or spread_shrink:
        live = (~pad)[..., None].astype(np.float32)  # [N, T, 1]
        count = np.maximum(live.sum(axis=1, keepdims=True), 1.0)
        band = out[..., :feats]
        mean = (band * live).sum(axis=1, keepdims=True) / count  # [N, 1, F]
        dev = (band - mean) * live
        if spread_shrink:
            sd = np.sqrt((dev * dev).sum(axis=1, keepdims=True) / count)
            b = rng.uniform(1 - spread_shrink, 1, size=(n, 1, 1)).astype(np.float32)
            dev = dev * ((1.0 + b * (sd - 1.0)) / np.maximum(sd, 1e-3))
        if offset_shrink:
            mean = mean * rng.uniform(1 - offset_shrink, 1, size=(n, 1, 1)).astype(np.float32)
        out = np.concatenate([(mean + dev) * live, out[..., feats:]], axis=2)
    return out.astype(np.float32)


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
    """The features of ``cfg``, the spectral part computed by librosa (the pitch columns, when ``cfg.pitch``, by
    ``edge_sdk.features.pitch_track`` as on the device): ``[T, n_features]`` float32."""
    import librosa

    mel = librosa.feature.melspectrogram(
        y=y, sr=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
        window="hann", center=True, pad_mode="constant", power=2.0, n_mels=cfg.n_mels, fmin=cfg.fmin,
        fmax=cfg.effective_fmax, htk=False, norm="slaney",
    )
    db = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=cfg.top_db if cfg.top_db > 0 else None)
    if cfg.kind == "logmel":
        return with_pitch(utterance_normalize(db.T, cfg), y, cfg)
    return with_pitch(utterance_normalize(librosa.feature.mfcc(S=db, n_mfcc=cfg.n_mfcc, dct_type=2, norm="ortho").T,
                                          cfg), y, cfg)


@dataclass
class FeatureSet:
    """Variable-length raw features of a clip list, and what was skipped."""

    clips: list[Clip]
    raw: list[np.ndarray]
    skipped: dict[str, int] = field(default_factory=dict)

    def normalization(self) -> Normalization:
        return Normalization.fit(np.concatenate(self.raw, axis=0))

    def model_inputs(self, cfg: FeatureConfig, norm: Normalization,
                     reference: dict[str, SpeakerStats] | None = None) -> np.ndarray:
        """``[N, max_frames, n_features]`` float32, normalised and cut/padded as on the device.

        With ``cfg.speaker_norm`` each speaker's clips are normalised by that speaker's statistics
        (:func:`edge_sdk.features.speaker_inputs`); the order of the clips is kept. ``reference`` (training
        only; see ``TrainConfig.speaker_reference`` and :meth:`reference_stats`) gives a speaker's statistics
        instead of all their clips' (a speaker not in it: all their clips).
        """
        if not self.raw:
            return np.zeros((0, cfg.max_frames, cfg.n_features), np.float32)
        out: list = [None] * len(self.raw)
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(self.clips):
            groups.setdefault(c.speaker if cfg.speaker_norm else "", []).append(i)
        for speaker, idx in groups.items():
            raws = [self.raw[i] for i in idx]
            stats = (reference or {}).get(speaker) if cfg.speaker_norm else None
            if stats is not None and stats.count > 0:
                own = stats.normalization(norm)
                xs = [fit_frames(own.apply(r), cfg.max_frames) for r in raws]
            else:
                xs = speaker_inputs(raws, cfg, norm)
            for i, x in zip(idx, xs, strict=True):
                out[i] = x
        return np.stack(out)

    def reference_stats(self, kind: str, extra: FeatureSet | None = None) -> dict[str, SpeakerStats]:
        """Per speaker, the statistics ``TrainConfig.speaker_reference`` asks for: "neutral", from their
        neutral clips plus ``extra``'s clips of the same speakers (e.g. RAVDESS calm, loaded only for this);
        "balanced", from all their clips with every class weighing the same (frames weighted); "neutral-mean", the
        mean of "neutral" with the spread (around their own mean) of all their clips in this set, the scale a device
        sees."""
        if kind == "neutral-mean":
            neutral, every = self.reference_stats("neutral", extra), _speaker_stats(
                (c, r, 1) for c, r in zip(self.clips, self.raw, strict=True))
            out = {}
            for speaker, n in neutral.items():
                a = every.get(speaker)
                if a is None or a.count <= 0 or n.count <= 0:
                    out[speaker] = n
                    continue
                mean_n, mean_a = n.sum / n.count, a.sum / a.count
                var_a = np.maximum(a.sumsq / a.count - mean_a * mean_a, 0.0)
                stats = out.setdefault(speaker, SpeakerStats(len(mean_n)))
                stats.count, stats.sum, stats.sumsq = a.count, a.count * mean_n, a.count * (var_a + mean_n * mean_n)
            return out
        if kind not in ("neutral", "balanced"):
            raise ValueError(f"unknown speaker reference {kind!r}")
        speakers = {c.speaker for c in self.clips}
        weights = np.ones(len(self.clips))
        if kind == "balanced":
            pairs = Counter((c.speaker, c.label) for c in self.clips)
            classes = Counter(spk for spk, _ in pairs)
            clips = Counter(c.speaker for c in self.clips)
            weights = np.array([clips[c.speaker] / (classes[c.speaker] * pairs[c.speaker, c.label])
                                for c in self.clips])
        items = [(c, r, w) for c, r, w in zip(self.clips, self.raw, weights, strict=True)
                 if kind == "balanced" or c.label == "neutral"]
        if extra is not None and kind == "neutral":
            items += [(c, r, 1.0) for c, r in zip(extra.clips, extra.raw, strict=True) if c.speaker in speakers]
        return _speaker_stats(items)

    def labels(self, label_names: Sequence[str]) -> np.ndarray:
        return np.array([list(label_names).index(c.label) for c in self.clips], dtype=np.int64)


def _speaker_stats(items) -> dict[str, SpeakerStats]:
    """Per speaker, the statistics of ``(clip, raw frames, weight)`` items (each frame counted ``weight`` times)."""
    out: dict[str, SpeakerStats] = {}
    for c, r, w in items:
        out.setdefault(c.speaker, SpeakerStats(r.shape[1])).add(r, w)
    return out


def _config_key(cfg: FeatureConfig, aug: Augmentation | None) -> str:
    # the cache holds raw features: the frame count and the speaker normalisation are applied later, so they are
    # pinned (to the fedser-train defaults, which keeps earlier caches valid) and configs differing only there share it
    h = hashlib.sha256(json.dumps({**cfg.to_dict(), "max_frames": 300, "speaker_norm": True}, sort_keys=True).encode())
    if aug is not None and aug.copies:
        h.update(json.dumps(aug.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _clip_key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]


def _clip_features(clip: Clip, cfg: FeatureConfig, aug: Augmentation | None) -> tuple[list[np.ndarray], str | None]:
    """(features of the clip and its augmented copies, None) or ([], skip reason)."""
    try:
        y = load_clip_audio(clip.path, cfg.sample_rate)
    except Exception as exc:  # soundfile raises several types for corrupt files
        log.warning("skipping %s: cannot decode (%s)", clip.path, exc)
        return [], "corrupt"
    if len(y) < cfg.n_fft:
        reason = "too_short"
    elif not np.all(np.isfinite(y)):
        reason = "non_finite"
    else:
        out = [librosa_features(trim_silence(y, cfg), cfg)]
        if aug is not None and aug.copies:
            seed = int(hashlib.sha256(os.path.basename(clip.path).encode()).hexdigest()[:8], 16)
            rng = np.random.default_rng([aug.seed, seed])
            out += [librosa_features(trim_silence(augment_audio(y, cfg.sample_rate, aug, rng), cfg), cfg)
                    for _ in range(aug.copies)]
        return out, None
    log.warning("skipping %s: %s", clip.path, reason)
    return [], reason


def _read_cache_entry(entry: Path) -> tuple[list, str | None] | None:
    """A cached clip's (features, skip reason), or None when the entry is not there or cannot be read: a cache
    trimmed meanwhile (``aggregator.jobs.trim_feature_cache``) or a file cut short (a full disk) is recomputed,
    never an error."""
    try:
        with np.load(entry, allow_pickle=False) as data:  # never allow pickle
            reason = str(data["reason"]) or None
            return [data[f"f{i}"] for i in range(int(data["count"]))], reason
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        log.warning("feature cache entry %s unreadable (%s): recomputing it", entry, exc)
        return None


def _mark_used(entry: Path) -> None:
    """Set a cache entry's modification time to now when it is read, so that the trim, which deletes the oldest
    modification times first (``aggregator.jobs.trim_feature_cache``), deletes the least recently used entries,
    not the earliest written. Best effort: an entry trimmed meanwhile or a read-only cache stays as it is."""
    try:
        os.utime(entry)
    except OSError:
        pass


def _write_cache_entry(entry: Path, feats: list, reason: str | None) -> None:
    """Keep a clip's result in the cache, best effort: a full disk, or the folder removed meanwhile by a trim
    (``aggregator.jobs.trim_feature_cache``), leaves the clip uncached, never fails the run."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)  # a trim may have removed it since the run began
        # a unique temporary name: two runs sharing the cache may compute the same clip at once
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp.npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, reason=reason or "", count=len(feats), **{f"f{i}": f for i, f in enumerate(feats)})
        os.replace(tmp, entry)
        tmp = None
    except OSError as exc:
        log.warning("feature cache: %s not written (%s); the run goes on without it", entry, exc)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def compute_features(
    clips: Sequence[Clip], cfg: FeatureConfig, *, cache_dir: str | os.PathLike | None = None,
    augmentation: Augmentation | None = None,
) -> FeatureSet:
    """Raw (un-normalised, trimmed) features of every readable clip.

    A clip that is missing, empty, undecodable or too short is skipped and
    counted by reason; the run goes on. With ``augmentation``, each kept clip
    is followed by its altered copies (same clip, same label). With
    ``cache_dir``, each clip's result (features or skip reason) is kept in
    ``<cache_dir>/<config key>/<clip key>.npz`` (no pickle), keyed by the
    feature config, the augmentation and the file's path, size and mtime, so
    any split of a corpus reuses it.
    """
    folder = Path(cache_dir) / f"features-{_config_key(cfg, augmentation)}" if cache_dir is not None else None
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # the cache is an optimisation: without it every clip is computed
            log.warning("feature cache %s unusable (%s): computing every clip", folder, exc)
            folder = None
    kept, raw, skipped, hits = [], [], Counter(), 0
    for clip in clips:
        if not os.path.exists(clip.path) or os.path.getsize(clip.path) == 0:
            reason = "missing" if not os.path.exists(clip.path) else "empty"
            log.warning("skipping %s: %s", clip.path, reason)
            skipped[reason] += 1
            continue
        entry = folder / f"{_clip_key(clip.path)}.npz" if folder is not None else None
        cached = _read_cache_entry(entry) if entry is not None else None
        if cached is not None:
            feats, reason = cached
            hits += 1
            _mark_used(entry)
        else:
            feats, reason = _clip_features(clip, cfg, augmentation)
            if entry is not None:
                _write_cache_entry(entry, feats, reason)
        if reason is not None:
            skipped[reason] += 1
            continue
        kept.extend([clip] * len(feats))
        raw.extend(feats)
    if hits:
        log.info("features: %d of %d clips from the cache %s", hits, len(clips), folder)
    return FeatureSet(kept, raw, dict(skipped))


FEATURE_PACK_FORMAT = "fedser-feature-pack/1"


def save_feature_pack(path: str | os.PathLike, parts: dict[str, FeatureSet], cfg: FeatureConfig) -> Path:
    """Write named :class:`FeatureSet` s (e.g. train, val, test, reference) and their feature config into one
    ``.npz`` (no pickle): what :func:`load_feature_pack` reads on a host that has neither the audio nor librosa,
    e.g. a GPU machine (``train_baseline(precomputed=...)``)."""
    arrays: dict[str, np.ndarray] = {"format": np.array(FEATURE_PACK_FORMAT),
                                     "feature_config": np.array(json.dumps(cfg.to_dict(), sort_keys=True)),
                                     "parts": np.array(json.dumps(sorted(parts)))}
    for name, fs in parts.items():
        if not name.isidentifier():
            raise ValueError(f"feature pack part name {name!r} must be an identifier")
        for attr in ("path", "speaker", "label", "split"):
            arrays[f"{name}__{attr}"] = np.array([getattr(c, attr) for c in fs.clips], dtype=str)
        arrays[f"{name}__lengths"] = np.array([len(r) for r in fs.raw], np.int64)
        arrays[f"{name}__frames"] = (np.concatenate(fs.raw, axis=0).astype(np.float32) if fs.raw
                                     else np.zeros((0, cfg.n_features), np.float32))
        arrays[f"{name}__skipped"] = np.array(json.dumps(fs.skipped, sort_keys=True))
    import io

    from edge_sdk.storage import atomic_write

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(Path(path), buf.getvalue())
    return Path(path)


def load_feature_pack(path: str | os.PathLike) -> tuple[dict[str, FeatureSet], FeatureConfig]:
    """The parts and feature config of a :func:`save_feature_pack` file; ValueError names what is wrong."""
    import zipfile

    try:
        data = np.load(path, allow_pickle=False)  # never allow pickle
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a feature pack ({exc})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a feature pack (a single array, not an .npz archive)")
    with data:
        if "format" not in data.files or str(data["format"]) != FEATURE_PACK_FORMAT:
            raise ValueError(f"{path}: not a {FEATURE_PACK_FORMAT} file")
        missing = {"feature_config", "parts"} - set(data.files)
        if not missing:
            try:
                names = json.loads(str(data["parts"]))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: malformed feature pack parts list ({exc})") from exc
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{path}: the feature pack's parts are not a list of names")
            missing = {f"{n}__{a}" for n in names for a in ("path", "speaker", "label", "split", "lengths",
                                                            "frames", "skipped")} - set(data.files)
        if missing:
            raise ValueError(f"{path}: feature pack lacks {', '.join(repr(m) for m in sorted(missing))}")
        try:
            cfg = FeatureConfig.from_dict(json.loads(str(data["feature_config"])))
            parts = {}
            for name in names:
                lengths = data[f"{name}__lengths"]
                frames = data[f"{name}__frames"]
                cols = [data[f"{name}__{a}"] for a in ("path", "speaker", "label", "split")]
                if (lengths.ndim != 1 or lengths.dtype.kind not in "iu" or (lengths <= 0).any()
                        or int(lengths.sum()) != len(frames) or frames.dtype.kind != "f"
                        or frames.ndim != 2 or frames.shape[1] != cfg.n_features
                        or any(len(c) != len(lengths) for c in cols)):
                    raise ValueError(f"part {name!r}: lengths, frames ({frames.shape}) and clip fields disagree "
                                     f"with each other or with n_features={cfg.n_features}")
                if not np.all(np.isfinite(frames)):
                    raise ValueError(f"part {name!r} holds non-finite features")
                clips = [Clip(str(p), str(s), str(lab), str(sp)) for p, s, lab, sp in zip(*cols, strict=True)]
                raw = np.split(frames.astype(np.float32), np.cumsum(lengths)[:-1]) if len(lengths) else []
                skipped = {str(k): int(v) for k, v in json.loads(str(data[f"{name}__skipped"])).items()}
                parts[name] = FeatureSet(clips, list(raw), skipped)
        except (ValueError, TypeError, AttributeError, KeyError, zipfile.BadZipFile) as exc:
            if str(exc).startswith(f"{path}"):
                raise
            raise ValueError(f"{path}: malformed feature pack ({exc})") from exc
    return parts, cfg
