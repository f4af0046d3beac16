"""fedser aggregator: a Flask service for enrollment, signed-update intake, FedAvg rounds and the registry.

``create_app(test_config=None)`` builds the app; nothing happens at import time.
Configuration, in order: defaults, ``instance/config.json``, ``FEDSER_*``
environment variables, then ``test_config``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

__all__ = ["create_app", "ConfigError", "DEFAULTS", "storage_full"]

log = logging.getLogger("aggregator")

DEFAULTS = {
    "DATABASE_URL": None,  # default: sqlite:///<instance>/aggregator.db
    # Secrets several hosts share (aggregator.identity, docs/deploy-multihost.md). With none set, a single host
    # makes <instance>/server_ed25519.pem and <instance>/admin_token (mode 0600) once; a second host refuses.
    "ADMIN_TOKEN": None,  # the admin bearer token ...
    "ADMIN_TOKEN_FILE": None,  # ... or a file holding it
    "SERVER_KEY_FILE": None,  # the server's Ed25519 signing key: a PEM file (mode 0600/0400) ...
    "SERVER_KEY": None,  # ... or the PEM itself (or base64 of it)
    "BLOB_CACHE_BYTES": 32 * 1024 * 1024,  # model files (in the database) each process keeps in memory
    # SQLite durability (aggregator.db.make_engine): NORMAL syncs the WAL at checkpoints, so a commit survives a
    # killed process but a power cut can lose the updates accepted and refusals counted in its last moments (the
    # database stays consistent); a transaction that publishes a version always commits with FULL
    # (registry.begin_durable), so a version devices may have installed is never undone; FULL syncs
    # every commit (durable through a power cut) and caps a host at about 220 updates/s on this machine's disk;
    # EXTRA also syncs the directory. Anything else is a ConfigError. PostgreSQL ignores it.
    "SQLITE_SYNCHRONOUS": "NORMAL",
    # PostgreSQL: send server-side TCP keepalives for each session (`-c tcp_keepalives_*` in the `options` startup
    # parameter), so the server ends a cut-off host's session, and its locks, in about 25 s. PgBouncer refuses that
    # parameter unless `ignore_startup_parameters = options`: behind one, set this off and the keepalives in
    # postgresql.conf (docs/deploy-multihost.md). SQLite ignores it.
    "PG_SESSION_KEEPALIVE": True,
    # Seconds an update post waits for the round's lock (PostgreSQL: the round row's FOR SHARE, via SET LOCAL
    # lock_timeout; SQLite: the host's write lock and busy wait) while another host or worker closes the
    # round; past it the post is refused 503 lock_timeout with Retry-After (counted; devices keep the update
    # and retry), so a close that hangs (a host cut off mid-close) does not hold every host's threads.
    "INTAKE_LOCK_TIMEOUT_SECONDS": 5.0,
    # PostgreSQL: a closing transaction idle (between statements) longer than this is ended by the server
    # (idle_in_transaction_session_timeout, set for the close only), releasing the round's lock when the closing
    # host is cut off behind a pooler or relay that TCP keepalives cannot see through. Longer than the slowest
    # close's longest pause (the validation gate); 0: off.
    "CLOSE_IDLE_TIMEOUT_SECONDS": 120.0,
    # rounds
    "ROUND_MIN_UPDATES": 2,  # a round closes as soon as it holds this many updates (K)
    "ROUND_DEADLINE_SECONDS": 0.0,  # > 0: a round also closes when this passes and it holds ...
    "ROUND_MIN_UPDATES_AT_DEADLINE": 1,  # ... at least this many updates
    "BACKGROUND_INTERVAL": 2.0,  # seconds between deadline checks in each worker
    # aggregation (aggregator.rounds.RoundPolicy)
    "AGGREGATION": "fedavg",  # fedavg | median | trimmed_mean
    "TRIM_FRACTION": 0.1,  # trimmed_mean cuts floor(f * N) per end, at least 1 when N >= 3 (fedavg.trim_count)
    "CLIP_NORM": 0.0,  # > 0: scale each delta down to this L2 norm before aggregating
    "SERVER_OPTIMIZER": "sgd",  # sgd (FedAvg) | fedavgm | fedadam | fedyogi
    "SERVER_LR": None,  # None: 1.0 for sgd and fedavgm, 0.01 for fedadam and fedyogi (fedavg.DEFAULT_SERVER_LR)
    "SERVER_MOMENTUM": 0.9,
    "SERVER_BETA1": 0.9,
    "SERVER_BETA2": 0.99,
    "SERVER_TAU": 1e-3,
    "STALENESS_LIMIT": 1,  # accept updates up to this many versions behind the current one (a device that
    # trained while a round closed still counts) ...
    "STALENESS_EXPONENT": 0.5,  # ... weighted n / (1 + staleness) ** exponent
    # FedAvg weight of an update: its self-reported example count, capped (0: no cap) at this many examples ...
    "MAX_EXAMPLES_WEIGHT": 1000.0,
    # ... and at this multiple of the round's (lower) median count: no device outweighs the median device by
    # claiming more (counts are self-reported; 2 of 20 devices claiming 10**6 took the model to UAR 0.25 uncapped)
    "MAX_EXAMPLES_WEIGHT_OVER_MEDIAN": 1.0,
    # intake
    "MAX_UPDATE_L2_NORM": 100.0,
    "MAX_CONTENT_LENGTH": 8 * 1024 * 1024,  # bytes of a request body; larger gets 413
    "RATE_LIMIT_PER_HOUR": 120,  # posts (accepted or refused) per device per hour; 0: no limit
    "REQUEST_MAX_SKEW": 300.0,  # seconds a signed device request's timestamp may be off
    # refusals and retention (aggregator.retention; `fedser-aggregator prune` applies them)
    "REFUSAL_AUDIT_UNAUTH_PER_MINUTE": 60,  # audit rows of unauthenticated refusals kept a minute (-1: all)
    "RETENTION_REFUSAL_DAYS": 30.0,  # audit rows older than this are pruned (0: kept forever); counts stay
    "RETENTION_UPDATE_BODY_DAYS": 7.0,  # bodies of accepted updates, this long after their round closed
    "RETENTION_BLOB_DAYS": 7.0,  # model files no version references, this long after they were written
    "RETENTION_JOB_DAYS": 30.0,  # a baseline job's folder (log, model, report), this long after it ended; its row stays
    # the features baseline jobs computed (<instance>/jobs/feature-cache), shared by this host's jobs; the least
    # recently used files go once it holds more (after every job, and in prune); 0: every job decodes its audio again
    "JOB_FEATURE_CACHE_BYTES": 2 * 1024**3,
    "ENROLLMENT_TOKEN_TTL": 24 * 3600,
    # validation gate (aggregator.validation): a manifest CSV path,speaker,label on the server
    "VALIDATION_MANIFEST": None,
    "VALIDATION_MARGIN": 0.02,  # refuse a candidate whose UAR drops more than this below the current one
    "VALIDATION_MIN_GROUP_CLIPS": 20,  # a validation group with fewer scored clips is reported but does not gate
    "VALIDATION_GROUP_Z": 1.0,  # a group gates only on a drop beyond the margin and this many standard errors
    "LOG_JSON": True,  # structured (JSON) request logs with request ids
}


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable and what it should be."""


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _from_env(config) -> None:
    """``FEDSER_*`` variables through Flask's ``config.from_prefixed_env("FEDSER")``, typed by :data:`DEFAULTS`.

    Flask reads every ``FEDSER_<KEY>`` (and ``FEDSER_<KEY>__<SUB>`` into a dict setting); each value is kept as
    the string it is, then converted to the type of the key's default: so ``FEDSER_ADMIN_TOKEN=0123`` stays
    ``"0123"`` (Flask's default JSON reading would make it 123), and ``FEDSER_ROUND_MIN_UPDATES=two`` is a
    :class:`ConfigError` naming the variable instead of a traceback. Keys without a typed default stay strings.
    """
    config.from_prefixed_env("FEDSER", loads=str)
    for key, default in DEFAULTS.items():
        raw = os.environ.get(f"FEDSER_{key}")
        if raw is None or default is None or isinstance(default, str):
            continue
        value = raw.strip().lower()
        if isinstance(default, bool):
            if value not in _TRUE + _FALSE:
                raise ConfigError(f"FEDSER_{key}={raw!r}: expected one of {', '.join(_TRUE + _FALSE)}")
            config[key] = value in _TRUE
        elif isinstance(default, (int, float)):
            try:
                config[key] = type(default)(value)
                if not math.isfinite(config[key]):
                    raise ValueError(value)
            except ValueError:
                kind = "an integer" if isinstance(default, int) else "a number"
                raise ConfigError(f"FEDSER_{key}={raw!r}: expected {kind} (default {default!r})") from None


