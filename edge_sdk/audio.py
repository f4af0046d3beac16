"""Reading audio on the device: WAV with the standard library, FLAC/OGG with soundfile.

Everything comes back as float32 mono in [-1, 1] at the requested rate.

Bounds (audio is untrusted input): a file's rate and the requested rate must be within
:data:`MIN_SAMPLE_RATE`..:data:`MAX_SAMPLE_RATE` Hz and it may have at most :data:`MAX_CHANNELS`
channels, or :class:`AudioError` says which; only the first ``max_seconds`` (default
:data:`~edge_sdk.features.MAX_CLIP_SECONDS`, 30 s) are read, block by block, never the whole
file. The peak memory of :func:`load_audio` is therefore bounded by the clip length and rates, not
the file: about 24 bytes per input sample kept plus 12 per output sample (about 120 MB for 30 s at
192 kHz, 12 MB for 30 s at 16 kHz).
"""

from __future__ import annotations

import logging
import math
import os
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edge_sdk.errors import AudioError, ParameterError
from edge_sdk.features import MAX_CLIP_SECONDS

log = logging.getLogger("edge_sdk")

__all__ = ["load_audio", "stream_audio", "resample", "to_mono", "check_sample_rate", "MIN_SAMPLE_RATE",
           "MAX_SAMPLE_RATE", "MAX_CHANNELS", "MAX_CLIP_SECONDS"]

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
MAX_CHANNELS = 32
_BLOCK_FRAMES = 1 << 16  # frames decoded at a time


def check_sample_rate(rate, what: str = "sample rate") -> int:
    """``rate`` as an int if it is within MIN_SAMPLE_RATE..MAX_SAMPLE_RATE Hz, else a ParameterError naming it."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or \
            not MIN_SAMPLE_RATE <= int(rate) <= MAX_SAMPLE_RATE:
        raise ParameterError(f"{what} must be an integer from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz, got {rate!r}")
    return int(rate)


def to_mono(y: np.ndarray) -> np.ndarray:
    """Average the channels of ``[n, channels]`` audio; 1-D audio is returned as is."""
    y = np.asarray(y)
    if y.ndim == 1:
        return y
    if y.ndim == 2:
        return y.mean(axis=1)
    raise ParameterError(f"audio must be [n] or [n, channels], got shape {y.shape}")


def resample(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling by FFT (exact for a periodic signal; fine for utterances).

    Both rates must be within MIN_SAMPLE_RATE..MAX_SAMPLE_RATE (so the output is at most 24 times
    the input); memory is about 16 bytes per input sample and 12 per output sample.
    """
    orig_sr = check_sample_rate(orig_sr, "the input sample rate")
    target_sr = check_sample_rate(target_sr, "the target sample rate")
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


def _pcm_to_float(raw: bytes, width: int, path: Path) -> np.ndarray:
    if width == 1:
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    if width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        return v.astype(np.float32) / float(1 << 23)
    if width == 4:
        return np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    raise AudioError(f"{path}: unsupported WAV sample width {width} bytes")


def _check_header(path: Path, sr: int, channels: int) -> None:
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioError(f"{path}: sample rate {sr} Hz is outside the supported "
                         f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"{path}: {channels} channels; 1 to {MAX_CHANNELS} are supported")


def _check_wav_header(path: Path, sr: int, channels: int, width: int) -> None:
    _check_header(path, sr, channels)
    if width not in (1, 2, 3, 4):
        raise AudioError(f"{path}: unsupported WAV sample width {width} bytes")


def _wav_block(raw: bytes, width: int, channels: int, path: Path) -> np.ndarray:
    """The whole frames of ``raw`` (PCM of ``width`` bytes, ``channels`` interleaved) as float32 mono."""
    n = len(raw) // (width * channels)
    return to_mono(_pcm_to_float(raw[: n * width * channels], width, path).reshape(n, channels)
                   ).astype(np.float32, copy=False)


def _max_frames(sr: int, max_seconds: float | None) -> int | None:
    return None if max_seconds is None else max(1, int(math.ceil(max_seconds * sr)))


def _read_wav(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int, int]:
    """(mono float32, rate, frames the header declares); at most ``max_seconds`` are decoded."""
    with wave.open(str(path), "rb") as wf:
        sr, channels, width, declared = wf.getframerate(), wf.getnchannels(), wf.getsampwidth(), wf.getnframes()
        _check_wav_header(path, sr, channels, width)
        limit = _max_frames(sr, max_seconds)
        want = declared if limit is None else min(declared, limit)
        blocks, got = [], 0
        while got < want:
            block = _wav_block(wf.readframes(min(_BLOCK_FRAMES, want - got)), width, channels, path)
            if len(block) == 0:
                break
            blocks.append(block)
            got += len(block)
    return (np.concatenate(blocks) if blocks else np.zeros(0, np.float32)), sr, declared


