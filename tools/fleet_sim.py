"""Several aggregator hosts on one PostgreSQL, and a fleet of simulated devices against them.

    nice -n 10 python -m tools.fleet_sim [--devices 1000] [--hosts 2] [--interval 20] [--duration 60]
                                         [--min-updates 200] [--workers 2] [--kill-host-after S]
                                         [--out fleet-sim.json]

Each host is a separate ``fedser-aggregator serve`` (gunicorn) with its own instance folder and its own
address, all on one PostgreSQL database (a new, throwaway one: ``FEDSER_TEST_POSTGRES`` or
``postgresql://postgres@127.0.0.1:5432/postgres``). As root, each host is a real network host: a network
namespace joined to this one by a veth pair, with its own IP; the database is reached over the veth through
a small TCP relay on this side (PostgreSQL listens on 127.0.0.1 only). Without root (or without ``ip
netns``) the hosts are 127.0.0.1, 127.0.0.2, ... on loopback, and :attr:`Fleet.mode` says so.

The devices are *lightweight*: each has its own Ed25519 key, enrolls with a one-time token over HTTP, pins
the server key the enrollment returns, verifies every signed manifest it pulls with that key, and posts real
signed update envelopes (``edge_sdk.wire.UpdateEnvelope``, the bundled model's head layout, 34 KB) through
``edge_sdk.client.ServerClient``. They do not run the TFLite model (a thousand interpreters do not fit in
memory here); their deltas are small random numbers. The full device (``edge_sdk.device.Device``) against
two hosts is ``tests/integration/test_multihost.py``.

What it prints (and writes as JSON with ``--out``): offered and accepted updates/s, per host, refusals by
reason, rounds closed, database rows and bytes written, beside what docs/capacity.md's model predicts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

log = logging.getLogger("tools")

REPO = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get("FEDSER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


# -- the network: namespaces + veth pairs, or loopback addresses ----------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "not root (ip netns needs CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"fsprobe{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def loopback_unavailable(address: str) -> str | None:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
    except OSError as exc:
        return f"cannot bind {address}: {exc}"
    return None


@dataclass
class HostNet:
    """Where one host lives: its namespace (None on loopback), its address, and the database address it uses."""

    name: str
    address: str
    netns: str | None = None
    gateway: str | None = None  # this side of the veth pair (the database relay listens here)
    link: str | None = None  # this side's veth name


class Network:
    """``n`` host addresses: network namespaces with veth pairs (root), else 127.0.0.1, 127.0.0.2, ...

    Every name is unique per run (a random tag), and :meth:`close` removes what was made even after a failure
    half-way (it is safe to call twice). ``mode`` is ``"netns"`` or ``"loopback"``; ``why_not_netns`` says why
    namespaces were not used.
    """

    def __init__(self, n: int, *, prefer_netns: bool = True) -> None:
        self.tag = secrets.token_hex(3)
        self.hosts: list[HostNet] = []
        self.why_not_netns = netns_unavailable() if prefer_netns else "loopback asked for"
        self.mode = "netns" if self.why_not_netns is None else "loopback"
        try:
            if self.mode == "netns":
                self._make_namespaces(n)
            else:
                for i in range(n):
                    address = f"127.0.0.{i + 1}"
                    problem = loopback_unavailable(address)
                    if problem:
                        raise RuntimeError(problem)
                    self.hosts.append(HostNet(f"host{i}", address))
        except BaseException:
            self.close()
            raise

    def _free_subnet(self) -> int:
        """A second octet ``x`` such that 10.x.0.0/16 is in no route here."""
        routes = _ip("-4", "route", "show", "table", "all", check=False).stdout + _ip("-4", "addr").stdout
        for _ in range(100):
            x = random.randint(150, 250)
            if f"10.{x}." not in routes:
                return x
        raise RuntimeError("no free 10.x.0.0/16 for the veth pairs")

    @staticmethod
    def remove_stale_namespaces() -> list[str]:
        """Delete the namespaces of runs whose process is gone (a run killed before :meth:`close`: SIGKILL, a
        pytest timeout). A namespace is named ``fedser-<pid>-<tag>-<i>`` after the process that made it; one whose
        process still lives is left alone, so concurrent runs do not disturb each other. Returns the names removed."""
        removed = []
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            parts = name.split("-")
            if len(parts) != 4 or parts[0] != "fedser" or not parts[1].isdigit():
                continue
            try:
                os.kill(int(parts[1]), 0)
                continue  # its run is alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", name, check=False)  # takes its end of the veth pair, and so the pair
            removed.append(name)
        return removed

    def _make_namespaces(self, n: int) -> None:
        stale = self.remove_stale_namespaces()
        if stale:
            log.warning("removed %d network namespaces left by killed runs: %s", len(stale), ", ".join(stale))
        x = self._free_subnet()
        for i in range(n):
            ns = f"fedser-{os.getpid()}-{self.tag}-{i}"
            outside, inside = f"fs{self.tag}h{i}", f"fs{self.tag}n{i}"
            gateway, address = f"10.{x}.{i}.1", f"10.{x}.{i}.2"
            _ip("netns", "add", ns)
            self.hosts.append(HostNet(f"host{i}", address, ns, gateway, outside))
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("addr", "add", f"{gateway}/24", "dev", outside)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        for host in self.hosts:
            if host.netns is None:
                continue
            for pid in _ip("netns", "pids", host.netns, check=False).stdout.split():
                try:  # only processes in the namespace this run made: its hosts
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", host.netns, check=False)  # takes its end of the veth pair, and so the pair
            if host.link:
                _ip("link", "del", host.link, check=False)
        self.hosts = [h for h in self.hosts if h.netns is None]

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DatabaseRelay:
    """A TCP relay in its own process: each ``listen`` address's port ``port`` to ``target`` (PostgreSQL).

    In netns mode PostgreSQL listens on 127.0.0.1 only, which a namespace cannot reach; the hosts connect to
    their gateway address across the veth pair and the relay passes the bytes on. A host killed mid-transaction
    closes its socket; the relay closes the database side, and PostgreSQL rolls the transaction back.
    """

    def __init__(self, listen: list[str], port: int, target: tuple[str, int]) -> None:
        self.port = port
        cmd = [sys.executable, "-m", "tools.fleet_sim", "relay", "--target", f"{target[0]}:{target[1]}",
               "--port", str(port), *listen]
        self.process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        line = self.process.stdout.readline().decode()
        if not line.startswith("listening"):
            self.close()
            raise RuntimeError(f"the database relay did not start: {line!r}")

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def _relay_main(listen: list[str], port: int, target: str) -> int:
    import asyncio

    host, tport = target.rsplit(":", 1)

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(tport))
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def main():
        servers = [await asyncio.start_server(handle, address, port) for address in listen]
        print("listening", flush=True)
        await asyncio.gather(*(s.serve_forever() for s in servers))

    asyncio.run(main())
    return 0


# -- hosts ----------------------------------------------------------------------------------------------------


def new_postgres_database() -> str:
    """URL of a new, empty PostgreSQL database (raises when none is reachable)."""
    import psycopg

    name = f"fedser_multihost_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_postgres_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.Error as exc:
        log.warning("could not drop %s: %s", name, exc)


def _with_host(url: str, host: str, port: int) -> str:
    """``url`` (postgresql://user@host:port/db) pointed at ``host:port``."""
    scheme, rest = url.split("://", 1)
    user, rest = rest.split("@", 1) if "@" in rest else ("", rest)
    db = rest.split("/", 1)[1]
    return f"{scheme}://{user + '@' if user else ''}{host}:{port}/{db}"


def shared_settings(folder: Path) -> dict[str, str]:
    """The server key and admin token every host is given (one key file and one token file, mode 0600).

    Each host gets them through ``FEDSER_SERVER_KEY_FILE`` and ``FEDSER_ADMIN_TOKEN_FILE`` (the multi-host
    deployment in the README); :func:`host_settings`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    key_path, token_path = folder / "server_ed25519.pem", folder / "admin_token"
    if not key_path.exists():
        from edge_sdk.signing import SigningKey
        from edge_sdk.storage import atomic_write

        SigningKey.generate().save(key_path)
        atomic_write(token_path, secrets.token_urlsafe(32).encode(), mode=0o600)
    return {"key_file": str(key_path), "token_file": str(token_path),
            "admin_token": token_path.read_text().strip()}


def aggregator_has_shared_settings() -> bool:
    """Whether this aggregator reads the server key and admin token from configuration (SERVER_KEY_FILE)."""
    from aggregator import DEFAULTS

    return "SERVER_KEY_FILE" in DEFAULTS


def host_settings(instance: Path, shared: dict[str, str]) -> dict[str, str]:
    """The ``FEDSER_*`` variables of one host. An aggregator older than the shared settings gets copies of
    the key and token files in its instance folder instead (it reads only those)."""
    instance.mkdir(parents=True, exist_ok=True)
    if aggregator_has_shared_settings():
        return {"FEDSER_SERVER_KEY_FILE": shared["key_file"], "FEDSER_ADMIN_TOKEN_FILE": shared["token_file"]}
    shutil.copy2(shared["key_file"], instance / "server_ed25519.pem")
    shutil.copy2(shared["token_file"], instance / "admin_token")
    return {}


@dataclass
class Host:
    net: HostNet
    port: int
    instance: Path
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.net.address}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL to the master and every worker (its process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Fleet:
    """``n`` aggregator hosts on one PostgreSQL database; a context manager that removes everything it made."""

    workdir: Path
    n_hosts: int = 2
    workers: int = 2
    threads: int | None = None
    env: dict = field(default_factory=dict)
    prefer_netns: bool = True
    database_url: str | None = None  # default: a new throwaway database, dropped at close

    def __post_init__(self) -> None:
        self.hosts: list[Host] = []
        self.network: Network | None = None
        self.relay: DatabaseRelay | None = None
        self._own_database = self.database_url is None
        self.shared = shared_settings(self.workdir / "shared")
        self.admin_token = self.shared["admin_token"]

    def live_hosts(self) -> list[Host]:
        return [h for h in self.hosts if h.alive]

    @property
    def mode(self) -> str:
        return self.network.mode if self.network else "none"

    def __enter__(self) -> Fleet:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self.database_url is None:
            self.database_url = new_postgres_database()
        self.network = Network(self.n_hosts, prefer_netns=self.prefer_netns)
        if self.network.mode == "netns":
            self.relay = DatabaseRelay([h.gateway for h in self.network.hosts], 5432, ("127.0.0.1", 5432))
        for net in self.network.hosts:
            instance = self.workdir / f"{net.name}" / "instance"
            instance.mkdir(parents=True, exist_ok=True)
            self.hosts.append(Host(net, 8080 if net.netns else _free_port(net.address), instance))
        for host in self.hosts:
            self.start_host(host)

    def host_database_url(self, host: Host) -> str:
        if host.net.netns is None:
            return self.database_url
        return _with_host(self.database_url, host.net.gateway, self.relay.port)

    def start_host(self, host: Host, *, timeout: float = 60) -> None:
        """Start (or restart) ``host``'s gunicorn; returns once its /healthz answers."""
        env = dict(os.environ, **{k: str(v) for k, v in self.env.items()},
                   **host_settings(host.instance, self.shared))
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        cmd = [sys.executable, "-m", "aggregator.cli", "--instance", str(host.instance), "--database-url",
               self.host_database_url(host), "serve", "--host", host.net.address, "--port", str(host.port),
               "--workers", str(self.workers)]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if host.net.netns:
            cmd = ["ip", "netns", "exec", host.net.netns, *cmd]
        host.log_path = host.instance.parent / "aggregator.log"
        with open(host.log_path, "ab") as log_file:
            host.process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if host.process.poll() is not None:
                raise RuntimeError(f"{host.net.name} exited with {host.process.returncode}: "
                                   f"{host.log_path.read_text()[-2000:]}")
            try:
                if requests.get(f"{host.base_url}/healthz", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        host.kill()
        raise RuntimeError(f"{host.net.name} did not answer /healthz within {timeout:g} s")

    def close(self) -> None:
        for host in self.hosts:
            try:
                host.stop()
            except Exception:  # keep cleaning up
                log.exception("stopping %s", host.net.name)
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self.network is not None:
            self.network.close()
        if self._own_database and self.database_url:
            drop_postgres_database(self.database_url)
            self.database_url = None

    # -- admin calls, to any host --------------------------------------------------------------------------
    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def admin(self, host: Host, method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, f"{host.base_url}/api/v1/admin{path}", headers=self.auth,
                                timeout=kwargs.pop("timeout", 60), **kwargs)

    def status(self, host: Host) -> dict:
        r = self.admin(host, "GET", "/status", timeout=30)
        r.raise_for_status()
        return r.json()

    def publish(self, host: Host, tflite: Path, metadata: Path) -> int:
        with open(tflite, "rb") as t, open(metadata, "rb") as m:
            r = self.admin(host, "POST", "/models", files={"tflite": t, "metadata": m})
        if r.status_code != 201:
            raise RuntimeError(f"publish on {host.net.name}: HTTP {r.status_code} {r.text[:500]}")
        return r.json()["version"]

    def token(self, host: Host) -> str:
        r = self.admin(host, "POST", "/enrollment-tokens", json={})
        r.raise_for_status()
        return r.json()["token"]


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


# -- the capacity model (docs/capacity.md) ------------------------------------------------------------------


@dataclass(frozen=True)
class CapacityModel:
    """docs/capacity.md's arithmetic, so that the simulation prints its predictions beside what it measured.

    ``row_overhead``: bytes an accepted update costs in PostgreSQL besides its body (the row of ``updates``
    with its five indexes, the TOAST chunk headers of the body); ``body_factor``: TOAST's bytes per body byte
    (random float32 does not compress; each ~2 KB chunk carries a header). Both measured (docs/capacity.md).
    """

    devices: int
    interval_s: float  # mean seconds between one device's updates
    update_bytes: int  # the body: the head's float32 deltas
    hosts: int
    per_host_intake: float  # accepted updates/s one host sustains (tools.bench_aggregator)
    min_updates: int  # K: updates per round
    row_overhead: int = 600
    body_factor: float = 8192 / (4 * 1996)  # TOAST: four 1,996-byte chunks (and their headers) per 8 KB page
    head_bytes: int | None = None  # a version's head file (kept while referenced); default update_bytes

    @property
    def offered(self) -> float:
        return self.devices / self.interval_s

    @property
    def capacity(self) -> float:
        return self.hosts * self.per_host_intake

    @property
    def posting_share(self) -> float:
        """Share of syncs that post: a device sends one update per version, so a sync posts only if a round
        closed since its last accepted update. Syncs come every Exp(interval) seconds, rounds every P = K /
        accepted seconds: the chance is E[min(1, gap / P)] = (interval / P)(1 - exp(-P / interval)), solved
        together with accepted = min(offered x share, capacity) by iteration."""
        import math

        rate = min(self.offered, self.capacity)
        share = 1.0
        for _ in range(50):
            period = self.min_updates / rate
            share = (self.interval_s / period) * (1 - math.exp(-period / self.interval_s))
            rate = min(self.offered * share, self.capacity)
        return share

    @property
    def accepted(self) -> float:
        return min(self.offered * self.posting_share, self.capacity)

    @property
    def toast_chunks(self) -> int:
        """PostgreSQL stores a body over ~2 KB out of line, in chunks of 1,996 bytes (TOAST_MAX_CHUNK_SIZE)."""
        return -(-self.update_bytes // 1996)

    @property
    def hosts_needed(self) -> int:
        return max(1, -(-int(self.offered * 1000) // int(self.per_host_intake * 1000)))

    @property
    def rounds_per_s(self) -> float:
        return self.accepted / self.min_updates

    @property
    def bytes_per_update(self) -> float:
        return self.update_bytes * self.body_factor + self.row_overhead

    @property
    def writes_per_s(self) -> float:
        """Row writes: an update is one INSERT (updates) and one UPDATE (devices); a close adds about six
        (the round claimed, then closed; the version row; the current flag moved; the next round; the head file)."""
        return 2 * self.accepted + 6 * self.rounds_per_s

    @property
    def tuples_per_s(self) -> float:
        """The same counted as PostgreSQL does (pg_stat_database): each body's TOAST chunks are rows too, and so
        are the head file's (a row of ``blobs``)."""
        return (2 + self.toast_chunks) * self.accepted + (6 + self.toast_chunks) * self.rounds_per_s

    def bytes_per_day(self) -> float:
        return self.accepted * 86400 * self.bytes_per_update + self.rounds_per_s * 86400 * (
            self.head_bytes or self.update_bytes)

    def steady_storage(self, body_days: float = 7.0) -> dict:
        """Bytes held once ``prune`` runs daily: bodies of the last ``body_days`` days (plus a day between
        prunes), and what grows for ever: each update's row, each version's head."""
        per_day = self.accepted * 86400
        return {"update_bodies": per_day * (body_days + 1) * self.update_bytes * self.body_factor,
                "rows_per_day": per_day * self.row_overhead,
                "heads_per_day": self.rounds_per_s * 86400 * (self.head_bytes or self.update_bytes)}

    def to_dict(self) -> dict:
        return {"offered_updates_per_s": self.offered, "capacity_updates_per_s": self.capacity,
                "posting_share": self.posting_share, "accepted_updates_per_s": self.accepted,
                "db_tuples_per_s": self.tuples_per_s, "hosts_needed": self.hosts_needed,
                "rounds_per_s": self.rounds_per_s, "db_row_writes_per_s": self.writes_per_s,
                "bytes_per_update": self.bytes_per_update, "db_bytes_per_s": self.accepted * self.bytes_per_update
                + self.rounds_per_s * (self.head_bytes or self.update_bytes), "db_bytes_per_day": self.bytes_per_day()}


# -- lightweight devices ------------------------------------------------------------------------------------


@dataclass
class SimDevice:
    """A device without a model: its own key, the server key it pinned, the version it knows, its sequence."""

    index: int
    key: object
    device_id: str = ""
    pinned: object = None
    version: int = 0
    etag: str | None = None
    head_sha256: str = ""
    sequence: int = 0
    accepted_on: int = -1  # the version its last accepted update was made on
    client: dict = field(default_factory=dict)  # host name -> ServerClient
    busy: threading.Lock = field(default_factory=threading.Lock)  # one sync at a time, like a real device


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: dict = field(default_factory=dict)  # host -> count
    duplicates: int = 0
    refused: dict = field(default_factory=dict)  # reason -> count
    errors: dict = field(default_factory=dict)
    first_error: dict = field(default_factory=dict)  # kind -> its first message
    posts: int = 0
    skipped_busy: int = 0  # syncs due while the device's previous one was still running (not started)
    first_posts: int = 0  # syncs that posted (a retry after stale_base is not counted again)
    pulls: int = 0
    new_versions_installed: int = 0
    blob_bytes: int = 0
    verify_failures: int = 0
    closes_triggered: dict = field(default_factory=dict)  # host -> rounds its posts closed
    latencies: list = field(default_factory=list)
    lag: list = field(default_factory=list)

    def add(self, table: str, key: str, n: int = 1) -> None:
        with self.lock:
            d = getattr(self, table)
            d[key] = d.get(key, 0) + n


_SESSIONS: dict[str, requests.Session] = {}
_SESSIONS_LOCK = threading.Lock()


def _session(host: Host, pool: int = 64) -> requests.Session:
    """One keep-alive connection pool per host, shared by the simulated devices (a load generator's economy:
    a thousand devices would each open their own connection)."""
    with _SESSIONS_LOCK:
        if host.base_url not in _SESSIONS:
            session = requests.Session()
            session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=pool))
            _SESSIONS[host.base_url] = session
        return _SESSIONS[host.base_url]


def _client_for(dev: SimDevice, host: Host):
    from edge_sdk.client import ServerClient

    if host.net.name not in dev.client:
        dev.client[host.net.name] = ServerClient(host.base_url, timeout=60, session=_session(host),
                                                 device_id=dev.device_id or None,
                                                 sign=dev.key.sign if dev.device_id else None)
    return dev.client[host.net.name]


def _install(dev: SimDevice, signed_bytes: bytes, host: Host, tally: Tally) -> None:
    """Verify a signed manifest with the pinned key; fetch and check the head file of a new version."""
    import hashlib

    from edge_sdk.manifest import SignedManifest

    try:
        manifest = SignedManifest.from_bytes(signed_bytes, dev.pinned.verify).manifest
    except Exception:
        with tally.lock:
            tally.verify_failures += 1
        raise
    if manifest.version <= dev.version:
        return
    if manifest.head.sha256 != dev.head_sha256:
        data = _client_for(dev, host).get_blob(manifest.head.url, size=manifest.head.size)
        if hashlib.sha256(data).hexdigest() != manifest.head.sha256:
            with tally.lock:
                tally.verify_failures += 1
            raise RuntimeError("head file does not match its manifest")
        dev.head_sha256 = manifest.head.sha256
        with tally.lock:
            tally.blob_bytes += len(data)
    dev.version = manifest.version
    with tally.lock:
        tally.new_versions_installed += 1


def _enroll(fleet: Fleet, dev: SimDevice, home: Host, tally: Tally, layout_box: dict) -> None:
    from edge_sdk.client import ServerClient
    from edge_sdk.signing import VerifyKey

    client = ServerClient(home.base_url, timeout=60, session=_session(home))
    reply = client.enroll(token=fleet.token(home), public_key=dev.key.verify_key.to_b64(), name=f"sim{dev.index}")
    dev.device_id = reply["device_id"]
    dev.pinned = VerifyKey.from_b64(reply["server_public_key"])
    if reply.get("manifest"):
        from edge_sdk.manifest import SignedManifest

        raw = json.dumps(reply["manifest"]).encode()
        manifest = SignedManifest.from_bytes(raw, dev.pinned.verify).manifest
        layout_box.setdefault("layout", manifest.metadata.head_layout)
        _install(dev, raw, home, tally)


def _pull(dev: SimDevice, host: Host, tally: Tally) -> bool:
    """Fetch the manifest from ``host`` and install it when it changed; False (counted) when the pull failed."""
    from edge_sdk.errors import ServerError

    try:
        data, etag = _client_for(dev, host).get_manifest(dev.etag)
        with tally.lock:
            tally.pulls += 1
        if data is not None:
            _install(dev, data, host, tally)
            dev.etag = etag
    except ServerError as exc:
        tally.add("errors", f"pull:{exc.reason}")
        tally.first_error.setdefault(f"pull:{exc.reason}", str(exc)[:300])
        return False
    return True


def _one_sync(fleet: Fleet, dev: SimDevice, rng, tally: Tally, layout, scale: float = 0.01) -> None:
    """What a device does every interval: pull the manifest (one host), post an update (another)."""


    pull_host, post_host = rng.sample(fleet.live_hosts(), 2) if len(fleet.live_hosts()) > 1 else (
        fleet.live_hosts()[0],) * 2
    if not _pull(dev, pull_host, tally):
        return
    if dev.accepted_on >= dev.version:  # this version's round already holds this device's update
        return
    with tally.lock:
        tally.first_posts += 1
    for attempt in range(2):
        outcome = _post(dev, post_host, tally, layout, scale)
        if outcome != "stale_base" or attempt:
            return
        # Refused because a round closed (or was closing) meanwhile: pull the new version, post again on it
        # (what edge_sdk.device.Device.sync does).
        if not _pull(dev, pull_host, tally):
            return


def _post(dev: SimDevice, post_host: Host, tally: Tally, layout, scale: float) -> str:
    import numpy as np

    from edge_sdk.errors import ServerError
    from edge_sdk.wire import UpdateEnvelope

    dev.sequence += 1
    nprng = np.random.default_rng(dev.index * 100003 + dev.sequence)
    deltas = {s.name: (scale * nprng.standard_normal(s.shape)).astype(np.float32) for s in layout}
    env = UpdateEnvelope.create(device_id=dev.device_id, base_version=dev.version, layout=layout, deltas=deltas,
                                num_examples=int(nprng.integers(5, 40)), sequence=dev.sequence, sign=dev.key.sign)
    started = time.perf_counter()
    try:
        reply = _client_for(dev, post_host).post_update(env.to_bytes())
    except ServerError as exc:
        with tally.lock:
            tally.posts += 1
        if exc.status is None or exc.status >= 500:
            tally.add("errors", f"post:{exc.reason}")
            tally.first_error.setdefault(f"post:{exc.reason}", str(exc)[:300])
        else:
            tally.add("refused", exc.reason)
            if exc.reason == "already_contributed":
                dev.accepted_on = dev.version
        return exc.reason
    with tally.lock:
        tally.posts += 1
        tally.latencies.append(time.perf_counter() - started)
    if reply.get("duplicate"):
        with tally.lock:
            tally.duplicates += 1
    else:
        tally.add("accepted", post_host.net.name)
    dev.accepted_on = dev.version
    if reply.get("round_closed"):
        tally.add("closes_triggered", post_host.net.name)
    return "accepted"


def _db_counters(url: str) -> dict:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url, autocommit=True) as conn:
        stats = conn.execute("SELECT tup_inserted, tup_updated, tup_deleted, xact_commit FROM pg_stat_database "
                             "WHERE datname = %s", (name,)).fetchone()
        tables = dict(conn.execute(
            "SELECT relname, pg_total_relation_size(relid) FROM pg_stat_user_tables").fetchall())
        rows = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: S608 (our table names)
                for t in ("updates", "rounds", "model_versions", "devices", "refusals")}
        closed = conn.execute("SELECT count(*) FROM rounds WHERE status = 'closed'").fetchone()[0]
        wal = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
        heap, toast, indexes = conn.execute(
            "SELECT pg_relation_size(c.oid), pg_total_relation_size(c.reltoastrelid), pg_indexes_size(c.oid) "
            "FROM pg_class c WHERE c.relname = 'updates'").fetchone()
        size = conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()[0]
    hi, lo = wal.split("/")
    return {"inserted": stats[0], "updated": stats[1], "deleted": stats[2], "commits": stats[3],
            "table_bytes": tables, "rows": rows, "rounds_closed": closed, "wal_lsn": (int(hi, 16) << 32) + int(lo, 16),
            "database_bytes": size, "updates_parts": {"heap": heap, "toast": toast, "indexes": indexes}}


def _cpu_seconds(pids) -> float:
    """utime + stime of these processes (and of their reaped children), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / tick


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def _cpu_snapshot(fleet: Fleet) -> dict:
    """CPU seconds so far: each host's gunicorn (master and workers), the PostgreSQL backends serving this
    database, this process (the simulated devices) and the database relay."""
    import resource

    import psycopg

    name = fleet.database_url.rsplit("/", 1)[1]
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        backends = {r[0]: _cpu_seconds([r[0]]) for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid != pg_backend_pid()", (name,)).fetchall()}
    me = resource.getrusage(resource.RUSAGE_SELF)
    return {"hosts": {h.net.name: _cpu_seconds(_group_pids(h.process.pid)) for h in fleet.hosts if h.alive},
            "postgres_backends": backends, "devices_process": me.ru_utime + me.ru_stime,
            "relay": _cpu_seconds(_group_pids(fleet.relay.process.pid)) if fleet.relay else 0.0}


def _cpu_delta(after: dict, before: dict) -> dict:
    # backends that existed at both ends (a backend that came and went meanwhile is not seen: a lower bound)
    pg = sum(v - before["postgres_backends"].get(pid, 0.0) for pid, v in after["postgres_backends"].items())
    return {"hosts": {k: v - before["hosts"].get(k, 0.0) for k, v in after["hosts"].items()},
            "postgres": pg, "devices_process": after["devices_process"] - before["devices_process"],
            "relay": after["relay"] - before["relay"]}


def _delta(after: dict, before: dict) -> dict:
    out = {}
    for k, v in after.items():
        if isinstance(v, dict):
            out[k] = {t: v[t] - before[k].get(t, 0) for t in v}
        elif isinstance(v, (int, float)):
            out[k] = v - before[k]
    return out


def simulate(args) -> dict:
    from edge_sdk.model import ModelMetadata, bundled_model_paths
    from edge_sdk.signing import SigningKey

    paths = bundled_model_paths()
    if paths is None:
        raise SystemExit("no bundled model in edge_sdk/data: the simulation posts updates of its head layout")
    update_bytes = ModelMetadata.load(paths[1]).head_layout.nbytes
    workdir = Path(args.workdir or f"/tmp/fedser-fleet-{secrets.token_hex(3)}")
    env = {"FEDSER_ROUND_MIN_UPDATES": str(args.min_updates), "FEDSER_LOG_JSON": "0"}
    rng = random.Random(args.seed)
    tally = Tally()
    report: dict = {"command": "python -m tools.fleet_sim " + " ".join(sys.argv[1:]), "seed": args.seed}
    with Fleet(workdir, n_hosts=args.hosts, workers=args.workers, threads=args.threads, env=env,
               prefer_netns=not args.loopback) as fleet:
        report["network"] = {"mode": fleet.mode, "hosts": [h.base_url for h in fleet.hosts],
                             "why_not_netns": fleet.network.why_not_netns}
        print(f"[fleet] {args.hosts} hosts ({fleet.mode}): {', '.join(h.base_url for h in fleet.hosts)}; "
              f"database {fleet.database_url.rsplit('/', 1)[1]}", flush=True)
        fleet.publish(fleet.hosts[0], *paths)
        devices = [SimDevice(i, SigningKey.generate()) for i in range(args.devices)]
        layout_box: dict = {}
        started = time.perf_counter()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda d: _enroll(fleet, d, fleet.hosts[d.index % len(fleet.hosts)], tally, layout_box),
                          devices))
        enroll_s = time.perf_counter() - started
        report["enrollment"] = {"devices": len(devices), "seconds": enroll_s, "per_s": len(devices) / enroll_s,
                                "pinned_keys": len({d.pinned.to_b64() for d in devices})}
        print(f"[fleet] {len(devices)} devices enrolled in {enroll_s:.1f} s ({len(devices) / enroll_s:.0f}/s), "
              f"spread over the hosts; {report['enrollment']['pinned_keys']} distinct pinned key(s)", flush=True)
        layout = layout_box["layout"]
        before = _db_counters(fleet.database_url)
        cpu_before = _cpu_snapshot(fleet)
        # Open loop: every device syncs every `interval` seconds (exponential gaps), whatever the servers' pace.
        import heapq

        t0 = time.perf_counter()
        queue = [(t0 + rng.expovariate(1 / args.interval), d.index) for d in devices]
        heapq.heapify(queue)
        end = t0 + args.duration
        killed = {}
        if args.kill_host_after is not None:  # SIGKILL the last host mid-run; the "load balancer" drops it
            def kill_last():
                victim = fleet.hosts[-1]
                with tally.lock:
                    killed.update(host=victim.net.name, at_s=time.perf_counter() - t0,
                                  accepted_before=dict(tally.accepted))
                victim.kill()

            killer = threading.Timer(args.kill_host_after, kill_last)
            killer.start()
        lock = threading.Lock()
        pool = ThreadPoolExecutor(args.concurrency)
        futures = []
        while queue and queue[0][0] < end:
            due, index = heapq.heappop(queue)
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            dev = devices[index]
            if dev.busy.acquire(blocking=False):  # else its previous sync is still queued or running: skipped

                def job(dev=dev, due=due):
                    with lock:  # how late the sync starts: the scheduler's and the pool's queue together
                        tally.lag.append(time.perf_counter() - due)
                    try:
                        _one_sync(fleet, dev, random.Random(rng.random()), tally, layout)
                    except Exception as exc:  # counted, the run goes on
                        tally.add("errors", type(exc).__name__)
                        tally.first_error.setdefault(type(exc).__name__, str(exc)[:300])
                    finally:
                        dev.busy.release()

                futures.append(pool.submit(job))
            else:
                with tally.lock:
                    tally.skipped_busy += 1
            heapq.heappush(queue, (due + rng.expovariate(1 / args.interval), index))
        # At the end: what started finishes, what is still queued is not started (an overloaded run stops on
        # time instead of draining a backlog).
        pool.shutdown(wait=True, cancel_futures=True)
        not_started = sum(f.cancelled() for f in futures)
        elapsed = time.perf_counter() - t0
        after = _db_counters(fleet.database_url)
        cpu = _cpu_delta(_cpu_snapshot(fleet), cpu_before)
        per_host = {h.net.name: tally.accepted.get(h.net.name, 0) for h in fleet.hosts}
        lat = sorted(tally.latencies)
        accepted = sum(per_host.values())
        db = _delta(after, before)
        measured = {
            "seconds": elapsed, "duration": args.duration,
            "killed": killed, "syncs_due": len(futures) + tally.skipped_busy, "syncs_skipped_busy": tally.skipped_busy,
            "syncs_not_started_by_the_end": not_started, "posts": tally.posts, "pulls": tally.pulls,
            "posting_share": tally.first_posts / max(1, len(futures) - not_started),
            "accepted": accepted, "accepted_per_s": accepted / elapsed, "per_host": per_host,
            "per_host_per_s": {k: v / elapsed for k, v in per_host.items()},
            "duplicates": tally.duplicates, "refused": tally.refused, "errors": tally.errors,
            "first_error": tally.first_error,
            "cpu_seconds": cpu, "cpu_ms_per_accepted_update": {
                "hosts": 1000 * sum(cpu["hosts"].values()) / max(1, accepted),
                "postgres": 1000 * cpu["postgres"] / max(1, accepted),
                "devices_process": 1000 * cpu["devices_process"] / max(1, accepted)},
            "rounds_closed": db["rounds_closed"], "closes_triggered_per_host": tally.closes_triggered,
            "versions_installed_by_devices": tally.new_versions_installed, "head_bytes_downloaded": tally.blob_bytes,
            "manifest_verify_failures": tally.verify_failures,
            "post_latency_ms": {"p50": 1000 * lat[len(lat) // 2], "p99": 1000 * lat[int(len(lat) * 0.99)]}
            if lat else {},
            "schedule_lag_s_p99": sorted(tally.lag)[int(len(tally.lag) * 0.99)] if tally.lag else None,
            "db": {"rows_inserted": db["inserted"], "rows_updated": db["updated"], "commits": db["commits"],
                   "row_writes_per_s": (db["inserted"] + db["updated"]) / elapsed,
                   "new_rows": db["rows"], "table_bytes": {k: v for k, v in db["table_bytes"].items() if v},
                   "updates_table_parts": db["updates_parts"],
                   "database_bytes": db["database_bytes"], "wal_bytes": db["wal_lsn"],
                   "bytes_per_accepted_update": db["table_bytes"].get("updates", 0) / max(1, accepted)},
        }
        # Totals over the whole database, against the rows: nothing counted twice.
        import psycopg

        with psycopg.connect(fleet.database_url, autocommit=True) as conn:
            measured["consistency"] = {
                "rounds_whose_count_differs_from_rows": conn.execute(
                    "SELECT count(*) FROM rounds r WHERE r.status = 'closed' AND r.num_updates != "
                    "(SELECT count(*) FROM updates u WHERE u.round_id = r.id)").fetchone()[0],
                "devices_whose_count_differs_from_rows": conn.execute(
                    "SELECT count(*) FROM devices d WHERE d.updates_accepted != "
                    "(SELECT count(*) FROM updates u WHERE u.device_id = d.id)").fetchone()[0],
                "updates_rows": conn.execute("SELECT count(*) FROM updates").fetchone()[0]}
    model = CapacityModel(devices=args.devices, interval_s=args.interval, update_bytes=update_bytes,
                          hosts=args.hosts, per_host_intake=args.per_host_intake, min_updates=args.min_updates)
    report["model"] = model.to_dict()
    report["measured"] = measured
    return report


def _print(report: dict) -> None:
    m, p = report["measured"], report["model"]
    db = m["db"]
    print(f"\n{'':34}{'model':>14}{'measured':>14}")
    rows = [
        ("offered syncs/s", p["offered_updates_per_s"], m["syncs_due"] / m["duration"]),
        ("accepted updates/s", p["accepted_updates_per_s"], m["accepted_per_s"]),
        ("rounds closed", p["rounds_per_s"] * m["seconds"], m["rounds_closed"]),
        ("share of syncs that post", p["posting_share"], m["posting_share"]),
        ("DB tuples written/s (with TOAST)", p["db_tuples_per_s"], db["row_writes_per_s"]),
        ("DB bytes per accepted update", p["bytes_per_update"], db["bytes_per_accepted_update"]),
        ("DB bytes/s (tables)", p["db_bytes_per_s"], sum(db["table_bytes"].values()) / m["seconds"]),
    ]
    for name, predicted, measured in rows:
        print(f"{name:34}{predicted:>14,.1f}{measured:>14,.1f}")
    print(f"per host accepted/s: {', '.join(f'{k} {v:.1f}' for k, v in m['per_host_per_s'].items())}; "
          f"closes by host: {m['closes_triggered_per_host']}")
    print(f"refused: {m['refused'] or 'none'}; errors: {m['errors'] or 'none'}; duplicates {m['duplicates']}; "
          f"syncs skipped (the device's previous one still queued or running) {m['syncs_skipped_busy']}, "
          f"not started by the end {m['syncs_not_started_by_the_end']}; "
          f"post latency p50 {m['post_latency_ms'].get('p50', 0):.0f} ms, "
          f"p99 {m['post_latency_ms'].get('p99', 0):.0f} ms; schedule lag p99 {m['schedule_lag_s_p99']:.2f} s")
    print(f"devices installed {m['versions_installed_by_devices']} new versions ({m['head_bytes_downloaded']:,} head "
          f"bytes), manifest verify failures {m['manifest_verify_failures']}; WAL {db['wal_bytes']:,} bytes "
          f"(whole cluster); consistency {m['consistency']}")
    if m["killed"]:
        k = m["killed"]
        print(f"killed {k['host']} at {k['at_s']:.1f} s (it had accepted {k['accepted_before'].get(k['host'], 0)}; "
              f"all hosts then {sum(k['accepted_before'].values())})")
    c = m["cpu_ms_per_accepted_update"]
    print(f"CPU per accepted update (its pulls, downloads and closes included): hosts {c['hosts']:.1f} ms, "
          f"PostgreSQL {c['postgres']:.1f} ms, simulated devices {c['devices_process']:.1f} ms; "
          f"so one core of host CPU takes {1000 / max(c['hosts'], 1e-9):.0f} updates/s")
    for kind, message in m["first_error"].items():
        print(f"first {kind}: {message}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["relay"]:
        p = argparse.ArgumentParser(prog="python -m tools.fleet_sim relay")
        p.add_argument("--target", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("listen", nargs="+")
        a = p.parse_args(argv[1:])
        return _relay_main(a.listen, a.port, a.target)
    parser = argparse.ArgumentParser(prog="python -m tools.fleet_sim", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--interval", type=float, default=20.0, help="mean seconds between one device's syncs")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load after enrollment")
    parser.add_argument("--min-updates", type=int, default=200, help="ROUND_MIN_UPDATES (K)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per host")
    parser.add_argument("--threads", type=int, default=None, help="threads per worker (default: serve's)")
    parser.add_argument("--concurrency", type=int, default=32, help="device requests in flight at once")
    parser.add_argument("--per-host-intake", type=float, default=206.0,
                        help="accepted updates/s one host sustains, for the model (tools.bench_aggregator)")
    parser.add_argument("--kill-host-after", type=float, default=None, metavar="S",
                        help="SIGKILL the last host S seconds into the load (its requests in flight fail; the rest "
                             "go to the hosts still up)")
    parser.add_argument("--loopback", action="store_true", help="hosts on 127.0.0.x even as root")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = simulate(args)
    _print(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