def _check_settings(config) -> None:
    """Settings whose value is checked at start whatever the database (a ConfigError names the variable)."""
    from aggregator.db import SQLITE_SYNCHRONOUS

    sync = str(config.get("SQLITE_SYNCHRONOUS") or "NORMAL").strip().upper()
    if sync not in SQLITE_SYNCHRONOUS:
        raise ConfigError(f"SQLITE_SYNCHRONOUS={config.get('SQLITE_SYNCHRONOUS')!r}: expected one of "
                          f"{', '.join(SQLITE_SYNCHRONOUS)}")
    config["SQLITE_SYNCHRONOUS"] = sync
    cache = config.get("JOB_FEATURE_CACHE_BYTES")
    if isinstance(cache, bool) or not isinstance(cache, int) or cache < 0:
        raise ConfigError(f"JOB_FEATURE_CACHE_BYTES={cache!r}: expected a whole number of bytes, 0 or more")
    for key, low in (("INTAKE_LOCK_TIMEOUT_SECONDS", 0.001), ("CLOSE_IDLE_TIMEOUT_SECONDS", 0.0)):
        try:
            value = float(config[key])
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and value >= low):
            raise ConfigError(f"{key}={config[key]!r}: expected a number of seconds >= {low:g}")
        config[key] = value
    groups = config.get("VALIDATION_MIN_GROUP_CLIPS")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ConfigError(f"VALIDATION_MIN_GROUP_CLIPS={groups!r}: expected an integer >= 1 (clips a validation "
                          "group needs to gate a round)")
    try:
        group_z = float(config.get("VALIDATION_GROUP_Z"))
    except (TypeError, ValueError):
        group_z = math.nan
    if isinstance(config.get("VALIDATION_GROUP_Z"), bool) or not (math.isfinite(group_z) and 0 <= group_z <= 10):
        raise ConfigError(f"VALIDATION_GROUP_Z={config.get('VALIDATION_GROUP_Z')!r}: expected a number of standard "
                          "errors in [0, 10]")
    config["VALIDATION_GROUP_Z"] = group_z


