"""The model registry: content-addressed files (in the database), signed manifests, the current version."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, event, func, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool

from aggregator.db import ModelVersion, Round, Update
from edge_sdk.errors import ModelError
from edge_sdk.manifest import BlobRef, Manifest, SignedManifest
from edge_sdk.model import ModelMetadata
from edge_sdk.signing import SigningKey
from edge_sdk.wire import pack_arrays, unpack_arrays

log = logging.getLogger("aggregator")

__all__ = ["BlobStore", "MissingBlob", "check_digest", "current_version", "begin_durable", "lock_rounds",
           "publish_version", "publish_base", "head_arrays", "blob_url", "rollback_to", "initial_head", "load_manifest"]


_HEX64 = re.compile(r"[0-9a-f]{64}")


def blob_url(sha256: str) -> str:
    return f"/api/v1/blobs/{sha256}"


class MissingBlob(FileNotFoundError):
    """No model file with that sha256 in the store."""


def check_digest(sha256: str) -> str:
    """``sha256`` if it is 64 lowercase hex digits, else ValueError."""
    if not isinstance(sha256, str) or not _HEX64.fullmatch(sha256):
        raise ValueError(f"not a sha256 hex digest: {str(sha256)[:80]!r}")
    return sha256


class BlobStore:
    """Model files in the database's ``blobs`` table, named by the sha256 of their bytes.

    Every host sharing the database reads every file, so a version published through one host is served by
    all. Writes are idempotent and race-free across hosts (``INSERT ... ON CONFLICT DO NOTHING``); a write of
    bytes already held refreshes their ``last_used``, so that prune (which spares files used recently) does
    not delete a file a publish is reusing. Files are immutable, so each process keeps the ones it read
    lately in a small LRU (``cache_bytes`` in all; 0: none), a cache that is never stale.

    ``put``/``get`` take the caller's session when there is one: a publish writes its files in its own
    transaction (a crash before the commit leaves nothing; on SQLite a second connection could not write
    while that transaction holds the lock). Without one they use their own short transaction; reads without
    a session go through a read-only connection (on SQLite: no write lock, so a close may read while it writes).
    """

    def __init__(self, engine, *, cache_bytes: int = 32 * 1024 * 1024) -> None:
        from aggregator.db import READ_ONLY

        self.engine = engine
        self.dialect = engine.dialect.name
        self._read_engine = engine.execution_options(**{READ_ONLY: True})
        self.cache_bytes = max(0, int(cache_bytes))
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, session: Session | None = None) -> BlobRef:
        data = bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        if session is None:
            with self.engine.begin() as conn:
                self._put(conn, sha, data)
        else:
            self._put(session, sha, data)
        return BlobRef(sha, len(data), blob_url(sha))

    def _put(self, conn, sha: str, data: bytes) -> None:
        from aggregator.db import Blob, insert_ignore

        now = time.time()
        # A hit sends no bytes: refresh its last_used (and, on PostgreSQL, hold its row until this commits, so a
        # concurrent prune that has not yet deleted it waits and then sees it fresh).
        hit = conn.execute(update(Blob).where(Blob.sha256 == sha).values(last_used=now)
                           .execution_options(synchronize_session=False)).rowcount
        if not hit:  # a concurrent put of the same bytes (another host) may insert first: then nothing happens
            conn.execute(insert_ignore(self.dialect, Blob, sha256=sha, size=len(data), data=data, created_at=now,
                                       last_used=now))

    def get(self, sha256: str, session: Session | None = None) -> bytes:
        """The file's bytes; ValueError for a malformed digest, :class:`MissingBlob` when there is none."""
        from aggregator.db import Blob

        check_digest(sha256)
        with self._lock:
            data = self._cache.get(sha256)
            if data is not None:
                self._cache.move_to_end(sha256)
                return data
        stmt = select(Blob.data).where(Blob.sha256 == sha256)
        if session is not None:
            data = session.scalar(stmt)
        else:
            with self._read_engine.connect() as conn:
                data = conn.scalar(stmt)
        if data is None:
            raise MissingBlob(f"no model file with sha256 {sha256}")
        data = bytes(data)
        self._remember(sha256, data)
        return data

    def exists(self, sha256: str, session: Session | None = None) -> bool:
        from aggregator.db import Blob

        check_digest(sha256)
        if sha256 in self._cache:
            return True
        stmt = select(Blob.size).where(Blob.sha256 == sha256)
        if session is not None:
            return session.scalar(stmt) is not None
        with self._read_engine.connect() as conn:
            return conn.scalar(stmt) is not None

    def _remember(self, sha256: str, data: bytes) -> None:
        if len(data) > self.cache_bytes // 4:
            return
        with self._lock:
            if sha256 in self._cache:
                return
            self._cache[sha256] = data
            self._cached += len(data)
            while self._cached > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= len(old)

    def forget(self, sha256: str) -> None:
        """Drop a file from this process's cache (prune deleted it)."""
        with self._lock:
            data = self._cache.pop(sha256, None)
            if data is not None:
                self._cached -= len(data)

    def import_folder(self, root: str | os.PathLike) -> dict:
        """Move the files of an older release's on-disk store (``root/ab/abcdef...``) into the database.

        Idempotent (a file already held is skipped; two processes may run it at once). A file whose bytes
        do not hash to its name is not imported (and logged); each keeps its file time as ``created_at``.
        Returns counts: imported, already held, corrupt. The folder itself is left in place.
        """
        from aggregator.db import Blob, insert_ignore

        counts = {"imported": 0, "present": 0, "corrupt": 0}
        for path in sorted(Path(root).glob("??/*")):
            if not _HEX64.fullmatch(path.name) or path.parent.name != path.name[:2] or not path.is_file():
                continue  # a temporary file of a write that never finished
            if self.exists(path.name):  # held already (an earlier start): not read again
                counts["present"] += 1
                continue
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != path.name:
                counts["corrupt"] += 1
                log.error("model file %s does not hash to its name: not imported (left on disk)", path)
                continue
            mtime = path.stat().st_mtime
            with self.engine.begin() as conn:
                done = conn.execute(insert_ignore(self.dialect, Blob, sha256=path.name, size=len(data), data=data,
                                                  created_at=mtime, last_used=mtime)
                                    .returning(Blob.sha256)).first() is not None
            counts["imported" if done else "present"] += 1
        return counts


