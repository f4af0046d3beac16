"""Schema and connection lifecycle (SQLAlchemy 2; SQLite WAL by default, PostgreSQL by URL).

All round state lives here, so any worker on any host can take any request.
"""

from __future__ import annotations

import time

import click
from flask import Flask, current_app, g
from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

__all__ = ["Base", "Device", "EnrollmentToken", "ModelVersion", "Round", "Update", "Refusal", "Job", "init_app",
           "get_session", "make_engine"]


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    enrolled_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_sequence: Mapped[int] = mapped_column(Integer, default=0)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    updates_accepted: Mapped[int] = mapped_column(Integer, default=0)
    updates_refused: Mapped[int] = mapped_column(Integer, default=0)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"
    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    device_id: Mapped[str | None] = mapped_column(String(40), nullable=True)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    round_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    base_sha256: Mapped[str] = mapped_column(String(64))
    head_sha256: Mapped[str] = mapped_column(String(64))
    signed_manifest: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)
    is_current: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    optimizer_state_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)  # server side only
    note: Mapped[str] = mapped_column(Text, default="")


class Round(Base):
    __tablename__ = "rounds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    base_version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)  # open|closing|closed|rejected
    opened_at: Mapped[float] = mapped_column(Float)
    deadline_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    num_updates: Mapped[int] = mapped_column(Integer, default=0)
    num_examples: Mapped[int] = mapped_column(Integer, default=0)
    published_version: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Update(Base):
    __tablename__ = "updates"
    __table_args__ = (
        UniqueConstraint("device_id", "sequence", name="uq_update_device_sequence"),
        UniqueConstraint("device_id", "round_id", name="uq_update_device_round"),
    )
    update_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    base_version: Mapped[int] = mapped_column(Integer)
    sequence: Mapped[int] = mapped_column(Integer)
    num_examples: Mapped[int] = mapped_column(Integer)
    l2_norm: Mapped[float] = mapped_column(Float)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    staleness: Mapped[int] = mapped_column(Integer, default=0)


class Refusal(Base):
    __tablename__ = "refusals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    device_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    authenticated: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(String(64), index=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[int] = mapped_column(Integer)


class Job(Base):
    """A baseline training job; it runs in its own process (``python -m aggregator.jobs``)."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32), default="baseline")
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)  # queued|running|succeeded|failed
    params: Mapped[str] = mapped_column(Text, default="{}")  # JSON
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    report: Mapped[str] = mapped_column(Text, default="")  # JSON
    published_version: Mapped[int | None] = mapped_column(Integer, nullable=True)


def make_engine(url: str):
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        # pysqlite's own transaction handling defers BEGIN; take the write lock at BEGIN instead,
        # so two workers cannot both read a round as open and then both write.
        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_conn, _record):
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def get_session() -> Session:
    if "db_session" not in g:
        g.db_session = current_app.extensions["fedser_sessionmaker"]()
    return g.db_session


def _close_session(_exc=None) -> None:
    session = g.pop("db_session", None)
    if session is not None:
        session.close()


def init_app(app: Flask) -> None:
    engine = make_engine(app.config["DATABASE_URL"])
    Base.metadata.create_all(engine)
    app.extensions["fedser_engine"] = engine
    app.extensions["fedser_sessionmaker"] = sessionmaker(engine, expire_on_commit=False)
    app.teardown_appcontext(_close_session)
    app.cli.add_command(init_db_command)


@click.command("init-db")
def init_db_command() -> None:
    """Create the tables (idempotent)."""
    Base.metadata.create_all(current_app.extensions["fedser_engine"])
    click.echo(f"schema ready at {time.strftime('%H:%M:%S')}")
