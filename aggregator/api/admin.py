"""Admin API (bearer admin token): enrollment tokens, devices, models, rounds, jobs, status."""

from __future__ import annotations

import hashlib
import json
import secrets
import time

from flask import Blueprint, current_app, jsonify, request
from sqlalchemy import func, select

from aggregator import service
from aggregator.api import (
    API_PREFIX,
    MAX_INT32,
    admin_required,
    blobs,
    int_field,
    json_object_body,
    path_int,
    refuse,
    server_key,
)
from aggregator.api.updates import refusal_counts
from aggregator.db import Device, EnrollmentToken, Job, ModelVersion, Round, Update, get_read_session, get_session
from aggregator.registry import base_metrics, begin_durable, current_version, load_manifest, publish_base, rollback_to
from aggregator.rounds import open_round
from edge_sdk.errors import FedserError
from edge_sdk.model import ModelMetadata
from edge_sdk.wire import refuse_json_constant

bp = Blueprint("admin", __name__, url_prefix=f"{API_PREFIX}/admin")
MAX_TOKEN_TTL = 30 * 86400  # seconds
MAX_MIN_UPDATES = 1_000_000
MAX_JOB_STRING = 1024


def create_enrollment_token(session, ttl: float) -> tuple[str, float]:
    # A fixed prefix: a bare url-safe token can start with "-", which a shell command line reads as an option.
    token = "fset_" + secrets.token_urlsafe(24)
    now = time.time()
    session.add(EnrollmentToken(token_sha256=hashlib.sha256(token.encode()).hexdigest(), created_at=now,
                                expires_at=now + ttl))
    session.commit()
    return token, now + ttl


@bp.post("/enrollment-tokens")
@admin_required
def new_token():
    body, refused = json_object_body()
    if refused is not None:
        return refused
    ttl = body.get("ttl_seconds", current_app.config["ENROLLMENT_TOKEN_TTL"])
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0 < ttl <= MAX_TOKEN_TTL:
        return refuse(400, "bad_ttl", f"ttl_seconds must be a number in (0, {MAX_TOKEN_TTL}], got "
                                      f"{str(ttl)[:40]!r}", authenticated=True)
    ttl = float(ttl)
    token, expires = create_enrollment_token(get_session(), ttl)
    return jsonify(token=token, expires_at=expires), 201


def publish_checked(session, tflite: bytes, metadata: ModelMetadata, *, note: str = "") -> tuple[dict, int]:
    """Publish a new base through the validation gate; (JSON body, HTTP status)."""
    base_metrics(metadata)  # malformed figures are refused before the validation gate spends a run on the model
    begin_durable(session)  # SQLite: the publishing commit is synced (a power cut never undoes a version)
    validator = current_app.extensions.get("fedser_validator")
    validation = {}
    if validator is not None:
        ok, validation = validator.check_base(session, tflite, metadata)
        if not ok:
            return {"error": "validation_failed", "detail": validation["reason"], "validation": validation}, 422
    manifest = publish_base(session, blobs(), server_key(), tflite, metadata,
                            deadline_seconds=service.deadline_seconds(), validation=validation, note=note)
    session.commit()
    return {"version": manifest.version, "base_sha256": manifest.base.sha256, "validation": validation}, 201


