from __future__ import annotations

import wave

import numpy as np
import pytest

from edge_sdk.audio import load_audio, resample
from edge_sdk.errors import AudioError


def _write_wav(path, y, sr, channels=1):
    pcm = (np.clip(y, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(channels)
        wf.setsampwidth(2)
        wf.setframerate(sr)
        wf.writeframes(pcm.tobytes())


def test_stereo_44k_wav_becomes_16k_mono(tmp_path):
    sr = 44100
    t = np.arange(sr) / sr
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    _write_wav(tmp_path / "a.wav", np.stack([tone, tone], axis=1).reshape(-1), sr, channels=2)
    y = load_audio(tmp_path / "a.wav", sample_rate=16000)
    assert y.dtype == np.float32 and len(y) == 16000
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 Hz bins over one second


def test_resample_keeps_a_tone():
    t = np.arange(48000) / 48000
    y = resample(np.sin(2 * np.pi * 1000 * t), 48000, 16000)
    assert len(y) == 16000
    np.testing.assert_allclose(y[100:-100], np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)[100:-100],
                               atol=1e-3)


def test_missing_empty_and_corrupt_files_say_what_is_wrong(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(tmp_path / "empty.wav")
    (tmp_path / "junk.flac").write_bytes(b"definitely not flac" * 10)
    with pytest.raises(AudioError, match="junk.flac"):
        load_audio(tmp_path / "junk.flac")


def test_reads_real_flac(ravdess_root):
    y = load_audio(next(ravdess_root.glob("Actor_01/*.flac")))
    assert y.ndim == 1 and 2.5 * 16000 < len(y) < 6 * 16000 and np.abs(y).max() <= 1.0
