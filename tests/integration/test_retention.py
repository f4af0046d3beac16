"""Retention: ``fedser-aggregator prune`` removes old refusal rows, the bodies of updates of long-closed rounds and
unreferenced old model files, and nothing else (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select, update

from aggregator import create_app
from aggregator.db import Blob, Job, Refusal, RefusalCount, Round, Update
from aggregator.jobs import feature_cache_dir, job_dir
from edge_sdk.model import ModelMetadata
from edge_sdk.signing import SigningKey
from tests.conftest import signed_update

REPO = Path(__file__).resolve().parents[2]
DAY = 86400.0


def _prune(instance: Path, url: str, *args: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "aggregator.cli", "--instance", str(instance), "--database-url", url, "prune", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, FEDSER_LOG_JSON="0", **(env or {})))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_prune_applies_the_retention_settings(tmp_path, database_url):
    instance = tmp_path / "inst"
    app = create_app({"INSTANCE_PATH": str(instance), "DATABASE_URL": database_url, "ROUND_MIN_UPDATES": 2,
                      "REFUSAL_AUDIT_UNAUTH_PER_MINUTE": -1})
    url = app.config["DATABASE_URL"]
    client = app.test_client()
    auth = {"Authorization": f"Bearer {app.config['ADMIN_TOKEN']}"}
    data = REPO / "edge_sdk" / "data"
    with open(data / "default_model.tflite", "rb") as t, open(data / "default_model.json", "rb") as m:
        assert client.post("/api/v1/admin/models", headers=auth, data={"tflite": (t, "m.tflite"),
                                                                        "metadata": (m, "m.json")}).status_code == 201
    layout = ModelMetadata.load(data / "default_model.json").head_layout
    devices = []
    for _ in range(3):
        token = client.post("/api/v1/admin/enrollment-tokens", headers=auth, json={}).json["token"]
        key = SigningKey.generate()
        r = client.post("/api/v1/devices/enroll", json={"token": token, "public_key": key.verify_key.to_b64()})
        devices.append((r.json["device_id"], key))
    # Round 1 closes with two updates (-> version 2); the third device's update opens round 2's count.
    for dev, key in devices[:2]:
        r = client.post("/api/v1/updates", data=signed_update(dev, key, layout, sequence=1).to_bytes())
        assert r.status_code == 202
    assert r.json["published_version"] == 2
    dev3, key3 = devices[2]
    assert client.post("/api/v1/updates", data=signed_update(dev3, key3, layout, sequence=1,
                                                             base_version=2).to_bytes()).status_code == 202
    for _ in range(4):  # refusals: unauthenticated, all rows kept here (-1)
        assert client.get("/api/v1/manifest", headers={"X-Fedser-Device": "nobody", "X-Fedser-Timestamp": "1",
                                                       "X-Fedser-Signature": "AA=="}).status_code == 401
    counts_before = client.get("/api/v1/admin/status", headers=auth).json["refusals"]
    assert counts_before == {"unknown_device": 4}

    orphan_old, orphan_new = app.extensions["fedser_blobs"].put(b"old orphan"), app.extensions["fedser_blobs"].put(
        b"new orphan")
    now = time.time()
    old = now - 30 * DAY
    session = app.extensions["fedser_sessionmaker"]()
    session.execute(update(Blob).values(last_used=old))  # every file old, the referenced ones included
    session.execute(update(Blob).where(Blob.sha256 == orphan_new.sha256).values(last_used=now))
    session.execute(update(Refusal).where(Refusal.id.in_(select(Refusal.id).limit(3))).values(at=now - 40 * DAY))
    session.execute(update(Round).where(Round.status == "closed").values(closed_at=now - 10 * DAY))
    session.commit()
    body_bytes = session.scalar(select(func.length(Update.body)).limit(1))
    session.commit()  # SQLite: no transaction (and its write lock) open while the CLI runs
    referenced = sorted(set(session.scalars(select(Blob.sha256))) - {orphan_old.sha256, orphan_new.sha256})
    session.commit()

    dry = _prune(instance, url, "--dry-run")
    assert dry == {"refusals_deleted": 3, "update_bodies_emptied": 2, "update_body_bytes_freed": 2 * body_bytes,
                   "blobs_deleted": 1, "blob_bytes_freed": len(b"old orphan"), "job_folders_deleted": 0,
                   "job_folder_bytes_freed": 0, "feature_cache_files_deleted": 0, "feature_cache_bytes_freed": 0,
                   "dry_run": True}
    assert session.scalar(select(func.count()).select_from(Refusal)) == 4  # a dry run removes nothing
    session.commit()
    report = _prune(instance, url)
    assert report == {**dry, "dry_run": False}
    assert _prune(instance, url) == {**{k: 0 for k in dry}, "dry_run": False}  # and again: nothing left to do

    session.expire_all()
    assert session.scalar(select(func.count()).select_from(Refusal)) == 1
    assert session.scalar(select(func.sum(RefusalCount.count))) == 4  # the metric keeps every refusal
    bodies = dict(session.execute(select(Update.device_id, func.length(Update.body))).all())
    left = sorted(session.scalars(select(Blob.sha256)))
    session.close()
    assert client.get("/api/v1/admin/status", headers=auth).json["refusals"] == counts_before
    assert bodies == {devices[0][0]: 0, devices[1][0]: 0, dev3: body_bytes}  # the open round's update kept
    assert orphan_old.sha256 not in left and orphan_new.sha256 in left
    assert set(referenced) <= set(left)
    # The service goes on: a replay of a pruned update is still refused by its sequence, the open round closes.
    r = client.post("/api/v1/updates", data=signed_update(devices[0][0], devices[0][1], layout, sequence=1,
                                                          base_version=2).to_bytes())
    assert r.status_code == 409
    r = client.post("/api/v1/updates", data=signed_update(devices[0][0], devices[0][1], layout, sequence=2,
                                                          base_version=2).to_bytes())
    assert r.status_code == 202 and r.json["published_version"] == 3
    app.extensions["fedser_engine"].dispose()


def test_prune_refuses_a_negative_setting(tmp_path):
    instance = tmp_path / "inst"
    cmd = [sys.executable, "-m", "aggregator.cli", "--instance", str(instance), "prune", "--refusal-days", "-1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "refusal_days" in proc.stderr


def test_prune_empties_the_bodies_of_superseded_rounds(tmp_path, database_url):
    """Before: only closed and rejected rounds' bodies were pruned; a superseded round's stayed for ever."""
    instance = tmp_path / "inst"
    app = create_app({"INSTANCE_PATH": str(instance), "DATABASE_URL": database_url, "ROUND_MIN_UPDATES": 2})
    url = app.config["DATABASE_URL"]
    client = app.test_client()
    auth = {"Authorization": f"Bearer {app.config['ADMIN_TOKEN']}"}
    data = REPO / "edge_sdk" / "data"

    def publish():
        with open(data / "default_model.tflite", "rb") as t, open(data / "default_model.json", "rb") as m:
            r = client.post("/api/v1/admin/models", headers=auth,
                            data={"tflite": (t, "m.tflite"), "metadata": (m, "m.json")})
        assert r.status_code == 201, r.text

    publish()
    layout = ModelMetadata.load(data / "default_model.json").head_layout
    token = client.post("/api/v1/admin/enrollment-tokens", headers=auth, json={}).json["token"]
    key = SigningKey.generate()
    dev = client.post("/api/v1/devices/enroll", json={"token": token, "public_key": key.verify_key.to_b64()}
                      ).json["device_id"]
    assert client.post("/api/v1/updates", data=signed_update(dev, key, layout, sequence=1).to_bytes()
                       ).status_code == 202
    publish()  # round 1 (one update) is superseded by version 2
    session = app.extensions["fedser_sessionmaker"]()
    assert session.scalar(select(Round.status).where(Round.id == 1)) == "superseded"
    session.execute(update(Round).where(Round.status == "superseded").values(closed_at=time.time() - 10 * DAY))
    session.commit()
    assert session.scalar(select(func.length(Update.body)).where(Update.device_id == dev)) > 0
    session.commit()  # SQLite: no transaction open while the CLI runs
    report = _prune(instance, url, "--blob-days", "0")
    assert report["update_bodies_emptied"] == 1
    session.expire_all()
    assert session.scalar(select(func.length(Update.body)).where(Update.device_id == dev)) == 0
    session.close()
    app.extensions["fedser_engine"].dispose()


def test_prune_removes_old_job_folders_and_trims_the_job_feature_cache(tmp_path, database_url):
    """Baseline jobs wrote their features into the server's working folder and kept them, and every job's folder
    (log, model, report), for ever. Now the cache lives in the instance and prune trims it, oldest first, to
    JOB_FEATURE_CACHE_BYTES, and deletes the folders of jobs that ended RETENTION_JOB_DAYS ago (their rows stay)."""
    instance = tmp_path / "inst"
    app = create_app({"INSTANCE_PATH": str(instance), "DATABASE_URL": database_url})
    url = app.config["DATABASE_URL"]
    now = time.time()
    session = app.extensions["fedser_sessionmaker"]()
    jobs = {name: Job(kind="baseline", status=status, params="{}", created_at=now - 50 * DAY,
                      finished_at=None if status == "running" else now - age * DAY)
            for name, status, age in (("old", "succeeded", 40), ("old failed", "failed", 31), ("recent", "failed", 2),
                                      ("running", "running", 0))}
    session.add_all(jobs.values())
    session.commit()
    ids = {name: job.id for name, job in jobs.items()}
    session.close()
    for job_id in ids.values():
        folder = job_dir(instance, job_id)
        (folder / "model").mkdir(parents=True)
        (folder / "log.txt").write_bytes(b"x" * 100)
        (folder / "model" / "model.tflite").write_bytes(b"m" * 1000)
    stray = instance / "jobs" / "notes"  # not a job's folder: left alone
    stray.mkdir()
    cache = feature_cache_dir(instance) / "features-abc"
    cache.mkdir(parents=True)
    for i in range(10):  # 10 files of 1,000 bytes, written a minute apart: the oldest go first
        path = cache / f"{i}.npz"
        path.write_bytes(b"f" * 1000)
        os.utime(path, (now - 600 + 60 * i,) * 2)
    writing = cache / "tmp1.tmp.npz"  # another job is writing it: it counts toward the limit, it stays
    writing.write_bytes(b"t" * 1000)

    env = {"FEDSER_JOB_FEATURE_CACHE_BYTES": "5500"}
    dry = _prune(instance, url, "--dry-run", env=env)
    assert (dry["job_folders_deleted"], dry["job_folder_bytes_freed"]) == (2, 2 * 1100)
    assert (dry["feature_cache_files_deleted"], dry["feature_cache_bytes_freed"]) == (6, 6000)
    assert len(list(cache.iterdir())) == 11
    report = _prune(instance, url, env=env)
    assert report == {**dry, "dry_run": False}
    assert sorted(p.name for p in cache.iterdir()) == ["6.npz", "7.npz", "8.npz", "9.npz", "tmp1.tmp.npz"]
    assert not job_dir(instance, ids["old"]).exists() and not job_dir(instance, ids["old failed"]).exists()
    assert job_dir(instance, ids["recent"]).exists() and job_dir(instance, ids["running"]).exists()
    assert stray.exists()
    session = app.extensions["fedser_sessionmaker"]()
    assert session.scalar(select(func.count()).select_from(Job)) == 4  # the rows stay
    session.close()
    # --job-days overrides the setting; JOB_FEATURE_CACHE_BYTES=0 empties the cache but what is being written
    report = _prune(instance, url, "--job-days", "1", env={"FEDSER_JOB_FEATURE_CACHE_BYTES": "0"})
    assert (report["job_folders_deleted"], report["feature_cache_files_deleted"]) == (1, 4)
    assert not job_dir(instance, ids["recent"]).exists() and job_dir(instance, ids["running"]).exists()
    assert [p.name for p in cache.iterdir()] == ["tmp1.tmp.npz"]
    os.utime(writing, (now - 7200,) * 2)  # abandoned two hours ago (a killed job): it goes too
    assert _prune(instance, url, env={"FEDSER_JOB_FEATURE_CACHE_BYTES": "0"})["feature_cache_files_deleted"] == 1
    assert not cache.exists()  # the emptied config folder is removed
    app.extensions["fedser_engine"].dispose()


def test_a_bad_job_feature_cache_setting_is_refused_at_start(tmp_path):
    cmd = [sys.executable, "-m", "aggregator.cli", "--instance", str(tmp_path / "inst"), "prune"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, FEDSER_JOB_FEATURE_CACHE_BYTES="-1"))
    assert proc.returncode != 0 and "JOB_FEATURE_CACHE_BYTES" in proc.stderr
