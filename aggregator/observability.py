"""Request ids, structured (JSON) logs, ``/healthz`` and ``/metrics`` (Prometheus text format).

Every response carries ``X-Request-Id`` (the client's, when it sent a sane
one, else a new one), and every log line written while handling a request
carries it too. The metrics are read from the database, so every gunicorn
worker reports the same fleet-wide figures.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from flask import Flask, Response, g, has_request_context, jsonify, request
from sqlalchemy import func, select, text

__all__ = ["install", "JsonFormatter", "render_metrics"]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
log = logging.getLogger("aggregator.http")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if has_request_context() and "request_id" in g:
            out["request_id"] = g.request_id
        for key in ("method", "path", "status", "ms", "device_id", "remote"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(json_logs: bool) -> None:
    root = logging.getLogger("aggregator")
    if any(getattr(h, "_fedser", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler._fedser = True
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def install(app: Flask) -> None:
    configure_logging(bool(app.config["LOG_JSON"]))

    @app.before_request
    def _start():
        rid = request.headers.get("X-Request-Id", "")
        g.request_id = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.after_request
    def _finish(resp: Response):
        resp.headers["X-Request-Id"] = g.get("request_id", "")
        ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        if request.path != "/healthz":
            log.info("%s %s %d", request.method, request.path, resp.status_code,
                     extra={"method": request.method, "path": request.path, "status": resp.status_code,
                            "ms": round(ms, 2), "device_id": g.get("device_id"), "remote": request.remote_addr})
        return resp

    @app.get("/healthz")
    def healthz():
        from aggregator.db import get_session

        try:
            get_session().execute(text("SELECT 1"))
        except Exception as exc:  # the database is what a health check must cover
            return jsonify(status="error", database=str(exc)[:200]), 503
        return jsonify(status="ok")

    from aggregator.api import admin_required

    @app.get("/metrics")
    @admin_required
    def metrics():
        from aggregator.db import get_session

        return Response(render_metrics(get_session()), mimetype="text/plain; version=0.0.4")


def _line(name: str, value, labels: dict | None = None) -> str:
    lab = ""
    if labels:
        lab = "{" + ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                             for k, v in labels.items()) + "}"
    return f"{name}{lab} {float(value):g}"


def render_metrics(session) -> str:
    from aggregator.db import Device, Job, ModelVersion, Refusal, Round, Update
    from aggregator.registry import current_version
    from aggregator.rounds import open_round

    lines: list[str] = []

    def metric(name, kind, help_text, samples):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(_line(name, v, lab) for lab, v in samples)

    metric("fedser_updates_accepted_total", "counter", "Accepted signed updates.",
           [(None, session.scalar(select(func.count()).select_from(Update)))])
    refusals = dict(session.execute(select(Refusal.reason, func.count()).group_by(Refusal.reason)).all())
    metric("fedser_refusals_total", "counter", "Refused requests by reason (each is also a row in the audit table).",
           [({"reason": r}, n) for r, n in sorted(refusals.items())] or [({"reason": "none"}, 0)])
    rounds = dict(session.execute(select(Round.status, func.count()).group_by(Round.status)).all())
    metric("fedser_rounds", "gauge", "Rounds by status.",
           [({"status": s}, rounds.get(s, 0)) for s in ("open", "closing", "closed", "rejected")])
    revoked = session.scalar(select(func.count()).select_from(Device).where(Device.revoked.is_(True)))
    total = session.scalar(select(func.count()).select_from(Device))
    metric("fedser_devices", "gauge", "Enrolled devices.", [({"state": "active"}, total - revoked),
                                                            ({"state": "revoked"}, revoked)])
    active = session.scalar(select(func.count()).select_from(Device).where(Device.last_seen > time.time() - 86400))
    metric("fedser_devices_seen_24h", "gauge", "Devices seen in the last 24 hours.", [(None, active)])
    cur = current_version(session)
    metric("fedser_model_version", "gauge", "Current model version (0: none).", [(None, cur.version if cur else 0)])
    metric("fedser_model_versions", "gauge", "Published versions.",
           [(None, session.scalar(select(func.count()).select_from(ModelVersion)))])
    rnd = open_round(session)
    metric("fedser_open_round_updates", "gauge", "Updates in the open round.",
           [(None, session.scalar(select(func.count()).select_from(Update).where(Update.round_id == rnd.id))
             if rnd else 0)])
    jobs = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    metric("fedser_jobs", "gauge", "Baseline training jobs by status.",
           [({"status": s}, jobs.get(s, 0)) for s in ("queued", "running", "succeeded", "failed")])
    return "\n".join(lines) + "\n"
