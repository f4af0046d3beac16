"""``fedser-edge doctor`` against the real things it checks: a real aggregator on loopback (reachability, the
pinned key, the manifest), a PulseAudio null sink as the microphone, state folders with bad owners and modes,
a device clock set wrong with libfaketime, the second runtime's venv (tflite-runtime, no sounddevice).
Each check is seen failing with its fix, and passing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, start_live_aggregator
from tests.edge_sdk.test_microphone import null_sink  # noqa: F401 - the PulseAudio fixture

TFLITE_RUNTIME_PY = REPO / ".venv-tflite-runtime" / "bin" / "python"
FAKETIME = shutil.which("faketime")


def doctor(state: Path, *args: str, python: str = sys.executable, env: dict | None = None,
           prefix: tuple[str, ...] = ()) -> tuple[int, dict[str, dict]]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FEDSER_EDGE_")}, **(env or {})}
    out = subprocess.run([*prefix, python, "-m", "edge_sdk.cli", "--state", str(state), "doctor", "--json", *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    checks = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            c = json.loads(line)
            checks[c["name"]] = c
    assert checks, out.stdout + out.stderr
    return out.returncode, checks


def _bad(checks: dict, name: str, *words: str) -> None:
    c = checks[name]
    assert c["status"] == "fail" and c["fix"], c
    for w in words:
        assert w in c["detail"] + " " + c["fix"], (w, c)


@pytest.fixture(scope="module")
def aggregator(tmp_path_factory):
    import requests

    from edge_sdk.model import bundled_model_paths

    paths = bundled_model_paths()
    if paths is None:
        pytest.skip("no bundled model in edge_sdk/data")
    agg = start_live_aggregator(tmp_path_factory.mktemp("doctor-agg"), min_updates=5)
    with open(paths[0], "rb") as t, open(paths[1], "rb") as m:
        r = requests.post(f"{agg.base_url}/api/v1/admin/models", headers=agg.auth, files={"tflite": t, "metadata": m},
                          timeout=120)
    assert r.status_code == 201, r.text
    yield agg
    agg.process.terminate()
    agg.process.wait(timeout=30)


@pytest.fixture
def enrolled(aggregator, tmp_path) -> Path:
    state = tmp_path / "dev"
    aggregator.enroll(state, name="doctor")
    return state


def test_a_healthy_enrolled_device_passes(enrolled):
    rc, checks = doctor(enrolled, "--no-audio")
    assert rc == 0, checks
    for name in ("config", "runtime", "model", "server", "clock", "key and manifest"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["state folder"]["status"] in ("ok", "warn")
    assert checks["runtime"]["detail"].startswith("ai_edge_litert ")
    assert "version 1 from the aggregator" in checks["model"]["detail"]
    assert "manifest version 1 verified with the pinned key; this device runs version 1" in \
        checks["key and manifest"]["detail"]


def test_server_unreachable(enrolled):
    identity = json.loads((enrolled / "identity.json").read_text())
    from tools.demo import free_port

    identity["server_url"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    (enrolled / "identity.json").write_text(json.dumps(identity))
    rc, checks = doctor(enrolled, "--no-audio", "--timeout", "3")
    assert rc == 1
    _bad(checks, "server", "unreachable", "systemctl status fedser-aggregator")
    assert checks["clock"]["status"] == "skip" and checks["key and manifest"]["status"] == "skip"


def test_another_server_key_is_caught(enrolled):
    from edge_sdk.signing import SigningKey

    identity = json.loads((enrolled / "identity.json").read_text())
    identity["server_public_key"] = SigningKey.generate().verify_key.to_b64()  # not the server's key
    (enrolled / "identity.json").write_text(json.dumps(identity))
    rc, checks = doctor(enrolled, "--no-audio")
    assert rc == 1
    _bad(checks, "key and manifest", "does not verify with the key pinned", "enroll again")
    _bad(checks, "model", "does not load")  # the local manifest no longer verifies either
    assert checks["server"]["status"] == "ok"


def test_an_identity_that_is_not_an_object_is_a_failed_check_not_a_traceback(tmp_path):
    state = tmp_path / "dev"
    state.mkdir()
    (state / "identity.json").write_text("[1, 2]")
    rc, checks = doctor(state, "--no-audio", "--timeout", "3")
    assert rc == 1
    _bad(checks, "model", "identity.json", "not a JSON object", "enroll again")


def test_a_damaged_model_file_is_caught(enrolled):
    tflite = next((enrolled / "models").glob("*.tflite"))
    tflite.write_bytes(tflite.read_bytes()[:-10])
    rc, checks = doctor(enrolled, "--no-audio")
    assert rc == 1
    _bad(checks, "model", "does not match the manifest", "fedser-edge sync")


@pytest.mark.skipif(FAKETIME is None, reason="faketime missing (Debian package faketime; scripts/setup.sh installs it)")
def test_a_device_clock_ten_minutes_off(enrolled):
    """The device's clock (libfaketime) is 10 minutes behind the server's Date header."""
    rc, checks = doctor(enrolled, "--no-audio", prefix=(FAKETIME, "-f", "-600s"))
    assert rc == 1
    _bad(checks, "clock", "behind the server's", "timedatectl set-ntp true")
    assert 590 <= int(checks["clock"]["detail"].split()[3]) <= 610, checks["clock"]
    _bad(checks, "key and manifest", "clock_skew")  # the server refuses its signed requests, as it would
    # ... and a clock within a few seconds passes
    rc, checks = doctor(enrolled, "--no-audio", prefix=(FAKETIME, "-f", "+2s"))
    assert checks["clock"]["status"] == "ok" and rc == 0, checks["clock"]


def test_not_enrolled_skips_the_server_with_how_to_enroll(tmp_path):
    rc, checks = doctor(tmp_path / "fresh", "--no-audio")
    assert rc == 0
    assert checks["server"]["status"] == "skip" and "fedser-edge enroll" in checks["server"]["fix"]
    assert checks["state folder"]["status"] == "warn" and "install -d -m 700" in checks["state folder"]["fix"]
    assert "bundled default model" in checks["model"]["detail"]
    assert not (tmp_path / "fresh").exists(), "doctor must not write to the state folder"


def test_state_folder_permissions(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "device.key").write_bytes(b"x")
    (state / "device.key").chmod(0o600)
    rc, checks = doctor(state, "--no-audio")
    assert checks["state folder"]["status"] == "ok" and rc == 0, checks["state folder"]
    state.chmod(0o777)
    (state / "device.key").chmod(0o644)
    rc, checks = doctor(state, "--no-audio")
    assert rc == 1
    _bad(checks, "state folder", "mode 0777", "chmod 700", "device.key has mode 0644", "chmod 600")
    if os.getuid() == 0:  # another owner (root can chown; CI runs as root)
        state.chmod(0o700)
        (state / "device.key").chmod(0o600)
        os.chown(state, 65534, 65534)
        rc, checks = doctor(state, "--no-audio")
        assert rc == 1
        _bad(checks, "state folder", "owned by uid 65534", "chown")


def test_a_broken_config_is_named(tmp_path):
    cfg = tmp_path / "edge.toml"
    cfg.write_text("[audio]\ndevice = 'USB'\nbogus_key = 1\n")
    out = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "--state", str(tmp_path / "s"), "--config", str(cfg),
                          "doctor", "--json", "--no-audio"], cwd=REPO, capture_output=True, text=True, timeout=120)
    checks = {json.loads(x)["name"]: json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")}
    assert out.returncode == 1
    _bad(checks, "config", "bogus_key")


def test_runtime_missing_and_version(tmp_path):
    rc, checks = doctor(tmp_path / "s", "--no-audio", env={"FEDSER_EDGE_RUNTIME": "tflite_runtime"})
    assert rc == 1  # tflite-runtime is not in this venv
    _bad(checks, "runtime", "tflite_runtime", "pip install")


@pytest.mark.skipif(not TFLITE_RUNTIME_PY.exists(),
                    reason="no .venv-tflite-runtime (scripts/test.sh makes it where tflite-runtime installs)")
def test_the_tflite_runtime_venv_without_sounddevice(tmp_path):
    """The second runtime's venv has tflite-runtime 2.14 and no sounddevice: runtime ok, audio fails with the fix."""
    rc, checks = doctor(tmp_path / "s", python=str(TFLITE_RUNTIME_PY))
    assert checks["runtime"]["status"] == "ok" and checks["runtime"]["detail"].startswith("tflite_runtime 2.14")
    assert checks["model"]["status"] == "ok", checks["model"]
    _bad(checks, "portaudio", "sounddevice", "fedser[audio]")
    assert "input devices" not in checks and rc == 1


