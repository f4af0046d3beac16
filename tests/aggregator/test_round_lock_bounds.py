"""A round close that holds the round's lock (a host cut off mid-close) stalls nobody's intake for long.

- An update post waits ``INTAKE_LOCK_TIMEOUT_SECONDS`` at most for the round's lock (PostgreSQL: the row lock a
  close holds; SQLite: the host's write lock and SQLite's own) and is then refused ``503 lock_timeout`` with
  ``Retry-After``: counted, not stored, not held against the device; the same update is accepted once the lock
  is free. A real device keeps it in its outbox and posts it again.
- PostgreSQL ends a close left idle in its transaction past ``CLOSE_IDLE_TIMEOUT_SECONDS``: the round stays open
  with every update and closes later.
- A post refused ``already_contributed`` is refused before its body is written.
- ``SQLITE_SYNCHRONOUS`` and the new settings are checked at start, whatever the database.

Real HTTP to gunicorn (or the Flask app in process), SQLite and PostgreSQL.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sqlite3
import time
from contextlib import contextmanager

import pytest
import requests
from sqlalchemy import event

from aggregator import DEFAULTS, ConfigError, create_app
from edge_sdk.errors import ServerError
from edge_sdk.model import ModelMetadata, bundled_model_paths
from edge_sdk.signing import SigningKey
from tests.conftest import postgres_database, signed_update, start_live_aggregator
from tests.edge_sdk.conftest import ModelFiles, clip

pytestmark = pytest.mark.skipif(bundled_model_paths() is None, reason="no bundled model in this checkout")

LOCK_WAIT = 1.0  # INTAKE_LOCK_TIMEOUT_SECONDS in these tests


@contextmanager
def round_lock_held(agg, database_url):
    """Hold what a round close holds: PostgreSQL the open round's row lock; SQLite the host lock and the write lock."""
    if database_url:
        import psycopg

        with psycopg.connect(database_url) as conn:  # a transaction, as a close's
            assert conn.execute("UPDATE rounds SET note = note WHERE status = 'open'").rowcount == 1
            yield
            conn.rollback()
        return
    db = agg.instance / "aggregator.db"
    fd = os.open(f"{db}.writelock", os.O_RDWR | os.O_CREAT, 0o600)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        conn.close()
        os.close(fd)


def _start(tmp_path, database_url, **env):
    agg = start_live_aggregator(tmp_path, min_updates=3, database_url=database_url, workers=1,
                                env={"FEDSER_INTAKE_LOCK_TIMEOUT_SECONDS": str(LOCK_WAIT), **env})
    assert agg.publish(ModelFiles(*bundled_model_paths())) == 1
    return agg


def _enroll_key(agg):
    key = SigningKey.generate()
    token = agg.post_admin("/enrollment-tokens", json={}).json()["token"]
    r = requests.post(f"{agg.base_url}/api/v1/devices/enroll", timeout=30,
                      json={"token": token, "public_key": key.verify_key.to_b64()})
    assert r.status_code in (200, 201), r.text
    doc = r.json()
    return doc["device_id"], key, doc


@pytest.fixture
def stop():
    started = []
    yield started.append
    for agg in started:
        agg.process.terminate()
        agg.process.wait(timeout=30)


def test_a_post_waits_for_the_round_lock_a_bounded_time_then_gets_a_counted_retryable_503(tmp_path, database_url,
                                                                                          stop):
    agg = _start(tmp_path, database_url)
    stop(agg)
    dev, key, doc = _enroll_key(agg)
    layout = ModelMetadata.load(bundled_model_paths()[1]).head_layout
    envelope = signed_update(dev, key, layout, sequence=1).to_bytes()
    with round_lock_held(agg, database_url):
        started = time.monotonic()
        try:
            r = requests.post(f"{agg.base_url}/api/v1/updates", data=envelope, timeout=20)
        except requests.ReadTimeout:
            pytest.fail("the post waited 20 s for the round's lock")
        waited = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "lock_timeout"
        assert int(r.headers["Retry-After"]) >= 1
        assert waited < LOCK_WAIT + 10, waited  # bounded (before: until the lock holder ended)
        assert requests.get(agg.base_url + "/healthz", timeout=10).status_code == 200
    again = requests.post(f"{agg.base_url}/api/v1/updates", data=envelope, timeout=30)
    assert again.status_code == 202 and again.json()["duplicate"] is False, again.text  # nothing was stored
    # Counted (SQLite: the count could not wait for the lock it timed out on; this process's next refusal adds it)
    assert requests.post(f"{agg.base_url}/api/v1/updates", data=b"junk", timeout=30).status_code == 400
    status = agg.status()
    assert status["refusals"].get("lock_timeout") == 1, status["refusals"]
    device = next(d for d in requests.get(f"{agg.base_url}/api/v1/admin/devices", headers=agg.auth,
                                          timeout=10).json()["devices"] if d["id"] == dev)
    assert device["updates_refused"] == 0 and device["updates_accepted"] == 1, device  # not the device's doing


