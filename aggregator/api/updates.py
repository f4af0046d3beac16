"""Update intake: signed head deltas from devices; closes a round when it is full or past its deadline."""

from __future__ import annotations

import logging
import re
import threading
import time

from flask import Blueprint, current_app, jsonify, request
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from werkzeug.exceptions import RequestEntityTooLarge

from aggregator import service
from aggregator.api import API_PREFIX, error, refuse, server_key
from aggregator.db import Device, Refusal, RefusalCount, bounded_connection, get_session, is_lock_timeout
from aggregator.intake import Refused, accept_update

log = logging.getLogger("aggregator")

bp = Blueprint("updates", __name__, url_prefix=f"{API_PREFIX}/updates")


@bp.post("")
def post_update():
    session = get_session()
    cfg = current_app.config
    limit = int(cfg["MAX_CONTENT_LENGTH"])
    data = _read_body(limit)
    if data is None:  # a chunked body (no Content-Length) longer than the limit
        return refuse(413, "too_large", f"body larger than {limit} bytes")
    try:
        accepted = accept_update(session, data, server_key(),
                                 max_l2_norm=float(cfg["MAX_UPDATE_L2_NORM"]),
                                 staleness_limit=int(cfg["STALENESS_LIMIT"]),
                                 rate_limit_per_hour=int(cfg["RATE_LIMIT_PER_HOUR"]),
                                 lock_timeout=float(cfg["INTAKE_LOCK_TIMEOUT_SECONDS"]))
    except Refused as exc:
        if exc.retry_after is not None:  # 503 lock_timeout: a busy round, not the device's doing
            return _refuse_busy(session, exc)
        return refuse(exc.status, exc.reason, exc.detail, device_id=exc.device_id, authenticated=exc.authenticated)
    body = accepted.to_dict()
    if not accepted.duplicate:
        full = accepted.round_updates >= int(cfg["ROUND_MIN_UPDATES"])
        deadline = accepted.round_deadline_at  # no query: the round's row was read in the insert's transaction
        due = (deadline is not None and deadline <= time.time()
               and accepted.round_updates >= int(cfg["ROUND_MIN_UPDATES_AT_DEADLINE"]))
        if full or due:
            try:
                result = service.close(session, accepted.round_id,
                                       min_updates=None if full else int(cfg["ROUND_MIN_UPDATES_AT_DEADLINE"]))
            except DBAPIError as exc:  # e.g. the server ended a close idle past CLOSE_IDLE_TIMEOUT_SECONDS
                session.rollback()  # the round stays open with every update; the next post or deadline retries
                log.warning("closing round %d failed, it stays open: %s", accepted.round_id, str(exc)[:300])
                return jsonify(body), 202
            if result.closed:
                body["round_closed"] = True
                body["published_version"] = result.published_version
                if result.rejected:
                    body["round_rejected"] = result.reason
    return jsonify(body), 200 if accepted.duplicate else 202


AUDIT_WAIT_S = 0.25  # seconds the count of a 503 lock_timeout may wait for the database's write lock


def _refuse_busy(session, exc: Refused):
    """503 with ``Retry-After``, counted like every refusal without queueing behind the lock that caused it.

    On SQLite the count needs the write lock the close holds: it waits ``AUDIT_WAIT_S`` at most, and a count
    that cannot be written then is kept in this process and added by its next refusal (:func:`count_refusal`).
    """
    from sqlalchemy.exc import OperationalError

    session.rollback()
    try:
        bounded_connection(session, AUDIT_WAIT_S)
        audit_refusal(session, exc.status, exc.reason, exc.detail, device_id=exc.device_id,
                      authenticated=exc.authenticated)
    except OperationalError as err:
        if not is_lock_timeout(err):
            raise
        session.rollback()
        key = (str(session.get_bind().url), exc.status, exc.reason)
        with _PENDING_LOCK:
            _PENDING[key] = _PENDING.get(key, 0) + 1
        log.warning("refused %s %s from %s: %s (%s); counted later", request.method, request.path[:200],
                    audit_device_id(exc.device_id), exc.reason, exc.detail[:500])
    resp = error(exc.status, exc.reason, exc.detail)
    resp.headers["Retry-After"] = str(exc.retry_after)
    return resp


