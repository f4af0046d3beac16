"""The microphone path through the real stack: sounddevice -> PortAudio -> ALSA's pulse plugin -> a PulseAudio
null sink whose monitor is the "microphone", while known clips play into the sink (RAVDESS speech when it is
here, else the synthetic voiced tones)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

PULSEAUDIO, PAPLAY = shutil.which("pulseaudio"), shutil.which("paplay")


@pytest.fixture
def null_sink(tmp_path):
    if not (PULSEAUDIO and PAPLAY):
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


def test_listen_hears_clips_played_into_a_null_sink(null_sink, synthetic_clips, tmp_path):
    from edge_sdk.device import Device
    from models.datasets import default_ravdess_root

    if Device(tmp_path / "probe").model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    env = {**null_sink, "PULSE_SOURCE": "fedser_null.monitor"}
    listen = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "--state", str(tmp_path / "dev"), "listen",
                               "--input-device", "pulse", "--feedback", "none", "--seconds", "14"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)  # interpreter start and the stream opening
    root = default_ravdess_root()
    clips = ([root / "Actor_01" / "03-01-05-01-01-01-01.flac", root / "Actor_02" / "03-01-04-01-01-01-02.flac"]
             if root else [synthetic_clips[0].path, synthetic_clips[-1].path])
    for clip in clips:
        subprocess.run([PAPLAY, "--device=fedser_null", str(clip)], env=null_sink, check=True, timeout=30)
        time.sleep(1.5)  # silence between utterances
    out, err = listen.communicate(timeout=60)
    assert listen.returncode == 0, err[-2000:]
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    preds = [x for x in lines if "label" in x]
    stats = next(x["listen_stats"] for x in lines if "listen_stats" in x)
    assert len(preds) == 2, (lines, err[-1000:])  # one utterance per clip, found by the segmenter
    assert stats["dropped_blocks"] == 0 and stats["input_overflows"] == 0 and stats["blocks"] > 150
    assert all(p["model_version"] == 0 and 0 < p["latency_ms"] < 500 for p in preds)
    assert Device(tmp_path / "dev").store.counts()["predictions"] == 2
