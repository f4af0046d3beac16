"""Device enrollment: a one-time token and the device's Ed25519 public key."""

from __future__ import annotations

import hashlib
import json
import time
import uuid

from flask import Blueprint, jsonify, request
from sqlalchemy import select

from aggregator.api import API_PREFIX, error, server_key
from aggregator.db import Device, EnrollmentToken, get_session
from aggregator.registry import current_version
from edge_sdk.errors import ParameterError
from edge_sdk.signing import VerifyKey

bp = Blueprint("devices", __name__, url_prefix=f"{API_PREFIX}/devices")


@bp.post("/enroll")
def enroll():
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not body.get("token") or not body.get("public_key"):
        return error(400, "malformed", "send JSON with 'token' and 'public_key' (base64 Ed25519)")
    try:
        public_key = VerifyKey.from_b64(str(body["public_key"])).to_b64()
    except ParameterError as exc:
        return error(400, "bad_public_key", str(exc))
    session = get_session()
    token_hash = hashlib.sha256(str(body["token"]).encode()).hexdigest()
    token = session.get(EnrollmentToken, token_hash)
    now = time.time()
    if token is None:
        return error(403, "bad_token", "enrollment token is unknown")
    if token.used_at is not None:
        return error(403, "token_used", "enrollment token was already used")
    if token.expires_at < now:
        return error(403, "token_expired", "enrollment token has expired; ask the admin for a new one")
    if session.scalars(select(Device).where(Device.public_key == public_key)).first():
        return error(409, "key_enrolled", "this public key is already enrolled")
    device = Device(id=f"dev-{uuid.uuid4().hex[:16]}", name=str(body.get("name", ""))[:200],
                    public_key=public_key, enrolled_at=now, last_seen=now)
    session.add(device)
    token.used_at, token.device_id = now, device.id
    session.commit()
    current = current_version(session)
    return jsonify(
        device_id=device.id,
        server_public_key=server_key().verify_key.to_b64(),
        manifest=json.loads(current.signed_manifest) if current else None,
    ), 201
