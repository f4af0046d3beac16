"""Admin API (bearer admin token): enrollment tokens, devices, models, rounds, jobs, status."""

from __future__ import annotations

import hashlib
import json
import secrets
import time

from flask import Blueprint, current_app, jsonify, request
from sqlalchemy import func, select

from aggregator import service
from aggregator.api import API_PREFIX, admin_required, blobs, error, server_key
from aggregator.db import Device, EnrollmentToken, Job, ModelVersion, Refusal, Round, Update, get_session
from aggregator.registry import current_version, load_manifest, publish_base, rollback_to
from aggregator.rounds import open_round
from edge_sdk.errors import FedserError
from edge_sdk.model import ModelMetadata

bp = Blueprint("admin", __name__, url_prefix=f"{API_PREFIX}/admin")


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
    body = request.get_json(silent=True) or {}
    try:
        ttl = float(body.get("ttl_seconds", current_app.config["ENROLLMENT_TOKEN_TTL"]))
    except (TypeError, ValueError):
        return error(400, "bad_ttl", f"ttl_seconds must be a number, got {body.get('ttl_seconds')!r}")
    if not 0 < ttl <= 30 * 86400:
        return error(400, "bad_ttl", f"ttl_seconds must be in (0, 2592000], got {ttl}")
    token, expires = create_enrollment_token(get_session(), ttl)
    return jsonify(token=token, expires_at=expires), 201


def publish_checked(session, tflite: bytes, metadata: ModelMetadata, *, note: str = "") -> tuple[dict, int]:
    """Publish a new base through the validation gate; (JSON body, HTTP status)."""
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
        return error(400, "malformed", "send multipart files 'tflite' and 'metadata'")
    session = get_session()
    try:
        metadata = ModelMetadata.from_dict(json.loads(request.files["metadata"].read()))
        body, status = publish_checked(session, request.files["tflite"].read(), metadata, note="uploaded")
    except (FedserError, ValueError, KeyError) as exc:
        session.rollback()
        return error(422, "bad_model", str(exc))
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
    session = get_session()
    row = session.get(ModelVersion, version)
    if row is None:
        return error(404, "unknown_version", f"model version {version} doesn't exist")
    manifest = rollback_to(session, blobs(), server_key(), row, deadline_seconds=service.deadline_seconds())
    session.commit()
    return jsonify(version=manifest.version, rollback_of=version), 201


@bp.post("/rounds/close")
@admin_required
def close_current_round():
    session = get_session()
    rnd = open_round(session)
    if rnd is None:
        return error(409, "no_open_round", "there is no open round")
    body = request.get_json(silent=True) or {}
    result = service.close(session, rnd.id, min_updates=int(body.get("min_updates", 1)))
    if not result.closed:
        return error(409, "not_closed", f"round {rnd.id} not closed: {result.reason}")
    return jsonify(result.to_dict())


@bp.get("/devices")
@admin_required
def list_devices():
    return jsonify(devices=summary(get_session())["devices"])


@bp.post("/devices/<device_id>/revoke")
@admin_required
def revoke(device_id: str):
    session = get_session()
    device = session.get(Device, device_id)
    if device is None:
        return error(404, "unknown_device", f"device {device_id} doesn't exist")
    device.revoked = True
    session.commit()
    return jsonify(device_id=device_id, revoked=True)


@bp.post("/jobs")
@admin_required
def start_job():
    """Start a baseline training job in its own process; JSON parameters as ``fedser-train train``'s."""
    from aggregator.jobs import JobError
    from aggregator.jobs import start_job as start

    try:
        job = start(current_app._get_current_object(), get_session(), request.get_json(silent=True) or {})
    except JobError as exc:
        return error(400, "bad_job", str(exc))
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

    session = get_session()
    job = session.get(Job, job_id)
    if job is None:
        return error(404, "unknown_job", f"job {job_id} doesn't exist")
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
    return jsonify(summary(get_session()))


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
        "refusals": dict(session.execute(select(Refusal.reason, func.count()).group_by(Refusal.reason)).all()),
        "jobs": [job_dict(j) for j in session.scalars(select(Job).order_by(Job.id.desc()).limit(20))],
    }


def _validation_uar(session, version: int | None) -> float | None:
    if version is None:
        return None
    row = session.get(ModelVersion, version)
    if row is None:
        return None
    v = load_manifest(row, server_key()).metrics.get("validation", {})
    return v.get("candidate", {}).get("uar") if isinstance(v, dict) else None
