"""Device configuration (TOML + environment) and the listening pipeline (segmentation, queue, counters)."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from edge_sdk.config import load_config
from edge_sdk.errors import ParameterError
from edge_sdk.listen import Segmenter

SR = 16000


def test_toml_then_environment_overrides(tmp_path):
    (tmp_path / "config.toml").write_text('threads = 2\n[audio]\ndevice = "USB"\n[web]\nport = 9001\n'
                                          '[privacy]\nstore_audio = true\nmax_predictions = 10\n')
    cfg = load_config(state_dir=tmp_path, environ={"FEDSER_EDGE_WEB_PORT": "9100",
                                                   "FEDSER_EDGE_PRIVACY_STORE_AUDIO": "false"})
    assert cfg.threads == 2 and cfg.audio.device == "USB" and cfg.privacy.max_predictions == 10
    assert cfg.web.port == 9100 and cfg.privacy.store_audio is False  # the environment wins
    assert load_config(environ={}).feedback.mode == "terminal"  # defaults without any file


@pytest.mark.parametrize("text, env, message", [
    ("[audio]\ndevise = 'x'\n", {}, "unknown setting audio.devise"),
    ("[web]\nport = 'eighty'\n", {}, "web.port must be int"),
    ("[feedback]\nmode = 'email'\n", {}, "feedback.mode"),
    ("[segmenter]\nmin_seconds = 9.0\n", {}, "min_seconds < max_seconds"),
    ("not toml [", {}, "not valid TOML"),
    ("[audio]\nstall_seconds = 0.5\n", {}, "audio.stall_seconds must be 1 to 3600, got 0.5"),
    ("", {"FEDSER_EDGE_AUDIO_STALL_SECONDS": "nan"}, "audio.stall_seconds must be 1 to 3600, got nan"),
    ("[training]\nthreads = 0\n", {}, "training.threads must be -1 .* or an integer in 1..64, got 0"),
    ("", {"FEDSER_EDGE_TRAINING_EPOCHS": "many"}, "FEDSER_EDGE_TRAINING_EPOCHS: training.epochs must be int"),
    # numbers the config took unchecked before (found by an audit)
    ("[web]\nport = 70000\n", {}, "web.port must be 0 to 65535, got 70000"),
    ("[audio]\nsample_rate = 1000000000000\n", {}, "audio.sample_rate must be 8000 to 192000"),
    ("", {"FEDSER_EDGE_PRIVACY_MAX_AGE_DAYS": "nan"}, "privacy.max_age_days must be 0 to 36500, got nan"),
    ("[privacy]\nmax_predictions = -5\n", {}, "privacy.max_predictions must be 0 to"),
    ("[privacy]\nnoise_multiplier = -1.0\n", {}, "privacy.noise_multiplier must be 0 to 100"),
    ("", {"FEDSER_EDGE_SYNC_INTERVAL_SECONDS": "-inf"}, "sync.interval_seconds must be 1 to"),
    ("[training]\nlearning_rate = 5.0\n", {}, "training.learning_rate must be unset or a number in"),
    ("[segmenter]\nmax_seconds = 600.0\n", {}, "segmenter.max_seconds must be 0.02 to 30"),
])
def test_bad_config_names_what_is_wrong(tmp_path, text, env, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ParameterError, match=message):
        load_config(path, environ=env)
    with pytest.raises(ParameterError, match="config file not found"):
        load_config(tmp_path / "missing.toml", environ={})


def test_a_config_path_that_is_not_utf8_text_or_a_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "latin1.toml").write_bytes("[feedback]\nlanguage = 'pl'  # zażółć\n".encode("latin-1", "replace")
                                           + b"\xff\xfe")
    with pytest.raises(ParameterError, match="latin1.toml: not UTF-8"):
        load_config(tmp_path / "latin1.toml", environ={})
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(ParameterError, match="folder.toml: cannot be read"):
        load_config(tmp_path / "folder.toml", environ={})


def _speech(seconds: float, rng, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (level * np.sin(2 * np.pi * 180 * t) * (1 + 0.3 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def _silence(seconds: float, rng) -> np.ndarray:
    return (0.002 * rng.standard_normal(int(seconds * SR))).astype(np.float32)


def test_segmenter_finds_utterances_drops_blips_and_cuts_long_speech(rng):
    cfg = load_config(environ={}).segmenter
    stream = np.concatenate([_silence(1.0, rng), _speech(1.5, rng), _silence(0.8, rng), _speech(0.2, rng),
                             _silence(0.8, rng), _speech(2.0, rng), _silence(0.1, rng), _speech(0.5, rng),
                             _silence(1.0, rng), _speech(13.0, rng), _silence(1.0, rng)])
    seg = Segmenter(cfg, SR)
    utts = []
    for i in range(0, len(stream), 800):  # 50 ms blocks, as the microphone delivers them
        utts += seg.feed(stream[i:i + 800])
    utts += seg.flush()
    durations = [round(len(u) / SR, 1) for u in utts]
    # 1.5 s; the 0.2 s blip is too short; 2.0 + 0.1 gap + 0.5 joins (gap < hangover); 13 s cut at 6 + 6 + rest
    assert len(durations) == 5 and seg.too_short == 1, durations
    assert 1.5 <= durations[0] <= 2.0 and 2.6 <= durations[1] <= 3.2
    assert durations[2] == durations[3] == 6.0 and 0.6 <= durations[4] <= 1.6


def test_listener_counts_blocks_it_had_to_drop(tmp_path, rng):
    from edge_sdk.device import Device
    from edge_sdk.listen import Listener

    device = Device(tmp_path / "dev")
    if device.model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    cfg = load_config(environ={"FEDSER_EDGE_AUDIO_QUEUE_BLOCKS": "3"})
    got = []
    listener = Listener(device, cfg, lambda pred, audio: got.append((pred, len(audio)))).start(microphone=False)
    stream = np.concatenate([_silence(0.5, rng), _speech(1.2, rng), _silence(1.0, rng)] * 3)
    for i in range(0, len(stream), 800):
        listener.push(stream[i:i + 800])  # far faster than real time: the queue of 3 must overflow
    stats = listener.stop()
    assert stats["blocks"] == int(np.ceil(len(stream) / 800))
    assert stats["dropped_blocks"] > 0 and stats["queued"] == 0  # counted, never silent
    slow = Listener(device, load_config(environ={}), lambda pred, audio: got.append((pred, len(audio))))
    slow.start(microphone=False)
    got.clear()
    for i in range(0, len(stream), 800):
        slow.push(stream[i:i + 800])
    stats = slow.stop()
    assert stats["dropped_blocks"] == 0 and stats["utterances"] == 3 == len(got)
    assert all(p.model_version == 0 and p.label in device.metadata.labels for p, _ in got)
    assert device.store.counts()["predictions"] >= 3


def _stream_at(sr: int) -> np.ndarray:
    """1 s of quiet, a 1.5 s voiced utterance, 1 s of quiet, generated at ``sr`` (the same sound at any rate)."""
    def t(seconds):
        return np.arange(int(seconds * sr)) / sr
    quiet = 0.002 * np.sin(2 * np.pi * 50 * t(1.0))
    tt = t(1.5)
    voiced = sum(0.25 / k * np.sin(2 * np.pi * k * 160 * tt * (1 + 0.03 * np.sin(2 * np.pi * 3 * tt)))
                 for k in range(1, 10)) * np.sin(np.pi * tt / 1.5)
    return np.concatenate([quiet, voiced, quiet]).astype(np.float32)


def _listen(device, sample_rate: int) -> tuple[list, dict]:
    from edge_sdk.listen import Listener

    cfg = load_config(environ={"FEDSER_EDGE_AUDIO_SAMPLE_RATE": str(sample_rate)})
    got = []
    listener = Listener(device, cfg, lambda pred, audio: got.append((pred, audio))).start(microphone=False)
    stream = _stream_at(sample_rate)
    for i in range(0, len(stream), listener.blocksize):
        listener.push(stream[i:i + listener.blocksize])
    return got, listener.stop()


def test_a_48_khz_microphone_gives_the_features_of_16_khz(tmp_path):
    """The stream runs at the microphone's rate; each utterance reaches the model at the model's rate."""
    import base64

    from edge_sdk.device import Device

    at16, at48 = Device(tmp_path / "a"), Device(tmp_path / "b")
    if at16.model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    assert at16.metadata.features.sample_rate == 16000
    got16, stats16 = _listen(at16, 16000)
    got48, stats48 = _listen(at48, 48000)
    assert len(got16) == len(got48) == 1 and stats48["errors"] == 0, (stats16, stats48)
    (p16, a16), (p48, a48) = got16[0], got48[0]
    assert abs(len(a48) - len(a16)) <= 2  # the utterance handed on is at 16 kHz, not three times longer

    def features(device):
        blob = device.store.export()["predictions"][0]["features"]
        return np.frombuffer(base64.b64decode(blob), "<f4")

    f16, f48 = features(at16), features(at48)
    assert f16.shape == f48.shape
    # normalised features (unit variance): the same sound within resampling error, not a 3x stretched one
    assert np.mean(np.abs(f16 - f48)) < 0.01, np.mean(np.abs(f16 - f48))  # measured: 5e-9
    assert p16.label == p48.label and max(abs(p16.probs[k] - p48.probs[k]) for k in p16.probs) < 0.01


def test_a_stream_rate_out_of_range_is_refused_with_a_message(tmp_path):
    from edge_sdk.device import Device
    from edge_sdk.errors import AudioError
    from edge_sdk.listen import Listener

    with pytest.raises(ParameterError, match="audio.sample_rate must be 8000 to 192000, got 4000"):
        load_config(environ={"FEDSER_EDGE_AUDIO_SAMPLE_RATE": "4000"})  # refused with the config now
    cfg = load_config(environ={})
    cfg.audio.sample_rate = 4000  # a config made in code, past validate(): the listener checks it too
    with pytest.raises(AudioError, match="audio.sample_rate must be an integer from 8000 to 192000 Hz"):
        Listener(Device(tmp_path / "dev"), cfg)


def test_listen_file_hears_a_long_recording_at_its_own_rate(tmp_path):
    """`listen --file` streams the whole file at its own rate: every utterance of a 90 s 48 kHz recording is heard
    (reading the file with load_audio kept only its first 30 s, at the configured 16 kHz rate), and no block is
    dropped: a file waits for the classifier (pushing without waiting dropped 1662 of 2400 blocks of a 120 s file)."""
    import json
    import subprocess
    import sys

    import soundfile

    from edge_sdk.device import Device

    if Device(tmp_path / "probe").model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    sr = 48000
    one = _stream_at(sr)  # quiet, 1.5 s utterance, quiet
    gap = np.zeros(int(14 * sr), np.float32)
    recording = np.concatenate([one, gap] * 5 + [one])  # six utterances, about 17.5 s apart, over 90 s
    path = tmp_path / "long.wav"
    soundfile.write(path, recording, sr)
    out = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "--state", str(tmp_path / "dev"), "listen",
                          "--file", str(path), "--feedback", "none"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    predictions = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{") and '"label"' in line]
    assert len(predictions) == 6, out.stdout[-2000:]
    stats = [json.loads(line)["listen_stats"] for line in out.stdout.splitlines() if '"listen_stats"' in line]
    assert stats and stats[0]["dropped_blocks"] == 0, stats


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_listen_ends_cleanly_on_sigint_or_sigterm_even_when_started_ignoring_sigint(tmp_path, signum):
    """A listener started as a background job (SIGINT ignored from the start, as a shell does) or stopped by
    systemd (SIGTERM) still closes its stream, prints its stats and exits 0."""
    import json
    import subprocess
    import sys
    import time

    import soundfile

    from edge_sdk.device import Device

    if Device(tmp_path / "probe").model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    soundfile.write(tmp_path / "one.wav", _stream_at(16000), 16000)
    listen = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "--state", str(tmp_path / "dev"), "listen",
                               "--file", str(tmp_path / "one.wav"), "--feedback", "none", "--seconds", "300"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 120
        line = ""
        while '"label"' not in line:  # the file's utterance heard: the session is in its loop
            line = listen.stdout.readline()
            assert line or listen.poll() is None, listen.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no prediction"
        listen.send_signal(signum)
        out, err = listen.communicate(timeout=60)
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.communicate()
    assert listen.returncode == 0, err[-2000:]
    stats = [json.loads(x)["listen_stats"] for x in out.splitlines() if '"listen_stats"' in x]
    assert stats and stats[0]["predictions"] == 1, out[-2000:]


def test_classify_keeps_at_most_the_maximum_clip_length(tmp_path, rng):
    """An over-long array handed to classify is cut before features and before the (opt-in) stored audio."""
    import base64

    from edge_sdk.device import Device
    from edge_sdk.features import MAX_CLIP_SECONDS

    device = Device(tmp_path / "dev")
    if device.model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    sr = device.metadata.features.sample_rate
    audio = (0.1 * rng.standard_normal(int(90 * sr))).astype(np.float32)
    device.classify(audio, keep_audio=True)
    stored = device.store.export()["predictions"][0]
    kept = np.frombuffer(base64.b64decode(stored["audio"]), "<i2") if stored.get("audio") else None
    assert kept is not None and len(kept) == int(MAX_CLIP_SECONDS * sr)
