"""Schema and connection lifecycle (SQLAlchemy 2; SQLite WAL by default, PostgreSQL by URL).

All state a request needs lives here (rounds, versions, the model files in ``blobs``), so any worker on any
host sharing the database can take any request; the signing key and admin token come from configuration
(``docs/deploy-multihost.md``).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
import weakref

import click
from flask import Flask, current_app, g
from sqlalchemy import (
    BigInteger,
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
    inspect,
    make_url,
)
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

__all__ = ["Base", "Device", "EnrollmentToken", "ModelVersion", "Round", "Update", "Refusal", "RefusalCount", "Job",
           "Blob", "SharedSetting", "insert_ignore", "init_app", "get_session", "get_read_session", "write_if_free",
           "make_engine", "bounded_connection", "pg_lock_timeout_column", "lock_timeout_ms",
           "is_lock_timeout", "LOCK_TIMEOUT"]

# Values a client chooses (sequence, example counts) and lifetime counters can pass 2**31-1, PostgreSQL's
# INTEGER: these columns are 64-bit (SQLite's INTEGER always is). Autoincrement keys stay INTEGER on SQLite,
# where only that type is the rowid.
BigInt = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    enrolled_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_sequence: Mapped[int] = mapped_column(BigInt, default=0)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    updates_accepted: Mapped[int] = mapped_column(BigInt, default=0)
    updates_refused: Mapped[int] = mapped_column(BigInt, default=0)
    # The round of its last accepted update: the intake refuses a second one in that round before writing it
    # (NULL in a database from before this column: the unique constraint refuses it, after the write, as before)
    last_round_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


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
    # open | closing | closed | rejected (by the validation gate) | superseded (a new version was published)
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)
    opened_at: Mapped[float] = mapped_column(Float)
    deadline_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    num_updates: Mapped[int] = mapped_column(Integer, default=0)
    num_examples: Mapped[int] = mapped_column(BigInt, default=0)
    published_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gate_report: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: the validation gate's figures


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
    sequence: Mapped[int] = mapped_column(BigInt)
    num_examples: Mapped[int] = mapped_column(BigInt)
    l2_norm: Mapped[float] = mapped_column(Float)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    staleness: Mapped[int] = mapped_column(Integer, default=0)
    # The device's answer report (edge_sdk.report; NULL from SDKs that send none)
    answers_scored: Mapped[int | None] = mapped_column(Integer, nullable=True)
    personal_correct: Mapped[int | None] = mapped_column(Integer, nullable=True)
    global_correct: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Refusal(Base):
    __tablename__ = "refusals"
    id: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    device_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    authenticated: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(String(64), index=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[int] = mapped_column(Integer)


class RefusalCount(Base):
    """Refusals by reason and status since the database was made: the metric, exact while the audit rows of
    unauthenticated refusals are sampled and old audit rows pruned (``aggregator.retention``)."""

    __tablename__ = "refusal_counts"
    reason: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(BigInt, default=0)
    last_at: Mapped[float] = mapped_column(Float)


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
    # The host whose process runs the job (its pid means something only there) and the tail of its log,
    # copied here by the job's process so that any host can show it.
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    log_tail: Mapped[str | None] = mapped_column(Text, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # the job's process is alive


class Blob(Base):
    """A model file (base ``.tflite``, head weights, optimizer state), named by the sha256 of its bytes.

    Immutable once written; ``last_used`` is refreshed whenever a publish writes the same bytes again, so that
    ``fedser-aggregator prune`` (which removes unreferenced files older than ``RETENTION_BLOB_DAYS``) spares
    a file a publish in progress is reusing (``aggregator.registry.BlobStore``).
    """

    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInt)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)
    last_used: Mapped[float] = mapped_column(Float, index=True)


class SharedSetting(Base):
    """Facts every host must agree on, none of them secret: the server's public key (``server_verify_key``),
    the sha256 of a generated admin token (``admin_token_sha256``). See ``aggregator.identity``."""

    __tablename__ = "shared_settings"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


def insert_ignore(dialect: str, table, **values):
    """``INSERT ... ON CONFLICT DO NOTHING`` on the table's primary key, on SQLite and PostgreSQL alike
    (``dialect``: the engine's ``dialect.name``)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).values(**values).on_conflict_do_nothing(
        index_elements=[c.name for c in table.__table__.primary_key.columns])


SQLITE_SYNCHRONOUS = ("FULL", "NORMAL", "EXTRA")  # the SQLITE_SYNCHRONOUS setting (aggregator.db.make_engine)
PG_KEEPALIVE_OPTIONS = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
PING_AFTER_IDLE_S = 2.0  # PostgreSQL: a pooled connection idle longer than this is pinged before use


