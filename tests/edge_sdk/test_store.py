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
    store.close()
