"""Retention: what the aggregator keeps, and for how long (``fedser-aggregator prune`` applies it).

Three things grow with use and are not needed forever:

* audit rows of refusals (the ``refusals`` table) older than ``RETENTION_REFUSAL_DAYS``; the counts by
  reason (``refusal_counts``, the metric) are kept, so the metric never goes down;
* bodies of accepted updates (about 80 KB each) of rounds that closed, were rejected or were superseded more than
  ``RETENTION_UPDATE_BODY_DAYS`` ago: the body is emptied, the row (who sent what, when, its norm and
  sequence, which keeps replays out) stays;
* model files (the ``blobs`` table) that no version references (base, head, optimizer state, anything in
  a signed manifest), last written more than ``RETENTION_BLOB_DAYS`` ago (the age keeps a publish in
  progress on any host, which writes its files before its row commits, safe).

On the host that runs it, with the app's instance folder, also

* folders of baseline jobs (log, trained model, report) that ended more than ``RETENTION_JOB_DAYS`` ago: the job's
  row, with its outcome, report and log tail, stays, and a published model is in the model store;
* the baseline jobs' feature cache, trimmed (least recently used first) to ``JOB_FEATURE_CACHE_BYTES`` (each job
  trims it too).

A setting of 0 keeps that kind forever. Nothing here runs by itself: schedule ``fedser-aggregator
prune`` (cron, a systemd timer) as often as suits.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from aggregator.db import Blob, ModelVersion, Refusal, Round, Update
from aggregator.registry import BlobStore

__all__ = ["RetentionPolicy", "PruneReport", "prune"]

log = logging.getLogger("aggregator")
_DAY = 86400.0
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BATCH = 5000  # rows per statement, so one prune never holds a long lock


@dataclass(frozen=True)
class RetentionPolicy:
    refusal_days: float = 30.0
    update_body_days: float = 7.0
    blob_days: float = 7.0
    job_days: float = 30.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and 0 <= value <= 36500):
                raise ValueError(f"{name} must be in 0 .. 36500 days (0: keep forever), got {value!r}")

    @classmethod
    def from_config(cls, config) -> RetentionPolicy:
        """The app's ``RETENTION_*`` settings (their defaults are in ``aggregator.DEFAULTS``)."""
        return cls(float(config["RETENTION_REFUSAL_DAYS"]), float(config["RETENTION_UPDATE_BODY_DAYS"]),
                   float(config["RETENTION_BLOB_DAYS"]), float(config["RETENTION_JOB_DAYS"]))


@dataclass
class PruneReport:
    refusals_deleted: int = 0
    update_bodies_emptied: int = 0
    update_body_bytes_freed: int = 0
    blobs_deleted: int = 0
    blob_bytes_freed: int = 0
    job_folders_deleted: int = 0
    job_folder_bytes_freed: int = 0
    feature_cache_files_deleted: int = 0
    feature_cache_bytes_freed: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def prune(session: Session, blobs: BlobStore, policy: RetentionPolicy, *, now: float | None = None,
          dry_run: bool = False, instance_path: str | None = None,
          feature_cache_bytes: int | None = None) -> PruneReport:
    """Apply ``policy``; with ``dry_run`` only count what it would remove. ``instance_path``: this host's instance
    folder, whose job folders (``policy.job_days``) and job feature cache (``feature_cache_bytes``; None: left
    alone) are pruned too."""
    now = time.time() if now is None else now
    report = PruneReport(dry_run=dry_run)
    if policy.refusal_days > 0:
        report.refusals_deleted = _prune_refusals(session, now - policy.refusal_days * _DAY, dry_run)
    if policy.update_body_days > 0:
        report.update_bodies_emptied, report.update_body_bytes_freed = _prune_bodies(
            session, now - policy.update_body_days * _DAY, dry_run)
    if policy.blob_days > 0:
        report.blobs_deleted, report.blob_bytes_freed = _prune_blobs(session, blobs, now - policy.blob_days * _DAY,
                                                                     dry_run)
    if instance_path is not None:
        from aggregator.jobs import feature_cache_dir, prune_job_folders, trim_feature_cache

        if policy.job_days > 0:
            report.job_folders_deleted, report.job_folder_bytes_freed = prune_job_folders(
                session, instance_path, policy.job_days, dry_run=dry_run, now=now)
        if feature_cache_bytes is not None:
            report.feature_cache_files_deleted, report.feature_cache_bytes_freed = trim_feature_cache(
                feature_cache_dir(instance_path), feature_cache_bytes, dry_run=dry_run, now=now)
    log.info("prune: %s", report.to_dict())
    return report


