"""A full disk under the device's state folder (a real tmpfs, filled): every write says so in one clear error
that names the folder and the space left (StorageFullError; the CLI exits 2 without a traceback, the page answers
507, listen goes on and counts it, doctor fails its disk check), nothing is half-written, and once there is room
again everything goes on with nothing lost. Needs root to mount the tmpfs (skipped otherwise)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

from edge_sdk.device import Device
from edge_sdk.errors import StorageFullError
from tests.conftest import REPO


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs mounted for the test, and functions to fill it and to free it."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()[:200]}")
    filler = where / "filler"

    def fill() -> None:
        with open(filler, "ab", buffering=0) as f:  # unbuffered: nothing left to flush at close
            for size in (65536, 4096, 512):
                try:
                    while True:
                        f.write(b"\0" * size)
                except OSError:
                    pass
        assert os.statvfs(where).f_bavail == 0

    def free() -> None:
        filler.unlink()

    try:
        yield where, fill, free
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _tone(i: int, rng) -> np.ndarray:
    t = np.arange(16000) / 16000
    return (0.2 * np.sin(2 * np.pi * (120 + 15 * i) * t) + 0.02 * rng.normal(size=len(t))).astype(np.float32)


def _answered(state, n: int = 12) -> tuple[Device, list[str]]:
    dev = Device(state)
    if dev.model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    rng, labels, ids = np.random.default_rng(0), dev.metadata.labels, []
    for i in range(n):
        pred = dev.classify(_tone(i, rng))
        dev.feedback(pred.id, labels[(labels.index(pred.label) + 1) % len(labels)])
        ids.append(pred.id)
    return dev, ids


def test_every_write_on_a_full_disk_says_so_and_nothing_is_lost(small_disk):
    where, fill, free = small_disk
    state = where / "dev"
    dev, ids = _answered(state)
    extra = dev.classify(_tone(99, np.random.default_rng(1)))  # stored, not yet answered
    fill()
    rng = np.random.default_rng(2)
    for attempt in (lambda: dev.classify(_tone(50, rng)), lambda: dev.feedback(extra.id, "up"),
                    lambda: dev.personalize()):
        with pytest.raises(StorageFullError) as full:
            attempt()
        message = str(full.value)
        assert f"the disk holding {state}" in message and "MB free" in message and "Free some space" in message
    assert not any(p.name.startswith("personal.") for p in state.iterdir())  # no half-written personal file
    free()
    dev.store.close()
    again = Device(state)  # everything from before the disk filled is there, and intact
    assert again.problems == []
    assert len(again.store.examples()) == len(ids)
    assert again.store.counts()["predictions"] == len(ids) + 1
    db = sqlite3.connect(str(state / "fedser.db"))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    again.feedback(extra.id, "up")
    assert again.personalize().status in ("kept", "discarded")


def test_the_cli_the_page_listen_and_doctor_on_a_full_disk(small_disk, synthetic_clips):
    from edge_sdk.web import FeedbackServer
    from tools.demo import free_port

    where, fill, free = small_disk
    state = where / "dev"
    dev, ids = _answered(state, n=3)
    extra = dev.classify(_tone(99, np.random.default_rng(1)))
    fill()
    clip = str(synthetic_clips[0].path)
    cli = [sys.executable, "-m", "edge_sdk.cli", "--state", str(state)]
    classified = subprocess.run([*cli, "classify", clip], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert classified.returncode == 2 and "Traceback" not in classified.stderr, classified.stderr[-2000:]
    assert f"error: the disk holding {state} is full" in classified.stderr
    for command in (["status"], ["export-data"]):  # reading works on a full disk (the store is open here)
        run = subprocess.run([*cli, *command], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, (command, run.stderr[-2000:])
    export = subprocess.run([*cli, "export-data", "--out", str(where / "mine.json")], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert export.returncode == 2 and "is full" in export.stderr and "Traceback" not in export.stderr, export.stderr
    assert not (where / "mine.json").exists() and not list(where.glob(".mine.json*"))  # nothing partial
    listened = subprocess.run([*cli, "-v", "listen", "--feedback", "none", "--file", clip], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert listened.returncode == 0, listened.stderr[-2000:]
    stats = json.loads(listened.stdout.strip().splitlines()[-1])["listen_stats"]
    assert stats["errors"] >= 1 and stats["predictions"] == 0
    assert "classification failed: the disk holding" in listened.stderr
    doctor = subprocess.run([*cli, "doctor", "--json", "--no-audio"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    checks = {c["name"]: c for c in (json.loads(x) for x in doctor.stdout.splitlines() if x.startswith("{"))}
    assert doctor.returncode == 1 and checks["disk space"]["status"] == "fail", checks.get("disk space")
    assert "0 MB free" in checks["disk space"]["detail"] and "journalctl" in checks["disk space"]["fix"]
    server = FeedbackServer(dev, port=free_port()).start()
    try:
        r = requests.post(server.url + "api/feedback", json={"id": extra.id, "answer": "up"}, timeout=30)
        assert r.status_code == 507 and r.json()["error"] == "storage_full", r.text
        assert "is full" in r.json()["detail"]
        free()
        time.sleep(0.1)
        r = requests.post(server.url + "api/feedback", json={"id": extra.id, "answer": "up"}, timeout=30)
        assert r.status_code == 200, r.text  # room again: the same answer is stored
    finally:
        server.stop()
    assert len(dev.store.examples()) == 4


def test_wipe_data_on_a_full_disk_removes_what_it_can_and_finishes_once_there_is_room(small_disk):
    where, fill, free = small_disk
    state = where / "dev"
    dev, ids = _answered(state, n=12)  # below the bundled model's input affine (20 answers): a quick head fit
    assert dev.personalize().status in ("kept", "discarded")
    personal = sorted(p.name for p in state.glob("personal.*"))
    fill()
    try:
        wiped = dev.wipe_data()
    except StorageFullError as exc:  # the store could not be changed; the personal files are gone regardless
        assert "is full" in str(exc)
        assert not list(state.glob("personal.*")) and not dev.personalized
        free()
        wiped = dev.wipe_data()
    else:
        free()
    assert dev.store.counts()["predictions"] == 0 and dev.store.examples() == []
    assert not list(state.glob("personal.*")) and not dev.personalized
    assert wiped["predictions"] in (0, 12) and set(wiped["personal_files"]) <= set(personal)
    raw = (state / "fedser.db").read_bytes()
    assert ids[0].encode() not in raw  # zeroed, not only unlinked from the b-tree


def test_a_store_closed_before_the_disk_filled_cannot_open_and_says_the_disk_is_full(small_disk):
    """Opening needs room for SQLite's -wal and -shm files; it reports SQLITE_IOERR, which is not the store's
    damage: the device says the disk is full and leaves the store as it is (review finding)."""
    where, fill, free = small_disk
    state = where / "dev"
    dev, ids = _answered(state, n=3)
    dev.store.close()
    fill()
    with pytest.raises(StorageFullError, match="is full"):
        Device(state)
    run = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "--state", str(state), "status"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "is full" in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert not list(state.glob("fedser.db.corrupt*"))  # not taken for damage
    free()
    again = Device(state)
    assert len(again.store.examples()) == 3 and again.problems == []
