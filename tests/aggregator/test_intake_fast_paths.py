"""The intake's fast paths keep their guarantees: the in-place norm, SQLite's durability setting, the host's
write lock (held for exactly the write transaction) and PostgreSQL's ping of idle pooled connections."""

from __future__ import annotations

import fcntl
import math
import os
import threading
import time

import numpy as np
import pytest
from sqlalchemy import text, update

from aggregator import ConfigError, create_app
from aggregator.db import Device, make_engine
from aggregator.fedavg import l2_norm
from aggregator.intake import _l2_norm_of_body
from edge_sdk.wire import ArraySpec, HeadLayout, pack_arrays


def test_the_norm_read_in_place_is_the_per_array_norm_and_none_when_a_value_is_not_finite(rng):
    layout = HeadLayout([ArraySpec("w0", (128, 150)), ArraySpec("b0", (150,)), ArraySpec("w1", (150, 4))])
    arrays = {s.name: (3 * rng.standard_normal(s.shape)).astype(np.float32) for s in layout}
    body = pack_arrays(layout, arrays)
    assert _l2_norm_of_body(layout, body) == pytest.approx(l2_norm(arrays), rel=1e-12)
    for bad in (np.nan, np.inf):
        raw = bytearray(body)
        raw[4 * 777: 4 * 778] = np.float32(bad).tobytes()
        assert _l2_norm_of_body(layout, bytes(raw)) is None  # the caller then names the array (bad_values)
    assert _l2_norm_of_body(HeadLayout([ArraySpec("w", (2,), "float64")]), bytes(16)) is None
    big = pack_arrays(layout, {k: np.full_like(v, 3e38) for k, v in arrays.items()})
    assert math.isfinite(_l2_norm_of_body(layout, big))  # float64 sums: no overflow from float32 squares


@pytest.mark.parametrize(("setting", "pragma"), [(None, 1), ("FULL", 2), ("normal", 1), ("EXTRA", 3)])
def test_sqlite_synchronous_setting(tmp_path, setting, pragma):
    cfg = {"INSTANCE_PATH": str(tmp_path / "inst")}
    if setting:
        cfg["SQLITE_SYNCHRONOUS"] = setting
    app = create_app(cfg)
    with app.extensions["fedser_engine"].connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == pragma
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_a_bad_sqlite_synchronous_setting_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="SQLITE_SYNCHRONOUS"):
        create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "SQLITE_SYNCHRONOUS": "OFF"})


def _lock_is_free(path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing the descriptor drops a lock it took
    return True


def test_a_sqlite_write_transaction_holds_the_host_lock_until_it_ends(tmp_path):
    db = tmp_path / "a.db"
    engine = make_engine(f"sqlite:///{db}")
    lock_file = f"{db}.writelock"
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (k INTEGER PRIMARY KEY)")
        conn.commit()
        assert _lock_is_free(lock_file)
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")  # begins: BEGIN IMMEDIATE after the lock
        assert not _lock_is_free(lock_file)
        conn.commit()
        assert _lock_is_free(lock_file)
        conn.exec_driver_sql("INSERT INTO t VALUES (2)")
        with pytest.raises(Exception, match="UNIQUE"):
            conn.exec_driver_sql("INSERT INTO t VALUES (2)")
        conn.rollback()
        assert _lock_is_free(lock_file)
    read = engine.execution_options(fedser_read_only=True)
    with engine.connect() as writer, read.connect() as reader:
        writer.exec_driver_sql("INSERT INTO t VALUES (3)")
        assert reader.exec_driver_sql("SELECT count(*) FROM t").scalar() == 1  # reads never wait for it
        writer.rollback()
    with engine.connect() as conn:  # a connection closed inside its transaction lets go too
        conn.exec_driver_sql("INSERT INTO t VALUES (4)")
        conn.invalidate()
    assert _lock_is_free(lock_file)
    engine.dispose()


def test_threads_queue_for_the_write_lock_and_write_if_free_gives_up(tmp_path):
    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst")})
    engine = app.extensions["fedser_engine"]
    with engine.begin() as conn:
        conn.execute(Device.__table__.insert().values(id="d", name="", public_key="k", enrolled_at=0.0,
                                                      last_sequence=0, revoked=False, updates_accepted=0,
                                                      updates_refused=0))
    from aggregator.db import write_if_free

    holder = engine.connect()
    holder.exec_driver_sql("UPDATE devices SET name = 'held'")  # holds the write lock
    with app.app_context():
        t0 = time.perf_counter()
        assert write_if_free(update(Device).values(last_seen=1.0)) is False
        assert time.perf_counter() - t0 < 2
    done = []

    def bump():
        with engine.begin() as conn:
            conn.execute(update(Device).values(updates_accepted=Device.updates_accepted + 1))
        done.append(1)

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    assert not done  # all wait for the holder
    holder.commit()
    holder.close()
    for t in threads:
        t.join(timeout=30)
    assert len(done) == 8
    with engine.connect() as conn:
        assert conn.execute(text("SELECT updates_accepted, name FROM devices")).one() == (8, "held")
    with app.app_context():
        assert write_if_free(update(Device).values(last_seen=2.0)) is True


@pytest.mark.postgres
def test_postgres_replaces_a_pooled_connection_that_died_while_idle(monkeypatch):
    import aggregator.db
    from tests.conftest import postgres_database

    engine = make_engine(postgres_database())
    try:
        first, other = engine.connect(), engine.connect()
        pid = first.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        first.close()  # back in the pool, first in line
        other.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")  # the server ends its backend
        other.close()
        time.sleep(0.2)
        monkeypatch.setattr(aggregator.db, "PING_AFTER_IDLE_S", 0.1)  # idle longer than this: pinged
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_sessions_ask_the_server_to_notice_a_vanished_client_within_seconds():
    from tests.conftest import postgres_database

    engine = make_engine(postgres_database() + "?options=-c%20statement_timeout%3D60000")  # the URL's are kept
    try:
        with engine.connect() as conn:
            shown = [conn.exec_driver_sql(f"SHOW {k}").scalar() for k in (
                "tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "statement_timeout")]
        assert shown == ["10", "5", "3", "1min"]
    finally:
        engine.dispose()
