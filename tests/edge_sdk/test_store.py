from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.errors import ParameterError
from edge_sdk.store import FeedbackStore


def _add(store, pid, label="happy"):
    store.add_prediction(prediction_id=pid, model_version=1, label=label, probs=np.array([0.1, 0.9]),
                         embedding=np.arange(4, dtype=np.float32), features=None, latency_ms=1.0)


def test_feedback_becomes_training_examples(tmp_path):
    store = FeedbackStore(tmp_path / "s.db")
    for pid in ("a", "b", "c"):
        _add(store, pid)
    store.add_feedback("a", "up")
    store.add_feedback("b", "down")
    store.add_feedback("c", "label", "sad")
    ex = {e.prediction_id: e for e in store.examples()}
    assert (ex["a"].target, ex["a"].sign) == ("happy", 1.0)
    assert (ex["b"].target, ex["b"].sign) == ("happy", -1.0)
    assert (ex["c"].target, ex["c"].sign) == ("sad", 1.0)
    store.add_feedback("b", "up")  # the user changes their mind: the latest answer counts
    assert {e.prediction_id: e.sign for e in store.examples()}["b"] == 1.0
    np.testing.assert_array_equal(ex["a"].embedding, np.arange(4))


def test_bad_feedback_is_refused(tmp_path):
    store = FeedbackStore(tmp_path / "s.db")
    _add(store, "a")
    with pytest.raises(ParameterError, match="no prediction"):
        store.add_feedback("zzz", "up")
    with pytest.raises(ParameterError, match="kind"):
        store.add_feedback("a", "meh")
    with pytest.raises(ParameterError, match="needs the label"):
        store.add_feedback("a", "label")


def test_outbox_and_sequence_survive_reopening(tmp_path):
    store = FeedbackStore(tmp_path / "s.db")
    assert store.next_sequence() == 1 and store.next_sequence() == 2
    store.enqueue(2, 1, b"envelope")
    store.close()
    store = FeedbackStore(tmp_path / "s.db")
    assert store.next_sequence() == 3
    (item,) = store.pending()
    assert item.envelope == b"envelope" and item.seq == 2
    store.mark_retry(2, "offline", next_attempt_at=100.0)
    assert store.pending(now=50.0) == [] and len(store.pending(now=150.0)) == 1
    store.mark_done(2, "accepted", {"status": "accepted"})
    assert store.pending() == [] and store.counts()["outbox_accepted"] == 1


def test_a_new_update_supersedes_the_pending_ones_in_one_transaction(tmp_path):
    import sqlite3

    store = FeedbackStore(tmp_path / "fedser.db")
    store.enqueue(1, 1, b"first")
    store.enqueue(2, 1, b"second")
    store.set("last_update", '{"seq": 2}')
    with pytest.raises(sqlite3.Error):  # the last write fails, after the insert and the marks: all rolled back
        store.enqueue_update(3, 2, b"third", object())
    assert [i.seq for i in store.outbox_items()] == [1, 2] and [i.seq for i in store.pending()] == [1, 2]
    assert store.get("last_update") == '{"seq": 2}'  # nothing half-written
    assert store.enqueue_update(3, 2, b"third", '{"seq": 3}') == [1, 2]
    assert [i.seq for i in store.pending()] == [3] and store.get("last_update") == '{"seq": 3}'
    replies = {i.seq: (i.state, i.attempts) for i in store.outbox_items()}
    assert replies == {1: ("rejected", 1), 2: ("rejected", 1), 3: ("pending", 0)}
    # withdrawn here, never sent: the page's "sent" counts only what the server accepted or refused
    assert store.counts()["outbox_sent"] == 0 and store.counts()["outbox_rejected"] == 2
    store.mark_done(3, "rejected", {"status": 409, "reason": "stale_base", "detail": "..."})
    store.enqueue(4, 2, b"fourth")
    store.mark_done(4, "accepted", {"round_id": 2})
    assert store.counts()["outbox_sent"] == 2
    store.close()


def test_what_retention_deletes_is_zeroed_in_the_file_without_a_vacuum(tmp_path):
    """secure_delete is on for every deletion: a prediction retention removed leaves none of its bytes in the
    store's files (the WAL checkpointed), though no VACUUM ran."""
    import sqlite3

    store = FeedbackStore(tmp_path / "fedser.db")
    marks = []
    for i in range(6):
        mark = np.frombuffer(f"feature-of-user-{i:04d}".encode().ljust(64, b"#"), np.float32).copy()
        marks.append(mark.tobytes())
        store.add_prediction(prediction_id=f"p{i:04d}", model_version=0, label="sad", probs=np.ones(4) / 4,
                             embedding=np.tile(mark, 4), features=None, latency_ms=1.0)
    assert store.enforce_retention(max_predictions=2) == 4
    with store._lock:
        store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("fedser.db*"))
    assert all(m not in raw for m in marks[:4]) and all(m in raw for m in marks[4:])
    store.close()
    off = sqlite3.connect(str(tmp_path / "plain.db"))  # the control: without secure_delete the bytes stay
    off.execute("PRAGMA secure_delete=OFF")
    off.execute("CREATE TABLE t (b BLOB)")
    off.execute("INSERT INTO t VALUES (?)", (marks[0] * 4,))
    off.commit()
    off.execute("DELETE FROM t")
    off.commit()
    off.close()
    assert marks[0] in (tmp_path / "plain.db").read_bytes()