def _prune_refusals(session: Session, cutoff: float, dry_run: bool) -> int:
    if dry_run:
        return int(session.scalar(select(func.count()).select_from(Refusal).where(Refusal.at < cutoff)) or 0)
    total = 0
    while True:
        ids = list(session.scalars(select(Refusal.id).where(Refusal.at < cutoff).limit(_BATCH)))
        if not ids:
            return total
        session.execute(delete(Refusal).where(Refusal.id.in_(ids)))
        session.commit()
        total += len(ids)


def _prune_bodies(session: Session, cutoff: float, dry_run: bool) -> tuple[int, int]:
    done = select(Round.id).where(Round.status.in_(("closed", "rejected", "superseded")), Round.closed_at < cutoff)
    which = (Update.round_id.in_(done), func.length(Update.body) > 0)
    if dry_run:
        n, size = session.execute(select(func.count(), func.coalesce(func.sum(func.length(Update.body)), 0))
                                  .where(*which)).one()
        return int(n), int(size)
    count = freed = 0
    while True:
        rows = session.execute(select(Update.update_id, func.length(Update.body)).where(*which)
                               .limit(_BATCH)).all()
        if not rows:
            return count, freed
        session.execute(update(Update).where(Update.update_id.in_([r[0] for r in rows])).values(body=b"")
                        .execution_options(synchronize_session=False))
        session.commit()
        count += len(rows)
        freed += sum(int(r[1]) for r in rows)


def referenced_blobs(session: Session) -> set[str]:
    """sha256 of every file a version refers to: its columns and every digest in its signed manifest."""
    out: set[str] = set()
    for base, head, state, signed in session.execute(select(
            ModelVersion.base_sha256, ModelVersion.head_sha256, ModelVersion.optimizer_state_sha256,
            ModelVersion.signed_manifest)):
        out.update(x for x in (base, head, state) if x)
        try:
            _digests(json.loads(signed), out)
        except ValueError:
            pass
    return out


def _digests(obj, out: set[str]) -> None:
    if isinstance(obj, str):
        if _HEX64.fullmatch(obj):
            out.add(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _digests(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _digests(v, out)


def _prune_blobs(session: Session, blobs: BlobStore, cutoff: float, dry_run: bool) -> tuple[int, int]:
    """Delete the unreferenced files last written before ``cutoff`` from the ``blobs`` table, a batch at a time.

    Reads digests and sizes only (never the bytes). The delete checks the age again, so a file a publish
    refreshed meanwhile (``BlobStore.put`` of the same bytes, on any host) stays.
    """
    keep = referenced_blobs(session)
    rows = session.execute(select(Blob.sha256, Blob.size).where(Blob.last_used < cutoff)).all()
    session.commit()  # SQLite: no transaction (and its write lock) held between the read and the deletes
    gone = [(sha, int(size)) for sha, size in rows if sha not in keep]
    if dry_run:
        return len(gone), sum(size for _, size in gone)
    count = freed = 0
    for i in range(0, len(gone), 500):
        shas = [sha for sha, _ in gone[i:i + 500]]
        deleted = session.execute(delete(Blob).where(Blob.sha256.in_(shas), Blob.last_used < cutoff)
                                  .returning(Blob.sha256, Blob.size)).all()
        session.commit()
        for sha, size in deleted:
            blobs.forget(sha)
            count += 1
            freed += int(size)
    return count, freed
