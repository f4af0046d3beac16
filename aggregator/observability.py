"""Request ids, structured (JSON) logs, ``/healthz`` and ``/metrics`` (Prometheus, through ``prometheus_client``).

Every response carries ``X-Request-Id`` (the client's, when it sent a sane
one, else a new one), and every log line written while handling a request
carries it too.

Metrics, two kinds:

* Fleet figures (updates, refusals, rounds, devices, versions, jobs, each device's personal against global
  accuracy) come from the database at scrape time (:class:`DatabaseCollector`), so every gunicorn worker
  gives the same answer.
* Request counts and latency per route (``fedser_http_requests_total``,
  ``fedser_http_request_duration_seconds``) are counted in the process that served the request, labelled by
  the route's rule (``/api/v1/admin/models/<int:version>/rollback``), never the raw path, so their number of
  series is bounded. With ``PROMETHEUS_MULTIPROC_DIR`` set in the environment before the server starts (an
  empty folder, writable by the workers; ``fedser-aggregator serve`` empties it at start), prometheus_client's
  multiprocess mode sums them over all workers, whichever one answers the scrape. Without it, each worker
  reports its own requests only (a scrape sees one worker's share).

Each app has its own ``CollectorRegistry`` (``app.extensions["fedser_metrics_registry"]``), so two apps in one
process (tests) never share counters.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from urllib.parse import quote

from flask import Flask, Response, current_app, g, has_request_context, jsonify, request
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select, text

__all__ = ["install", "JsonFormatter", "render_metrics", "DatabaseCollector", "LATENCY_BUCKETS"]

# Seconds; the update post and the admin upload are the slow ones (a round close aggregates and signs).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

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
    disable_created_metrics()  # no *_created series (process-wide; Prometheus does not need them)
    registry = CollectorRegistry(auto_describe=True)
    requests_total = Counter("fedser_http_requests", "HTTP requests by method, route (its rule) and status.",
                             ("method", "route", "status"), registry=registry)
    latency = Histogram("fedser_http_request_duration_seconds", "Time to answer a request, by method and route.",
                        ("method", "route"), buckets=LATENCY_BUCKETS, registry=registry)
    app.extensions["fedser_metrics_registry"] = registry

    @app.before_request
    def _start():
        rid = request.headers.get("X-Request-Id", "")
        g.request_id = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.after_request
    def _finish(resp: Response):
        resp.headers["X-Request-Id"] = g.get("request_id", "")
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"  # bounded label values
        method = request.method if request.method in _METHODS else "other"
        requests_total.labels(method, route, str(resp.status_code)).inc()
        latency.labels(method, route).observe(seconds)
        if request.path != "/healthz":
            # Percent-encoded again: the decoded path could hold a newline (%0a) that forges log lines.
            path = quote(request.path[:2000], safe="/:@!$&'()*+,;=-._~")
            log.info("%s %s %d", method, path, resp.status_code,
                     extra={"method": method, "path": path, "status": resp.status_code,
                            "ms": round(seconds * 1000, 2), "device_id": g.get("device_id"),
                            "remote": request.remote_addr})
        return resp

    @app.get("/healthz")
    def healthz():
        from aggregator.db import get_read_session

        try:  # a read-only session: a health check never waits for the write lock (aggregator.db)
            get_read_session().execute(text("SELECT 1"))
        except Exception as exc:  # the database is what a health check must cover
            return jsonify(status="error", database=str(exc)[:200]), 503
        return jsonify(status="ok")

    from aggregator.api import admin_required

    @app.get("/metrics")
    @admin_required
    def metrics():
        from aggregator.db import get_read_session

        return Response(render_metrics(get_read_session(), app=current_app._get_current_object()),
                        content_type="text/plain; version=0.0.4; charset=utf-8")


_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


def render_metrics(session, app: Flask | None = None) -> str:
    """The Prometheus text exposition: the database's figures and, with ``app``, its request metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(session, app.extensions["fedser_server_key"] if app else None))
    if app is not None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(registry)  # every worker's request metrics, summed
        else:
            registry.register(_Forward(app.extensions["fedser_metrics_registry"]))
    return generate_latest(registry).decode("utf-8")