_PENDING: dict[tuple[str, int, str], int] = {}  # (database, status, reason): counted here, not yet in the table
_PENDING_LOCK = threading.Lock()


def _read_body(limit: int) -> bytes | None:
    """The request body, or None when it is longer than ``limit`` bytes (also when sent chunked)."""
    try:
        if request.content_length is not None:  # werkzeug already refused one longer than the limit (413)
            return request.get_data(cache=False)
        stream, parts, size = request.stream, [], 0
        while size <= limit:
            chunk = stream.read(min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
    except RequestEntityTooLarge:
        return None
    return None if size > limit else b"".join(parts)


_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")
AUDIT_DEVICE_ID_LEN = 40  # the refusals.device_id column
_ONE_ROW_A_MINUTE = ("rate_limited", "revoked_device")  # authenticated, but repeated at the sender's pace


def audit_device_id(device_id: str | None) -> str | None:
    """What the audit row keeps of a caller-given device id: 40 characters of ``A-Za-z0-9._-`` at most.

    Other characters become ``?``; a longer value keeps 37 and ends in ``...``.
    """
    if not device_id:
        return None
    clean = _UNSAFE_ID_CHARS.sub("?", device_id[:AUDIT_DEVICE_ID_LEN + 1])
    return clean if len(clean) <= AUDIT_DEVICE_ID_LEN else clean[:AUDIT_DEVICE_ID_LEN - 3] + "..."


def count_refusal(session, status: int, reason: str, now: float) -> None:
    """Add one to the exact count of refusals by reason and status (one upsert in the caller's transaction)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    db = str(session.get_bind().url)
    with _PENDING_LOCK:
        pending = {k[1:]: _PENDING.pop(k) for k in [k for k in _PENDING if k[0] == db]}
    pending[(status, reason)] = pending.get((status, reason), 0) + 1
    for (status, reason), n in sorted(pending.items()):
        stmt = insert(RefusalCount).values(reason=reason, status=status, count=n, last_at=now)
        session.execute(stmt.on_conflict_do_update(
            index_elements=["reason", "status"], set_={"count": RefusalCount.count + n, "last_at": now}))


def refusal_counts(session) -> dict[str, int]:
    """Refusals by reason since the database was made (exact: sampled or pruned audit rows don't change it)."""
    return {r: int(n) for r, n in session.execute(
        select(RefusalCount.reason, func.sum(RefusalCount.count)).group_by(RefusalCount.reason)).all()}


def audit_refusal(session, status: int, reason: str, detail: str, *, device_id: str | None = None,
                  authenticated: bool = False) -> None:
    """Count a refusal (the metric by reason), keep an audit row of it, log it.

    Every refusal is counted exactly. The audit row keeps a sanitised device id of at most 40 characters and
    a detail of at most 2,000; the rows of *unauthenticated* refusals (anyone can send those) are kept for
    at most ``REFUSAL_AUDIT_UNAUTH_PER_MINUTE`` a minute, fleet-wide, and a device refused as revoked or rate
    limited gets one such row a minute (the rate limit only needs the rows before it), so a flood costs
    bounded storage.
    """
    now = time.time()
    device_id = audit_device_id(device_id)
    log.warning("refused %s %s from %s: %s (%s)", request.method, request.path[:200], device_id, reason,
                detail[:500])
    count_refusal(session, status, reason, now)
    keep = True
    if not authenticated:
        per_minute = int(current_app.config.get("REFUSAL_AUDIT_UNAUTH_PER_MINUTE", 60))
        if per_minute >= 0:
            kept = session.scalar(select(func.count()).select_from(Refusal).where(
                Refusal.at > now - 60, Refusal.authenticated.is_(False)))
            keep = kept < per_minute
    elif reason in _ONE_ROW_A_MINUTE and device_id:
        keep = not session.scalar(select(func.count()).select_from(Refusal).where(
            Refusal.device_id == device_id, Refusal.reason == reason, Refusal.at > now - 60))
    if keep:
        session.add(Refusal(at=now, device_id=device_id, authenticated=authenticated,
                            reason=reason, detail=detail[:2000], status=status))
    if authenticated and device_id:
        device = session.get(Device, device_id)
        if device is not None:
            device.updates_refused += 1
            device.last_seen = time.time()
    session.commit()
