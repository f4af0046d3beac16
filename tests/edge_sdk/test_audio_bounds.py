"""Audio is untrusted input: a documented rate range and maximum clip length, bounded memory, and nothing past
the cut ever reaches the user's running speaker statistics (issue 11, item 7)."""

from __future__ import annotations

import struct
import time
import tracemalloc
import wave

import numpy as np
import pytest

from edge_sdk.audio import MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, load_audio, resample
from edge_sdk.errors import AudioError, ParameterError
from edge_sdk.features import MAX_CLIP_SECONDS

MB = 1 << 20


def _wav_header(rate: int, channels: int, width: int, n_bytes: int) -> bytes:
    """A canonical PCM RIFF header: lets a test declare any rate or channel count the wave module would refuse
    to write."""
    block = channels * width
    return (b"RIFF" + struct.pack("<I", 36 + n_bytes) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate, (rate * block) & 0xFFFFFFFF, block, 8 * width) +
            b"data" + struct.pack("<I", n_bytes))


def _crafted_wav(path, rate: int, size: int, channels: int = 1) -> None:
    body = (np.random.default_rng(0).standard_normal(size // 2) * 3000).astype("<i2").tobytes()
    path.write_bytes(_wav_header(rate, channels, 2, len(body)) + body)


def _write_wav(path, y: np.ndarray, sr: int) -> None:
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(sr)
        wf.writeframes((np.clip(y, -1, 1) * 32767).astype("<i2").tobytes())


def _peak_bytes(fn):
    """(result or exception, peak bytes traced while calling fn)."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - the caller checks which
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("size", [4_000, 100_000])
def test_a_wav_declaring_1_hz_is_refused_without_allocating(tmp_path, size):
    # Before: the resampler sized its output from the 1 Hz rate (3.27 GB for 4 KB; MemoryError 11.9 GiB for 100 KB).
    path = tmp_path / "one-hertz.wav"
    _crafted_wav(path, 1, size)
    out, peak = _peak_bytes(lambda: load_audio(path, sample_rate=16000))
    assert isinstance(out, AudioError), out
    assert "1 Hz" in str(out) and f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}" in str(out)
    assert peak < 2 * MB, peak


@pytest.mark.parametrize("rate, channels, message", [
    (7999, 1, "7999 Hz is outside"), (192_001, 1, "192001 Hz is outside"), (4_000_000_000, 1, "outside"),
    (16000, MAX_CHANNELS + 1, f"{MAX_CHANNELS + 1} channels"),
])
def test_rates_and_channel_counts_out_of_range_are_refused_by_name(tmp_path, rate, channels, message):
    path = tmp_path / "odd.wav"
    _crafted_wav(path, rate, 4 * channels * 100, channels=channels)
    with pytest.raises(AudioError, match=message):
        load_audio(path)


def test_a_folder_and_a_wav_whose_header_lies_about_its_length_are_said_plainly(tmp_path, caplog):
    """A folder was reported as "audio file not found"; a WAV whose data chunk claims 4 GB but holds 1 s was
    reported as cut at the maximum clip length (found by an audit)."""
    with pytest.raises(AudioError, match="is a folder, not an audio file"):
        load_audio(tmp_path)
    pcm = (np.sin(np.arange(16000) / 10) * 10000).astype("<i2").tobytes()
    header = (b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt "
              + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16) + b"data" + struct.pack("<I", 0xFFFFFFF0))
    (tmp_path / "liar.wav").write_bytes(header + pcm)
    assert len(load_audio(tmp_path / "liar.wav")) == 16000
    assert "header says" in caplog.text and "holds 1.0 s" in caplog.text and "maximum clip length" not in caplog.text


def test_a_decoder_error_without_a_message_names_its_type(tmp_path, monkeypatch):
    import edge_sdk.audio as audio

    def bare(*args, **kwargs):
        raise EOFError()

    monkeypatch.setattr(audio, "_read_wav", bare)
    (tmp_path / "x.wav").write_bytes(b"RIFF0000WAVE")
    with pytest.raises(AudioError, match=r"cannot decode .*x.wav: EOFError \(a damaged or cut-short file\?\)"):
        load_audio(tmp_path / "x.wav")


def test_resample_and_load_audio_check_the_rates_they_are_asked_for(tmp_path):
    y = np.zeros(4000, np.float32)
    for orig, target in ((1, 16000), (16000, 1), (16000, 10**9), (0, 16000), (16000.5, 16000)):
        out, peak = _peak_bytes(lambda o=orig, t=target: resample(y, o, t))
        assert isinstance(out, ParameterError) and "8000 to 192000 Hz" in str(out), (orig, target, out)
        assert peak < 1 * MB
    _write_wav(tmp_path / "ok.wav", np.zeros(1600), 16000)
    with pytest.raises(ParameterError, match="requested sample rate"):
        load_audio(tmp_path / "ok.wav", sample_rate=100)
    with pytest.raises(ParameterError, match="max_seconds"):
        load_audio(tmp_path / "ok.wav", max_seconds=0)


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_a_ten_minute_file_is_cut_at_the_maximum_in_bounded_memory(tmp_path, suffix):
    import soundfile

    sr = 16000
    rng = np.random.default_rng(5)
    y = (0.1 * rng.standard_normal(600 * sr)).astype(np.float32)
    path = tmp_path / f"ten-minutes{suffix}"
    soundfile.write(str(path), y, sr, subtype="PCM_16")
    del y
    out, peak = _peak_bytes(lambda: load_audio(path, sample_rate=sr))
    assert isinstance(out, np.ndarray), out
    assert len(out) == int(MAX_CLIP_SECONDS * sr)
    # 30 s at 16 kHz as float32 is 1.9 MB; decoding the whole file (before) peaked at about 100 MB
    assert peak < 12 * MB, f"peak {peak / MB:.1f} MB"
    whole = load_audio(path, sample_rate=sr, max_seconds=None)
    assert len(whole) == 600 * sr and np.array_equal(whole[: len(out)], out)


def test_a_long_192_khz_stereo_file_costs_memory_bounded_by_the_clip_not_the_file(tmp_path):
    import soundfile

    sr = MAX_SAMPLE_RATE
    t = np.arange(45 * sr) / sr
    y = 0.3 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "long-192k.wav"
    soundfile.write(str(path), np.stack([y, y], axis=1), sr, subtype="PCM_16")
    del t, y
    out, peak = _peak_bytes(lambda: load_audio(path, sample_rate=16000))
    assert isinstance(out, np.ndarray) and len(out) == int(MAX_CLIP_SECONDS * 16000)
    assert abs(np.argmax(np.abs(np.fft.rfft(out[:16000]))) - 440) <= 1
    # documented in edge_sdk/audio.py: about 24 bytes per input sample kept (30 s x 192 kHz: 132 MB) at most
    assert peak < 160 * MB, f"peak {peak / MB:.1f} MB"


def _voiced(seconds: float, sr: int, f0: float, level: float) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    y = sum(level / k * np.sin(2 * np.pi * k * f0 * t * (1 + 0.02 * np.sin(2 * np.pi * 3 * t))) for k in range(1, 8))
    return (y * (0.6 + 0.4 * np.sin(2 * np.pi * 2.5 * t) ** 2)).astype(np.float32)


def _speaker_stats(device) -> dict:
    stats = device.store.export()["speaker_statistics"]
    assert len(stats) == 1, stats
    return next(iter(stats.values()))


@pytest.fixture
def devices(tmp_path):
    from edge_sdk.device import Device

    first = Device(tmp_path / "a")
    if first.model is None or not first.metadata.features.speaker_norm:
        pytest.skip("needs the bundled speaker-normalised model in edge_sdk/data")
    return first, Device(tmp_path / "b")


def test_what_is_cut_never_reaches_the_users_statistics(tmp_path, devices):
    """A 10-minute file: the first 30 s of speech, then 9.5 minutes of loud noise. The user's statistics after it
    equal those after the first 30 s alone, and so does a clean clip's prediction afterwards."""
    long_dev, short_dev = devices
    sr = 16000
    head = _voiced(MAX_CLIP_SECONDS, sr, 140.0, 0.2)
    tail = (0.8 * np.random.default_rng(2).standard_normal(570 * sr)).astype(np.float32)
    _write_wav(tmp_path / "ten-minutes.wav", np.concatenate([head, tail]), sr)
    _write_wav(tmp_path / "first-30s.wav", head, sr)
    long_dev.classify_file(tmp_path / "ten-minutes.wav")
    short_dev.classify_file(tmp_path / "first-30s.wav")
    a, b = _speaker_stats(long_dev), _speaker_stats(short_dev)
    assert a["count"] == b["count"] and np.allclose(a["sum"], b["sum"]) and np.allclose(a["sumsq"], b["sumsq"])
    clean = _voiced(2.0, sr, 220.0, 0.3)
    p_long, p_short = long_dev.classify(clean), short_dev.classify(clean)
    assert p_long.label == p_short.label
    assert max(abs(p_long.probs[k] - p_short.probs[k]) for k in p_long.probs) < 1e-5


def test_an_over_long_array_given_to_classify_is_cut_before_the_statistics(devices):
    long_dev, short_dev = devices
    sr = 16000
    head = _voiced(MAX_CLIP_SECONDS, sr, 140.0, 0.2)
    tail = (0.8 * np.random.default_rng(3).standard_normal(120 * sr)).astype(np.float32)
    long_dev.classify(np.concatenate([head, tail]))
    short_dev.classify(head)
    a, b = _speaker_stats(long_dev), _speaker_stats(short_dev)
    assert a["count"] == b["count"] and np.allclose(a["sum"], b["sum"])


def test_stream_audio_reads_a_recording_of_any_length_one_block_at_a_time(tmp_path):
    from edge_sdk.audio import stream_audio

    sr = 48000
    y = (0.1 * np.random.default_rng(6).standard_normal(300 * sr)).astype(np.float32)
    _write_wav(tmp_path / "five-minutes.wav", y, sr)

    def consume():
        rate, blocks = stream_audio(tmp_path / "five-minutes.wav", block_seconds=0.05)
        total = 0
        for block in blocks:
            assert block.dtype == np.float32 and len(block) <= 2400
            total += len(block)
        return rate, total

    (rate, total), peak = _peak_bytes(consume)
    assert (rate, total) == (sr, 300 * sr)
    assert peak < 4 * MB, f"peak {peak / MB:.2f} MB"  # measured 2.1 MB; the file is 55 MB as float32
    _crafted_wav(tmp_path / "one-hertz.wav", 1, 4000)
    with pytest.raises(AudioError, match="1 Hz is outside"):
        stream_audio(tmp_path / "one-hertz.wav")


def test_listening_to_a_long_48_khz_file_hears_speech_after_the_clip_limit(tmp_path):
    """What `listen --file` can do with stream_audio: utterances at 10 s and at 100 s of a 48 kHz recording."""
    from edge_sdk.audio import stream_audio
    from edge_sdk.config import load_config
    from edge_sdk.device import Device
    from edge_sdk.listen import Listener

    device = Device(tmp_path / "dev")
    if device.model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    sr = 48000
    y = (0.001 * np.random.default_rng(7).standard_normal(110 * sr)).astype(np.float32)
    for start in (10, 100):
        y[start * sr:start * sr + int(1.5 * sr)] += _voiced(1.5, sr, 150.0, 0.25)
    _write_wav(tmp_path / "long.wav", y, sr)
    rate, blocks = stream_audio(tmp_path / "long.wav")
    cfg = load_config(environ={"FEDSER_EDGE_AUDIO_SAMPLE_RATE": str(rate)})
    heard = []
    listener = Listener(device, cfg, lambda pred, audio: heard.append(len(audio))).start(microphone=False)
    for block in blocks:
        while listener.queue.full():  # a file is faster than real time: wait for the worker, drop nothing
            time.sleep(0.01)
        listener.push(block)
    stats = listener.stop()
    assert stats["utterances"] == 2 and stats["dropped_blocks"] == 0 and stats["errors"] == 0, stats
    assert all(16000 <= n <= 2.5 * 16000 for n in heard), heard  # handed on at the model's 16 kHz
