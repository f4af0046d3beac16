"""A store that is only busy is not damage (review item 1).

A second connection holds the write lock (``BEGIN IMMEDIATE``, as ``listen`` does while it stores a
prediction) while a new ``Device`` opens the same state folder, as every ``fedser-edge`` command does.
The device must use the same ``fedser.db``: not move it aside, not start an empty one.
"""

from __future__ import annotations

import sqlite3

import pytest

from edge_sdk.device import Device
from edge_sdk.errors import FedserError
from edge_sdk.store import FeedbackStore


def _seeded(state):
    store = FeedbackStore(state / "fedser.db")
    store.set("marker", "answers-of-the-user")
    store.close()


def test_opening_a_store_that_another_process_is_writing_uses_that_store(tmp_path):
    _seeded(tmp_path)
    writer = sqlite3.connect(str(tmp_path / "fedser.db"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # held for the whole open below
    try:
        dev = Device(tmp_path, use_bundled_model=False)
        try:
            assert dev.problems == []
            assert dev.store.get("marker") == "answers-of-the-user"
        finally:
            dev.store.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert sorted(p.name for p in tmp_path.glob("fedser.db.corrupt*")) == []


def test_opening_an_up_to_date_store_takes_no_write_lock(tmp_path):
    _seeded(tmp_path)
    writer = sqlite3.connect(str(tmp_path / "fedser.db"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        store = FeedbackStore(tmp_path / "fedser.db")
        try:
            assert store._conn.execute("PRAGMA user_version").fetchone()[0] >= 1
            assert store.get("marker") == "answers-of-the-user"
        finally:
            store.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_store_locked_even_for_reading_is_an_error_and_is_left_in_place(tmp_path):
    _seeded(tmp_path)
    holder = sqlite3.connect(str(tmp_path / "fedser.db"), isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO kv(key, value) VALUES ('x', 'y')")
    holder.execute("COMMIT")  # exclusive mode keeps the lock after the commit
    try:
        with pytest.raises(FedserError, match="cannot be used now"):
            Device(tmp_path, use_bundled_model=False)
    finally:
        holder.close()
    assert list(tmp_path.glob("fedser.db.corrupt*")) == []
    store = FeedbackStore(tmp_path / "fedser.db")
    assert store.get("marker") == "answers-of-the-user"
    store.close()


def test_a_damaged_store_is_still_moved_aside(tmp_path):
    (tmp_path / "fedser.db").write_bytes(b"this is not a database" * 100)
    dev = Device(tmp_path, use_bundled_model=False)
    try:
        assert [p["file"] for p in dev.problems] == ["fedser.db"]
        assert len(list(tmp_path.glob("fedser.db.corrupt*"))) == 1
    finally:
        dev.store.close()