class _HostWriteLock:
    """Queues the SQLite write transactions of this host's processes: a thread lock, then an ``flock``.

    SQLite lets one transaction write at a time; a second ``BEGIN IMMEDIATE`` polls for the lock with sleeps
    of 1 to 100 ms (its busy handler), so under load a writer often sleeps after the lock is free and one
    can starve. Waiting here instead hands the lock over as soon as it is released (the kernel wakes the next
    ``flock`` waiter), and only one thread of a process waits on the file. Writers that do not take it (another
    program) still meet SQLite's own lock and busy timeout, which stay as they were.
    """

    def __init__(self, path: str) -> None:
        self.path, self.thread_lock, self.fd = path, threading.Lock(), None
        ref = weakref.ref(self)  # a worker forked from the arbiter: its own lock and file descriptor
        os.register_at_fork(after_in_child=lambda: (lock := ref()) is not None and lock._after_fork())

    def _after_fork(self) -> None:
        self.thread_lock = threading.Lock()
        self._close()

    def _close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # a copy shared with another process: its flock stays until that one lets go

    def __del__(self) -> None:
        self._close()

    def acquire(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if not self.thread_lock.acquire(timeout=timeout):
            raise _locked(timeout)
        try:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._flock(deadline)
        except BaseException:
            self.thread_lock.release()
            raise

    def _flock(self, deadline: float) -> None:
        """The file lock, waiting until ``deadline`` (time.monotonic) at most.

        ``flock`` has no timeout: a blocking one would wait for as long as another process of this host holds
        the lock (a round close, or a stopped process). Free at once, it is taken without waiting; otherwise
        it is tried again every 0.2 ms for the first 20 ms (a write transaction ends in about a millisecond,
        so a handover stays quick), then every 2 ms until the deadline (a long wait is a round close).
        """
        started = time.monotonic()
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            now = time.monotonic()
            if now >= deadline:
                raise _locked(now - started)
            time.sleep(min(0.0002 if now - started < 0.02 else 0.002, deadline - now))

    def release(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.thread_lock.release()


def _locked(waited: float):
    from sqlalchemy.exc import OperationalError

    return OperationalError("BEGIN IMMEDIATE", {}, sqlite3.OperationalError(f"database is locked (waited "
                                                                            f"{waited:.2f} s)"))


class _LockedConnection(sqlite3.Connection):
    """A pysqlite connection whose write transaction holds the host's write lock until it commits or rolls back."""

    lock_timeout = 30.0  # seconds, as the busy timeout (write_if_free lowers both)

    def hold(self, lock: _HostWriteLock, timeout: float | None = None) -> None:
        lock.acquire(self.lock_timeout if timeout is None else min(timeout, self.lock_timeout))
        self._held = lock

    def let_go(self) -> None:
        held, self._held = getattr(self, "_held", None), None
        if held is not None:
            held.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.let_go()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.let_go()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.let_go()


def make_engine(url: str, *, sqlite_synchronous: str = "NORMAL", pg_session_keepalive: bool = True):
    """The engine of ``url``: SQLite in WAL mode, or PostgreSQL with a pool whose idle connections are pinged.

    ``sqlite_synchronous``: ``NORMAL`` (default) syncs the WAL at checkpoints, not at every commit: a commit
    survives the process being killed at any point (the WAL is in the OS's page cache), and the database
    stays consistent through a power cut, which may lose the last commits before it; ``FULL`` syncs at every
    commit (durable through a power cut; on this machine's disk a sync costs about 4 ms, which caps one
    host's intake at about 220 updates/s, ``python -m tools.bench_aggregator``).
    """
    if url.startswith("sqlite"):
        sqlite_synchronous = str(sqlite_synchronous).upper()
        if sqlite_synchronous not in SQLITE_SYNCHRONOUS:
            raise ValueError(f"SQLITE_SYNCHRONOUS must be one of {', '.join(SQLITE_SYNCHRONOUS)}, "
                             f"got {sqlite_synchronous!r}")
        path = make_url(url).database
        lock = _HostWriteLock(f"{path}.writelock") if path and path != ":memory:" else None
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False,
                                                  "factory": _LockedConnection})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        # pysqlite's own transaction handling defers BEGIN; a transaction that may write takes the write lock
        # at BEGIN instead, so two workers cannot both read a round as open and then both write (a deferred
        # transaction that read first cannot wait for the lock when it writes: SQLite refuses it at once).
        # Read-only sessions (get_read_session: manifest GETs, /healthz, /metrics) begin DEFERRED and never
        # queue behind a writer: in WAL mode they read the last committed state while a round closes.
        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_conn, _record):
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(conn):
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
                return
            raw = conn.connection.dbapi_connection
            bound = conn.get_execution_options().get(LOCK_TIMEOUT)  # bounded_connection: a shorter wait
            if lock is not None:
                raw.hold(lock, bound)
            try:
                if bound is None:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                else:  # SQLite's own wait (a writer without the host lock): bounded alike, for this BEGIN only
                    raw.execute(f"PRAGMA busy_timeout={max(1, int(bound * 1000))}")
                    try:
                        conn.exec_driver_sql("BEGIN IMMEDIATE")
                    finally:
                        raw.execute(f"PRAGMA busy_timeout={int(raw.lock_timeout * 1000)}")
            except BaseException:
                raw.let_go()
                raise

        return engine
    # The server notices a vanished client (a host cut off mid-transaction, whose locks would stop every other
    # host's intake) after about 10 + 3 x 5 s of silence instead of its default of over two hours; a client-side
    # pooler or relay in between hides such a client from these (docs/deploy-multihost.md). They travel in the
    # `options` startup parameter, which PgBouncer refuses unless `ignore_startup_parameters = options`:
    # pg_session_keepalive=False (PG_SESSION_KEEPALIVE) sends only the URL's own options (set the keepalives in
    # postgresql.conf then). The client's own socket keepalives (libpq's keepalives*) are kept either way.
    options = " ".join(filter(None, (make_url(url).query.get("options"),
                                     PG_KEEPALIVE_OPTIONS if pg_session_keepalive else None)))
    connect_args = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
    if options:
        connect_args["options"] = options
    engine = create_engine(url, pool_size=5, max_overflow=10, connect_args=connect_args)

    # pool_pre_ping would cost a round trip at every checkout, two per update post. A connection that was
    # in use a moment ago is not pinged; one idle in the pool longer than PING_AFTER_IDLE_S is (a restarted
    # server or a dropped connection is then replaced before a request sees it). A connection that fails
    # within those seconds fails that one statement, and SQLAlchemy then replaces every pooled connection.
    @event.listens_for(engine, "checkin")
    def _idle_since(_dbapi_conn, record):
        record.info["fedser_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn, record, _proxy):
        since = record.info.get("fedser_idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool retries with a new connection
            raise DisconnectionError(f"pooled connection is gone: {exc}") from exc
        if not alive:
            raise DisconnectionError("pooled connection did not answer a ping")

    return engine


def add_missing_columns(engine) -> list[str]:
    """``ALTER TABLE ... ADD COLUMN`` for each nullable column the model has and an older database lacks.

    ``create_all`` creates missing tables, not missing columns; new columns are nullable, so a database made
    by an older release gains them in place. Returns ``table.column`` for each one added.
    """
    added = []
    existing = inspect(engine)
    for table in Base.metadata.sorted_tables:
        if not existing.has_table(table.name):
            continue
        have = {c["name"] for c in existing.get_columns(table.name)}
        for col in table.columns:
            if col.name in have or not col.nullable:
                continue
            with engine.begin() as conn:
                kind = col.type.compile(dialect=engine.dialect)
                guard = "IF NOT EXISTS " if engine.dialect.name == "postgresql" else ""  # two processes at once
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {guard}{col.name} {kind}")
            added.append(f"{table.name}.{col.name}")
    return added


def widen_integer_columns(engine) -> list[str]:
    """PostgreSQL: ``ALTER COLUMN ... TYPE BIGINT`` for each 64-bit column an older database holds as INTEGER."""
    if engine.dialect.name != "postgresql":
        return []
    widened = []
    existing = inspect(engine)
    for table in Base.metadata.sorted_tables:
        if not existing.has_table(table.name):
            continue
        have = {c["name"]: c["type"] for c in existing.get_columns(table.name)}
        for col in table.columns:
            if not isinstance(col.type.dialect_impl(engine.dialect), BigInteger) or col.name not in have:
                continue
            if isinstance(have[col.name], BigInteger):
                continue
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ALTER COLUMN {col.name} TYPE BIGINT")
            widened.append(f"{table.name}.{col.name}")
    return widened


def seed_refusal_counts(engine) -> None:
    """A database from before ``refusal_counts``: start the counts from the audit rows it holds."""
    from sqlalchemy import func, insert, select
    from sqlalchemy.exc import IntegrityError

    try:
        with engine.begin() as conn:
            if conn.scalar(select(func.count()).select_from(RefusalCount)):
                return
            conn.execute(insert(RefusalCount).from_select(
                ["reason", "status", "count", "last_at"],
                select(Refusal.reason, Refusal.status, func.count(), func.max(Refusal.at))
                .group_by(Refusal.reason, Refusal.status)))
    except IntegrityError:  # another process seeded them first
        pass


READ_ONLY = "fedser_read_only"  # execution option of the read-only sessions' engine
LOCK_TIMEOUT = "fedser_lock_timeout"  # execution option: seconds a SQLite write transaction waits to begin


def bounded_connection(session: Session, seconds: float, *, postgres: bool = True):
    """The session's connection, its transaction begun with every lock wait bounded by ``seconds``.

    SQLite: the host write lock and SQLite's busy wait at ``BEGIN IMMEDIATE``; PostgreSQL: ``SET LOCAL
    lock_timeout`` (row locks such as the round's ``FOR SHARE``, until the transaction ends). A wait that runs
    out raises an ``OperationalError`` for which :func:`is_lock_timeout` is true. The session must not be in a
    transaction yet (else the SQLite bound does not apply). ``postgres=False``: the caller sets PostgreSQL's
    bound itself, in its first statement (:func:`pg_lock_timeout_column`: no round trip of its own).
    """
    if session.get_bind().dialect.name != "sqlite":  # the option is read by SQLite's BEGIN only
        conn = session.connection()
    else:
        conn = session.connection(execution_options={LOCK_TIMEOUT: float(seconds)})
    if postgres and conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {lock_timeout_ms(seconds)}")
    return conn


def pg_lock_timeout_column():
    """A column that sets PostgreSQL's ``lock_timeout`` (bound parameter ``lock_timeout_ms``, a string) for the
    rest of the transaction, as ``SET LOCAL`` does, when a query selects it: no round trip of its own."""
    from sqlalchemy import bindparam, func

    return func.set_config("lock_timeout", bindparam("lock_timeout_ms"), True).label("lock_timeout_set")


def lock_timeout_ms(seconds: float) -> str:
    return str(max(1, int(float(seconds) * 1000)))


def is_lock_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` (a SQLAlchemy ``OperationalError``) is a lock wait that ran out (:func:`bounded_connection`)."""
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) == "55P03":  # PostgreSQL lock_not_available (lock_timeout)
        return True
    return isinstance(orig, sqlite3.OperationalError) and "database is locked" in str(orig)


def get_session() -> Session:
    """The request's session; on SQLite each of its transactions takes the write lock when it begins."""
    if "db_session" not in g:
        g.db_session = current_app.extensions["fedser_sessionmaker"]()
    return g.db_session


def get_read_session() -> Session:
    """The request's read-only session: on SQLite its transactions begin DEFERRED and take no lock.

    For reads only (a write in it could fail at once with "database is locked" while another worker holds
    the lock); it is a second connection, so it does not see the uncommitted writes of :func:`get_session`.
    """
    if "db_read_session" not in g:
        g.db_read_session = current_app.extensions["fedser_read_sessionmaker"]()
    return g.db_read_session


def write_if_free(statement) -> bool:
    """Run one write statement in its own transaction unless that would wait for another writer.

    For bookkeeping that may be skipped (a device's ``last_seen`` on a read): on SQLite the statement gives up
    after 50 ms instead of queueing behind a round close; returns whether it ran.
    """
    from sqlalchemy.exc import OperationalError

    engine = current_app.extensions["fedser_engine"]
    with engine.connect() as conn:
        # On the DBAPI connection: a statement through SQLAlchemy's would begin the transaction first.
        raw = conn.connection.dbapi_connection if engine.dialect.name == "sqlite" else None
        if raw is not None:
            raw.execute("PRAGMA busy_timeout=50")
            raw.lock_timeout = 0.05
        try:
            with conn.begin():
                conn.execute(statement)
            return True
        except OperationalError:
            if raw is None:
                raise
            return False
        finally:
            if raw is not None:
                raw.execute("PRAGMA busy_timeout=30000")
                raw.lock_timeout = _LockedConnection.lock_timeout


def _close_session(_exc=None) -> None:
    for name in ("db_session", "db_read_session"):
        session = g.pop(name, None)
        if session is not None:
            session.close()


def init_app(app: Flask) -> None:
    try:
        engine = make_engine(app.config["DATABASE_URL"],
                             sqlite_synchronous=app.config.get("SQLITE_SYNCHRONOUS") or "NORMAL",
                             pg_session_keepalive=bool(app.config.get("PG_SESSION_KEEPALIVE", True)))
    except ValueError as exc:
        from aggregator import ConfigError

        raise ConfigError(str(exc)) from exc
    Base.metadata.create_all(engine)
    add_missing_columns(engine)
    widen_integer_columns(engine)
    seed_refusal_counts(engine)
    app.extensions["fedser_engine"] = engine
    app.extensions["fedser_sessionmaker"] = sessionmaker(engine, expire_on_commit=False)
    app.extensions["fedser_read_sessionmaker"] = sessionmaker(engine.execution_options(**{READ_ONLY: True}),
                                                              expire_on_commit=False)
    app.teardown_appcontext(_close_session)
    app.cli.add_command(init_db_command)


@click.command("init-db")
def init_db_command() -> None:
    """Create the tables (idempotent)."""
    Base.metadata.create_all(current_app.extensions["fedser_engine"])
    click.echo(f"schema ready at {time.strftime('%H:%M:%S')}")
