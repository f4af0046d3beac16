"""The microphone path through the real stack: sounddevice -> PortAudio -> ALSA's pulse plugin -> a PulseAudio
null sink whose monitor is the "microphone", while known clips play into the sink (RAVDESS speech when it is
here, else the synthetic voiced tones)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO

PULSEAUDIO, PAPLAY, PACTL = shutil.which("pulseaudio"), shutil.which("paplay"), shutil.which("pactl")


@pytest.fixture
def null_sink(tmp_path):
    if not (PULSEAUDIO and PAPLAY and PACTL):
        pytest.skip("pulseaudio / paplay not installed (scripts/setup.sh installs pulseaudio, pulseaudio-utils, "
                    "libasound2-plugins)")
    runtime = tmp_path / "pulse-runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
    start = subprocess.run([PULSEAUDIO, "--daemonize=yes", "--exit-idle-time=-1", "-n",
                            "--load=module-native-protocol-unix", "--load=module-null-sink sink_name=fedser_null",
                            "--load=module-always-sink"], env=env, capture_output=True, text=True, timeout=30)
    if start.returncode != 0:
        pytest.skip(f"cannot start a private PulseAudio daemon here: {start.stderr.strip()[-300:]}")
    yield env
    subprocess.run([PULSEAUDIO, "--kill"], env=env, capture_output=True, timeout=30)


def _wait_recording(env, listen, stderr=None, seconds: float = 90) -> None:
    """Until PulseAudio has the listener's recording stream on the monitor, running (not corked)."""
    deadline = time.monotonic() + seconds
    while not _recording(env):
        assert listen.poll() is None, stderr.read_text()[-2000:] if stderr else "listen ended"
        assert time.monotonic() < deadline, "the listener never opened its input stream"
        time.sleep(0.1)


def _recording(env) -> bool:
    """Whether a client records from the null sink's monitor and its stream is running."""
    out = subprocess.run([PACTL, "list", "source-outputs"], env=env, capture_output=True, text=True,
                         timeout=10).stdout
    return "Corked: no" in out


