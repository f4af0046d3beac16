"""BlobStore.put on a file it already holds refreshes its mtime, so prune (which spares files newer than its
cutoff) does not delete a blob a publish is reusing."""

from __future__ import annotations

import os
import time

from aggregator import create_app
from aggregator.retention import RetentionPolicy, prune


def test_put_of_an_existing_blob_refreshes_its_mtime_and_prune_spares_it(tmp_path):
    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst")})
    blobs = app.extensions["fedser_blobs"]
    reused, orphan = blobs.put(b"an old file a publish reuses"), blobs.put(b"an old orphan")
    old = time.time() - 30 * 86400
    for ref in (reused, orphan):
        os.utime(blobs.path(ref.sha256), (old, old))
    assert blobs.put(b"an old file a publish reuses") == reused  # the publish, before its version row commits
    assert blobs.path(reused.sha256).stat().st_mtime > old + 29 * 86400
    session = app.extensions["fedser_sessionmaker"]()
    report = prune(session, blobs, RetentionPolicy(refusal_days=0, update_body_days=0, blob_days=7))
    session.close()
    assert report.blobs_deleted == 1
    assert blobs.path(reused.sha256).exists() and not blobs.path(orphan.sha256).exists()
    app.extensions["fedser_engine"].dispose()
