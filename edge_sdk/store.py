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
from edge_sdk.storage import is_full_error, storage_full

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
    source TEXT NOT NULL DEFAULT '',
    audio BLOB,
    sample_rate INTEGER,
    base TEXT
);
CREATE INDEX IF NOT EXISTS predictions_created ON predictions(created_at);
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
# Answers stored by SDKs before a correction to the predicted label itself counted as a thumbs-up: checked with a
# read at every open (an older SDK may have written to this file since), rewritten only when there are any.
_OLD_THUMBS_UP = ("FROM feedback JOIN predictions p ON p.id = feedback.prediction_id"
                  " WHERE feedback.kind = 'label' AND feedback.label = p.label")
_SCHEMA_VERSION = 2  # PRAGMA user_version of a store that has _SCHEMA and every migration below


_INSERT_OUTBOX = "INSERT INTO outbox(seq, base_version, envelope, created_at) VALUES (?, ?, ?, ?)"
_MARK_DONE = "UPDATE outbox SET state = ?, server_reply = ?, attempts = attempts + 1 WHERE seq = ?"
_UPSERT_KV = "INSERT INTO kv(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"


def _json_items(items) -> Iterator[str]:
    """The items of a JSON array, one per line, as the export writes them (the brackets are the caller's)."""
    for i, item in enumerate(items):
        yield ("\n  " if i == 0 else ",\n  ") + json.dumps(item)


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode that SQLite can take (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_or_none(text):
    """A JSON field as stored, or None where the file holds something else (an export still gives the rest)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None


@dataclass(frozen=True, eq=False)
class FeedbackExample:
    """One training example derived from a prediction and its feedback."""

    prediction_id: str
    embedding: np.ndarray
    target: str
    sign: float  # +1 cross-entropy toward target, -1 complementary loss away from it
    kind: str
    # The sha256 of the model file (base) whose encoder made ``embedding`` (None: stored by an SDK before it was
    # recorded), and the model version that classified.
    base: str | None = None
    model_version: int = 0


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
            # What is deleted (retention, wipe-data) is zeroed in the file, not only unlinked from its b-tree:
            # the user's answers and features do not linger in free pages until a VACUUM that may never run.
            self._conn.execute("PRAGMA secure_delete=ON")
            self._conn.execute("PRAGMA foreign_keys=ON")
            # Schema and migrations write only when the file is behind _SCHEMA_VERSION: opening an up-to-date
            # store (every CLI command, while `listen` runs) only reads, so it never waits for the write lock.
            if self._conn.execute("PRAGMA user_version").fetchone()[0] < _SCHEMA_VERSION:
                self._migrate()
            elif self._conn.execute(f"SELECT EXISTS (SELECT 1 {_OLD_THUMBS_UP})").fetchone()[0]:
                with self._tx() as c:  # written by an older SDK since: a write, rarely
                    c.execute(f"UPDATE feedback SET kind = 'up', label = NULL WHERE rowid IN (SELECT feedback.rowid "
                              f"{_OLD_THUMBS_UP})")

    def _migrate(self) -> None:
        with self._tx() as c:  # one write transaction; a second opener waits, then sees it
            if c.execute("PRAGMA user_version").fetchone()[0] >= _SCHEMA_VERSION:
                return
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            columns = {r[1] for r in c.execute("PRAGMA table_info(predictions)")}
            # files from before these columns
            for name, kind in (("audio", "BLOB"), ("sample_rate", "INTEGER"), ("base", "TEXT")):
                if name not in columns:
                    c.execute(f"ALTER TABLE predictions ADD COLUMN {name} {kind}")
            c.execute(f"UPDATE feedback SET kind = 'up', label = NULL WHERE rowid IN (SELECT feedback.rowid "
                      f"{_OLD_THUMBS_UP})")
            c.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _tx(self):
        return _Transaction(self._conn, self._lock, self.path)

    # -- key/value state ------------------------------------------------------------------
    def get(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute(_UPSERT_KV, (key, value))

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
        audio: np.ndarray | None = None,
        sample_rate: int | None = None,
        state: dict[str, str] | None = None,
        base: str | None = None,
    ) -> None:
        """Store a prediction; ``audio`` (kept as 16-bit PCM) only when the user opted in.

        ``base``: the sha256 of the model file whose encoder made ``embedding`` (a new base re-embeds the answer
        from ``features``).

        ``state`` (key/value pairs) is written in the same transaction: one commit per prediction.
        """
        pcm = None if audio is None else (np.clip(np.asarray(audio, np.float32), -1, 1) * 32767).astype("<i2").tobytes()
        with self._tx() as c:
            c.execute(
                "INSERT INTO predictions(id, created_at, model_version, label, probs, embedding, features,"
                " latency_ms, source, audio, sample_rate, base) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    prediction_id, time.time(), int(model_version), label,
                    json.dumps([round(float(p), 6) for p in probs]),
                    np.asarray(embedding, "<f4").tobytes(),
                    None if features is None else np.asarray(features, "<f4").tobytes(),
                    float(latency_ms), source, pcm, sample_rate if pcm is not None else None, base,
                ),
            )
            for key, value in (state or {}).items():
                c.execute(_UPSERT_KV, (key, value))

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

        A ``label`` answer naming the label the model predicted is a thumbs-up (``up``): it is stored, counted
        and trained on as one.

        Raises
        ------
        ParameterError
            Unknown prediction id, unknown kind, or a ``label`` answer without a label.
        """
        if kind not in FEEDBACK_KINDS:
            raise ParameterError(f"feedback kind must be one of {FEEDBACK_KINDS}, got {kind!r}")
        if kind == "label" and not label:
            raise ParameterError("a corrected-label answer needs the label")
        if not _encodable(prediction_id):  # a lone surrogate (from JSON's "\ud800" or an undecodable argv byte)
            # cannot even be looked up: SQLite's UnicodeEncodeError dropped the page's connection unanswered
            raise ParameterError(f"no prediction with id {prediction_id!r}")
        with self._tx() as c:
            row = c.execute("SELECT label FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
            if row is None:
                raise ParameterError(f"no prediction with id {prediction_id!r}")
            if kind == "label" and label == row[0]:
                kind = "up"
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
                "SELECT p.id, p.embedding, p.label, f.kind, f.label, p.base, p.model_version FROM feedback f"
                " JOIN predictions p ON p.id = f.prediction_id ORDER BY f.created_at, p.id"
            ).fetchall()
        out = []
        for pid, emb, predicted, kind, corrected, base, version in rows:
            embedding = np.frombuffer(emb, "<f4").astype(np.float32)
            target, sign = (corrected, 1.0) if kind == "label" else (predicted, 1.0 if kind == "up" else -1.0)
            out.append(FeedbackExample(pid, embedding, target, sign, kind, base, int(version)))
        return out

    def set_embeddings(self, embeddings: dict[str, np.ndarray], base: str) -> None:
        """Replace the stored embeddings of these predictions with ones made by the encoder of ``base`` (the
        model file's sha256), in one transaction."""
        with self._tx() as c:
            c.executemany("UPDATE predictions SET embedding = ?, base = ? WHERE id = ?",
                          [(np.asarray(e, "<f4").tobytes(), base, pid) for pid, e in embeddings.items()])

    def features_of(self, prediction_ids: list[str]) -> dict[str, np.ndarray]:
        """The stored features (flat float32) of these predictions; predictions stored without any are left out."""
        out: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(prediction_ids), 500):
                ids = list(prediction_ids[start : start + 500])
                rows = self._conn.execute(
                    f"SELECT id, features FROM predictions WHERE id IN ({','.join('?' * len(ids))})"
                    " AND features IS NOT NULL", ids).fetchall()
                out.update((pid, np.frombuffer(blob, "<f4").astype(np.float32)) for pid, blob in rows)
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            preds, audio = self._conn.execute("SELECT COUNT(*), COUNT(audio) FROM predictions").fetchone()
            by_kind = dict(self._conn.execute("SELECT kind, COUNT(*) FROM feedback GROUP BY kind").fetchall())
            # per state: the items, and those the server answered (a refusal's reply has its status; an update
            # withdrawn here, superseded or made on a base that was replaced, never left the device)
            outbox = {state: (n, answered) for state, n, answered in self._conn.execute(
                "SELECT state, COUNT(*), SUM(instr(server_reply, '\"status\"') > 0) FROM outbox GROUP BY state")}
        return {
            "predictions": preds,
            "audio_kept": audio,  # recordings kept (privacy store_audio, opt-in)
            "feedback": sum(by_kind.values()),
            **{f"feedback_{k}": by_kind.get(k, 0) for k in FEEDBACK_KINDS},
            **{f"outbox_{k}": outbox.get(k, (0, 0))[0] for k in ("pending", "accepted", "rejected")},
            # updates that left the device: accepted, or refused by the server
            "outbox_sent": outbox.get("accepted", (0, 0))[0] + (outbox.get("rejected", (0, 0))[1] or 0),
        }

    def recent(self, limit: int = 20) -> list[dict]:
        """The latest predictions with their feedback, newest first (what the local page shows)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT p.id, p.created_at, p.model_version, p.label, p.probs, p.latency_ms, p.source, f.kind,"
                " f.label FROM predictions p LEFT JOIN feedback f ON f.prediction_id = p.id"
                " ORDER BY p.created_at DESC, p.id LIMIT ?", (int(limit),)).fetchall()
        keys = ("id", "created_at", "model_version", "label", "probs", "latency_ms", "source", "feedback",
                "corrected_label")
        out = [dict(zip(keys, r, strict=True)) for r in rows]
        for item in out:
            item["probs"] = json.loads(item["probs"])
        return out

    def personal_accuracy(self) -> dict:
        """How often the model was right for this user: thumbs-up over all answered predictions."""
        with self._lock:
            by_kind = dict(self._conn.execute("SELECT kind, COUNT(*) FROM feedback GROUP BY kind").fetchall())
        answered = sum(by_kind.values())
        return {"answered": answered, "right": by_kind.get("up", 0),
                "accuracy": by_kind.get("up", 0) / answered if answered else None}

    # -- the user's own data: retention, export, wipe ---------------------------------------
    def enforce_retention(self, *, max_predictions: int = 0, max_age_days: float = 0.0,
                          now: float | None = None) -> int:
        """Delete the oldest predictions (and their feedback) beyond the limits; returns how many went."""
        now = time.time() if now is None else now
        removed = 0
        with self._tx() as c:
            if max_age_days > 0:
                removed += c.execute("DELETE FROM predictions WHERE created_at < ?",
                                     (now - max_age_days * 86400,)).rowcount
            if max_predictions > 0:
                removed += c.execute(
                    "DELETE FROM predictions WHERE id IN (SELECT id FROM predictions ORDER BY created_at DESC, id"
                    " LIMIT -1 OFFSET ?)", (int(max_predictions),)).rowcount
        return removed

    EXPORT_FORMAT = "fedser-edge-export/1"
    EXPORT_BATCH = 16  # predictions read per lock hold: memory bounded by 16 rows (with audio, 16 recordings)

    def export(self) -> dict:
        """Everything stored about the user, as JSON-ready data (arrays as base64 little-endian): the document
        :meth:`iter_export` writes, read back. Holds all of it in memory: a caller writing it out uses that."""
        return json.loads("".join(self.iter_export()))

    def iter_export(self, batch: int = EXPORT_BATCH) -> Iterator[str]:
        """Everything stored about the user as one JSON document (:data:`EXPORT_FORMAT`), in pieces of text: its
        predictions with their answers, embedding, features and recording (when kept), one per line, its outbox
        (what was sent, not the weights) and its voice statistics. Memory is bounded by ``batch`` predictions
        whatever the store holds; the lock is taken per batch, so the device goes on classifying and storing
        answers meanwhile (a prediction stored while the export runs may or may not be in it; one deleted meanwhile,
        by retention or a wipe, is left out from the batch after its deletion)."""
        import base64

        def b64(b):
            return base64.b64encode(b).decode() if b is not None else None

        arrays = "base64 of little-endian float32 (embedding, features) or int16 PCM (audio)"
        yield (f'{{"format": {json.dumps(self.EXPORT_FORMAT)}, "exported_at": {json.dumps(time.time())},\n'
               f' "arrays": {json.dumps(arrays)},\n "predictions": [')
        predictions = self._pages(
            "SELECT p.id, p.created_at, p.model_version, p.label, p.probs, p.latency_ms, p.source, p.embedding,"
            " p.features, p.audio, p.sample_rate, f.kind, f.label, f.created_at FROM predictions p LEFT JOIN feedback f"
            " ON f.prediction_id = p.id WHERE (p.created_at, p.id) > (?, ?) ORDER BY p.created_at, p.id LIMIT ?",
            start=(-float("inf"), ""), key=lambda r: (r[1], r[0]), batch=batch)
        yield from _json_items(
            {"id": r[0], "created_at": r[1], "model_version": r[2], "label": r[3], "probs": _json_or_none(r[4]),
             "latency_ms": r[5], "source": r[6], "embedding": b64(r[7]), "features": b64(r[8]), "audio": b64(r[9]),
             "sample_rate": r[10],
             "feedback": None if r[11] is None else {"kind": r[11], "label": r[12], "created_at": r[13]}}
            for r in predictions)
        yield '\n ],\n "outbox": ['
        outbox = self._pages(  # every update this device made (kept after it is sent)
            "SELECT seq, base_version, created_at, attempts, state FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            start=(0,), key=lambda r: (r[0],), batch=256)
        yield from _json_items({"seq": r[0], "base_version": r[1], "created_at": r[2], "attempts": r[3],
                                "state": r[4]} for r in outbox)
        with self._lock:  # one entry per feature setting the device has used (a few): read at once
            stats = self._conn.execute("SELECT key, value FROM kv WHERE key LIKE 'speaker_stats:%'").fetchall()
        stats = json.dumps({k.split(":", 1)[1]: _json_or_none(v) for k, v in stats})
        yield f'\n ],\n "speaker_statistics": {stats}}}\n'

    def _pages(self, sql: str, *, start: tuple, key, batch: int) -> Iterator[tuple]:
        """The rows of a keyset query (``sql`` takes the key to start after, then a LIMIT), ``batch`` per lock hold:
        the lock is free between batches, and a row deleted meanwhile is left out from the batch after it."""
        after = start
        while True:
            with self._lock:
                rows = self._conn.execute(sql, (*after, max(1, int(batch)))).fetchall()
            if not rows:
                return
            after = key(rows[-1])
            yield from rows

    def wipe(self) -> dict:
        """Delete every prediction, answer and pending update, the weight deltas of updates already sent (their
        sequence, state and the server's reply stay: what was sent, not what it held) and the fingerprint of the
        answers the last update was made from, with the deleted content
        zeroed (``secure_delete``, on for every deletion) and the file rewritten and shrunk (VACUUM; skipped on a
        full disk, ``"vacuumed": false``: the zeroing holds)."""
        with self._lock:
            with self._tx() as c:  # secure_delete (on since open): what is deleted is zeroed
                preds = c.execute("DELETE FROM predictions").rowcount
                pending = c.execute("DELETE FROM outbox WHERE state = 'pending'").rowcount
                c.execute("UPDATE outbox SET envelope = x'' WHERE state != 'pending'")
                # 'personal_examples' was written by SDKs before the update counted all answers
                c.execute("DELETE FROM kv WHERE key IN ('personal_base_version', 'personal_examples')"
                          " OR key LIKE 'speaker_stats:%'")
                # the last update's record keeps its base and retry time (when this device may send again on that
                # version), not the fingerprint of the answers it was made from
                row = c.execute("SELECT value FROM kv WHERE key = 'last_update'").fetchone()
                last = _json_or_none(row[0]) if row else None
                if row and (not isinstance(last, dict) or "answers" in last):
                    kept = {k: v for k, v in last.items() if k != "answers"} if isinstance(last, dict) else {}
                    c.execute(_UPSERT_KV, ("last_update", json.dumps(kept)))
            vacuumed = True
            try:
                self._conn.execute("VACUUM")  # needs room for a copy of what is left: skipped on a full disk
            except sqlite3.OperationalError as exc:
                if not is_full_error(exc):
                    raise
                vacuumed = False
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return {"predictions": preds, "pending_updates": pending, "vacuumed": vacuumed}

    # -- outbox ---------------------------------------------------------------------------
    def next_sequence(self) -> int:
        """Reserve the next per-device update sequence number (never reused)."""
        with self._tx() as c:
            row = c.execute("SELECT value FROM kv WHERE key = 'sequence'").fetchone()
            seq = int(row[0]) + 1 if row else 1
            c.execute(_UPSERT_KV, ("sequence", str(seq)))
        return seq

    def enqueue(self, seq: int, base_version: int, envelope: bytes) -> None:
        with self._tx() as c:
            c.execute(_INSERT_OUTBOX, (seq, base_version, envelope, time.time()))

    def enqueue_update(self, seq: int, base_version: int, envelope: bytes, last_update: str) -> list[int]:
        """Put a new update in the outbox, mark every other pending one superseded by it and record it as the
        device's ``last_update``, in one transaction: an interruption leaves all of it or none. Returns the
        sequences superseded."""
        with self._tx() as c:
            superseded = [r[0] for r in c.execute("SELECT seq FROM outbox WHERE state = 'pending' ORDER BY seq")]
            c.execute(_INSERT_OUTBOX, (seq, base_version, envelope, time.time()))
            for old in superseded:
                c.execute(_MARK_DONE, ("rejected", json.dumps({"reason": "superseded", "by": seq}), old))
            c.execute(_UPSERT_KV, ("last_update", last_update))
        return superseded

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

    def is_pending(self, seq: int) -> bool:
        """Whether outbox item ``seq`` is still there and pending (a wipe deletes pending items)."""
        with self._lock:
            row = self._conn.execute("SELECT state FROM outbox WHERE seq = ?", (int(seq),)).fetchone()
        return row is not None and row[0] == "pending"

    def mark_done(self, seq: int, state: str, reply: dict) -> None:
        with self._tx() as c:
            c.execute(_MARK_DONE, (state, json.dumps(reply), seq))

    def mark_retry(self, seq: int, error: str, next_attempt_at: float) -> None:
        with self._tx() as c:
            c.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? WHERE seq = ?",
                      (error, next_attempt_at, seq))


class _Transaction:
    """One write transaction under the store's lock. A full disk (SQLITE_FULL, at any statement or the commit)
    rolls it back and raises :class:`~edge_sdk.errors.StorageFullError` naming the folder and the space left."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock, path: Path) -> None:
        self._conn, self._lock, self._path = conn, lock, path

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            self._lock.release()
            self._full(exc)
            raise
        return self._conn

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self._rollback()
                if isinstance(exc, sqlite3.OperationalError):
                    self._full(exc)
                return
            try:
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as commit_exc:
                self._rollback()
                self._full(commit_exc)
                raise
        finally:
            self._lock.release()

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.OperationalError:  # SQLite may have rolled back by itself (a full disk can)
                pass

    def _full(self, exc: sqlite3.OperationalError) -> None:
        if is_full_error(exc):
            raise storage_full(self._path.parent, "a change to the device's store", exc) from exc
