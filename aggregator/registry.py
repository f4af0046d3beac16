"""The model registry: content-addressed files, signed manifests, the current version."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from aggregator.db import ModelVersion, Round, Update
from edge_sdk.errors import ModelError
from edge_sdk.manifest import BlobRef, Manifest, SignedManifest
from edge_sdk.model import ModelMetadata
from edge_sdk.signing import SigningKey
from edge_sdk.storage import atomic_write
from edge_sdk.wire import pack_arrays, unpack_arrays

log = logging.getLogger("aggregator")

__all__ = ["BlobStore", "current_version", "lock_rounds", "publish_version", "publish_base", "head_arrays", "blob_url",
           "rollback_to", "initial_head", "load_manifest"]


def blob_url(sha256: str) -> str:
    return f"/api/v1/blobs/{sha256}"


class BlobStore:
    """Files named by their sha256 under ``root/ab/abcdef...``; writes are atomic and idempotent."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> BlobRef:
        sha = hashlib.sha256(data).hexdigest()
        path = self.path(sha)
        try:  # a hit: refresh its mtime, so that prune (which spares recent files) doesn't take a reused blob
            os.utime(path)
        except FileNotFoundError:
            atomic_write(path, data)
        return BlobRef(sha, len(data), blob_url(sha))

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()


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

    Runs inside the caller's transaction: nothing is visible until it commits,
    and a crash before the commit leaves at most an unreferenced blob.
    """
    lock_rounds(session)
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
    head_ref = blobs.put(pack_arrays(metadata.head_layout, head))
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
    """The head weights stored in a ``.tflite`` (its ``get_weights`` signature); ModelError if it won't load."""
    import tempfile

    from edge_sdk.model import TFLiteModel

    with tempfile.NamedTemporaryFile(suffix=".tflite") as tmp:
        tmp.write(tflite)
        tmp.flush()
        try:
            return TFLiteModel(tmp.name, metadata).get_weights()
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"the uploaded model does not load in the TFLite runtime: {exc}") from exc


def publish_base(session: Session, blobs: BlobStore, key: SigningKey, tflite: bytes,
                 metadata: ModelMetadata, *, metrics: dict | None = None, deadline_seconds: float | None = None,
                 validation: dict | None = None, note: str = "") -> Manifest:
    """Publish a new base model; its initial head is read from the file through ``get_weights``."""
    head = initial_head(tflite, metadata)
    base = blobs.put(tflite)
    parent = current_version(session)
    metrics = dict(metrics or metadata.extra.get("test", {}))
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
