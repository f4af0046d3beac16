"""One process at a time changes a device's state folder (``edge_sdk.storage.StateLock``): a second ``train``,
``sync`` or ``wipe-data`` beside a running ``listen`` is refused with exit status 75 naming the holder, or waits
with ``--wait``; reading and answering work beside it. Real processes, real flock, the bundled model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from edge_sdk.cli import EXIT_BUSY
from edge_sdk.errors import FedserError, ParameterError, StateBusyError
from edge_sdk.storage import LOCK_FILE, StateLock
from tests.conftest import REPO


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_sdk.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_a_second_holder_is_refused_with_the_first_ones_name_until_it_lets_go(tmp_path):
    first = StateLock(tmp_path, command="fedser-edge listen").acquire()
    with pytest.raises(StateBusyError) as busy:
        StateLock(tmp_path, command="fedser-edge train").acquire()
    assert busy.value.holder["pid"] == os.getpid() and busy.value.holder["command"] == "fedser-edge listen"
    message = str(busy.value)
    assert f"fedser-edge listen (pid {os.getpid()}, since " in message
    assert "--wait" in message and str(tmp_path) in message
    assert StateLock(tmp_path).busy() == busy.value.holder  # what status and doctor show
    first.release()
    assert (tmp_path / LOCK_FILE).read_bytes() == b""  # no note outlives its holder
    assert StateLock(tmp_path).busy() is None
    with StateLock(tmp_path, command="fedser-edge train") as second:
        assert second.held
    assert oct((tmp_path / LOCK_FILE).stat().st_mode & 0o777) == oct(0o600)


def test_wait_takes_the_folder_when_the_holder_lets_go(tmp_path):
    first = StateLock(tmp_path, command="fedser-edge sync").acquire()
    threading.Timer(0.8, first.release).start()
    started = time.monotonic()
    second = StateLock(tmp_path).acquire(wait=30)
    assert second.held and 0.7 < time.monotonic() - started < 10
    second.release()
    first = StateLock(tmp_path).acquire()
    with pytest.raises(StateBusyError, match="after waiting 1 s"):
        StateLock(tmp_path).acquire(wait=1)
    first.release()
    for bad in (-1, float("nan"), float("inf"), 86401, True, "5"):
        with pytest.raises(ParameterError, match="wait must be"):
            StateLock(tmp_path).acquire(wait=bad)


def test_a_killed_holder_never_leaves_the_folder_locked(tmp_path):
    code = ("import sys, time; from edge_sdk.storage import StateLock; "
            "StateLock(sys.argv[1], command='fedser-edge listen').acquire(); print('held', flush=True); "
            "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert StateLock(tmp_path).busy()["pid"] == proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid  # its note stays: the lock does not
    assert StateLock(tmp_path).busy() is None
    with StateLock(tmp_path) as lock:
        assert lock.held


@pytest.mark.parametrize("note", [b"x" * 1_000_000, b"\xff\xfe not utf-8", b"[1, 2]", b'{"pid": "1", "command": "x"}',
                                  b'{"pid": 0, "command": "x", "since": 1}',
                                  b'{"pid": 12, "command": "a\\u001b[2Jb", "since": 1}',
                                  b'{"pid": 12, "command": "x", "since": NaN}',
                                  b'{"pid": 12, "command": "x", "since": 1e20}'])
def test_a_damaged_note_only_makes_the_message_vaguer(tmp_path, note):
    import fcntl

    path = tmp_path / LOCK_FILE
    path.write_bytes(note)
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held by "someone" who wrote that note
    try:
        assert StateLock(tmp_path).holder() is None
        assert StateLock(tmp_path).busy() == {}
        with pytest.raises(StateBusyError, match="in use by another process") as busy:
            StateLock(tmp_path).acquire()
        assert busy.value.holder is None and len(str(busy.value)) < 500
    finally:
        os.close(fd)


def test_a_lock_file_that_is_a_link_is_refused_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    (tmp_path / LOCK_FILE).symlink_to(target)
    with pytest.raises(FedserError, match="cannot open the state folder's lock"):
        StateLock(tmp_path).acquire()
    assert target.read_text() == "keep me"


def _bundled_or_skip(state) -> None:
    from edge_sdk.model import bundled_model_paths

    if bundled_model_paths() is None:
        pytest.skip("no bundled model in edge_sdk/data")


def test_beside_a_running_listen_writers_are_refused_and_readers_and_answers_work(tmp_path, synthetic_clips):
    state = tmp_path / "dev"
    _bundled_or_skip(state)
    clip = str(synthetic_clips[0].path)
    classified = _cli("--state", str(state), "classify", clip)
    assert classified.returncode == 0, classified.stderr
    prediction_id = json.loads(classified.stdout.splitlines()[-1])["id"]
    listen = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "--state", str(state), "listen", "--feedback",
                               "none", "--file", clip, "--seconds", "300"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (StateLock(state).busy() or {}).get("command"):
            assert listen.poll() is None and time.time() < deadline, listen.stderr.read() if listen.poll() else ""
            time.sleep(0.1)
        for writer in (["wipe-data", "--yes"], ["train"], ["sync"], ["classify", clip]):
            refused = _cli("--state", str(state), *writer)
            assert refused.returncode == EXIT_BUSY, (writer, refused.stderr)
            assert f"in use by fedser-edge listen (pid {listen.pid}" in refused.stderr, refused.stderr
            assert "systemctl stop fedser-edge" in refused.stderr
        status = _cli("--state", str(state), "status")
        assert status.returncode == 0, status.stderr
        in_use = json.loads(status.stdout)["in_use_by"]
        assert in_use["command"] == "fedser-edge listen" and in_use["pid"] == listen.pid
        answered = _cli("--state", str(state), "feedback", prediction_id, "up")
        assert answered.returncode == 0, answered.stderr
        doctor = _cli("--state", str(state), "doctor", "--json", "--no-audio")
        checks = [json.loads(line) for line in doctor.stdout.splitlines() if line.startswith("{")]
        folder = next(c for c in checks if c["name"] == "state folder")
        assert f"in use by fedser-edge listen (pid {listen.pid})" in folder["detail"], folder
        # --wait: the wipe waits for listen, which a SIGTERM ends a second later, and then runs
        threading.Timer(1.0, listen.send_signal, (signal.SIGTERM,)).start()
        wiped = _cli("--state", str(state), "--wait", "60", "wipe-data", "--yes")
        assert wiped.returncode == 0, wiped.stderr
        assert json.loads(wiped.stdout)["wiped"]["predictions"] >= 1
        assert listen.wait(timeout=60) == 0
    finally:
        listen.kill()
        listen.communicate()
    assert StateLock(state).busy() is None


@pytest.mark.parametrize("wait", ["-1", "nan", "1e9", "soon"])
def test_the_wait_flag_is_range_checked(tmp_path, wait):
    bad = _cli("--state", str(tmp_path), "--wait", wait, "status")
    assert bad.returncode == 2 and "--wait" in bad.stderr
    assert not (tmp_path / LOCK_FILE).exists()
