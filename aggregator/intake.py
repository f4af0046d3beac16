"""Checking a posted update: everything is checked, nothing bad gets in, nothing good is lost.

:func:`accept_update` either stores the update (committed before it returns)
or raises :class:`Refused` with an HTTP status and a machine-readable reason.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from aggregator.db import (
    Device,
    ModelVersion,
    Refusal,
    Round,
    Update,
    bounded_connection,
    is_lock_timeout,
    lock_timeout_ms,
    pg_lock_timeout_column,
)
from aggregator.fedavg import l2_norm
from aggregator.registry import current_version, load_manifest
from edge_sdk.errors import SignatureError, WireFormatError
from edge_sdk.signing import SigningKey, VerifyKey
from edge_sdk.wire import FieldRangeError, HeadLayout, UpdateEnvelope

__all__ = ["Refused", "Accepted", "accept_update"]


class Refused(Exception):
    def __init__(self, status: int, reason: str, detail: str, *, device_id: str | None = None,
                 authenticated: bool = False, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail
        self.device_id, self.authenticated = device_id, authenticated
        self.retry_after = retry_after  # seconds (the Retry-After header of a 503)


@dataclass(frozen=True)
class Accepted:
    update_id: str
    round_id: int
    duplicate: bool
    round_updates: int
    round_deadline_at: float | None = None  # of the round it went into (the caller closes a round past it)

    def to_dict(self) -> dict:
        return {"status": "accepted", "update_id": self.update_id, "round_id": self.round_id,
                "duplicate": self.duplicate}


def accept_update(session: Session, data: bytes, server_key: SigningKey, *, max_l2_norm: float,
                  staleness_limit: int = 0, rate_limit_per_hour: int = 0,
                  lock_timeout: float = 5.0) -> Accepted:
    """Check and store one posted update envelope (see the module docstring).

    ``lock_timeout``: seconds the post waits for the round's lock (a close in progress on another host or
    worker) before it is refused ``503 lock_timeout`` with a ``retry_after``: the device keeps the update
    and posts it again. Such a refusal is the server's state, not the device's doing: it is not counted
    against the device (``authenticated=False``: no rate-limit row, no ``updates_refused``).
    """
    try:
        envelope, header_bytes = UpdateEnvelope.from_bytes(data)
    except FieldRangeError as exc:  # a field outside its documented range (edge_sdk.wire)
        raise Refused(400, "out_of_range", str(exc)) from exc
    except WireFormatError as exc:
        raise Refused(400, "malformed", str(exc)) from exc
    started = time.monotonic()
    try:
        return _accept(session, envelope, header_bytes, server_key, max_l2_norm=max_l2_norm,
                       staleness_limit=staleness_limit, rate_limit_per_hour=rate_limit_per_hour,
                       lock_timeout=lock_timeout)
    except OperationalError as exc:
        if not is_lock_timeout(exc):
            raise
        session.rollback()
        retry = max(1, math.ceil(lock_timeout))
        raise Refused(503, "lock_timeout", f"waited {time.monotonic() - started:.1f} s for the round's lock (a "
                                           f"round close in progress holds it): the update was not stored; post "
                                           f"it again in {retry} s", device_id=envelope.header.device_id,
                      retry_after=retry) from exc


def _accept(session: Session, envelope: UpdateEnvelope, header_bytes: bytes, server_key: SigningKey, *,
            max_l2_norm: float, staleness_limit: int, rate_limit_per_hour: int, lock_timeout: float) -> Accepted:
    header = envelope.header
    # Core statements on the session's connection for the reads and writes of the hot path: the ORM's
    # identity map and unit of work cost more CPU here than the database does (tools.bench_aggregator).
    # Every lock wait of the transaction is bounded (SQLite: at BEGIN; PostgreSQL: the round's FOR SHARE).
    conn = bounded_connection(session, lock_timeout, postgres=False)
    if conn.dialect.name == "postgresql":  # the bound is set by the device query itself: no extra round trip
        device = conn.execute(_DEVICE_PG, {"dev_id": header.device_id,
                                           "lock_timeout_ms": lock_timeout_ms(lock_timeout)}).first()
    else:
        device = conn.execute(_DEVICE, {"dev_id": header.device_id}).first()
    if device is None:
        raise Refused(401, "unknown_device", f"device {header.device_id!r} is not enrolled",
                      device_id=header.device_id)
    try:
        envelope.verify(VerifyKey.from_b64(device.public_key).verify, header_bytes)
    except SignatureError as exc:
        raise Refused(401, "bad_signature", str(exc), device_id=device.id) from exc
    if device.revoked:
        raise Refused(403, "revoked_device", f"device {device.id} is revoked", device_id=device.id,
                      authenticated=True)

    def refuse(status: int, reason: str, detail: str) -> Refused:
        return Refused(status, reason, detail, device_id=device.id, authenticated=True)

    update_id = envelope.update_id
    if header.sequence <= device.last_sequence:
        existing = session.get(Update, update_id)
        if existing is not None:  # a retried post of an accepted update: same answer, counted once
            return Accepted(existing.update_id, existing.round_id, True, 0)
        raise refuse(409, "replayed_sequence",
                     f"sequence {header.sequence} is not above the last accepted {device.last_sequence}")
    # Lifetime totals bound the last hour's: only a device that posted that often in all costs two queries.
    if rate_limit_per_hour > 0 and device.updates_accepted + device.updates_refused >= rate_limit_per_hour:
        since = time.time() - 3600
        recent = session.scalar(select(func.count()).select_from(Update).where(
            Update.device_id == device.id, Update.received_at > since)) + session.scalar(
            select(func.count()).select_from(Refusal).where(Refusal.device_id == device.id, Refusal.at > since,
                                                            Refusal.authenticated.is_(True)))
        if recent >= rate_limit_per_hour:
            raise Refused(429, "rate_limited", f"device {device.id} posted {recent} times in the last hour; the "
                                               f"limit is {rate_limit_per_hour}", device_id=device.id,
                          authenticated=True)
    rnd = current = conn.execute(_OPEN_ROUND).first()  # (round id, deadline, current version, its manifest)
    if current is None:
        current = current_version(session)
        if current is None:
            raise refuse(409, "no_model", "no model version is published yet")
        raise refuse(409, "stale_base", f"the round of version {current.version} is closing: pull the new model "
                                        "and retrain")
    staleness = current.version - header.base_version
    if staleness < 0 or (staleness > 0 and session.get(ModelVersion, header.base_version) is None):
        raise refuse(409, "unknown_base", f"update is against version {header.base_version}, which this server "
                                          f"does not know (current is {current.version})")
    if staleness > staleness_limit:
        raise refuse(409, "stale_base", f"update is against version {header.base_version}, {staleness} behind the "
                                        f"current {current.version} (limit {staleness_limit}): pull the new model "
                                        "and retrain")
    # Decided before the body is written: rounds only move on, and every accepted update goes into the open
    # round, so a device has one in it exactly when its last accepted one went there (the unique constraint
    # stays the guard of two concurrent posts, and of devices whose last_round_id predates the column).
    if device.last_round_id == rnd.id:
        raise refuse(409, "already_contributed", f"device {device.id} already has an update in round {rnd.id}")
    manifest = load_manifest(current, server_key)
    layout = manifest.metadata.head_layout
    if header.layout_sha256 != layout.sha256:
        raise refuse(422, "layout_mismatch", f"head layout {header.layout} does not match version "
                                             f"{current.version}'s {layout.to_json()}")
    norm = _l2_norm_of_body(layout, envelope.body)
    if norm is None:  # not finite somewhere (or not all float32): the per-array decode names the array
        try:
            norm = l2_norm(envelope.deltas())
        except WireFormatError as exc:
            raise refuse(422, "bad_values", str(exc)) from exc
    if not math.isfinite(norm) or norm > max_l2_norm:
        raise refuse(422, "norm_too_large", f"delta L2 norm {norm:.4g} exceeds the limit {max_l2_norm:.4g}")
    now = time.time()
    sqlite = session.get_bind().dialect.name == "sqlite"
    try:
        conn.execute(_INSERT_UPDATE, {
            "update_id": update_id, "device_id": device.id, "round_id": rnd.id, "base_version": header.base_version,
            "sequence": header.sequence, "num_examples": header.num_examples, "l2_norm": norm, "body": envelope.body,
            "received_at": now, "staleness": staleness, "answers_scored": header.answers_scored,
            "personal_correct": header.personal_correct, "global_correct": header.global_correct})
        conn.execute(_BUMP_DEVICE, {"dev_id": device.id, "seq": header.sequence, "now": now, "rid": rnd.id})
        # SQLite: this transaction holds the one write lock (BEGIN IMMEDIATE), so a count before the commit is
        # exact and costs no second transaction (and no second wait for the lock).
        count = conn.scalar(_COUNT_ROUND, {"rid": rnd.id}) if sqlite else None
        session.commit()
    except IntegrityError as exc:  # a unique constraint: which one says why
        session.rollback()
        again = session.get(Update, update_id)
        if again is not None:  # a concurrent post of the same update won the race
            return Accepted(again.update_id, again.round_id, True, 0)
        if session.scalar(select(func.count()).select_from(Update).where(Update.round_id == rnd.id,
                                                                         Update.device_id == device.id)):
            raise refuse(409, "already_contributed",
                         f"device {device.id} already has an update in round {rnd.id}") from exc
        raise refuse(409, "replayed_sequence", f"concurrent update with sequence {header.sequence}") from exc
    if count is None:
        # PostgreSQL (READ COMMITTED): counted after the commit, so that under concurrency every post sees at
        # least its own and earlier commits and the post that completes the K-th update always sees K and
        # closes the round. One autocommit statement: no BEGIN, no ROLLBACK, no lock.
        with session.get_bind().connect().execution_options(isolation_level="AUTOCOMMIT") as auto:
            count = auto.scalar(_COUNT_ROUND, {"rid": rnd.id})
    return Accepted(update_id, rnd.id, False, count, rnd.deadline_at)


_DEVICE = select(*(Device.__table__.c[k] for k in ("id", "public_key", "revoked", "last_sequence",
                                                  "updates_accepted", "updates_refused", "last_round_id"))).where(
    Device.__table__.c.id == bindparam("dev_id"))
_DEVICE_PG = _DEVICE.add_columns(pg_lock_timeout_column())  # also bounds the transaction's lock waits
# The open round and its (current) version in one query, the round row share-locked until the commit: a
# concurrent close (which updates the row) either waits for this insert or has already moved both on; without
# the lock, PostgreSQL's READ COMMITTED could let an update land in a round aggregated a moment before. SQLite
# has no FOR SHARE; its writers are serialised by BEGIN IMMEDIATE.
_ROUNDS, _VERSIONS = Round.__table__, ModelVersion.__table__
_OPEN_ROUND = (select(_ROUNDS.c.id, _ROUNDS.c.deadline_at, _VERSIONS.c.version, _VERSIONS.c.signed_manifest)
               .join(_VERSIONS, _VERSIONS.c.version == _ROUNDS.c.base_version)
               .where(_VERSIONS.c.is_current.is_(True), _ROUNDS.c.status == "open")
               .with_for_update(read=True, of=_ROUNDS))
_INSERT_UPDATE = insert(Update.__table__)
_BUMP_DEVICE = (update(Device.__table__).where(Device.__table__.c.id == bindparam("dev_id"))
                .values(last_sequence=bindparam("seq"), last_seen=bindparam("now"), last_round_id=bindparam("rid"),
                        updates_accepted=Device.__table__.c.updates_accepted + 1))
_COUNT_ROUND = (select(func.count()).select_from(Update.__table__)
                .where(Update.__table__.c.round_id == bindparam("rid")))


def _l2_norm_of_body(layout: HeadLayout, body: bytes) -> float | None:
    """L2 norm (float64) of the body's values, read in place; None when one is not finite or not float32.

    The same figure as ``l2_norm(envelope.deltas())`` without copying each array: the body is the layout's
    arrays back to back, little-endian (``edge_sdk.wire.pack_arrays``), its length already checked against
    the header, and the header's layout against ``layout``.
    """
    if any(s.dtype != "float32" for s in layout) or len(body) != layout.nbytes:
        return None
    flat = np.frombuffer(body, "<f4").astype(np.float64)
    # Not np.dot: that goes through BLAS, whose threads spin on every core (measured: 4 ms of CPU an update).
    norm = math.sqrt(float(np.square(flat, out=flat).sum()))  # NaN or Inf anywhere makes the sum NaN or Inf
    return norm if math.isfinite(norm) else None