def test_no_input_device(tmp_path):
    """No sound card and no sound server here (a private, empty PulseAudio runtime folder): no input device."""
    runtime = tmp_path / "no-pulse"
    runtime.mkdir(mode=0o700)
    rc, checks = doctor(tmp_path / "s", env={"XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path),
                                             "PULSE_SERVER": f"unix:{runtime}/nothing"})
    if checks.get("portaudio", {}).get("status") != "ok":
        pytest.skip(f"PortAudio not available here: {checks.get('portaudio')}")
    if checks["input devices"]["status"] == "ok":
        pytest.skip(f"this machine has a real input device: {checks['input devices']['detail']}")
    assert rc == 1
    _bad(checks, "input devices", "no audio input device", "arecord -l", "group audio")


def test_the_microphone_opens_at_the_configured_rate(null_sink, tmp_path):  # noqa: F811 - the fixture
    """A PulseAudio null sink's monitor is the microphone (as in test_microphone.py)."""
    env = {**null_sink, "PULSE_SOURCE": "fedser_null.monitor"}
    rc, checks = doctor(tmp_path / "s", env={**env, "FEDSER_EDGE_AUDIO_DEVICE": "pulse",
                                             "FEDSER_EDGE_AUDIO_SAMPLE_RATE": "48000"})
    assert checks["portaudio"]["status"] == "ok" and checks["input devices"]["status"] == "ok", checks
    assert "pulse" in checks["input devices"]["detail"]
    mic = checks["microphone"]
    assert mic["status"] == "ok" and "opens at 48000 Hz" in mic["detail"] and "resamples" in mic["detail"], mic
    rc, checks = doctor(tmp_path / "s", env={**env, "FEDSER_EDGE_AUDIO_DEVICE": "no-such-microphone"})
    assert rc == 1
    _bad(checks, "microphone", "no-such-microphone", "fedser-edge devices")


