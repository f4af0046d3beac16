"""Update intake: signed head deltas from devices; closes a round when it is full."""

from __future__ import annotations

import logging
import time

from flask import Blueprint, current_app, jsonify, request

from aggregator.api import API_PREFIX, blobs, error, server_key
from aggregator.db import Device, Refusal, get_session
from aggregator.intake import Refused, accept_update
from aggregator.rounds import close_round

log = logging.getLogger("aggregator")

bp = Blueprint("updates", __name__, url_prefix=f"{API_PREFIX}/updates")


@bp.post("")
def post_update():
    session = get_session()
    try:
        accepted = accept_update(session, request.get_data(cache=False), server_key(),
                                 max_l2_norm=float(current_app.config["MAX_UPDATE_L2_NORM"]))
    except Refused as exc:
        session.rollback()
        _audit(session, exc)
        log.warning("refused update from %s: %s (%s)", exc.device_id, exc.reason, exc.detail)
        return error(exc.status, exc.reason, exc.detail)
    body = accepted.to_dict()
    if not accepted.duplicate and accepted.round_updates >= current_app.config["ROUND_MIN_UPDATES"]:
        result = close_round(session, blobs(), server_key(), accepted.round_id,
                             min_updates=current_app.config["ROUND_MIN_UPDATES"],
                             server_lr=float(current_app.config["SERVER_LR"]))
        if result.closed:
            body["round_closed"] = True
            body["published_version"] = result.published_version
    return jsonify(body), 200 if accepted.duplicate else 202


def _audit(session, exc: Refused) -> None:
    session.add(Refusal(at=time.time(), device_id=exc.device_id, authenticated=exc.authenticated,
                        reason=exc.reason, detail=exc.detail[:2000], status=exc.status))
    if exc.authenticated and exc.device_id:
        device = session.get(Device, exc.device_id)
        if device is not None:
            device.updates_refused += 1
            device.last_seen = time.time()
    session.commit()