def test_a_real_device_keeps_an_update_refused_503_and_posts_it_again(tmp_path, database_url, stop):
    from edge_sdk.device import TrainPolicy

    agg = _start(tmp_path / "srv", database_url)
    stop(agg)
    now = [1000.0]
    dev = agg.enroll(tmp_path / "dev", train_policy=TrainPolicy(min_examples=4, holdout_every=0, epochs=1),
                     clock=lambda: now[0])
    for i in range(4):
        dev.feedback(dev.classify(clip(i)).id, ("angry", "happy", "neutral", "sad")[i % 4])
    seq = dev.make_update()
    assert seq is not None
    item = next(i for i in dev.store.outbox_items() if i.seq == seq)
    with round_lock_held(agg, database_url):
        with pytest.raises(ServerError) as refused:  # the client call: the status, reason and Retry-After
            dev.client.post_update(item.envelope)
        assert (refused.value.status, refused.value.reason) == (503, "lock_timeout")
        assert refused.value.retry_after == math.ceil(LOCK_WAIT)
        report = dev.flush_outbox()
    assert report.accepted == [] and report.rejected == [], report
    assert "lock_timeout" in report.error and report.still_pending == 1, report
    now[0] += 3600  # past its retry time
    report = dev.flush_outbox()
    assert [a["seq"] for a in report.accepted] == [seq] and report.still_pending == 0, report