def test_a_server_with_no_published_model_is_a_warning(tmp_path):
    """A real aggregator that has published nothing answers the manifest with 404 no_model: 'warn', not 'fail'."""
    agg = start_live_aggregator(tmp_path / "empty-agg", min_updates=5)
    try:
        state = tmp_path / "dev"
        agg.enroll(state, name="doctor-empty")
        rc, checks = doctor(state, "--no-audio")
        c = checks["key and manifest"]
        assert c["status"] == "warn" and "published no model" in c["detail"] and "publish-base" in c["fix"], c
    finally:
        agg.process.terminate()
        agg.process.wait(timeout=30)


def test_a_malformed_date_header_is_a_line_not_a_traceback(enrolled):
    """A server (here a plain loopback one) whose Date header is not a date: doctor says so, it does not crash."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def date_time_string(self, timestamp=None):  # http.server's Date header
            return "Tuesday, sometime"

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        identity = json.loads((enrolled / "identity.json").read_text())
        identity["server_url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
        (enrolled / "identity.json").write_text(json.dumps(identity))
        rc, checks = doctor(enrolled, "--no-audio", "--timeout", "5")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert checks["clock"]["status"] == "warn" and "not a date" in checks["clock"]["detail"], checks["clock"]
    assert checks["server"]["status"] == "ok"


def test_a_local_model_newer_than_the_servers_is_not_said_to_be_replaced(tmp_path):
    """The server answers an older (genuinely signed) manifest than the one installed, as an aggregator restored
    from an older backup would: doctor does not claim that sync installs it (sync refuses the downgrade)."""
    from edge_sdk.model import bundled_model_paths
    from tests.edge_sdk.conftest import ModelFiles
    from tests.edge_sdk.test_device_federation import _ReplayProxy

    paths = bundled_model_paths()
    if paths is None:
        pytest.skip("no bundled model in edge_sdk/data")
    agg = start_live_aggregator(tmp_path / "agg", min_updates=50, workers=0)
    try:
        assert agg.publish(ModelFiles(*paths)) == 1
        dev = agg.enroll(tmp_path / "dev", name="doctor-newer")
        old_manifest, _ = dev.client.get_manifest()
        assert agg.publish(ModelFiles(*paths)) == 2
        assert dev.pull_model() and dev.model_version == 2
        dev.store.close()
        proxy = _ReplayProxy(agg.base_url, old_manifest)
        try:
            dev = None
            identity = json.loads((tmp_path / "dev" / "identity.json").read_text())
            identity["server_url"] = proxy.url
            (tmp_path / "dev" / "identity.json").write_text(json.dumps(identity))
            rc, checks = doctor(tmp_path / "dev", "--no-audio")
        finally:
            proxy.close()
    finally:
        agg.process.terminate()
        agg.process.wait(timeout=30)
    detail = checks["key and manifest"]["detail"]
    assert "this device runs version 2" in detail and "installs the new one" not in detail, detail
    assert "refuses the older manifest" in detail
