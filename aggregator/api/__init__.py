"""Blueprints of the HTTP API, one per resource, and what they share."""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from functools import wraps

from flask import abort, current_app, g, jsonify, request

API_PREFIX = "/api/v1"


def error(status: int, reason: str, detail: str):
    """A JSON refusal: ``{"error": reason, "detail": detail}`` with ``status``."""
    resp = jsonify(error=reason, detail=detail)
    resp.status_code = status
    return resp


def admin_required(fn):
    """Admin endpoints need ``Authorization: Bearer <admin token>``."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        if not token or not hmac.compare_digest(token, current_app.config["ADMIN_TOKEN"]):
            abort(401, "admin endpoints need the header 'Authorization: Bearer <admin token>'")
        return fn(*args, **kwargs)

    return wrapper


def server_key():
    return current_app.extensions["fedser_server_key"]


def blobs():
    return current_app.extensions["fedser_blobs"]


def device_required(fn):
    """Device endpoints without a signed body need the signed-request headers of ``edge_sdk.wire``.

    ``X-Fedser-Device``, ``X-Fedser-Timestamp`` and ``X-Fedser-Signature`` (base64
    Ed25519 over :func:`edge_sdk.wire.request_signing_message`); the device must be
    enrolled and not revoked, the timestamp within ``REQUEST_MAX_SKEW`` seconds.
    Each refusal is audited like an update's.
    """

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from aggregator.api.updates import audit_refusal
        from aggregator.db import Device, get_session
        from edge_sdk.errors import SignatureError
        from edge_sdk.signing import VerifyKey
        from edge_sdk.wire import REQUEST_HEADERS, request_signing_message

        session = get_session()
        device_id, ts, sig = (request.headers.get(h, "") for h in REQUEST_HEADERS)

        def refuse(status, reason, detail, authenticated=False):
            session.rollback()
            audit_refusal(session, status, reason, detail, device_id=device_id or None, authenticated=authenticated)
            return error(status, reason, detail)

        if not (device_id and ts and sig):
            return refuse(401, "missing_device_auth", "device endpoints need the headers " + ", ".join(REQUEST_HEADERS))
        device = session.get(Device, device_id)
        if device is None:
            return refuse(401, "unknown_device", f"device {device_id!r} is not enrolled")
        try:
            skew = abs(time.time() - float(ts))
            signature = base64.b64decode(sig, validate=True)
            path = request.full_path.rstrip("?")
            VerifyKey.from_b64(device.public_key).verify(signature, request_signing_message(request.method, path, ts))
        except (ValueError, binascii.Error, SignatureError) as exc:
            return refuse(401, "bad_signature", f"request signature does not verify: {exc}")
        if skew > float(current_app.config["REQUEST_MAX_SKEW"]):
            return refuse(401, "clock_skew", f"request timestamp is {skew:.0f} s from the server's clock "
                                             f"(limit {current_app.config['REQUEST_MAX_SKEW']:.0f} s): set the clock")
        if device.revoked:
            return refuse(403, "revoked_device", f"device {device_id} is revoked", authenticated=True)
        g.device_id = device_id
        now = time.time()
        if not device.last_seen or now - device.last_seen > 60:
            device.last_seen = now
            session.commit()
        return fn(*args, **kwargs)

    return wrapper