class _Forward:
    """Collects another registry's metrics (this process's request metrics) into the scrape's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self):
        yield from self.registry.collect()


class DatabaseCollector:
    """The fleet's figures, read from the database when collected (any worker gives the same answer)."""

    def __init__(self, session, server_key=None) -> None:
        self.session, self.server_key = session, server_key

    def collect(self):
        from aggregator.console import GAIN_BUCKETS, device_accuracy, fleet_accuracy
        from aggregator.db import Device, Job, ModelVersion, Round, Update
        from aggregator.registry import current_version
        from aggregator.rounds import open_round

        session = self.session

        def count(query) -> int:
            return int(session.scalar(query) or 0)

        m = CounterMetricFamily("fedser_updates_accepted", "Accepted signed updates.")
        m.add_metric([], count(select(func.count()).select_from(Update)))
        yield m
        from aggregator.api.updates import refusal_counts

        refusals = refusal_counts(session)  # exact; the audit rows of unauthenticated refusals are sampled
        m = CounterMetricFamily("fedser_refusals", "Refused requests by reason (audit rows: the refusals table, "
                                                   "sampled for unauthenticated ones).", labels=["reason"])
        for reason, n in sorted(refusals.items()) or [("none", 0)]:
            m.add_metric([str(reason)], n)
        yield m
        rounds = dict(session.execute(select(Round.status, func.count()).group_by(Round.status)).all())
        m = GaugeMetricFamily("fedser_rounds", "Rounds by status.", labels=["status"])
        for status in ("open", "closing", "closed", "rejected", "superseded"):
            m.add_metric([status], rounds.get(status, 0))
        yield m
        revoked = count(select(func.count()).select_from(Device).where(Device.revoked.is_(True)))
        total = count(select(func.count()).select_from(Device))
        m = GaugeMetricFamily("fedser_devices", "Enrolled devices.", labels=["state"])
        m.add_metric(["active"], total - revoked)
        m.add_metric(["revoked"], revoked)
        yield m
        yield GaugeMetricFamily("fedser_devices_seen_24h", "Devices seen in the last 24 hours.", value=count(
            select(func.count()).select_from(Device).where(Device.last_seen > time.time() - 86400)))
        cur = current_version(session)
        yield GaugeMetricFamily("fedser_model_version", "Current model version (0: none).",
                                value=cur.version if cur else 0)
        yield GaugeMetricFamily("fedser_model_versions", "Published versions.",
                                value=count(select(func.count()).select_from(ModelVersion)))
        rnd = open_round(session)
        yield GaugeMetricFamily("fedser_open_round_updates", "Updates in the open round.", value=count(
            select(func.count()).select_from(Update).where(Update.round_id == rnd.id)) if rnd else 0)
        jobs = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        m = GaugeMetricFamily("fedser_jobs", "Baseline training jobs by status.", labels=["status"])
        for status in ("queued", "running", "succeeded", "failed"):
            m.add_metric([status], jobs.get(status, 0))
        yield m
        # What the fleet is for: each device's personal head against the global head on its own answers.
        per_device = device_accuracy(session)
        fleet = fleet_accuracy(per_device)
        personal = GaugeMetricFamily("fedser_device_personal_accuracy", "Accuracy of the device's personal head on "
                                     "its held-back answers (latest report).", labels=["device"])
        global_ = GaugeMetricFamily("fedser_device_global_accuracy", "Accuracy of the global head on the same "
                                    "answers.", labels=["device"])
        scored = GaugeMetricFamily("fedser_device_answers_scored", "Answers the device's latest report scored.",
                                   labels=["device"])
        for device_id, r in sorted(per_device.items()):
            personal.add_metric([device_id], r["personal_accuracy"])
            global_.add_metric([device_id], r["global_accuracy"])
            scored.add_metric([device_id], r["answers_scored"])
        yield personal
        yield global_
        yield scored
        yield GaugeMetricFamily("fedser_fleet_devices_reporting", "Devices whose updates report scored answers.",
                                value=fleet["devices_reporting"])
        for name, key, text_ in (("fedser_fleet_personal_accuracy", "personal_accuracy", "personal heads"),
                                 ("fedser_fleet_global_accuracy", "global_accuracy", "the global head")):
            m = GaugeMetricFamily(name, f"Accuracy of {text_} over all devices' scored answers (pooled).")
            if fleet[key] is not None:
                m.add_metric([], fleet[key])
            yield m
        cumulative, buckets = 0, []
        for bound, n in zip(GAIN_BUCKETS, fleet["gain_histogram"], strict=False):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        buckets.append(("+Inf", fleet["devices_reporting"]))
        # Negative bounds: prometheus_client (OpenMetrics) then leaves out _sum and _count; the mean is a gauge.
        yield HistogramMetricFamily("fedser_fleet_accuracy_gain", "Devices by personal minus global accuracy "
                                    "(fractions; latest report of each).", buckets=buckets,
                                    sum_value=sum(fleet["gains"]))
        m = GaugeMetricFamily("fedser_fleet_accuracy_gain_mean", "Mean over reporting devices of personal minus "
                              "global accuracy.")
        if fleet["mean_gain"] is not None:
            m.add_metric([], fleet["mean_gain"])
        yield m