ROUNDS_LOCK_KEY = 0x66656473  # "feds": the PostgreSQL advisory lock that serialises publishing and round opening


def lock_rounds(session: Session) -> None:
    """Serialise the transactions that publish a version or open a round, until this transaction ends.

    PostgreSQL (READ COMMITTED): a publish's ``SELECT ... status='open' FOR UPDATE`` does not see the round a
    concurrent close inserts (nor a round that close has already marked ``closing``), so two rounds could be
    left open; a transaction-level advisory lock taken first by both makes the second wait for the first's
    commit and then read it. SQLite's write sessions (BEGIN IMMEDIATE) are serialised already.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ROUNDS_LOCK_KEY})


_SYNC_RESTORE = "fedser_restore_synchronous"  # session.info / connection record info: the level to go back to


DURABLE = "fedser_durable"  # execution option of a transaction begun by begin_durable


def begin_durable(session: Session) -> None:
    """Begin ``session``'s transaction so that its commit is synced to disk on SQLite (``synchronous=FULL``),
    whatever ``SQLITE_SYNCHRONOUS`` says; the connection goes back to its own level when the transaction ends.

    For every transaction that publishes a version (round close, rollback, a new base): with ``NORMAL`` a power
    cut can undo a commit devices have already seen, and the server would then publish another head under the
    same version number. A FULL commit syncs the WAL, every earlier commit in it included, so nothing a device
    can see is lost; only these rare transactions pay the sync, intake stays at the configured level. SQLite
    cannot change the level inside a transaction, so this must come before the transaction's first statement
    (a no-op when one is already begun: :func:`publish_version` then logs that the commit is not synced).
    PostgreSQL: nothing to do (every commit is durable).
    """
    if session.in_transaction() or session.get_bind().dialect.name != "sqlite":
        return
    fairy = session.connection(execution_options={DURABLE: True}).connection
    if _SYNC_RESTORE in fairy.info:
        session.info[_SYNC_RESTORE] = (fairy.dbapi_connection, fairy.info)


@event.listens_for(Engine, "begin")  # class level: runs before the SQLite engine's own BEGIN IMMEDIATE
def _full_sync_at_begin(conn) -> None:
    if not conn.get_execution_options().get(DURABLE) or conn.dialect.name != "sqlite":
        return
    raw = conn.connection.dbapi_connection
    level = raw.execute("PRAGMA synchronous").fetchone()[0]  # 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA
    if level < 2:
        raw.execute("PRAGMA synchronous=FULL")  # per connection; never lowers FULL or EXTRA
        conn.connection.info[_SYNC_RESTORE] = level


def _check_durable(session: Session) -> None:
    conn = session.connection()
    if conn.dialect.name != "sqlite":
        return
    if conn.connection.dbapi_connection.execute("PRAGMA synchronous").fetchone()[0] < 2:
        log.warning("a version is published by a transaction not begun with begin_durable: its commit is not "
                    "synced to disk (SQLITE_SYNCHRONOUS=NORMAL), a power cut could undo it")


@event.listens_for(Session, "after_commit")
@event.listens_for(Session, "after_rollback")
def _restore_after_transaction(session: Session) -> None:
    """Back to the configured level right after the commit (or rollback), while the session still holds the
    connection, so the intake that uses the connection next is not synced."""
    held = session.info.pop(_SYNC_RESTORE, None)
    if held is not None:
        raw, info = held
        _restore_level(raw, info)


@event.listens_for(Pool, "checkin")
def _restore_at_checkin(dbapi_connection, record) -> None:
    """A session closed without commit or rollback: its connection goes back to the pool at its own level."""
    if record is not None and _SYNC_RESTORE in record.info and dbapi_connection is not None:
        _restore_level(dbapi_connection, record.info)


def _restore_level(raw, info: dict) -> None:
    level = info.pop(_SYNC_RESTORE, None)
    if level is None:
        return
    try:
        raw.execute(f"PRAGMA synchronous={int(level)}")
    except Exception as exc:  # a connection that broke: the pool discards it anyway
        log.warning("could not restore PRAGMA synchronous=%s after a publish: %s", level, exc)


def current_version(session: Session) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).where(ModelVersion.is_current.is_(True))).first()


def head_arrays(blobs: BlobStore, manifest: Manifest) -> dict[str, np.ndarray]:
    return unpack_arrays(manifest.metadata.head_layout, blobs.get(manifest.head.sha256))


def publish_version(
    session: Session,
    blobs: BlobStore,
    key: SigningKey,
    *,
    base: BlobRef,
    head: dict[str, np.ndarray],
    metadata: ModelMetadata,
    parent_version: int | None,
    round_id: int | None = None,
    metrics: dict | None = None,
    optimizer_state_sha256: str | None = None,
    deadline_seconds: float | None = None,
    note: str = "",
) -> Manifest:
    """Sign and record a new version, make it current, open its first round.

    A round still open on the version this one replaces (an upload or a rollback published while devices
    were posting) is closed as ``superseded``: its updates are deltas of a head that is no longer served,
    so they are kept on record, counted in the round row, and never aggregated; their devices pull the new
    version and send a new update for it. At most one round is open at any time.

    Runs inside the caller's transaction, its model files included: nothing is visible until it commits,
    and a crash before the commit leaves nothing behind; on SQLite that commit is synced to disk whatever
    ``SQLITE_SYNCHRONOUS`` says (when the caller began it with :func:`begin_durable`).
    """
    lock_rounds(session)
    _check_durable(session)  # the caller began the transaction with begin_durable (SQLite: a synced commit)
    now = time.time()
    # First, so that a concurrent close holding the open round's row makes this wait for its commit (and its
    # version number) instead of racing it to the same number.
    for rnd in session.scalars(select(Round).where(Round.status == "open").with_for_update()):
        count, examples = session.execute(select(func.count(), func.coalesce(func.sum(Update.num_examples), 0))
                                          .where(Update.round_id == rnd.id)).one()
        rnd.status, rnd.closed_at, rnd.num_updates, rnd.num_examples = "superseded", now, count, int(examples)
        rnd.note = (f"superseded: a new version was published ({note or 'round close'}) while this round was "
                    f"open; its {count} updates were not aggregated")[:500]
        log.warning("round %d superseded with %d updates by a new version (%s)", rnd.id, count, note)
    head_ref = blobs.put(pack_arrays(metadata.head_layout, head), session)
    latest = session.scalars(select(ModelVersion.version).order_by(ModelVersion.version.desc())).first()
    version = (latest or 0) + 1
    manifest = Manifest(version=version, base=base, head=head_ref, metadata=metadata,
                        parent_version=parent_version, round_id=round_id, metrics=metrics or {})
    signed = manifest.sign(key.sign)
    session.execute(update(ModelVersion).where(ModelVersion.is_current.is_(True)).values(is_current=False))
    session.add(ModelVersion(version=version, parent_version=parent_version, round_id=round_id,
                             base_sha256=base.sha256, head_sha256=head_ref.sha256,
                             signed_manifest=signed.to_bytes(), created_at=time.time(), is_current=True,
                             optimizer_state_sha256=optimizer_state_sha256, note=note))
    session.flush()
    session.add(Round(base_version=version, status="open", opened_at=now,
                      deadline_at=now + deadline_seconds if deadline_seconds else None))
    log.info("published model version %d (parent %s, round %s)", version, parent_version, round_id)
    return manifest


def initial_head(tflite: bytes, metadata: ModelMetadata) -> dict[str, np.ndarray]:
    """The head weights stored in a ``.tflite`` (its ``get_weights`` signature); ModelError if it won't load, or if
    its metadata turns the per-user input affine on (``input_affine_from``) for a file without the ``input_grad``
    signature the devices would need (they would log it and fit the head only: a publishing mistake)."""
    import tempfile

    from edge_sdk.model import TFLiteModel

    with tempfile.NamedTemporaryFile(suffix=".tflite") as tmp:
        tmp.write(tflite)
        tmp.flush()
        try:
            model = TFLiteModel(tmp.name, metadata)
            if metadata.input_affine_from and not model.has_input_grad:
                raise ModelError(f"the metadata turns the input affine on from {metadata.input_affine_from} answers "
                                 "(input_affine_from), but the model has no input_grad signature: re-export it "
                                 "(fedser-train reexport) or leave input_affine_from out")
            return model.get_weights()
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"the uploaded model does not load in the TFLite runtime: {exc}") from exc


def base_metrics(metadata: ModelMetadata, metrics: dict | None = None) -> dict:
    """The figures a new base is published with: ``metrics``, else its metadata's ``extra.test``, which must then be
    an object (or absent or null); ModelError naming the field otherwise."""
    test = metadata.extra.get("test")
    if not metrics and test is not None and not isinstance(test, dict):
        raise ModelError("model metadata extra.test must be an object of test figures (for example "
                         f'{{"uar": 0.7}}) or absent, got {type(test).__name__} {str(test)[:40]}')
    return dict(metrics or test or {})


def publish_base(session: Session, blobs: BlobStore, key: SigningKey, tflite: bytes,
                 metadata: ModelMetadata, *, metrics: dict | None = None, deadline_seconds: float | None = None,
                 validation: dict | None = None, note: str = "") -> Manifest:
    """Publish a new base model; its initial head is read from the file through ``get_weights``."""
    metrics = base_metrics(metadata, metrics)
    head = initial_head(tflite, metadata)
    base = blobs.put(tflite, session)
    parent = current_version(session)
    if validation:
        metrics["validation"] = validation
    return publish_version(session, blobs, key, base=base, head=head, metadata=metadata,
                           parent_version=parent.version if parent else None, metrics=metrics,
                           deadline_seconds=deadline_seconds, note=note)


def rollback_to(session: Session, blobs: BlobStore, key: SigningKey, row: ModelVersion, *,
                deadline_seconds: float | None = None) -> Manifest:
    """Republish version ``row`` (its base and head) as a new, current version."""
    old = load_manifest(row, key)
    return publish_version(session, blobs, key, base=old.base, head=head_arrays(blobs, old), metadata=old.metadata,
                           parent_version=row.version, metrics={**old.metrics, "rollback_of": row.version},
                           optimizer_state_sha256=row.optimizer_state_sha256, deadline_seconds=deadline_seconds,
                           note=f"rollback to version {row.version}")


def load_manifest(row: ModelVersion, key: SigningKey) -> Manifest:
    """The verified manifest of a version (versions are immutable: verified once per process)."""
    return _verified_manifest(bytes(row.signed_manifest), key.verify_key.to_b64())


@functools.lru_cache(maxsize=64)
def _verified_manifest(signed: bytes, verify_key_b64: str) -> Manifest:
    from edge_sdk.signing import VerifyKey

    return SignedManifest.from_bytes(signed, VerifyKey.from_b64(verify_key_b64).verify).manifest