def _load_config_file(app: Flask) -> None:
    """``<instance>/config.json``, if there: a JSON object of settings. Anything else is a ConfigError naming the
    file (Flask's own loader raised JSONDecodeError, TypeError or UnicodeDecodeError tracebacks)."""
    path = Path(app.instance_path) / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    except NotADirectoryError:  # the instance path is a file: said when the folder is made
        return
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as UTF-8 text: {exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object of settings, not a {type(data).__name__}")
    app.config.from_mapping(data)


def _database_error(url: str, exc: BaseException) -> ConfigError:
    """A ConfigError naming the database URL without its password (nothing of a URL that does not parse: it may
    hold one) and the first line of what went wrong."""
    try:
        from sqlalchemy.engine import make_url

        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:
        shown = "(unparseable)"
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]
    return ConfigError(f"DATABASE_URL {shown} cannot be used: {reason}")


def create_app(test_config: dict | None = None, *, instance_path: str | None = None) -> Flask:
    instance_path = instance_path or (test_config or {}).get("INSTANCE_PATH") or os.environ.get(
        "FEDSER_INSTANCE_PATH")
    app = Flask(__name__, instance_path=os.path.abspath(instance_path) if instance_path else None,
                instance_relative_config=True)
    app.config.from_mapping(DEFAULTS)
    _load_config_file(app)
    _from_env(app.config)
    if test_config:
        app.config.update(test_config)
    _check_settings(app.config)
    from aggregator.rounds import RoundPolicy

    try:  # the aggregation settings are checked at start, not at the first round close
        RoundPolicy.from_config(app.config)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"aggregation settings: {exc}") from exc
    inst = Path(app.instance_path)
    try:
        inst.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"the instance folder {inst} cannot be created: {exc.strerror or exc}") from exc
    if not app.config["DATABASE_URL"]:
        app.config["DATABASE_URL"] = f"sqlite:///{inst / 'aggregator.db'}"

    import sqlalchemy.exc

    from aggregator import db, identity
    from aggregator.registry import BlobStore

    try:  # the URL itself: no dialect reads it, its driver is not installed, a port that is not a number
        db.init_app(app)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, TypeError) as exc:
        raise _database_error(app.config["DATABASE_URL"], exc) from exc
    try:
        engine = app.extensions["fedser_engine"]
        app.extensions["fedser_server_key"] = identity.server_key(app.config, inst, engine)
        app.config["ADMIN_TOKEN"] = identity.admin_token(app.config, inst, engine)
        app.extensions["fedser_blobs"] = BlobStore(engine, cache_bytes=int(app.config["BLOB_CACHE_BYTES"]))
        _import_legacy_blobs(app.extensions["fedser_blobs"], inst / "blobs")
    except sqlalchemy.exc.SQLAlchemyError as exc:  # a server not there, a login refused
        raise _database_error(app.config["DATABASE_URL"], exc) from exc
    if app.config["VALIDATION_MANIFEST"]:
        from aggregator.validation import Validator
        from edge_sdk.errors import FedserError

        try:
            app.extensions["fedser_validator"] = Validator(
                app.config["VALIDATION_MANIFEST"], inst / "validation", app.extensions["fedser_blobs"],
                app.extensions["fedser_server_key"], margin=float(app.config["VALIDATION_MARGIN"]),
                min_group_clips=app.config["VALIDATION_MIN_GROUP_CLIPS"], group_z=app.config["VALIDATION_GROUP_Z"])
        except (FedserError, OSError) as exc:
            raise ConfigError(f"VALIDATION_MANIFEST: {exc}") from exc

    from aggregator import dashboard
    from aggregator.api import API_PREFIX, admin, devices, models, updates

    for bp in (devices.bp, updates.bp, models.bp, admin.bp, dashboard.bp):
        app.register_blueprint(bp)
    dashboard.page_and_csp()  # a console page whose script its CSP cannot name stops the start, not each GET /admin

    from aggregator import observability, openapi

    observability.install(app)

    @app.after_request
    def _safe_headers(resp):
        # Every answer is what it says it is (no browser sniffs a JSON error into HTML); an admin's answers (bearer
        # token) and the metrics stay out of every cache: a shared proxy or the browser's disk must not keep them.
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        if request.path.startswith(f"{API_PREFIX}/admin") or request.path == "/metrics":
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    from aggregator.cli import register_flask_commands

    register_flask_commands(app)  # `flask --app aggregator status` and the rest of fedser-aggregator's commands
    openapi.install(app)

    from sqlalchemy.exc import DBAPIError

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        reason = {413: "too_large"}.get(exc.code, exc.name.lower().replace(" ", "_"))
        if exc.code == 413:  # refused before any handler ran: audit it like every other refusal
            from aggregator.api.updates import audit_refusal
            from aggregator.db import get_session

            try:
                audit_refusal(get_session(), 413, reason,
                              f"body larger than {app.config['MAX_CONTENT_LENGTH']} bytes")
            except DBAPIError as db_exc:  # a full disk: the refusal stands, unaudited (logged)
                get_session().rollback()
                log.error("413 not audited: %s", str(getattr(db_exc, "orig", db_exc))[:300])
        return jsonify(error=reason, detail=exc.description), exc.code

    @app.errorhandler(DBAPIError)
    def database_error(exc: DBAPIError):
        """The database's disk is full (SQLite: SQLITE_FULL; PostgreSQL: SQLSTATE 53100 disk_full): 507 with
        Retry-After, which devices treat as transient (their outbox keeps the
        update and tries again with backoff); the transaction was rolled back, so nothing is half-stored. Counted
        as ``fedser_http_requests_total{status="507"}`` (not in the refusals table: that write would fail too) and
        logged. Any other database error stays a 500."""
        if not storage_full(exc):
            raise exc
        from aggregator.db import get_session

        try:
            get_session().rollback()
        except Exception:  # noqa: BLE001 - the session may be gone with the connection; the answer stands
            pass
        log.error("the database's disk is full: %s", str(exc.orig)[:300])
        resp = jsonify(error="storage_full", detail="the server's database is out of disk space: nothing was "
                       "stored; try again later (operators: free space on the database's disk)")
        resp.headers["Retry-After"] = "300"
        return resp, 507

    return app


