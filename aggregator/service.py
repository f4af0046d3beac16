"""What the blueprints, the CLI and the background closer share: policy, gate and closing from the app config."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from flask import Flask, current_app
from sqlalchemy import text

from aggregator.rounds import CloseResult, RoundPolicy, close_round, due_round

log = logging.getLogger("aggregator")

__all__ = ["round_policy", "validation_gate", "close", "deadline_seconds", "close_due_round", "start_deadline_thread"]


def round_policy(app: Flask | None = None, *, min_updates: int | None = None) -> RoundPolicy:
    return RoundPolicy.from_config((app or current_app).config, min_updates=min_updates)


def deadline_seconds(app: Flask | None = None) -> float | None:
    value = float((app or current_app).config["ROUND_DEADLINE_SECONDS"])
    return value if value > 0 else None


def validation_gate(app: Flask | None = None):
    """The gate callable of :func:`aggregator.rounds.close_round`, or None when no validation set is configured."""
    app = app or current_app
    validator = app.extensions.get("fedser_validator")
    if validator is None:
        return None
    return validator.gate


def close(session, round_id: int, *, min_updates: int | None = None, app: Flask | None = None) -> CloseResult:
    app = app or current_app
    ext = app.extensions
    if session.in_transaction() and session.get_bind().dialect.name == "sqlite":
        # The caller read the round first (admin close, deadline check): end that transaction, so that the close
        # begins its own with a synced commit (registry.begin_durable; SQLite cannot change it mid-transaction).
        # The close claims the round with a conditional UPDATE, so a close by another worker meanwhile is safe.
        session.commit()
    idle = float(app.config.get("CLOSE_IDLE_TIMEOUT_SECONDS") or 0)
    if idle > 0 and session.get_bind().dialect.name == "postgresql":
        # For this close's transaction only: a closing host cut off from the database (behind a pooler or relay
        # that keepalives cannot see through) holds the round's lock until the server ends its session.
        session.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {int(idle * 1000)}"))
    return close_round(session, ext["fedser_blobs"], ext["fedser_server_key"], round_id,
                       policy=round_policy(app, min_updates=min_updates), gate=validation_gate(app),
                       before_commit=_test_pause(app))


TEST_HOOKS_FILE = "test-hooks.json"


def _test_pause(app: Flask):
    """The crash tests' fault injection, or None (always, in production).

    Only a file the tests write into the instance folder, ``test-hooks.json``, read once per process (no
    setting, no environment variable): ``pause_before_close_commit`` seconds to sleep after a close wrote its
    new version and before it commits, and ``marker``, a file written when the pause begins so that a test
    waits on it instead of guessing with a sleep.
    """
    if "fedser_test_hooks" not in app.extensions:
        app.extensions["fedser_test_hooks"] = _read_test_hooks(Path(app.instance_path) / TEST_HOOKS_FILE)
    hooks = app.extensions["fedser_test_hooks"]
    try:
        seconds = float(hooks.get("pause_before_close_commit") or 0)
    except (TypeError, ValueError):
        seconds = 0.0
    marker = hooks.get("marker")
    if not (seconds > 0 and seconds < float("inf")) or not (marker is None or isinstance(marker, str)):
        return None

    def pause(round_id: int) -> None:
        log.warning("test fault injection: pausing %.1f s before committing the close of round %d", seconds,
                    round_id)
        if marker:
            from edge_sdk.storage import atomic_write

            atomic_write(marker, str(round_id).encode())
        time.sleep(seconds)

    return pause


def _read_test_hooks(path: Path) -> dict:
    """The hooks file's object; a file that is not a JSON object is logged and ignored (never fails a close)."""
    if not path.is_file():
        return {}
    try:
        hooks = json.loads(path.read_text())
        if not isinstance(hooks, dict):
            raise ValueError(f"a JSON object expected, got {type(hooks).__name__}")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        log.warning("ignoring the test hooks file %s: %s", path, str(exc)[:200])
        return {}
    if hooks:
        log.warning("test hooks active from %s: %s", path, hooks)
    return hooks


def close_due_round(app: Flask, session) -> CloseResult | None:
    """Close the open round if its deadline has passed and it holds enough updates."""
    rnd = due_round(session, time.time(), int(app.config["ROUND_MIN_UPDATES_AT_DEADLINE"]))
    if rnd is None:
        session.rollback()
        return None
    result = close(session, rnd.id, min_updates=int(app.config["ROUND_MIN_UPDATES_AT_DEADLINE"]), app=app)
    if result.closed:
        log.info("round %d closed at its deadline with %d updates", rnd.id, result.num_updates)
    return result


def start_deadline_thread(app: Flask) -> threading.Thread | None:
    """A daemon thread per worker process that closes rounds whose deadline passed.

    Every worker may run one: the close claims the round with a conditional
    UPDATE, so only one of them aggregates it.
    """
    if deadline_seconds(app) is None or app.extensions.get("fedser_deadline_thread"):
        return None
    interval = float(app.config["BACKGROUND_INTERVAL"])

    def loop():
        sessionmaker = app.extensions["fedser_sessionmaker"]
        while True:
            time.sleep(interval)
            try:
                with sessionmaker() as session:
                    close_due_round(app, session)
            except Exception:  # keep the closer alive; the next tick retries
                log.exception("deadline check failed")

    thread = threading.Thread(target=loop, name="fedser-deadline", daemon=True)
    thread.start()
    app.extensions["fedser_deadline_thread"] = thread
    return thread
