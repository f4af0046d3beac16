"""Admin API (bearer admin token): enrollment tokens, base models, rounds, status."""

from __future__ import annotations

import hashlib
import json
import secrets
import time

from flask import Blueprint, current_app, jsonify, request
from sqlalchemy import func, select

from aggregator.api import API_PREFIX, admin_required, blobs, error, server_key
from aggregator.db import Device, EnrollmentToken, ModelVersion, Refusal, Round, Update, get_session
from aggregator.registry import current_version, publish_base
from aggregator.rounds import close_round, open_round
from edge_sdk.errors import FedserError
from edge_sdk.model import ModelMetadata

bp = Blueprint("admin", __name__, url_prefix=f"{API_PREFIX}/admin")


def create_enrollment_token(session, ttl: float) -> tuple[str, float]:
    token = secrets.token_urlsafe(24)
    now = time.time()
    session.add(EnrollmentToken(token_sha256=hashlib.sha256(token.encode()).hexdigest(), created_at=now,
                                expires_at=now + ttl))
    session.commit()
    return token, now + ttl


@bp.post("/enrollment-tokens")
@admin_required
def new_token():
    body = request.get_json(silent=True) or {}
    ttl = float(body.get("ttl_seconds", current_app.config["ENROLLMENT_TOKEN_TTL"]))
    if not 0 < ttl <= 30 * 86400:
        return error(400, "bad_ttl", f"ttl_seconds must be in (0, 2592000], got {ttl}")
    token, expires = create_enrollment_token(get_session(), ttl)
    return jsonify(token=token, expires_at=expires), 201


@bp.post("/models")
@admin_required
def upload_base():
    """Publish a new base: multipart with ``tflite`` (the file) and ``metadata`` (model.json)."""
    if "tflite" not in request.files or "metadata" not in request.files:
        return error(400, "malformed", "send multipart files 'tflite' and 'metadata'")
    try:
        metadata = ModelMetadata.from_dict(json.loads(request.files["metadata"].read()))
        session = get_session()
        manifest = publish_base(session, blobs(), server_key(), request.files["tflite"].read(), metadata)
        session.commit()
    except (FedserError, ValueError) as exc:
        get_session().rollback()
        return error(422, "bad_model", str(exc))
    return jsonify(version=manifest.version, base_sha256=manifest.base.sha256), 201


@bp.post("/rounds/close")
@admin_required
def close_current_round():
    session = get_session()
    rnd = open_round(session)
    if rnd is None:
        return error(409, "no_open_round", "there is no open round")
    body = request.get_json(silent=True) or {}
    result = close_round(session, blobs(), server_key(), rnd.id, min_updates=int(body.get("min_updates", 1)),
                         server_lr=float(current_app.config["SERVER_LR"]))
    if not result.closed:
        return error(409, "not_closed", f"round {rnd.id} not closed: {result.reason}")
    return jsonify(result.__dict__)


@bp.post("/devices/<device_id>/revoke")
@admin_required
def revoke(device_id: str):
    session = get_session()
    device = session.get(Device, device_id)
    if device is None:
        return error(404, "unknown_device", f"device {device_id} doesn't exist")
    device.revoked = True
    session.commit()
    return jsonify(device_id=device_id, revoked=True)


@bp.get("/status")
@admin_required
def status():
    return jsonify(summary(get_session()))


def summary(session) -> dict:
    current = current_version(session)
    rnd = open_round(session)
    return {
        "current_version": current.version if current else None,
        "versions": session.scalar(select(func.count()).select_from(ModelVersion)),
        "open_round": {"id": rnd.id, "updates": session.scalar(
            select(func.count()).select_from(Update).where(Update.round_id == rnd.id))} if rnd else None,
        "rounds_closed": session.scalar(select(func.count()).select_from(Round).where(Round.status == "closed")),
        "rounds": [
            {"id": r.id, "base_version": r.base_version, "status": r.status, "num_updates": r.num_updates,
             "num_examples": r.num_examples, "published_version": r.published_version}
            for r in session.scalars(select(Round).order_by(Round.id.desc()).limit(50))
        ],
        "devices": [
            {"id": d.id, "name": d.name, "revoked": d.revoked, "last_seen": d.last_seen,
             "updates_accepted": d.updates_accepted, "updates_refused": d.updates_refused}
            for d in session.scalars(select(Device).order_by(Device.enrolled_at))
        ],
        "refusals": dict(session.execute(select(Refusal.reason, func.count()).group_by(Refusal.reason)).all()),
    }
