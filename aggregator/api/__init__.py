"""Blueprints of the HTTP API, one per resource, and what they share."""

from __future__ import annotations

import hmac
from functools import wraps

from flask import abort, current_app, jsonify, request

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
