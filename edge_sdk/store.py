"""The device's SQLite file: predictions, the user's feedback, and the durable outbox.

No raw audio is stored: a prediction keeps the normalised features (to
re-embed when a new encoder arrives) and the embedding (to train the head).
Arrays are stored as raw little-endian float32 bytes, never pickled.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk.errors import ParameterError

__all__ = ["FeedbackStore", "FeedbackExample", "OutboxItem", "FEEDBACK_KINDS"]

FEEDBACK_KINDS = ("up", "down", "label")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    model_version INTEGER NOT NULL,
    label TEXT NOT NULL,
    probs TEXT NOT NULL,
    embedding BLOB NOT NULL,
    features BLOB,
    latency_ms REAL NOT NULL,
    source TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS feedback (
    prediction_id TEXT PRIMARY KEY REFERENCES predictions(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('up', 'down', 'label')),
    label TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    base_version INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'accepted', 'rejected')),
    server_reply TEXT
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True, eq=False)
class FeedbackExample:
    """One training example derived from a prediction and its feedback."""

    prediction_id: str
    embedding: np.ndarray
    target: str
    sign: float  # +1 cross-entropy toward target, -1 complementary loss away from it
    kind: str


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    base_version: int
    envelope: bytes
    attempts: int
    next_attempt_at: float
    state: str
    last_error: str | None


class FeedbackStore:
    """SQLite (WAL) store of one device. Safe to use from several threads."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _tx(self):
        return _Transaction(self._conn, self._lock)

    # -- key/value state ------------------------------------------------------------------
    def get(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO kv(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                      (key, value))

    # -- predictions and feedback ---------------------------------------------------------
    def add_prediction(
        self,
        *,
        prediction_id: str,
        model_version: int,
        label: str,
        probs: np.ndarray,
        embedding: np.ndarray,
        features: np.ndarray | None,
        latency_ms: float,
        source: str = "",
    ) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO predictions(id, created_at, model_version, label, probs, embedding, features,"
                " latency_ms, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    prediction_id, time.time(), int(model_version), label,
                    json.dumps([round(float(p), 6) for p in probs]),
                    np.asarray(embedding, "<f4").tobytes(),
                    None if features is None else np.asarray(features, "<f4").tobytes(),
                    float(latency_ms), source,
                ),
            )

    def prediction(self, prediction_id: str) -> dict | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT id, created_at, model_version, label, probs, latency_ms, source FROM predictions WHERE id = ?",
                (prediction_id,),
            ).fetchone()
        if row is None:
            return None
        keys = ("id", "created_at", "model_version", "label", "probs", "latency_ms", "source")
        out = dict(zip(keys, row, strict=False))
        out["probs"] = json.loads(out["probs"])
        return out

    def add_feedback(self, prediction_id: str, kind: str, label: str | None = None) -> None:
        """Record (or replace) the user's answer to one prediction.

        Raises
        ------
        ParameterError
            Unknown prediction id, unknown kind, or a ``label`` answer without a label.
        """
        if kind not in FEEDBACK_KINDS:
            raise ParameterError(f"feedback kind must be one of {FEEDBACK_KINDS}, got {kind!r}")
        if kind == "label" and not label:
            raise ParameterError("a corrected-label answer needs the label")
        with self._tx() as c:
            if c.execute("SELECT 1 FROM predictions WHERE id = ?", (prediction_id,)).fetchone() is None:
                raise ParameterError(f"no prediction with id {prediction_id!r}")
            c.execute(
                "INSERT INTO feedback(prediction_id, kind, label, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(prediction_id) DO UPDATE SET kind = excluded.kind, label = excluded.label,"
                " created_at = excluded.created_at",
                (prediction_id, kind, label if kind == "label" else None, time.time()),
            )

    def examples(self) -> list[FeedbackExample]:
        """Training examples from every prediction with feedback, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT p.id, p.embedding, p.label, f.kind, f.label FROM feedback f"
                " JOIN predictions p ON p.id = f.prediction_id ORDER BY f.created_at, p.id"
            ).fetchall()
        out = []
        for pid, emb, predicted, kind, corrected in rows:
            embedding = np.frombuffer(emb, "<f4").astype(np.float32)
            if kind == "up":
                out.append(FeedbackExample(pid, embedding, predicted, 1.0, kind))
            elif kind == "label":
                out.append(FeedbackExample(pid, embedding, corrected, 1.0, kind))
            else:
                out.append(FeedbackExample(pid, embedding, predicted, -1.0, kind))
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            preds = self._conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
            by_kind = dict(self._conn.execute("SELECT kind, COUNT(*) FROM feedback GROUP BY kind").fetchall())
            outbox = dict(self._conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())
        return {
            "predictions": preds,
            "feedback": sum(by_kind.values()),
            **{f"feedback_{k}": by_kind.get(k, 0) for k in FEEDBACK_KINDS},
            **{f"outbox_{k}": outbox.get(k, 0) for k in ("pending", "accepted", "rejected")},
        }

    # -- outbox ---------------------------------------------------------------------------
    def next_sequence(self) -> int:
        """Reserve the next per-device update sequence number (never reused)."""
        with self._tx() as c:
            row = c.execute("SELECT value FROM kv WHERE key = 'sequence'").fetchone()
            seq = int(row[0]) + 1 if row else 1
            c.execute("INSERT INTO kv(key, value) VALUES ('sequence', ?) ON CONFLICT(key) DO UPDATE"
                      " SET value = excluded.value", (str(seq),))
        return seq

    def enqueue(self, seq: int, base_version: int, envelope: bytes) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO outbox(seq, base_version, envelope, created_at) VALUES (?, ?, ?, ?)",
                      (seq, base_version, envelope, time.time()))

    def pending(self, now: float | None = None) -> list[OutboxItem]:
        """Pending items due at ``now`` (all pending when ``now`` is None), in sequence order."""
        query = "SELECT seq, base_version, envelope, attempts, next_attempt_at, state, last_error FROM outbox" \
                " WHERE state = 'pending'"
        args: tuple = ()
        if now is not None:
            query += " AND next_attempt_at <= ?"
            args = (now,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY seq", args).fetchall()
        return [OutboxItem(*r) for r in rows]

    def outbox_items(self) -> Iterator[OutboxItem]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, base_version, envelope, attempts, next_attempt_at, state, last_error FROM outbox"
                " ORDER BY seq").fetchall()
        return iter([OutboxItem(*r) for r in rows])

    def mark_done(self, seq: int, state: str, reply: dict) -> None:
        with self._tx() as c:
            c.execute("UPDATE outbox SET state = ?, server_reply = ?, attempts = attempts + 1 WHERE seq = ?",
                      (state, json.dumps(reply), seq))

    def mark_retry(self, seq: int, error: str, next_attempt_at: float) -> None:
        with self._tx() as c:
            c.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? WHERE seq = ?",
                      (error, next_attempt_at, seq))


class _Transaction:
    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock) -> None:
        self._conn, self._lock = conn, lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._conn.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()