def storage_full(exc: BaseException) -> bool:
    """Whether a database error (SQLAlchemy's, or the driver's own) says its disk is full: PostgreSQL's SQLSTATE
    53100 (disk_full), else what :func:`edge_sdk.storage.is_full_error` recognises (SQLite's SQLITE_FULL, ENOSPC)."""
    from edge_sdk.storage import is_full_error

    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None) == "53100" or is_full_error(orig)


def _import_legacy_blobs(store, folder: Path) -> None:
    """An instance from before the ``blobs`` table: its model files go into the database, at every start.

    Idempotent and cheap once done (a file already held is skipped by its name, the sha256, without reading it).
    The folder is never renamed nor deleted here: during a rolling upgrade processes of the older release still
    serve (and write) model files from it, and would answer 404 for every file if it moved; files they write
    meanwhile are imported at the next start of a new-release process. A file whose bytes do not match its name
    is not imported (logged). The operator removes the folder once no process of the older release runs
    (docs/deploy-multihost.md, "Upgrading from a release with model files on disk").
    """
    if not folder.is_dir():
        return
    counts = store.import_folder(folder)
    if counts["imported"] or counts["corrupt"]:
        log.warning("model files of %s moved into the database: %s", folder, counts)
    log.warning("%s (the model files of an older release, %d held in the database) is no longer used by this "
                "release: remove it once no process of the older release runs", folder, counts["present"] +
                counts["imported"])
