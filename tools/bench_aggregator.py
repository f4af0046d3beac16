"""Aggregator benchmarks: signed-update intake under load, and closing a large round.

    python -m tools.bench_aggregator [--updates 3000] [--concurrency 16] [--workers 2] [--threads N]
                                     [--db sqlite,postgresql] [--close-updates 1000,10000]
                                     [--py-spy PREFIX] [--out bench-aggregator.json]

Intake: one aggregator host (``fedser-aggregator serve``: gunicorn, ``--workers``
processes) on loopback; a *separate process* posts pre-signed updates (a head
of about 20 k parameters, one update per device, K larger than the run so no
round closes) over ``--concurrency`` keep-alive connections, and reports
accepted updates per second and latency percentiles beside the targets
(>= 300 accepted/s per host, p99 < 250 ms). The load generator shares the
machine's cores with the server: the CPU seconds per accepted update of the
server, of the load generator and of PostgreSQL are reported, and so are the
machine's cores and its load average when the run started (numbers from a
loaded machine are not comparable with a quiet one's). ``--py-spy PREFIX``
records the server's workers with py-spy (if installed) into
``PREFIX-<db>.txt`` (collapsed stacks).

Close: a round holding N accepted updates (rows written straight to the
database) is closed in-process; prints seconds and the peak Python memory of
the close, for each N, so that "memory flat in N" can be read off.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

EMBEDDING, HIDDEN, CLASSES = 128, 150, 4  # head: 128*150 + 150 + 150*4 + 4 = 19,954 parameters


def make_model(out: Path, *, trainable_embedding: bool = False) -> tuple[Path, Path]:
    """A small encoder with a ~20 k-parameter head, exported as a real trainable .tflite (with
    ``trainable_embedding``, the encoder's embedding layer joins the head: 6 arrays, 24,178 parameters)."""
    from edge_sdk.features import FeatureConfig, Normalization
    from edge_sdk.model import ModelMetadata
    from models.architectures import build_encoder, build_head, preset
    from models.export import export_tflite, head_layout

    cfg = preset("dnn", channels=(16,), embedding_dim=EMBEDDING, head_units=HIDDEN)
    feats = FeatureConfig(max_frames=50)
    enc, head = build_encoder(cfg, feats.max_frames, feats.n_features), build_head(cfg, CLASSES)
    hw = {"w0": head.get_layer("head_hidden").kernel.numpy(), "b0": head.get_layer("head_hidden").bias.numpy(),
          "w1": head.get_layer("head_logits").kernel.numpy(), "b1": head.get_layer("head_logits").bias.numpy()}
    meta = ModelMetadata(labels=("angry", "happy", "neutral", "sad"), features=feats,
                         normalization=Normalization(np.zeros(40), np.ones(40)),
                         head_layout=head_layout(EMBEDDING, HIDDEN, CLASSES), embedding_dim=EMBEDDING,
                         train_batch_size=8, architecture="dnn")
    res = export_tflite(enc, hw, meta, out, trainable_embedding=trainable_embedding)
    return res.tflite_path, res.metadata_path


def _app(instance: Path, database_url: str | None, **config):
    from aggregator import create_app

    cfg = {"INSTANCE_PATH": str(instance), "LOG_JSON": False, **config}
    if database_url:
        cfg["DATABASE_URL"] = database_url
    return create_app(cfg)


def prepare(instance: Path, database_url: str | None, tflite: Path, meta: Path, n_devices: int) -> list[bytes]:
    """Publish the model, register devices straight in the database, and sign one update per device."""
    from aggregator.db import Device
    from aggregator.registry import publish_base
    from edge_sdk.model import ModelMetadata
    from edge_sdk.signing import SigningKey
    from edge_sdk.wire import UpdateEnvelope

    app = _app(instance, database_url)
    metadata = ModelMetadata.load(meta)
    ext = app.extensions
    with ext["fedser_sessionmaker"]() as session:
        publish_base(session, ext["fedser_blobs"], ext["fedser_server_key"], tflite.read_bytes(), metadata)
        session.commit()
        rng = np.random.default_rng(0)
        envelopes, now = [], time.time()
        for _ in range(n_devices):
            key = SigningKey.generate()
            dev_id = f"dev-{uuid.uuid4().hex[:16]}"
            session.add(Device(id=dev_id, name="bench", public_key=key.verify_key.to_b64(), enrolled_at=now,
                               last_seen=now))
            deltas = {s.name: (0.01 * rng.standard_normal(s.shape)).astype(np.float32) for s in metadata.head_layout}
            envelopes.append(UpdateEnvelope.create(device_id=dev_id, base_version=1, layout=metadata.head_layout,
                                                   deltas=deltas, num_examples=10, sequence=1,
                                                   sign=key.sign).to_bytes())
        session.commit()
    app.extensions["fedser_engine"].dispose()
    return envelopes


def _cpu_seconds(pids) -> dict[int, float]:
    """User + system CPU seconds of each live process of ``pids`` (Linux ``/proc``; empty elsewhere)."""
    tick, out = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100, {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return out


def _cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two readings, of the processes alive at the second (new ones count from 0)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def _children(pid: int) -> list[int]:
    """``pid`` and its descendants (the gunicorn arbiter and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in task.read_text().split())
            except OSError:
                pass
    return out


def _postgres_pids() -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() == "postgres":
                pids.append(int(stat.parent.name))
        except (OSError, ValueError):
            pass
    return pids


def _load(url: str, envelopes: list[bytes], concurrency: int, queue: mp.Queue) -> None:
    """The load generator (its own process): post every envelope over keep-alive connections, time each."""
    import http.client
    import resource
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    local = threading.local()

    def post(body: bytes) -> tuple[int, float]:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        t0 = time.perf_counter()
        try:
            local.conn.request("POST", parts.path, body=body, headers={"Content-Type": "application/octet-stream"})
            resp = local.conn.getresponse()
            resp.read()
        except (http.client.HTTPException, OSError):
            local.conn.close()
            local.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            return 0, time.perf_counter() - t0
        return resp.status, time.perf_counter() - t0

    warm = envelopes[: concurrency * 2]
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, warm))
        queue.put("warm")
        usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        results = list(pool.map(post, envelopes[len(warm):]))
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    queue.put({"results": results, "wall": wall, "cpu_s": cpu})


def start_server(instance: Path, port: int, *, workers: int, threads: int | None, database_url: str | None,
                 env: dict) -> subprocess.Popen:
    """``fedser-aggregator serve`` in its own process group; returns once ``/healthz`` answers."""
    import urllib.request

    cmd = [sys.executable, "-m", "aggregator.cli", "--instance", str(instance)]
    if database_url:
        cmd += ["--database-url", database_url]
    cmd += ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    if threads:
        cmd += ["--threads", str(threads)]
    log_file = open(instance.parent / "aggregator.log", "ab")  # noqa: SIM115 (the server's, closed with it)
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"aggregator exited with {proc.returncode}; see {log_file.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("aggregator did not answer /healthz within 60 s")


def bench_intake(db: str, args, tflite: Path, meta: Path) -> dict:
    from tools.demo import free_port

    tmp = Path(tempfile.mkdtemp(prefix=f"fedser-bench-{db}-"))
    database_url = None
    if db == "postgresql":
        import psycopg

        name = f"fedser_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.postgres, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        database_url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
    instance = tmp / "instance"
    envelopes = prepare(instance, database_url, tflite, meta, args.updates)
    port = free_port()
    proc = start_server(instance, port, workers=args.workers, threads=args.threads, database_url=database_url,
                        env={"FEDSER_LOG_JSON": "0", "FEDSER_ROUND_MIN_UPDATES": str(10**9)})
    spy = None
    try:
        ctx = mp.get_context("spawn")
        queue: mp.Queue = ctx.Queue()
        loader = ctx.Process(target=_load, args=(f"http://127.0.0.1:{port}/api/v1/updates", envelopes,
                                                 args.concurrency, queue))
        loader.start()
        assert queue.get(timeout=600) == "warm"
        server_pids = _children(proc.pid)
        cpu0 = (_cpu_seconds(server_pids), _cpu_seconds(_postgres_pids() if database_url else []))
        py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if args.py_spy and py_spy:
            spy = subprocess.Popen([py_spy, "record", "--pid", str(proc.pid), "--subprocesses", "--nonblocking",
                                    "--format", "raw", "--rate", "100", "-o", f"{args.py_spy}-{db}.txt"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = queue.get(timeout=1800)
        cpu1 = (_cpu_seconds(server_pids), _cpu_seconds(_postgres_pids() if database_url else []))
        loader.join()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
        if database_url:
            import psycopg

            with psycopg.connect(args.postgres, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    codes = [c for c, _ in out["results"]]
    lat = sorted(t for _, t in out["results"])
    accepted = sum(1 for c in codes if c == 202)
    per = 1000 / max(accepted, 1)  # CPU milliseconds per accepted update
    return {"db": db, "workers": args.workers, "threads": args.threads, "concurrency": args.concurrency,
            "posted": len(codes), "accepted": accepted, "other_status": sorted({c for c in codes if c != 202}),
            "updates_per_s": accepted / out["wall"], "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[int(len(lat) * 0.99) - 1], "max_ms": 1000 * lat[-1],
            "mean_ms": 1000 * statistics.fmean(lat), "body_bytes": len(envelopes[0]), "wall_s": out["wall"],
            "cpu_ms_per_update": {"server": per * _cpu_used(cpu0[0], cpu1[0]),
                                  "load_generator": per * out["cpu_s"],
                                  "postgresql": per * _cpu_used(cpu0[1], cpu1[1]) if database_url else None}}


def environment() -> dict:
    """What the figures depend on: cores, the load already on them, the code."""
    import platform
    import sqlite3

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()
        except OSError:
            return ""

    return {"cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "git_commit": git("rev-parse", "--short", "HEAD"), "git_dirty": bool(git("status", "--porcelain",
                                                                                      "--untracked-files=no")),
            "sqlite_synchronous": os.environ.get("FEDSER_SQLITE_SYNCHRONOUS", "NORMAL")}


INTAKE_TARGET_PER_S, INTAKE_TARGET_P99_MS = 300.0, 250.0


def intake_line(r: dict, cpus: int) -> str:
    rate_ok = "met" if r["updates_per_s"] >= INTAKE_TARGET_PER_S else "NOT met"
    p99_ok = "met" if r["p99_ms"] < INTAKE_TARGET_P99_MS else "NOT met"
    cpu = r["cpu_ms_per_update"]
    pg = f", postgresql {cpu['postgresql']:.2f}" if cpu["postgresql"] is not None else ""
    return (f"intake {r['db']:10s} per host: {r['updates_per_s']:6.1f} accepted/s (target >= "
            f"{INTAKE_TARGET_PER_S:.0f}: {rate_ok})  p99 {r['p99_ms']:6.1f} ms (target < {INTAKE_TARGET_P99_MS:.0f}: "
            f"{p99_ok})  p50 {r['p50_ms']:.1f} ms  on {cpus} CPUs shared with the load generator\n"
            f"       {r['accepted']}/{r['posted']} accepted, {r['workers']} workers x "
            f"{r['threads'] or 'default'} threads, {r['concurrency']} connections, {r['body_bytes']} B bodies; "
            f"CPU ms per update: server {cpu['server']:.2f}, load generator {cpu['load_generator']:.2f}{pg}")


def bench_close(n: int, tflite: Path, meta: Path) -> dict:
    """Close a round of ``n`` updates (rows inserted directly); seconds and peak traced memory."""
    from sqlalchemy import insert

    from aggregator.db import Device, Round, Update
    from aggregator.rounds import RoundPolicy, close_round, open_round
    from edge_sdk.model import ModelMetadata
    from edge_sdk.wire import pack_arrays

    tmp = Path(tempfile.mkdtemp(prefix="fedser-bench-close-"))
    try:
        instance = tmp / "instance"
        prepare(instance, None, tflite, meta, 0)
        app = _app(instance, None)
        layout = ModelMetadata.load(meta).head_layout
        ext = app.extensions
        rng = np.random.default_rng(1)
        with ext["fedser_sessionmaker"]() as session:
            rnd = open_round(session)
            now = time.time()
            session.execute(insert(Device), [{"id": f"d{i}", "name": "", "public_key": f"k{i}", "enrolled_at": now,
                                              "last_sequence": 1, "revoked": False, "updates_accepted": 1,
                                              "updates_refused": 0} for i in range(n)])
            bodies = [pack_arrays(layout, {s.name: (0.01 * rng.standard_normal(s.shape)).astype(np.float32)
                                           for s in layout}) for _ in range(min(n, 64))]
            session.execute(insert(Update), [{"update_id": f"{i:064x}", "device_id": f"d{i}", "round_id": rnd.id,
                                              "base_version": 1, "sequence": 1, "num_examples": 10, "l2_norm": 1.0,
                                              "body": bodies[i % len(bodies)], "received_at": now, "staleness": 0}
                                             for i in range(n)])
            session.commit()
            rid = rnd.id
        with ext["fedser_sessionmaker"]() as session:
            tracemalloc.start()
            t0 = time.perf_counter()
            result = close_round(session, ext["fedser_blobs"], ext["fedser_server_key"], rid, policy=RoundPolicy())
            seconds = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert result.closed and result.num_updates == n, result
            assert session.get(Round, rid).status == "closed"
        return {"updates": n, "seconds": seconds, "peak_traced_mb": peak / 2**20,
                "body_kb": len(bodies[0]) / 1024}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_aggregator", description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="threads per worker (default: serve's)")
    parser.add_argument("--py-spy", default=None, metavar="PREFIX",
                        help="record the server with py-spy into PREFIX-<db>.txt (collapsed stacks)")
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--postgres", default=os.environ.get("FEDSER_TEST_POSTGRES",
                                                             "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--close-updates", default="1000,10000")
    parser.add_argument("--out", type=Path, default=Path("bench-aggregator.json"))
    parser.add_argument("--trainable-embedding", action="store_true",
                        help="the head includes the encoder's embedding layer (models.export, 6 arrays)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp:
        tflite, meta = make_model(Path(tmp), trainable_embedding=args.trainable_embedding)
        env = environment()
        report = {"environment": env, "cpu_count": env["cpu_count"], "intake": [], "close": []}
        load = env["loadavg_at_start"]
        print(f"{env['cpu_count']} CPUs, load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
              f"(code {env['git_commit']}{' + local changes' if env['git_dirty'] else ''})", flush=True)
        for db in filter(None, args.db.split(",")):
            r = bench_intake(db, args, tflite, meta)
            report["intake"].append(r)
            print(intake_line(r, env["cpu_count"]), flush=True)
        for n in (int(x) for x in args.close_updates.split(",") if x):
            r = bench_close(n, tflite, meta)
            report["close"].append(r)
            print(f"close {n:6d} updates: {r['seconds']:.2f} s, peak traced memory {r['peak_traced_mb']:.1f} MB "
                  f"(bodies {r['body_kb']:.0f} KB)  target <= 2 s for 10,000, memory flat in N", flush=True)
    report["environment"]["loadavg_at_end"] = list(os.getloadavg())
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