# 48 kHz: a USB microphone's rate, resampled for the model (slow-marked: the fast suite has the same check on pushed
# blocks in test_config_and_listen.py)
@pytest.mark.parametrize("rate", [16000, pytest.param(48000, marks=pytest.mark.slow)])
def test_listen_hears_clips_played_into_a_null_sink(null_sink, synthetic_clips, tmp_path, rate):
    from edge_sdk.device import Device
    from models.datasets import default_ravdess_root

    if Device(tmp_path / "probe").model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    env = {**null_sink, "PULSE_SOURCE": "fedser_null.monitor", "FEDSER_EDGE_AUDIO_SAMPLE_RATE": str(rate),
           "PYTHONFAULTHANDLER": "1"}  # a listener that hangs is ended with SIGABRT below: its threads' stacks
    err_file = open(tmp_path / "listen.stderr", "w")  # noqa: SIM115 - closed below
    listen = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "--state", str(tmp_path / "dev"), "listen",
                               "--input-device", "pulse", "--feedback", "none", "--seconds", "300"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in listen.stdout], daemon=True)
    reader.start()
    try:
        _wait_recording(null_sink, listen, tmp_path / "listen.stderr")
        root = default_ravdess_root()
        # clips the bundled model is sure of (angry, strong happy: top probability 0.999 and 1.0 read from a file), so
        # the comparison below checks the audio path, not a borderline decision: on a clip near the boundary the
        # running speaker statistics, which differ by a few frames between the two paths, can move it by 0.2
        clips = ([root / "Actor_01" / "03-01-05-01-01-01-01.flac", root / "Actor_02" / "03-01-03-02-01-01-02.flac"]
                 if root else [synthetic_clips[0].path, synthetic_clips[-1].path])
        for clip in clips:
            subprocess.run([PAPLAY, "--device=fedser_null", str(clip)], env=null_sink, check=True, timeout=30)
            time.sleep(1.5)  # silence between utterances (part of the signal: the segmenter's hangover ends each)
        out, deadline = [], time.monotonic() + 60
        while sum("label" in x for x in out) < 2 and time.monotonic() < deadline:  # both predictions printed
            try:
                out.append(lines.get(timeout=0.5))
            except queue.Empty:
                assert listen.poll() is None, (tmp_path / "listen.stderr").read_text()[-2000:]
        listen.send_signal(signal.SIGINT)
        try:
            listen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            listen.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to stderr
            listen.wait(timeout=30)
            pytest.fail(f"listen still ran 60 s after SIGINT; printed {out[-6:]}; its stacks and stderr:\n"
                        + (tmp_path / "listen.stderr").read_text()[-6000:])
        reader.join(timeout=30)  # the pipe is at its end once the process exited
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait()
        err_file.close()
    err = (tmp_path / "listen.stderr").read_text()
    while not lines.empty():
        out.append(lines.get())
    assert listen.returncode == 0, err[-2000:]
    lines = [json.loads(x) for x in out if x.startswith("{")]
    preds = [x for x in lines if "label" in x]
    stats = next(x["listen_stats"] for x in lines if "listen_stats" in x)
    assert len(preds) == 2, (lines, err[-1000:])  # one utterance per clip, found by the segmenter
    assert stats["dropped_blocks"] == 0 and stats["input_overflows"] == 0 and stats["blocks"] > 150
    assert all(p["model_version"] == 0 and 0 < p["latency_ms"] < 500 for p in preds)
    assert Device(tmp_path / "dev").store.counts()["predictions"] == 2
    # The same clips streamed from a file through the same segmenter on a fresh device: the microphone at either
    # rate hears what the file holds (the segmenter, not the sound stack, decides how much quiet edge an utterance
    # keeps, and the level-normalised model is sensitive to it, so the reference goes through the segmenter too).
    if root is None:
        # Synthetic tones are far from speech: the level-normalised bundled model gives them near-boundary
        # probabilities that the sound stack's resampling moves (sad 0.96 heard against 0.38 read, seen in a clean
        # clone). Label parity is checked on RAVDESS speech; without it the capture path above is what is tested.
        return
    import numpy as np
    import soundfile

    from edge_sdk.audio import load_audio

    gap = np.zeros(int(1.5 * 16000), np.float32)
    stream = np.concatenate([gap] + [x for c in clips for x in (load_audio(c, sample_rate=16000), gap)])
    soundfile.write(tmp_path / "clips.wav", stream, 16000)
    ref = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "--state", str(tmp_path / "ref"), "listen", "--file",
                          str(tmp_path / "clips.wav"), "--feedback", "none"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    files = [json.loads(x) for x in ref.stdout.splitlines() if x.startswith("{") and '"label"' in x]
    assert len(files) == 2, ref.stdout[-2000:]
    for heard, read in zip(preds, files, strict=True):  # printed in the order heard
        assert heard["label"] == read["label"], (rate, heard["probs"], read["probs"])
        diff = max(abs(heard["probs"][k] - read["probs"][k]) for k in read["probs"])
        assert diff < 0.1, (heard["probs"], read["probs"])