def _read_soundfile(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int, int]:
    try:
        import soundfile
    except (ImportError, OSError) as exc:
        raise AudioError(
            f"reading {path.suffix or 'this'} files needs the soundfile package (pip install soundfile): {exc}"
        ) from exc
    try:
        with soundfile.SoundFile(str(path)) as f:
            sr, channels, declared = int(f.samplerate), int(f.channels), int(f.frames)
            _check_header(path, sr, channels)
            limit = _max_frames(sr, max_seconds)
            blocks, got = [], 0
            while limit is None or got < limit:
                n = _BLOCK_FRAMES if limit is None else min(_BLOCK_FRAMES, limit - got)
                block = f.read(n, dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                blocks.append(to_mono(block).astype(np.float32, copy=False))
                got += len(block)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise AudioError(f"cannot decode {path}: {exc}") from exc
    return (np.concatenate(blocks) if blocks else np.zeros(0, np.float32)), sr, declared


def load_audio(path: str | os.PathLike, *, sample_rate: int = 16000,
               max_seconds: float | None = MAX_CLIP_SECONDS) -> np.ndarray:
    """Read an audio file as float32 mono at ``sample_rate``: its first ``max_seconds`` at most.

    WAV (PCM 8/16/24/32-bit) needs nothing beyond the standard library; FLAC,
    OGG and float WAV need ``soundfile`` (part of ``fedser[edge]``). A longer
    file is cut (and a warning logged) without decoding the rest; ``max_seconds=None``
    reads it all (for trusted files only: memory grows with the file).

    Raises
    ------
    AudioError
        The file is missing, empty, unreadable, has no samples, or its sample rate or
        channel count is outside the supported range.
    ParameterError
        ``sample_rate`` is outside MIN_SAMPLE_RATE..MAX_SAMPLE_RATE or ``max_seconds`` is not positive.
    """
    sample_rate = check_sample_rate(sample_rate, "the requested sample rate")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and 0 < max_seconds < math.inf):
        raise ParameterError(f"max_seconds must be a positive number of seconds or None, got {max_seconds!r}")
    path = Path(path)
    if path.is_dir():
        raise AudioError(f"{path} is a folder, not an audio file")
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file is empty: {path}")
    try:
        if path.suffix.lower() == ".wav":
            try:
                y, sr, declared = _read_wav(path, max_seconds)
            except wave.Error:
                y, sr, declared = _read_soundfile(path, max_seconds)  # float WAV and WAVE_FORMAT_EXTENSIBLE
        else:
            y, sr, declared = _read_soundfile(path, max_seconds)
    except AudioError:
        raise
    except (OSError, RuntimeError, ValueError, EOFError, MemoryError) as exc:
        # some readers raise with no message (a WAV whose data chunk claims more bytes than the file holds)
        reason = str(exc) or f"{type(exc).__name__} (a damaged or cut-short file?)"
        raise AudioError(f"cannot decode {path}: {reason}") from exc
    if y.size == 0:
        raise AudioError(f"audio file has no samples: {path}")
    if max_seconds is not None and declared > len(y) and declared > max_seconds * sr:
        if len(y) < max_seconds * sr - 1:  # the header promised more than the file holds
            log.warning("%s: its header says %.1f s but it holds %.1f s (a cut-short or damaged file); read what "
                        "is there", path, declared / sr, len(y) / sr)
        else:
            log.warning("%s: %.1f s long; kept the first %.1f s (the maximum clip length)", path, declared / sr,
                        len(y) / sr)
    return resample(y, sr, sample_rate)


def stream_audio(path: str | os.PathLike, *, block_seconds: float = 0.05) -> tuple[int, Iterator[np.ndarray]]:
    """(the file's sample rate, an iterator of its float32 mono blocks) for a recording of any length.

    What ``listen --file`` needs: the listener segments the stream into utterances (each at most
    ``segmenter.max_seconds``) and resamples each to the model's rate, so a long file is never held whole;
    memory is one block. The rate and channel bounds of :func:`load_audio` apply.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise AudioError(f"audio file not found or empty: {path}")
    if not 0 < block_seconds <= 10:
        raise ParameterError(f"block_seconds must be in (0, 10], got {block_seconds!r}")
    try:
        import soundfile

        f = soundfile.SoundFile(str(path))
    except (ImportError, OSError) as exc:  # no soundfile: WAV through the standard library
        if path.suffix.lower() != ".wav":
            raise AudioError(f"cannot open {path}: {exc}") from exc
        return _stream_wav(path, block_seconds)
    except (RuntimeError, ValueError) as exc:
        raise AudioError(f"cannot decode {path}: {exc}") from exc
    try:
        _check_header(path, int(f.samplerate), int(f.channels))
    except AudioError:
        f.close()
        raise
    frames = max(1, int(round(block_seconds * f.samplerate)))

    def blocks() -> Iterator[np.ndarray]:
        with f:
            while True:
                try:
                    block = f.read(frames, dtype="float32", always_2d=True)
                except (RuntimeError, ValueError) as exc:
                    raise AudioError(f"cannot decode {path}: {exc}") from exc
                if len(block) == 0:
                    return
                yield to_mono(block).astype(np.float32, copy=False)

    return int(f.samplerate), blocks()


def _stream_wav(path: Path, block_seconds: float) -> tuple[int, Iterator[np.ndarray]]:
    try:
        wf = wave.open(str(path), "rb")
    except (wave.Error, EOFError, OSError) as exc:
        raise AudioError(f"cannot decode {path}: {exc}") from exc
    sr, channels, width = wf.getframerate(), wf.getnchannels(), wf.getsampwidth()
    try:
        _check_wav_header(path, sr, channels, width)
    except AudioError:
        wf.close()
        raise
    frames = max(1, int(round(block_seconds * sr)))

    def blocks() -> Iterator[np.ndarray]:
        with wf:
            while True:
                block = _wav_block(wf.readframes(frames), width, channels, path)
                if len(block) == 0:
                    return
                yield block

    return sr, blocks()