@bp.post("/models")
@admin_required
def upload_base():
    """Publish a new base: multipart with ``tflite`` (the file) and ``metadata`` (model.json)."""
    if "tflite" not in request.files or "metadata" not in request.files:
        return refuse(400, "malformed", "send multipart files 'tflite' and 'metadata'", authenticated=True)
    session = get_session()
    try:
        meta = json.loads(request.files["metadata"].read(), parse_constant=refuse_json_constant)
    except (ValueError, RecursionError) as exc:
        return refuse(400, "bad_metadata", f"metadata is not JSON: {str(exc)[:200]}", authenticated=True)
    if not isinstance(meta, dict):
        return refuse(400, "bad_metadata", f"metadata must be a JSON object, got {type(meta).__name__}",
                      authenticated=True)
    try:
        metadata = ModelMetadata.from_dict(meta)
        body, status = publish_checked(session, request.files["tflite"].read(), metadata, note="uploaded")
    except (FedserError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return refuse(422, "bad_model", str(exc)[:1000], authenticated=True)
    if status == 422:  # the validation gate refused the base: counted like every refusal, with its figures
        refuse(422, body["error"], body["detail"], authenticated=True)
    return jsonify(body), status


@bp.get("/models")
@admin_required
def list_versions():
    session = get_session()
    out = []
    for row in session.scalars(select(ModelVersion).order_by(ModelVersion.version.desc()).limit(200)):
        m = load_manifest(row, server_key())
        out.append({"version": row.version, "parent_version": row.parent_version, "round_id": row.round_id,
                    "created_at": row.created_at, "current": row.is_current, "base_sha256": row.base_sha256,
                    "head_sha256": row.head_sha256, "metrics": m.metrics, "note": row.note})
    return jsonify(versions=out)


@bp.post("/models/<int:version>/rollback")
@admin_required
def rollback(version: int):
    """Serve an earlier version again: republished as a new version number (devices only move forward)."""
    if (refused := path_int("version", version)) is not None:
        return refused
    session = get_session()
    begin_durable(session)  # before the first read: SQLite sets the commit's sync when the transaction begins
    row = session.get(ModelVersion, version)
    if row is None:
        return refuse(404, "unknown_version", f"model version {version} doesn't exist", authenticated=True)
    manifest = rollback_to(session, blobs(), server_key(), row, deadline_seconds=service.deadline_seconds())
    session.commit()
    return jsonify(version=manifest.version, rollback_of=version), 201


@bp.post("/rounds/close")
@admin_required
def close_current_round():
    session = get_session()
    body, refused = json_object_body()
    if refused is not None:
        return refused
    min_updates, refused = int_field(body, "min_updates", 1, 1, MAX_MIN_UPDATES)
    if refused is not None:
        return refused
    rnd = open_round(session)
    if rnd is None:
        return refuse(409, "no_open_round", "there is no open round", authenticated=True)
    result = service.close(session, rnd.id, min_updates=min_updates)
    if not result.closed:
        return refuse(409, "not_closed", f"round {rnd.id} not closed: {result.reason}", authenticated=True)
    return jsonify(result.to_dict())


@bp.get("/devices")
@admin_required
def list_devices():
    return jsonify(devices=summary(get_session())["devices"])


@bp.post("/devices/<device_id>/revoke")
@admin_required
def revoke(device_id: str):
    from edge_sdk.wire import valid_device_id

    if not valid_device_id(device_id):
        return refuse(400, "out_of_range", "device_id must be 1-40 characters of A-Z a-z 0-9 . _ -",
                      authenticated=True)
    session = get_session()
    device = session.get(Device, device_id)
    if device is None:
        return refuse(404, "unknown_device", f"device {device_id} doesn't exist", authenticated=True)
    device.revoked = True
    session.commit()
    return jsonify(device_id=device_id, revoked=True)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@bp.post("/jobs")
@admin_required
def start_job():
    """Start a baseline training job in its own process; JSON parameters as ``fedser-train train``'s."""
    from aggregator.jobs import JobError
    from aggregator.jobs import start_job as start

    body, refused = json_object_body()
    if refused is not None:
        return refused
    for key, value in body.items():  # aggregator.jobs checks names and types; the ranges here
        if any(isinstance(v, str) and not _utf8(v) for v in (key, value)):  # a lone surrogate: not text
            return refuse(400, "bad_job", "job parameter names and strings must be valid UTF-8 text",
                          authenticated=True)
        if isinstance(value, str) and (len(value) > MAX_JOB_STRING or "\x00" in value):
            return refuse(400, "bad_job", f"{str(key)[:40]} must be a string of at most {MAX_JOB_STRING} "
                                          "characters without NUL", authenticated=True)
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= MAX_INT32:
            return refuse(400, "bad_job", f"{str(key)[:40]} must be in 0 .. {MAX_INT32}", authenticated=True)
    try:
        job = start(current_app._get_current_object(), get_session(), body)
    except (JobError, ValueError, OSError) as exc:
        return refuse(400, "bad_job", str(exc)[:500], authenticated=True)
    return jsonify(job_dict(job)), 202


@bp.get("/jobs")
@admin_required
def list_jobs():
    from aggregator.jobs import reap

    session = get_session()
    jobs = list(session.scalars(select(Job).order_by(Job.id.desc()).limit(50)))
    for job in jobs:
        reap(session, job)
    return jsonify(jobs=[job_dict(j) for j in jobs])


@bp.get("/jobs/<int:job_id>")
@admin_required
def get_job(job_id: int):
    from aggregator.jobs import log_tail, reap

    if (refused := path_int("job_id", job_id)) is not None:
        return refused
    session = get_session()
    job = session.get(Job, job_id)
    if job is None:
        return refuse(404, "unknown_job", f"job {job_id} doesn't exist", authenticated=True)
    reap(session, job)
    return jsonify({**job_dict(job, report=True), "log_tail": log_tail(current_app.instance_path, job_id)})


def job_dict(job: Job, *, report: bool = False) -> dict:
    out = {"id": job.id, "kind": job.kind, "status": job.status, "params": json.loads(job.params or "{}"),
           "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
           "detail": job.detail, "published_version": job.published_version}
    if report:
        out["report"] = json.loads(job.report) if job.report else None
    return out


@bp.get("/status")
@admin_required
def status():
    return jsonify(summary(get_read_session()))  # a read: the dashboard's polls never wait for a round close


def summary(session) -> dict:
    current = current_version(session)
    rnd = open_round(session)
    metrics = load_manifest(current, server_key()).metrics if current else {}
    return {
        "current_version": current.version if current else None,
        "current_metrics": metrics,
        "policy": service.round_policy().describe(),
        "round_min_updates": int(current_app.config["ROUND_MIN_UPDATES"]),
        "versions": session.scalar(select(func.count()).select_from(ModelVersion)),
        "open_round": {"id": rnd.id, "base_version": rnd.base_version, "opened_at": rnd.opened_at,
                       "deadline_at": rnd.deadline_at, "updates": session.scalar(
                           select(func.count()).select_from(Update).where(Update.round_id == rnd.id))} if rnd else None,
        "rounds_closed": session.scalar(select(func.count()).select_from(Round).where(Round.status == "closed")),
        "rounds": [
            {"id": r.id, "base_version": r.base_version, "status": r.status, "opened_at": r.opened_at,
             "closed_at": r.closed_at, "num_updates": r.num_updates, "num_examples": r.num_examples,
             "published_version": r.published_version, "note": r.note,
             "validation_uar": _validation_uar(session, r.published_version)}
            for r in session.scalars(select(Round).order_by(Round.id.desc()).limit(100))
        ],
        "devices": [
            {"id": d.id, "name": d.name, "revoked": d.revoked, "enrolled_at": d.enrolled_at, "last_seen": d.last_seen,
             "updates_accepted": d.updates_accepted, "updates_refused": d.updates_refused}
            for d in session.scalars(select(Device).order_by(Device.enrolled_at))
        ],
        "refusals": refusal_counts(session),
        "jobs": [job_dict(j) for j in session.scalars(select(Job).order_by(Job.id.desc()).limit(20))],
    }


def _validation_uar(session, version: int | None) -> float | None:
    if version is None:
        return None
    row = session.get(ModelVersion, version)
    if row is None:
        return None
    from aggregator.console import _dict, _num  # (the console's reading of a version's metrics: any JSON)

    return _num(_dict(_dict(load_manifest(row, server_key()).metrics.get("validation")).get("candidate")).get("uar"))
