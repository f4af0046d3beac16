"""The blob store (model files in the database's ``blobs`` table) and prune: a put of a file already held
refreshes its ``last_used``, so prune (which spares files used after its cutoff) does not delete a blob a
publish is reusing; unreferenced old files go, referenced or fresh ones stay. SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from aggregator import create_app
from aggregator.db import Blob, ModelVersion
from aggregator.registry import MissingBlob
from aggregator.retention import RetentionPolicy, prune

DATA = Path(__file__).resolve().parents[2] / "edge_sdk" / "data"
BLOBS_ONLY = RetentionPolicy(refusal_days=0, update_body_days=0, blob_days=7)


@pytest.fixture
def app(tmp_path, database_url):
    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "DATABASE_URL": database_url})
    yield app
    app.extensions["fedser_engine"].dispose()


def _age(app, sha: str, days: float) -> None:
    with app.extensions["fedser_sessionmaker"]() as s:
        s.execute(update(Blob).where(Blob.sha256 == sha).values(last_used=time.time() - days * 86400,
                                                                created_at=time.time() - days * 86400))
        s.commit()


def _held(app) -> set[str]:
    with app.extensions["fedser_sessionmaker"]() as s:
        return set(s.scalars(select(Blob.sha256)))


def test_put_of_an_existing_blob_refreshes_it_and_prune_spares_it(app):
    blobs = app.extensions["fedser_blobs"]
    reused, orphan = blobs.put(b"an old file a publish reuses"), blobs.put(b"an old orphan")
    for ref in (reused, orphan):
        _age(app, ref.sha256, 30)
    assert blobs.put(b"an old file a publish reuses") == reused  # the publish, before its version row commits
    with app.extensions["fedser_sessionmaker"]() as s:
        assert s.scalar(select(Blob.last_used).where(Blob.sha256 == reused.sha256)) > time.time() - 60
        assert s.scalar(select(func.count()).select_from(Blob)) == 2  # no second row
        session = s
        dry = prune(session, blobs, BLOBS_ONLY, dry_run=True)
        assert (dry.blobs_deleted, dry.blob_bytes_freed) == (1, len(b"an old orphan"))
        assert _held(app) == {reused.sha256, orphan.sha256}  # a dry run removes nothing
        report = prune(session, blobs, BLOBS_ONLY)
    assert (report.blobs_deleted, report.blob_bytes_freed) == (1, len(b"an old orphan"))
    assert _held(app) == {reused.sha256}
    with pytest.raises(MissingBlob):
        blobs.get(orphan.sha256)
    assert blobs.get(reused.sha256) == b"an old file a publish reuses"


def test_prune_spares_every_file_a_version_references_however_old(app):
    client, auth = app.test_client(), {"Authorization": f"Bearer {app.config['ADMIN_TOKEN']}"}
    with open(DATA / "default_model.tflite", "rb") as t, open(DATA / "default_model.json", "rb") as m:
        assert client.post("/api/v1/admin/models", headers=auth, data={"tflite": (t, "m.tflite"),
                                                                        "metadata": (m, "m.json")}).status_code == 201
    blobs = app.extensions["fedser_blobs"]
    fresh = blobs.put(b"a fresh orphan")
    old = blobs.put(b"an old orphan")
    with app.extensions["fedser_sessionmaker"]() as s:
        base, head = s.execute(select(ModelVersion.base_sha256, ModelVersion.head_sha256)).one()
    for sha in (base, head, old.sha256):
        _age(app, sha, 365)
    with app.extensions["fedser_sessionmaker"]() as s:
        report = prune(s, blobs, BLOBS_ONLY)
        assert report.blobs_deleted == 1
        assert prune(s, blobs, BLOBS_ONLY).blobs_deleted == 0  # and again: nothing left to do
    assert _held(app) == {base, head, fresh.sha256}
    assert len(blobs.get(base)) == (DATA / "default_model.tflite").stat().st_size


def test_a_malformed_digest_is_a_value_error(app):
    blobs = app.extensions["fedser_blobs"]
    for bad in ("nothex", "A" * 64, "0" * 63, "../" + "0" * 61):
        with pytest.raises(ValueError):
            blobs.get(bad)
    with pytest.raises(MissingBlob):
        blobs.get("0" * 64)


def test_the_read_cache_is_bounded(tmp_path):
    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "BLOB_CACHE_BYTES": 40_000})
    blobs = app.extensions["fedser_blobs"]
    refs = [blobs.put(bytes([i]) * 9_000) for i in range(10)]
    for ref in refs:
        assert blobs.get(ref.sha256) == bytes([refs.index(ref)]) * 9_000
    assert blobs._cached <= 40_000 and len(blobs._cache) == 4  # the 4 read last
    big = blobs.put(b"x" * 20_000)  # over a quarter of the cache: read, never cached
    assert blobs.get(big.sha256) == b"x" * 20_000 and big.sha256 not in blobs._cache
    app.extensions["fedser_engine"].dispose()


def test_prune_spares_an_old_file_a_concurrent_publish_is_reusing(app):
    """A publish (another host, say) writes bytes already held inside its open transaction while prune runs: prune
    waits for it (PostgreSQL: the row lock of the refresh; SQLite: the write lock) and then sees the file fresh
    (PostgreSQL: the age check in its DELETE; without it prune deletes a file the new version references)."""
    blobs = app.extensions["fedser_blobs"]
    ref = blobs.put(b"an old file a publish reuses")
    _age(app, ref.sha256, 30)
    publish = app.extensions["fedser_sessionmaker"]()
    blobs.put(b"an old file a publish reuses", publish)  # not committed yet
    reports = []

    def run_prune():
        with app.extensions["fedser_sessionmaker"]() as s:
            reports.append(prune(s, blobs, BLOBS_ONLY))

    thread = threading.Thread(target=run_prune)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive()  # PostgreSQL: its DELETE waits on the refreshed row; SQLite: it waits to begin
    publish.commit()
    publish.close()
    thread.join(timeout=60)
    assert reports and reports[0].blobs_deleted == 0
    assert blobs.get(ref.sha256) == b"an old file a publish reuses"
