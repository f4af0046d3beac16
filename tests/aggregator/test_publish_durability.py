"""A published version is durable before any device can see it: on SQLite every transaction that publishes a
version (admin publish, round close, rollback through the API and the CLI) commits with ``synchronous=FULL``,
whatever ``SQLITE_SYNCHRONOUS`` says, while intake commits at the configured level (``NORMAL``). A commit of
``NORMAL`` can be undone by a power cut, and the server would then publish another head under the same number."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import event

from aggregator import create_app
from aggregator.cli import main as cli_main
from edge_sdk.model import ModelMetadata
from tests.aggregator.test_shared_state import DATA, _enroll, _publish
from tests.conftest import signed_update

LEVELS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def _record_commits(engine) -> list[tuple[bool, str]]:
    """(whether the transaction inserted a model version, PRAGMA synchronous just before its commit)."""
    commits: list[tuple[bool, str]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _seen(conn, cursor, statement, *_):
        if statement.lstrip().upper().startswith("INSERT INTO MODEL_VERSIONS"):
            conn.info["published"] = True

    @event.listens_for(engine, "commit")
    def _commit(conn):  # before the DBAPI commit, inside the transaction
        level = conn.connection.dbapi_connection.execute("PRAGMA synchronous").fetchone()[0]
        commits.append((conn.info.pop("published", False), LEVELS[level]))

    return commits


def _pooled_level(engine) -> str:
    with engine.connect() as conn:
        return LEVELS[conn.exec_driver_sql("PRAGMA synchronous").scalar()]


@pytest.mark.parametrize("configured", ["NORMAL", "EXTRA"])
def test_every_publish_commits_with_a_full_sync_and_intake_does_not(tmp_path, configured, capsys):
    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "ROUND_MIN_UPDATES": 2,
                      "SQLITE_SYNCHRONOUS": configured})
    engine = app.extensions["fedser_engine"]
    commits = _record_commits(engine)
    client, token = app.test_client(), app.config["ADMIN_TOKEN"]
    auth = {"Authorization": f"Bearer {token}"}
    publish_level = "EXTRA" if configured == "EXTRA" else "FULL"  # never lowered

    assert _publish(client, token) == 1  # admin publish (publish_base)
    assert [level for published, level in commits if published] == [publish_level]
    assert _pooled_level(engine) == configured  # back to the configured level after the commit

    layout = ModelMetadata.load(DATA / "default_model.json").head_layout
    devices = [_enroll(client, token) for _ in range(2)]
    commits.clear()
    for i, (enrolled, key) in enumerate(devices):
        r = client.post("/api/v1/updates", data=signed_update(enrolled["device_id"], key, layout, sequence=1,
                                                             base_version=1).to_bytes())
        assert r.status_code == 202, (i, r.json)
    published = [level for p, level in commits if p]
    intake = [level for p, level in commits if not p]
    assert published == [publish_level], commits  # the round close that the second post triggered
    assert intake and set(intake) == {configured}, commits  # the accepted updates: not synced
    assert client.get("/api/v1/admin/status", headers=auth).json["current_version"] == 2

    commits.clear()
    r = client.post("/api/v1/admin/models/1/rollback", headers=auth)
    assert r.status_code == 201, r.json
    assert [level for p, level in commits if p] == [publish_level]

    commits.clear()
    assert cli_main(["rollback", "1"], app=app) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["version"] == 4
    assert [level for p, level in commits if p] == [publish_level]
    assert _pooled_level(engine) == configured

    # And after all that, intake still commits at the configured level.
    commits.clear()
    enrolled, key = devices[0]
    r = client.post("/api/v1/updates", data=signed_update(enrolled["device_id"], key, layout, sequence=2,
                                                         base_version=4).to_bytes())
    assert r.status_code == 202, r.json
    assert [level for p, level in commits if not p] and all(level == configured for p, level in commits), commits
    engine.dispose()


def test_a_durable_transaction_that_rolls_back_leaves_the_connection_at_its_level(tmp_path, caplog):
    from aggregator.registry import begin_durable

    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst")})
    engine = app.extensions["fedser_engine"]
    with app.extensions["fedser_sessionmaker"]() as session:
        begin_durable(session)
        assert LEVELS[session.connection().exec_driver_sql("PRAGMA synchronous").scalar()] == "FULL"
        session.rollback()
        assert _pooled_level(engine) == "NORMAL"
    with app.extensions["fedser_sessionmaker"]() as session:  # closed without commit or rollback
        begin_durable(session)
    assert _pooled_level(engine) == "NORMAL"
    # A publish in a transaction begun elsewhere cannot be synced (SQLite refuses mid-transaction): it says so.
    from aggregator.db import ModelVersion
    from aggregator.registry import rollback_to

    assert _publish(app.test_client(), app.config["ADMIN_TOKEN"]) == 1
    with app.extensions["fedser_sessionmaker"]() as session, caplog.at_level("WARNING", "aggregator"):
        row = session.get(ModelVersion, 1)
        rollback_to(session, app.extensions["fedser_blobs"], app.extensions["fedser_server_key"], row)
        session.commit()
    assert "not synced to disk" in caplog.text
    engine.dispose()
