"""What the admin console shows beyond the status summary: personal against global accuracy, versions, refusals.

Read from the database on each request (and each metrics scrape), so every worker gives the same answer.

Personal against global
    Each update may carry the device's answer report (:mod:`edge_sdk.report`): of ``answers_scored`` answers
    that personalisation did not train on, how many the device's personal head and the global head got right.
    A device's figures are those of its latest update that carried a report with at least one scored answer.
"""

from __future__ import annotations

import json
import math

from sqlalchemy import func, select

from aggregator.db import Device, ModelVersion, Round, Update
from aggregator.registry import load_manifest

__all__ = ["device_accuracy", "fleet_accuracy", "versions", "refused_rounds", "GAIN_BUCKETS", "console"]

# Upper bounds of the histogram of (personal - global) accuracy per device, in accuracy points (fractions).
GAIN_BUCKETS = (-0.5, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.5, 1.0)


def device_accuracy(session) -> dict[str, dict]:
    """Per device id: its latest answer report, with the two accuracies and the gain (personal - global)."""
    latest = (select(Update.device_id, func.max(Update.sequence).label("seq"))
              .where(Update.answers_scored > 0).group_by(Update.device_id).subquery())
    rows = session.execute(
        select(Update.device_id, Update.answers_scored, Update.personal_correct, Update.global_correct,
               Update.round_id, Update.base_version, Update.received_at)
        .join(latest, (Update.device_id == latest.c.device_id) & (Update.sequence == latest.c.seq))).all()
    out = {}
    for device_id, scored, personal, global_, round_id, base_version, at in rows:
        p, g = personal / scored, global_ / scored
        out[device_id] = {"answers_scored": scored, "personal_correct": personal, "global_correct": global_,
                          "personal_accuracy": p, "global_accuracy": g, "gain": p - g, "round_id": round_id,
                          "base_version": base_version, "reported_at": at}
    return out


def fleet_accuracy(per_device: dict[str, dict]) -> dict:
    """Fleet-wide: devices reporting, pooled accuracies, mean gain, devices better/worse/equal, gain histogram."""
    reports = list(per_device.values())
    scored = sum(r["answers_scored"] for r in reports)
    gains = [r["gain"] for r in reports]
    counts = [0] * (len(GAIN_BUCKETS) + 1)
    for gain in gains:
        counts[next((i for i, b in enumerate(GAIN_BUCKETS) if gain <= b + 1e-12), len(GAIN_BUCKETS))] += 1
    return {
        "devices_reporting": len(reports),
        "answers_scored": scored,
        "personal_accuracy": sum(r["personal_correct"] for r in reports) / scored if scored else None,
        "global_accuracy": sum(r["global_correct"] for r in reports) / scored if scored else None,
        "mean_gain": sum(gains) / len(gains) if gains else None,
        "median_gain": _median(gains),
        "devices_better": sum(g > 1e-12 for g in gains),
        "devices_worse": sum(g < -1e-12 for g in gains),
        "devices_equal": sum(abs(g) <= 1e-12 for g in gains),
        "gain_buckets": list(GAIN_BUCKETS),
        "gain_histogram": counts,  # counts[i]: gain <= GAIN_BUCKETS[i] (and > the previous bound); last: > 1.0
        "gains": sorted(gains),
    }


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def versions(session, key, limit: int = 200) -> list[dict]:
    """Published versions, newest first, with lineage and the figures each was published with."""
    out = []
    for row in session.scalars(select(ModelVersion).order_by(ModelVersion.version.desc()).limit(limit)):
        # An uploaded base's metrics are its metadata's extra.test, as the uploader wrote them: any JSON. Only
        # numbers of the expected kind are passed on (a string there was markup on the page; an object of the
        # wrong shape a 500 of this endpoint).
        metrics = load_manifest(row, key).metrics
        validation = _dict(metrics.get("validation"))
        base_test = metrics.get("base_test") if isinstance(metrics.get("base_test"), dict) else metrics
        candidate, current = _dict(validation.get("candidate")), _dict(validation.get("current"))
        out.append({
            "version": row.version, "parent_version": row.parent_version, "round_id": row.round_id,
            "created_at": row.created_at, "current": bool(row.is_current), "note": row.note,
            "rollback_of": _int(metrics.get("rollback_of")),
            "validation_uar": _num(candidate.get("uar")), "validation_accuracy": _num(candidate.get("accuracy")),
            "previous_validation_uar": _num(current.get("uar")),
            "base_test_uar": _num(base_test.get("uar")), "base_test_accuracy": _num(base_test.get("accuracy")),
            "round_updates": _int(metrics.get("round_updates")), "round_examples": _int(metrics.get("round_examples")),
        })
    return out


def refused_rounds(session, limit: int = 50) -> list[dict]:
    """Rounds the validation gate refused, newest first, with the gate's figures."""
    out = []
    for r in session.scalars(select(Round).where(Round.status == "rejected").order_by(Round.id.desc()).limit(limit)):
        try:
            gate = _dict(json.loads(r.gate_report)) if r.gate_report else {}
        except ValueError:
            gate = {}
        candidate, current = _dict(gate.get("candidate")), _dict(gate.get("current"))
        out.append({
            "id": r.id, "base_version": r.base_version, "closed_at": r.closed_at, "num_updates": r.num_updates,
            "num_examples": r.num_examples, "reason": r.note,
            "candidate_uar": _num(candidate.get("uar")), "current_uar": _num(current.get("uar")),
            "candidate_accuracy": _num(candidate.get("accuracy")), "current_accuracy": _num(current.get("accuracy")),
            "margin": _num(gate.get("margin")), "validation_examples": _int(candidate.get("num_examples")),
            "min_group_clips": _int(gate.get("min_group_clips")), "groups": _groups(gate.get("groups")),
        })
    return out


def _groups(groups) -> list[dict]:
    """The gate's per-group figures (aggregator.validation), by group name; [] when the set had one group."""
    if not isinstance(groups, dict):
        return []
    out = []
    for name, g in sorted(groups.items()):
        if not isinstance(g, dict):
            continue
        cand, cur = _dict(g.get("candidate")), _dict(g.get("current"))
        out.append({"group": str(name), "examples": _int(g.get("examples")),
                    "candidate_uar": _num(cand.get("uar")), "current_uar": _num(cur.get("uar")),
                    "candidate_accuracy": _num(cand.get("accuracy")), "current_accuracy": _num(cur.get("accuracy")),
                    "gates": bool(g.get("gates")), "dropped": bool(g.get("dropped")),
                    "note": str(g.get("note") or "")})
    return out


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _int(value) -> int | None:
    """A non-negative integer (a count, a version), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 63 else None


def _num(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def console(session, key) -> dict:
    """Everything ``GET /api/v1/admin/console`` returns."""
    per_device = device_accuracy(session)
    names = dict(session.execute(select(Device.id, Device.name)).all())
    devices = [{"id": d, "name": names.get(d, ""), **r} for d, r in sorted(per_device.items())]
    return {"fleet": fleet_accuracy(per_device), "devices": devices, "versions": versions(session, key),
            "refused_rounds": refused_rounds(session)}
