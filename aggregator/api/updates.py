"""Update intake: signed head deltas from devices; closes a round when it is full or past its deadline."""

from __future__ import annotations

import logging
import time

from flask import Blueprint, current_app, jsonify, request

from aggregator import service
from aggregator.api import API_PREFIX, error, server_key
from aggregator.db import Device, Refusal, Round, get_session
from aggregator.intake import Refused, accept_update

log = logging.getLogger("aggregator")

bp = Blueprint("updates", __name__, url_prefix=f"{API_PREFIX}/updates")


@bp.post("")
def post_update():
    session = get_session()
    cfg = current_app.config
    try:
        accepted = accept_update(session, request.get_data(cache=False), server_key(),
                                 max_l2_norm=float(cfg["MAX_UPDATE_L2_NORM"]),
                                 staleness_limit=int(cfg["STALENESS_LIMIT"]),
                                 rate_limit_per_hour=int(cfg["RATE_LIMIT_PER_HOUR"]))
    except Refused as exc:
        session.rollback()
        audit_refusal(session, exc.status, exc.reason, exc.detail, device_id=exc.device_id,
                      authenticated=exc.authenticated)
        return error(exc.status, exc.reason, exc.detail)
    body = accepted.to_dict()
    if not accepted.duplicate:
        full = accepted.round_updates >= int(cfg["ROUND_MIN_UPDATES"])
        rnd = session.get(Round, accepted.round_id)
        due = (rnd is not None and rnd.deadline_at is not None and rnd.deadline_at <= time.time()
               and accepted.round_updates >= int(cfg["ROUND_MIN_UPDATES_AT_DEADLINE"]))
        if full or due:
            result = service.close(session, accepted.round_id,
                                   min_updates=None if full else int(cfg["ROUND_MIN_UPDATES_AT_DEADLINE"]))
            if result.closed:
                body["round_closed"] = True
                body["published_version"] = result.published_version
                if result.rejected:
                    body["round_rejected"] = result.reason
    return jsonify(body), 200 if accepted.duplicate else 202


def audit_refusal(session, status: int, reason: str, detail: str, *, device_id: str | None = None,
                  authenticated: bool = False) -> None:
    """A row in the refusals table (the audit trail and the metric by reason); logs it too."""
    log.warning("refused %s %s from %s: %s (%s)", request.method, request.path, device_id, reason, detail)
    session.add(Refusal(at=time.time(), device_id=device_id, authenticated=authenticated,
                        reason=reason, detail=detail[:2000], status=status))
    if authenticated and device_id:
        device = session.get(Device, device_id)
        if device is not None:
            device.updates_refused += 1
            device.last_seen = time.time()
    session.commit()