@pytest.mark.postgres
def test_postgresql_ends_a_close_left_idle_past_its_timeout_and_the_round_closes_later(tmp_path):
    url = postgres_database()
    inst = tmp_path / "inst"
    inst.mkdir()
    (inst / "test-hooks.json").write_text(json.dumps({"pause_before_close_commit": 4}))
    app = create_app({"INSTANCE_PATH": str(inst), "DATABASE_URL": url, "ROUND_MIN_UPDATES": 2,
                      "CLOSE_IDLE_TIMEOUT_SECONDS": 1.5})
    client, devices = app.test_client(), []
    with open(bundled_model_paths()[0], "rb") as t, open(bundled_model_paths()[1], "rb") as m:
        r = client.post("/api/v1/admin/models", data={"tflite": t, "metadata": m},
                        headers={"Authorization": f"Bearer {app.config['ADMIN_TOKEN']}"})
    assert r.status_code == 201, r.text
    for _ in range(3):
        key = SigningKey.generate()
        token = client.post("/api/v1/admin/enrollment-tokens", json={},
                            headers={"Authorization": f"Bearer {app.config['ADMIN_TOKEN']}"}).json["token"]
        doc = client.post("/api/v1/devices/enroll", json={"token": token, "public_key": key.verify_key.to_b64()}).json
        devices.append((doc["device_id"], key))
    layout = ModelMetadata.load(bundled_model_paths()[1]).head_layout
    posts = [client.post("/api/v1/updates", data=signed_update(d, k, layout, sequence=1).to_bytes())
             for d, k in devices[:2]]
    assert [p.status_code for p in posts] == [202, 202], [p.text for p in posts]
    assert "round_closed" not in posts[1].json, posts[1].json  # the close idled 4 s > 1.5 s: the server ended it
    app.extensions["fedser_test_hooks"] = {}  # no more pause
    third = client.post("/api/v1/updates", data=signed_update(*devices[2], layout, sequence=1).to_bytes())
    assert third.status_code == 202 and third.json.get("round_closed") is True, third.json
    assert third.json["published_version"] == 2


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_already_contributed_is_refused_before_the_body_is_written(tmp_path, backend):
    cfg = {"INSTANCE_PATH": str(tmp_path / "inst"), "ROUND_MIN_UPDATES": 5}
    if backend == "postgresql":
        cfg["DATABASE_URL"] = postgres_database()
    app = create_app(cfg)
    admin = {"Authorization": f"Bearer {app.config['ADMIN_TOKEN']}"}
    client = app.test_client()
    with open(bundled_model_paths()[0], "rb") as t, open(bundled_model_paths()[1], "rb") as m:
        assert client.post("/api/v1/admin/models", data={"tflite": t, "metadata": m}, headers=admin).status_code == 201
    key = SigningKey.generate()
    token = client.post("/api/v1/admin/enrollment-tokens", json={}, headers=admin).json["token"]
    doc = client.post("/api/v1/devices/enroll", json={"token": token, "public_key": key.verify_key.to_b64()}).json
    layout = ModelMetadata.load(bundled_model_paths()[1]).head_layout
    inserts = []

    @event.listens_for(app.extensions["fedser_engine"], "before_cursor_execute")
    def _count(_conn, _cursor, statement, _params, _context, _many):
        if statement.lstrip().upper().startswith("INSERT INTO UPDATES"):
            inserts.append(statement)

    first = client.post("/api/v1/updates", data=signed_update(doc["device_id"], key, layout, sequence=1).to_bytes())
    assert first.status_code == 202 and len(inserts) == 1, first.text
    second = client.post("/api/v1/updates", data=signed_update(doc["device_id"], key, layout, sequence=2).to_bytes())
    assert second.status_code == 409 and second.json["error"] == "already_contributed", second.text
    assert len(inserts) == 1  # refused before the INSERT (before: the body was written, then rolled back)
    with app.extensions["fedser_engine"].begin() as conn:  # a device row from before the column: the guard
        conn.exec_driver_sql("UPDATE devices SET last_round_id = NULL")
    third = client.post("/api/v1/updates", data=signed_update(doc["device_id"], key, layout, sequence=3).to_bytes())
    assert third.status_code == 409 and third.json["error"] == "already_contributed", third.text
    assert len(inserts) == 2  # written, then refused by the unique constraint, as before
    status = client.get("/api/v1/admin/status", headers=admin).json
    assert status["refusals"].get("already_contributed") == 2, status["refusals"]
    devices = client.get("/api/v1/admin/devices", headers=admin).json["devices"]
    assert devices[0]["updates_refused"] == 2 and devices[0]["updates_accepted"] == 1


def test_settings_are_checked_at_start_whatever_the_database(tmp_path, monkeypatch):
    assert DEFAULTS["SQLITE_SYNCHRONOUS"] == "NORMAL"
    assert DEFAULTS["INTAKE_LOCK_TIMEOUT_SECONDS"] > 0 and DEFAULTS["CLOSE_IDLE_TIMEOUT_SECONDS"] > 0
    nowhere = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # never reached: the settings are refused first
    with pytest.raises(ConfigError, match="SQLITE_SYNCHRONOUS"):
        create_app({"INSTANCE_PATH": str(tmp_path / "a"), "DATABASE_URL": nowhere, "SQLITE_SYNCHRONOUS": "OFF"})
    monkeypatch.setenv("FEDSER_SQLITE_SYNCHRONOUS", "sometimes")
    with pytest.raises(ConfigError, match="SQLITE_SYNCHRONOUS"):
        create_app({"INSTANCE_PATH": str(tmp_path / "b")})
    monkeypatch.delenv("FEDSER_SQLITE_SYNCHRONOUS")
    for key, bad in (("INTAKE_LOCK_TIMEOUT_SECONDS", 0), ("INTAKE_LOCK_TIMEOUT_SECONDS", "soon"),
                     ("CLOSE_IDLE_TIMEOUT_SECONDS", -1)):
        with pytest.raises(ConfigError, match=key):
            create_app({"INSTANCE_PATH": str(tmp_path / "c"), key: bad})
    app = create_app({"INSTANCE_PATH": str(tmp_path / "d"), "SQLITE_SYNCHRONOUS": "full"})
    assert app.config["SQLITE_SYNCHRONOUS"] == "FULL"
