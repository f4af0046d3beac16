"""The aggregator's database disk fills up (SQLite in an instance folder on a real, filled tmpfs; PostgreSQL with
the test database in a tablespace on one): an update post gets 507 ``storage_full`` with Retry-After, not a 500;
the device keeps it in its outbox as transient, nothing is half-stored, and once there is room the same update
is accepted. Needs root to mount the tmpfs (skipped otherwise)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests

from edge_sdk.device import TrainPolicy
from edge_sdk.model import bundled_model_paths
from tests.conftest import start_live_aggregator
from tests.edge_sdk.conftest import ModelFiles, clip

pytestmark = pytest.mark.skipif(bundled_model_paths() is None, reason="no bundled model in this checkout")

POLICY = TrainPolicy(min_examples=4, holdout_every=0, epochs=3)
LABELS = ("angry", "happy", "neutral", "sad")


def _mount(where, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()[:200]}")


def _fill(where) -> None:
    with open(where / "filler", "ab", buffering=0) as f:
        for size in (1 << 20, 65536, 4096, 512):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


def _refused_for_a_full_disk(agg, tmp_path, disk):
    """The bundled model published, a device enrolled (its own disk is not the server's) with 5 answers, the
    server's disk filled, one sync: its update is refused 507 storage_full and stays in the outbox."""
    assert agg.publish(ModelFiles(*bundled_model_paths())) == 1
    dev = agg.enroll(tmp_path / "dev", train_policy=POLICY)
    for i in range(5):
        pred = dev.classify(clip(i))
        dev.feedback(pred.id, LABELS[i % 4])
    _fill(disk)
    report = dev.sync()
    assert report.accepted == [] and report.still_pending == 1, report.to_dict()
    assert "507" in report.error and "storage_full" in report.error, report.error
    return dev


def test_an_update_to_a_server_whose_disk_is_full_waits_in_the_outbox_and_lands_later(tmp_path):
    disk = tmp_path / "disk"
    _mount(disk, "24m")
    agg = None
    try:
        agg = start_live_aggregator(disk / "srv", min_updates=2, workers=0)
        dev = _refused_for_a_full_disk(agg, tmp_path, disk)
        pending = dev.store.pending()
        assert len(pending) == 1 and pending[0].attempts == 1  # kept, with a later retry
        r = requests.post(f"{agg.base_url}/api/v1/updates", data=pending[0].envelope,
                          headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert r.status_code == 507 and r.headers["Retry-After"] == "300", r.text
        assert r.json()["error"] == "storage_full"
        big = requests.post(f"{agg.base_url}/api/v1/updates", data=b"\0" * (8 * 1024 * 1024 + 1),
                            headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert big.status_code in (413, 507), big.text  # refused either way (too large, or no room), never a 500
        metrics = requests.get(f"{agg.base_url}/metrics", headers=agg.auth, timeout=60)
        if metrics.status_code == 200:  # what an operator's alert reads (it may be refused on a full disk itself)
            assert 'status="507"' in metrics.text
        assert agg.process.poll() is None  # the server goes on
        (disk / "filler").unlink()
        dev.store.set("x", "y")  # (the device's own store still works throughout)
        for item in dev.store.pending():  # retry now rather than after the backoff
            dev.store.mark_retry(item.seq, "test", 0.0)
        report = dev.sync()
        assert [a["seq"] for a in report.accepted] == [pending[0].seq] and report.still_pending == 0, report.to_dict()
    finally:
        if agg is not None:
            agg.process.terminate()
            agg.process.wait(timeout=30)
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_the_check_names_full_disks_of_both_databases_and_nothing_else():
    import sqlite3

    from aggregator import storage_full

    class Pg(Exception):
        sqlstate = "53100"

    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = 5
    assert storage_full(full) and storage_full(Pg("could not extend file: No space left on device"))
    assert not storage_full(locked) and not storage_full(ValueError("nope"))


@pytest.mark.postgres
def test_the_same_on_postgresql_with_the_database_on_a_full_disk(tmp_path):
    """The test database lives in a tablespace on a small tmpfs (PostgreSQL's WAL stays on its own disk, as on a
    host whose data volume fills): relation files cannot grow (SQLSTATE 53100), the post gets 507, and lands once
    there is room."""
    import uuid

    from tests.conftest import POSTGRES_ADMIN_URL

    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    if not admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
        pytest.skip("creating a tablespace needs a PostgreSQL superuser")
    tag = uuid.uuid4().hex[:10]
    disk = Path("/tmp") / f"fedser-pgdisk-{tag}"  # outside pytest's 0700 folders, which the server cannot enter
    _mount(disk, "24m")
    name, space, agg = f"fedser_test_full_{tag}", f"fedser_full_{tag}", None
    try:
        chowned = subprocess.run(["chown", "postgres:postgres", str(disk)], capture_output=True, text=True)
        if chowned.returncode != 0:
            pytest.skip(f"the server's user cannot own the tmpfs: {chowned.stderr.strip()[:200]}")
        try:
            admin.execute(f"CREATE TABLESPACE {space} LOCATION '{disk}'")
        except psycopg.Error as exc:  # a server on another host cannot reach this folder
            pytest.skip(f"cannot create a tablespace at {disk}: {exc}")
        admin.execute(f'CREATE DATABASE "{name}" TABLESPACE {space}')
        url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        agg = start_live_aggregator(tmp_path / "srv", min_updates=2, workers=0, database_url=url)
        dev = _refused_for_a_full_disk(agg, tmp_path, disk)
        assert agg.process.poll() is None
        (disk / "filler").unlink()
        for item in dev.store.pending():
            dev.store.mark_retry(item.seq, "test", 0.0)
        report = dev.sync()
        assert len(report.accepted) == 1 and report.still_pending == 0, report.to_dict()
    finally:
        if agg is not None:
            agg.process.terminate()
            agg.process.wait(timeout=30)
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f"DROP TABLESPACE IF EXISTS {space}")
        admin.close()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
        if disk.exists():
            disk.rmdir()
