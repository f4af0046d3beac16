"""fedser aggregator: a Flask service for enrollment, signed-update intake, FedAvg rounds and the registry.

``create_app(test_config=None)`` builds the app; nothing happens at import time.
Configuration, in order: defaults, ``instance/config.json``, ``FEDSER_*``
environment variables, then ``test_config``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

__all__ = ["create_app"]

log = logging.getLogger("aggregator")

DEFAULTS = {
    "DATABASE_URL": None,  # default: sqlite:///<instance>/aggregator.db
    "ADMIN_TOKEN": None,  # default: generated once into <instance>/admin_token (mode 0600)
    "ROUND_MIN_UPDATES": 2,  # a round closes as soon as it holds this many updates
    "SERVER_LR": 1.0,
    "MAX_UPDATE_L2_NORM": 100.0,
    "MAX_CONTENT_LENGTH": 8 * 1024 * 1024,  # bytes of a request body; larger gets 413
    "ENROLLMENT_TOKEN_TTL": 24 * 3600,
}


def _env_overrides() -> dict:
    out = {}
    for key, default in DEFAULTS.items():
        value = os.environ.get(f"FEDSER_{key}")
        if value is None:
            continue
        out[key] = type(default)(value) if isinstance(default, (int, float)) and default is not None else value
    return out


def create_app(test_config: dict | None = None, *, instance_path: str | None = None) -> Flask:
    instance_path = instance_path or (test_config or {}).get("INSTANCE_PATH") or os.environ.get(
        "FEDSER_INSTANCE_PATH")
    app = Flask(__name__, instance_path=os.path.abspath(instance_path) if instance_path else None,
                instance_relative_config=True)
    app.config.from_mapping(DEFAULTS)
    app.config.from_file("config.json", load=json.load, silent=True)
    app.config.update(_env_overrides())
    if test_config:
        app.config.update(test_config)
    inst = Path(app.instance_path)
    inst.mkdir(parents=True, exist_ok=True)
    if not app.config["DATABASE_URL"]:
        app.config["DATABASE_URL"] = f"sqlite:///{inst / 'aggregator.db'}"
    if not app.config["ADMIN_TOKEN"]:
        app.config["ADMIN_TOKEN"] = _load_or_create_secret(inst / "admin_token")

    from aggregator import db
    from aggregator.registry import BlobStore
    from edge_sdk.signing import SigningKey

    app.extensions["fedser_server_key"] = SigningKey.load_or_create(inst / "server_ed25519.pem")
    app.extensions["fedser_blobs"] = BlobStore(inst / "blobs")
    db.init_app(app)

    from aggregator.api import admin, devices, models, updates

    for bp in (devices.bp, updates.bp, models.bp, admin.bp):
        app.register_blueprint(bp)

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        reason = {413: "too_large"}.get(exc.code, exc.name.lower().replace(" ", "_"))
        return jsonify(error=reason, detail=exc.description), exc.code

    return app


def _load_or_create_secret(path: Path) -> str:
    from edge_sdk.storage import atomic_write

    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    atomic_write(path, token.encode(), mode=0o600)
    return token
