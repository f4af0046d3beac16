"""Reading audio on the device: WAV with the standard library, FLAC/OGG with soundfile.

Everything comes back as float32 mono in [-1, 1] at the requested rate.
"""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np

from edge_sdk.errors import AudioError, ParameterError

__all__ = ["load_audio", "resample", "to_mono"]


def to_mono(y: np.ndarray) -> np.ndarray:
    """Average the channels of ``[n, channels]`` audio; 1-D audio is returned as is."""
    y = np.asarray(y)
    if y.ndim == 1:
        return y
    if y.ndim == 2:
        return y.mean(axis=1)
    raise ParameterError(f"audio must be [n] or [n, channels], got shape {y.shape}")


def resample(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling by FFT (exact for a periodic signal; fine for utterances)."""
    if orig_sr <= 0 or target_sr <= 0:
        raise ParameterError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr or len(y) == 0:
        return np.asarray(y, np.float32)
    n_out = int(round(len(y) * target_sr / orig_sr))
    spec = np.fft.rfft(np.asarray(y, np.float64))
    n_bins = n_out // 2 + 1
    if n_bins <= len(spec):
        spec = spec[:n_bins]
    else:
        spec = np.concatenate([spec, np.zeros(n_bins - len(spec), spec.dtype)])
    out = np.fft.irfft(spec, n=n_out) * (n_out / len(y))
    return out.astype(np.float32)


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as wf:
        sr, channels, width, n = wf.getframerate(), wf.getnchannels(), wf.getsampwidth(), wf.getnframes()
        raw = wf.readframes(n)
    if width == 1:
        y = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        y = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        y = v.astype(np.float32) / float(1 << 23)
    elif width == 4:
        y = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise AudioError(f"{path}: unsupported WAV sample width {width} bytes")
    return y.reshape(-1, channels), sr


def load_audio(path: str | os.PathLike, *, sample_rate: int = 16000) -> np.ndarray:
    """Read an audio file as float32 mono at ``sample_rate``.

    WAV (PCM 8/16/24/32-bit) needs nothing beyond the standard library; FLAC,
    OGG and float WAV need ``soundfile`` (part of ``fedser[edge]``).

    Raises
    ------
    AudioError
        The file is missing, empty, unreadable or has no samples.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file is empty: {path}")
    try:
        if path.suffix.lower() == ".wav":
            try:
                y, sr = _read_wav(path)
            except wave.Error:
                y, sr = _read_soundfile(path)  # float WAV and WAVE_FORMAT_EXTENSIBLE
        else:
            y, sr = _read_soundfile(path)
    except AudioError:
        raise
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise AudioError(f"cannot decode {path}: {exc}") from exc
    y = to_mono(y)
    if y.size == 0:
        raise AudioError(f"audio file has no samples: {path}")
    return resample(y, sr, sample_rate)


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    try:
        import soundfile
    except (ImportError, OSError) as exc:
        raise AudioError(
            f"reading {path.suffix or 'this'} files needs the soundfile package (pip install soundfile): {exc}"
        ) from exc
    try:
        y, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise AudioError(f"cannot decode {path}: {exc}") from exc
    return y, sr