# frozen: slow-marked (the default suite's budget); the fast suite's hung-server test below also sees a stall
@pytest.mark.parametrize("how", ["killed", pytest.param("frozen", marks=pytest.mark.slow)])
def test_listen_reopens_an_input_that_went_away_and_hears_again(null_sink, synthetic_clips, tmp_path, how):
    """The sound server (standing in for a USB microphone pulled out) dies under a running listen (``killed``:
    PortAudio ends the stream) or stops delivering (``frozen``, SIGSTOP: the stream stays open, no block comes for
    audio.stall_seconds): listen says the input is lost and retries; the server comes back (a new one, or the same
    one continued) with the same source, listen reopens it by name and classifies the next utterance. Without the
    watchdog listen ran on, deaf."""
    from edge_sdk.device import Device

    if Device(tmp_path / "probe").model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    env = {**null_sink, "PULSE_SOURCE": "fedser_null.monitor", "FEDSER_EDGE_AUDIO_STALL_SECONDS": "3"}
    err_file = open(tmp_path / "listen.stderr", "w")  # noqa: SIM115 - closed below
    listen = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "--state", str(tmp_path / "dev"), "listen",
                               "--input-device", "pulse", "--feedback", "none", "--seconds", "300"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in listen.stdout], daemon=True).start()
    seen: list[dict] = []
    server = 0

    def wait_for(pred, what: str, seconds: float = 90) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                assert listen.poll() is None, (tmp_path / "listen.stderr").read_text()[-2000:]
                continue
            if line.startswith("{"):
                seen.append(json.loads(line))
                if pred(seen[-1]):
                    return seen[-1]
        pytest.fail(f"no {what} within {seconds} s; printed {seen[-6:]}; stderr "
                    + (tmp_path / "listen.stderr").read_text()[-2000:])

    try:
        _wait_recording(null_sink, listen, tmp_path / "listen.stderr")
        server = _server_pid(null_sink) if how == "frozen" else 0
        if how == "killed":
            subprocess.run([PULSEAUDIO, "--kill"], env=null_sink, capture_output=True, timeout=30)
        else:
            os.kill(server, signal.SIGSTOP)
        lost = wait_for(lambda x: x.get("input") == "lost", "loss report", 30)
        assert ("ended" if how == "killed" else "no audio from the input for") in lost["reason"], lost
        time.sleep(2)  # gone for a while: at least one reopen fails
        if how == "killed":
            start = subprocess.run([PULSEAUDIO, "--daemonize=yes", "--exit-idle-time=-1", "-n",
                                    "--load=module-native-protocol-unix",
                                    "--load=module-null-sink sink_name=fedser_null", "--load=module-always-sink"],
                                   env=null_sink, capture_output=True, text=True, timeout=30)
            assert start.returncode == 0, start.stderr
        else:
            os.kill(server, signal.SIGCONT)
        back = wait_for(lambda x: x.get("input") == "restored", "restored report", 90)
        assert back["after_seconds"] >= 2
        deadline = time.monotonic() + 30
        while not _recording(null_sink):
            assert time.monotonic() < deadline, "the reopened stream never ran"
            time.sleep(0.1)
        subprocess.run([PAPLAY, "--device=fedser_null", str(synthetic_clips[0].path)], env=null_sink, check=True,
                       timeout=30)
        time.sleep(1.5)
        wait_for(lambda x: "label" in x, "prediction after the input came back", 60)
        listen.send_signal(signal.SIGINT)
        stats = wait_for(lambda x: "listen_stats" in x, "listen_stats", 60)["listen_stats"]
        assert listen.wait(timeout=60) == 0
    finally:
        if server:
            os.kill(server, signal.SIGCONT)  # never leave a stopped server behind (a failure above)
        if listen.poll() is None:
            listen.kill()
            listen.wait()
        err_file.close()
    assert stats["input_losses"] == 1 and stats["input_restarts"] == 1 and not stats["input_lost"], stats
    assert "reopening" in (tmp_path / "listen.stderr").read_text()


def _server_pid(env) -> int:
    out = subprocess.run([PULSEAUDIO, "--check", "-v"], env=env, capture_output=True, text=True, timeout=30).stderr
    return int(out.rsplit("PID", 1)[-1].strip(" .\n"))


@pytest.mark.parametrize("when", [pytest.param("before the loss is seen", marks=pytest.mark.slow), "while reopening"])
def test_listen_stops_at_once_even_on_a_hung_sound_server(null_sink, tmp_path, when):
    """SIGINT to listen while the sound server is frozen (SIGSTOP): closing its stream blocks, so it is left behind
    after 5 s, and the process must still end (it hung in PortAudio's exit handler before: review finding)."""
    from edge_sdk.device import Device

    if Device(tmp_path / "probe").model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    env = {**null_sink, "PULSE_SOURCE": "fedser_null.monitor", "FEDSER_EDGE_AUDIO_STALL_SECONDS": "2",
           "PYTHONFAULTHANDLER": "1"}  # a hang is ended with SIGABRT below: every thread's stack
    listen = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "--state", str(tmp_path / "dev"), "listen",
                               "--input-device", "pulse", "--feedback", "none", "--seconds", "300"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = _server_pid(null_sink)
    try:
        _wait_recording(null_sink, listen)
        os.kill(server, signal.SIGSTOP)
        time.sleep(0.5 if when.startswith("before") else 5)  # 5 s: lost after 2, the keeper blocked closing it
        listen.send_signal(signal.SIGINT)
        started = time.monotonic()
        try:
            out, err = listen.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            listen.send_signal(signal.SIGABRT)
            out, err = listen.communicate(timeout=30)
            pytest.fail(f"listen still ran 30 s after SIGINT with the sound server frozen; printed {out[-500:]}; "
                        f"its stacks and stderr:\n{err[-6000:]}")
        assert time.monotonic() - started < 20
        assert listen.returncode == 0, err[-2000:]
        assert "listen_stats" in out.strip().splitlines()[-1]
    finally:
        os.kill(server, signal.SIGCONT)
        if listen.poll() is None:
            listen.kill()
            listen.communicate()
