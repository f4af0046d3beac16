"""A baseline job whose process cannot be started is marked failed with the reason (it stayed "queued" for
ever before: its row is committed before the process starts). Real HTTP to gunicorn, SQLite."""

from __future__ import annotations

import shutil

import requests

from tests.conftest import start_live_aggregator


def test_a_job_that_cannot_start_is_failed_with_the_reason(tmp_path):
    agg = start_live_aggregator(tmp_path, min_updates=2, workers=1)
    try:
        jobs = agg.instance / "jobs"
        if jobs.is_dir():
            shutil.rmtree(jobs)
        jobs.write_text("a file where the jobs folder goes: the job's folder cannot be made\n")
        r = agg.post_admin("/jobs", json={"epochs": 1})
        assert r.status_code == 400 and r.json()["error"] == "bad_job", r.text
        listed = requests.get(f"{agg.base_url}/api/v1/admin/jobs", headers=agg.auth, timeout=30).json()["jobs"]
        assert len(listed) == 1
        assert listed[0]["status"] == "failed", listed
        assert "could not be started" in listed[0]["detail"], listed
    finally:
        agg.process.terminate()
        agg.process.wait(timeout=30)
