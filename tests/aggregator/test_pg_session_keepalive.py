"""PG_SESSION_KEEPALIVE: on (default), each PostgreSQL session asks the server for TCP keepalives through the
`options` startup parameter; off (behind PgBouncer, which refuses that parameter unless told to ignore it), no
`-c tcp_keepalives_*` is sent, the URL's own options still are."""

from __future__ import annotations

import pytest
from sqlalchemy import event

from aggregator import create_app
from aggregator.db import make_engine


def _startup_options(engine) -> list:
    """The `options` each new connection was made with (recorded from SQLAlchemy's do_connect)."""
    seen = []

    @event.listens_for(engine, "do_connect")
    def _record(dialect, conn_rec, cargs, cparams):
        seen.append(cparams.get("options"))

    return seen


@pytest.mark.postgres
@pytest.mark.parametrize("on", [True, False])
def test_session_keepalives_are_sent_only_when_on(on):
    from tests.conftest import postgres_database

    engine = make_engine(postgres_database() + "?options=-c%20statement_timeout%3D60000",
                         pg_session_keepalive=on)
    sent = _startup_options(engine)
    try:
        with engine.connect() as conn:
            shown = [conn.exec_driver_sql(f"SHOW {k}").scalar() for k in (
                "tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "statement_timeout")]
        assert shown[3] == "1min"  # the URL's own options are kept either way
        assert (shown[:3] == ["10", "5", "3"]) is on
        assert ("tcp_keepalives" in sent[0]) is on, sent
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_the_setting_reaches_the_engine_from_the_environment(tmp_path, monkeypatch):
    from tests.conftest import postgres_database

    monkeypatch.setenv("FEDSER_PG_SESSION_KEEPALIVE", "off")
    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "DATABASE_URL": postgres_database()})
    assert app.config["PG_SESSION_KEEPALIVE"] is False
    engine = app.extensions["fedser_engine"]
    engine.dispose()
    sent = _startup_options(engine)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW tcp_keepalives_idle").scalar() != "10"
        assert sent and not any(o and "tcp_keepalives" in o for o in sent), sent
    finally:
        engine.dispose()
