"""The aggregator as run: a kill in the middle of closing a round, deadline closes, the dashboard in Chromium."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import signed_update, start_live_aggregator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _post_ignoring_errors(base_url: str, data: bytes) -> None:
    try:
        requests.post(f"{base_url}/api/v1/updates", data=data, timeout=180)
    except requests.RequestException:  # the server is killed while this post waits for its answer
        pass


def _stop(agg) -> None:
    agg.process.terminate()
    agg.process.wait(timeout=30)


def test_kill_during_round_close_loses_nothing_and_counts_nothing_twice(tmp_path, trained_model, database_url):
    # Fault injection is a test-only file in the instance folder (no setting, no environment variable read on
    # every close): the worker that closes the round writes the marker file, then pauses before its commit.
    marker = tmp_path / "paused-before-commit"
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "test-hooks.json").write_text(json.dumps({"pause_before_close_commit": 120, "marker": str(marker)}))
    agg = start_live_aggregator(tmp_path, min_updates=2, database_url=database_url)
    port = int(agg.base_url.rsplit(":", 1)[1])
    try:
        agg.publish(trained_model)
        a = agg.enroll(tmp_path / "a")
        b = agg.enroll(tmp_path / "b")
        layout = a.metadata.head_layout
        env_a = signed_update(a.device_id, a.key, layout, sequence=1, num_examples=3)
        env_b = signed_update(b.device_id, b.key, layout, sequence=1, num_examples=5)
        assert agg.post_update(env_a.to_bytes()).status_code == 202
        # The second update fills the round; its close aggregates, publishes, then pauses before the commit.
        poster = threading.Thread(target=_post_ignoring_errors, args=(agg.base_url, env_b.to_bytes()), daemon=True)
        poster.start()
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and poster.is_alive():
            time.sleep(0.05)
        assert marker.exists(), "the close never reached the pause before its commit"
        assert marker.read_text() == "1"  # round 1's close, written and not committed
        _kill_group(agg.process)  # SIGKILL to master and workers mid-close
        poster.join(30)
    except BaseException:
        _kill_group(agg.process)
        raise
    (instance / "test-hooks.json").unlink()  # the restarted server closes without pausing
    agg = start_live_aggregator(tmp_path, min_updates=2, database_url=database_url, port=port)
    try:
        status = agg.status()
        # Not completed: still version 1, the round open with both accepted updates, nothing published.
        assert status["current_version"] == 1 and status["versions"] == 1
        assert status["open_round"]["updates"] == 2 and status["rounds_closed"] == 0
        # A device retrying its post (it never saw an answer) is told it was accepted; counted once.
        again = agg.post_update(env_b.to_bytes())
        assert again.status_code == 200 and again.json()["duplicate"] is True
        r = agg.post_admin("/rounds/close", json={"min_updates": 2})
        assert r.status_code == 200 and r.json()["published_version"] == 2 and r.json()["num_updates"] == 2
        assert r.json()["num_examples"] == 8
        assert agg.post_admin("/rounds/close", json={"min_updates": 1}).status_code == 409  # nothing to close twice
        status = agg.status()
        closed = [r for r in status["rounds"] if r["status"] == "closed"]
        assert len(closed) == 1 and closed[0]["num_updates"] == 2 and status["current_version"] == 2
        assert {d["updates_accepted"] for d in status["devices"]} == {1}
    finally:
        _stop(agg)


def test_a_round_closes_at_its_deadline_with_fewer_than_k(tmp_path, trained_model):
    env = {"FEDSER_ROUND_DEADLINE_SECONDS": "2", "FEDSER_ROUND_MIN_UPDATES_AT_DEADLINE": "1",
           "FEDSER_BACKGROUND_INTERVAL": "0.3"}
    agg = start_live_aggregator(tmp_path, min_updates=10, env=env)
    try:
        agg.publish(trained_model)
        dev = agg.enroll(tmp_path / "d")
        status = agg.status()
        assert status["open_round"]["deadline_at"] > time.time()
        r = agg.post_update(signed_update(dev.device_id, dev.key, dev.metadata.head_layout, sequence=1).to_bytes())
        assert r.status_code == 202 and not r.json().get("round_closed")
        deadline = time.time() + 15
        while time.time() < deadline and agg.status()["current_version"] != 2:
            time.sleep(0.3)
        status = agg.status()
        assert status["current_version"] == 2 and status["rounds"][1]["num_updates"] == 1
        # the next round has its own deadline and, being empty, stays open past it
        time.sleep(2.5)
        assert agg.status()["current_version"] == 2 and agg.status()["open_round"]["updates"] == 0
    finally:
        _stop(agg)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_dashboard_in_headless_chromium(tmp_path, trained_model):
    agg = start_live_aggregator(tmp_path, min_updates=1)
    try:
        agg.publish(trained_model)
        dev = agg.enroll(tmp_path / "d", name="kitchen-pi")
        agg.post_update(signed_update(dev.device_id, dev.key, dev.metadata.head_layout, sequence=1).to_bytes())
        requests.get(f"{agg.base_url}/api/v1/manifest", timeout=5)  # an unsigned read: one refusal
        url = f"{agg.base_url}/admin#token={agg.admin_token}"
        flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--virtual-time-budget=5000", "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'chrome'}"]
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        assert "kitchen-pi" in dom and dev.device_id in dom
        assert "missing_device_auth" in dom  # refusals by reason
        assert 'aria-label="rounds chart"' in dom and "round 1: 1 devices" in dom
        assert '<p id="error"></p>' in dom
        shot = tmp_path / "dashboard.png"
        subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        artifacts = os.environ.get("FEDSER_TEST_ARTIFACTS")
        if artifacts:
            os.makedirs(artifacts, exist_ok=True)
            shutil.copy(shot, os.path.join(artifacts, "dashboard.png"))
        wrong = subprocess.run([*flags, "--dump-dom", f"{agg.base_url}/admin#token=wrong"], capture_output=True,
                               text=True, timeout=120).stdout
        assert '<p id="error">That token was refused.</p>' in wrong and "kitchen-pi" not in wrong
    finally:
        _stop(agg)


REPO = Path(__file__).resolve().parents[2]


def _wait_https(url: str, ca: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, f"aggregator exited with {proc.returncode}"
        try:
            if requests.get(url, timeout=2, verify=str(ca)).ok:
                return
        except requests.RequestException:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within 60 s")


def test_tls_example_configuration(tmp_path, trained_model, monkeypatch):
    """deploy/tls as written: a private CA, the aggregator's ExecStart (HTTPS, its own control socket), a device
    that trusts the CA through REQUESTS_CA_BUNDLE (deploy/tls/fedser-edge-ca.conf)."""
    from edge_sdk.device import Device
    from edge_sdk.errors import ServerError
    from tools.demo import free_port

    tls = tmp_path / "tls"
    subprocess.run([str(REPO / "deploy/tls/make-private-ca.sh"), str(tls), "127.0.0.1", "localhost"], check=True,
                   capture_output=True, timeout=60)
    assert oct((tls / "server.key").stat().st_mode & 0o777) == "0o600"
    unit = (REPO / "deploy/tls/fedser-aggregator-tls.conf").read_text()
    exec_start = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=/")][-1].removeprefix("ExecStart=")
    port = free_port()
    run_dir, home = tmp_path / "run", tmp_path / "home"
    run_dir.mkdir()
    home.mkdir()
    for old, new in (("/var/lib/fedser-aggregator", str(tmp_path / "instance")),
                     ("/etc/fedser-aggregator/tls", str(tls)), ("/run/fedser-aggregator", str(run_dir)),
                     ("--host 0.0.0.0", "--host 127.0.0.1"), ("--port 8443", f"--port {port}")):
        assert old in exec_start
        exec_start = exec_start.replace(old, new)
    argv = shlex.split(exec_start)
    assert argv[0] == "/opt/fedser/bin/fedser-aggregator"
    env = dict(os.environ, HOME=str(home), XDG_RUNTIME_DIR="", FEDSER_ROUND_MIN_UPDATES="1")
    with open(tmp_path / "aggregator.log", "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "aggregator.cli", *argv[1:]], env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"https://127.0.0.1:{port}"
    ca = tls / "ca.crt"
    try:
        _wait_https(f"{base}/healthz", ca, proc)
        with pytest.raises(requests.exceptions.SSLError):  # not trusted without the fleet's CA
            requests.get(f"{base}/healthz", timeout=10)
        with pytest.raises(requests.RequestException):  # and no plain HTTP on the port
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).raise_for_status()
        # gunicorn's control socket where the unit puts it, none in the shared default place
        # (the arbiter opens it in a thread once it serves: wait for it to appear; a clean-clone run checked too early)
        deadline = time.monotonic() + 30
        while not (run_dir / "gunicorn.ctl").is_socket() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (run_dir / "gunicorn.ctl").is_socket() and not (home / ".gunicorn").exists()
        token = (tmp_path / "instance" / "admin_token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        with open(trained_model.tflite_path, "rb") as t, open(trained_model.metadata_path, "rb") as m:
            r = requests.post(f"{base}/api/v1/admin/models", headers=auth, files={"tflite": t, "metadata": m},
                              verify=str(ca), timeout=120)
        assert r.status_code == 201, r.text
        tokens = [requests.post(f"{base}/api/v1/admin/enrollment-tokens", headers=auth, json={}, verify=str(ca),
                                timeout=30).json()["token"] for _ in range(2)]
        with pytest.raises(ServerError) as exc:  # a device without the CA refuses the server's certificate
            Device(tmp_path / "untrusting").enroll(base, tokens[0])
        assert exc.value.reason == "unreachable" and "CERTIFICATE_VERIFY_FAILED" in str(exc.value)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))  # what deploy/tls/fedser-edge-ca.conf sets
        dev = Device(tmp_path / "dev")
        dev.enroll(base, tokens[1])
        assert dev.model_version == 1
        assert dev.client.get_manifest()[0] is not None  # a signed device GET over HTTPS
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_each_server_has_its_own_control_socket_or_none(tmp_path, trained_model):
    """gunicorn's default control socket is one path per user (~/.gunicorn/gunicorn.ctl): two servers on a host
    (demo, simulations, tests) took each other's. The aggregator makes none unless --control-socket asks."""
    home = tmp_path / "home"
    home.mkdir()
    servers = [start_live_aggregator(tmp_path / name, min_updates=1, env={"HOME": str(home), "XDG_RUNTIME_DIR": ""})
               for name in ("one", "two")]
    try:
        for agg in servers:
            assert requests.get(f"{agg.base_url}/healthz", timeout=10).ok
        assert not (home / ".gunicorn").exists()
    finally:
        for agg in servers:
            _stop(agg)


def test_private_ca_script_puts_ip_literals_as_ip_names(tmp_path):
    """IPv6 literals were put in the server certificate as DNS: names (a client checking the address refuses them)."""
    tls = tmp_path / "tls"
    subprocess.run([str(REPO / "deploy/tls/make-private-ca.sh"), str(tls), "fedser.example.org", "10.0.0.5", "::1",
                    "fd00::5"], check=True, capture_output=True, timeout=60)
    san = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(tls / "server.crt")],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    names = sorted(x.strip() for x in san.splitlines()[-1].split(","))
    assert names == ["DNS:fedser.example.org", "IP Address:0:0:0:0:0:0:0:1", "IP Address:10.0.0.5",
                     "IP Address:FD00:0:0:0:0:0:0:5"], san
