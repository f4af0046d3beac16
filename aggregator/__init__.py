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
    # rounds
    "ROUND_MIN_UPDATES": 2,  # a round closes as soon as it holds this many updates (K)
    "ROUND_DEADLINE_SECONDS": 0.0,  # > 0: a round also closes when this passes and it holds ...
    "ROUND_MIN_UPDATES_AT_DEADLINE": 1,  # ... at least this many updates
    "BACKGROUND_INTERVAL": 2.0,  # seconds between deadline checks in each worker
    # aggregation (aggregator.rounds.RoundPolicy)
    "AGGREGATION": "fedavg",  # fedavg | median | trimmed_mean
    "TRIM_FRACTION": 0.1,
    "CLIP_NORM": 0.0,  # > 0: scale each delta down to this L2 norm before aggregating
    "SERVER_OPTIMIZER": "sgd",  # sgd (FedAvg) | fedavgm | fedadam | fedyogi
    "SERVER_LR": 1.0,
    "SERVER_MOMENTUM": 0.9,
    "SERVER_BETA1": 0.9,
    "SERVER_BETA2": 0.99,
    "SERVER_TAU": 1e-3,
    "STALENESS_LIMIT": 0,  # accept updates up to this many versions behind the current one
    "STALENESS_EXPONENT": 0.5,  # ... weighted n / (1 + staleness) ** exponent
    # intake
    "MAX_UPDATE_L2_NORM": 100.0,
    "MAX_CONTENT_LENGTH": 8 * 1024 * 1024,  # bytes of a request body; larger gets 413
    "RATE_LIMIT_PER_HOUR": 120,  # posts (accepted or refused) per device per hour; 0: no limit
    "REQUEST_MAX_SKEW": 300.0,  # seconds a signed device request's timestamp may be off
    "ENROLLMENT_TOKEN_TTL": 24 * 3600,
    # validation gate (aggregator.validation): a manifest CSV path,speaker,label on the server
    "VALIDATION_MANIFEST": None,
    "VALIDATION_MARGIN": 0.02,  # refuse a candidate whose UAR drops more than this below the current one
    "LOG_JSON": True,  # structured (JSON) request logs with request ids
}


def _env_overrides() -> dict:
    out = {}
    for key, default in DEFAULTS.items():
        value = os.environ.get(f"FEDSER_{key}")
        if value is None:
            continue
        if isinstance(default, bool):
            out[key] = value.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(default, (int, float)):
            out[key] = type(default)(value)
        else:
            out[key] = value
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
    if app.config["VALIDATION_MANIFEST"]:
        from aggregator.validation import Validator

        app.extensions["fedser_validator"] = Validator(
            app.config["VALIDATION_MANIFEST"], inst / "validation", app.extensions["fedser_blobs"],
            app.extensions["fedser_server_key"], margin=float(app.config["VALIDATION_MARGIN"]))

    from aggregator import dashboard
    from aggregator.api import admin, devices, models, updates

    for bp in (devices.bp, updates.bp, models.bp, admin.bp, dashboard.bp):
        app.register_blueprint(bp)

    from aggregator import observability, openapi

    observability.install(app)
    openapi.install(app)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        reason = {413: "too_large"}.get(exc.code, exc.name.lower().replace(" ", "_"))
        if exc.code == 413:  # refused before any handler ran: audit it like every other refusal
            from aggregator.api.updates import audit_refusal
            from aggregator.db import get_session

            audit_refusal(get_session(), 413, reason, f"body larger than {app.config['MAX_CONTENT_LENGTH']} bytes")
        return jsonify(error=reason, detail=exc.description), exc.code

    return app


def _load_or_create_secret(path: Path) -> str:
    from edge_sdk.storage import atomic_write

    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    atomic_write(path, token.encode(), mode=0o600)
    return token
