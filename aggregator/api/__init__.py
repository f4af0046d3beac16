"""Blueprints of the HTTP API, one per resource, and what they share."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from functools import wraps

from flask import current_app, g, jsonify, request

from edge_sdk.wire import MAX_INT32, refuse_json_constant  # MAX_INT32: path ids and admin integers (PG INTEGER)

API_PREFIX = "/api/v1"


def error(status: int, reason: str, detail: str):
    """A JSON refusal: ``{"error": reason, "detail": detail}`` with ``status``."""
    resp = jsonify(error=reason, detail=detail)
    resp.status_code = status
    return resp


def refuse(status: int, reason: str, detail: str, *, device_id: str | None = None, authenticated: bool = False):
    """:func:`error`, audited and counted like every refusal (``aggregator.api.updates.audit_refusal``)."""
    from aggregator.api.updates import audit_refusal
    from aggregator.db import get_session

    session = get_session()
    session.rollback()
    audit_refusal(session, status, reason, detail, device_id=device_id, authenticated=authenticated)
    return error(status, reason, detail)


def path_int(name: str, value: int, maximum: int = MAX_INT32, *, device_id: str | None = None):
    """A refusal (400 ``out_of_range``) when a path integer is outside ``1 .. maximum``, else None."""
    if not 1 <= value <= maximum:
        return refuse(400, "out_of_range", f"{name} must be in 1 .. {maximum}, got {str(value)[:40]}",
                      device_id=device_id, authenticated=True)
    return None


def json_object_body(*, authenticated: bool = True) -> tuple[dict | None, object]:
    """The request body as a JSON object (``{}`` when empty): ``(body, None)`` or ``(None, 400 refusal)``.

    NaN and Infinity are refused, as are arrays, strings, numbers and ``null``.
    """
    data = request.get_data(cache=True)
    if not data.strip():
        return {}, None
    try:
        body = json.loads(data, parse_constant=refuse_json_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return None, refuse(400, "malformed", f"body is not JSON: {str(exc)[:200]}", authenticated=authenticated)
    if not isinstance(body, dict):
        return None, refuse(400, "malformed", f"body must be a JSON object, got {type(body).__name__}",
                            authenticated=authenticated)
    return body, None


def int_field(body: dict, name: str, default: int, low: int, high: int):
    """``(value, None)`` or ``(None, 400 refusal)`` for an integer field of an admin body in ``low .. high``."""
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        return None, refuse(400, "out_of_range", f"{name} must be an integer in {low} .. {high}, got "
                                                 f"{str(value)[:40]!r}", authenticated=True)
    if not low <= value <= high:
        return None, refuse(400, "out_of_range", f"{name} must be in {low} .. {high}, got {str(value)[:40]}",
                            authenticated=True)
    return value, None


def admin_required(fn):
    """Admin endpoints need ``Authorization: Bearer <admin token>``."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        # Bytes, not str: compare_digest refuses a str with a non-ASCII character (a 500 before).
        given = token.encode("utf-8", "surrogateescape")
        if not token or not hmac.compare_digest(given, current_app.config["ADMIN_TOKEN"].encode()):
            return refuse(401, "bad_admin_token", "admin endpoints need the header 'Authorization: Bearer <admin "
                                                  "token>'")
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
        from sqlalchemy import update

        from aggregator.db import Device, get_read_session, write_if_free
        from edge_sdk.errors import SignatureError
        from edge_sdk.signing import VerifyKey
        from edge_sdk.wire import (
            MAX_SIGNATURE_HEADER_LEN,
            REQUEST_HEADERS,
            FieldRangeError,
            parse_request_timestamp,
            request_signing_message,
            valid_device_id,
        )

        device_id, ts, sig = (request.headers.get(h, "") for h in REQUEST_HEADERS)

        def deny(status, reason, detail, authenticated=False):
            """:func:`refuse` (audited, counted) naming the device the request claims to come from."""
            return refuse(status, reason, detail, device_id=device_id or None, authenticated=authenticated)

        if not (device_id and ts and sig):
            return deny(401, "missing_device_auth", "device endpoints need the headers " + ", ".join(REQUEST_HEADERS))
        if not valid_device_id(device_id):
            return deny(401, "unknown_device", "X-Fedser-Device is not a device id (1-40 characters of A-Z a-z "
                                                 "0-9 . _ -)")
        try:
            timestamp = parse_request_timestamp(ts)
        except FieldRangeError as exc:
            return deny(401, "bad_timestamp", str(exc))
        if len(sig) > MAX_SIGNATURE_HEADER_LEN:
            return deny(401, "bad_signature", f"X-Fedser-Signature is longer than {MAX_SIGNATURE_HEADER_LEN} "
                                                "characters")
        device = get_read_session().get(Device, device_id)  # a read: no write lock (aggregator.db)
        if device is None:
            return deny(401, "unknown_device", f"device {device_id!r} is not enrolled")
        try:
            skew = abs(time.time() - timestamp)
            signature = base64.b64decode(sig, validate=True)
            path = request.full_path.rstrip("?")
            VerifyKey.from_b64(device.public_key).verify(signature, request_signing_message(request.method, path, ts))
        except (ValueError, binascii.Error, SignatureError) as exc:
            return deny(401, "bad_signature", f"request signature does not verify: {exc}")
        if skew > float(current_app.config["REQUEST_MAX_SKEW"]):
            return deny(401, "clock_skew", f"request timestamp is {skew:.0f} s from the server's clock "
                                             f"(limit {current_app.config['REQUEST_MAX_SKEW']:.0f} s): set the clock")
        if device.revoked:
            return deny(403, "revoked_device", f"device {device_id} is revoked", authenticated=True)
        g.device_id = device_id
        now = time.time()
        if not device.last_seen or now - device.last_seen > 60:  # bookkeeping: skipped while a writer works
            write_if_free(update(Device).where(Device.id == device_id).values(last_seen=now))
        return fn(*args, **kwargs)

    return wrapper
