"""Baseline training jobs: ``models`` training in a separate worker process, never in a request thread.

``start_job`` records a job and starts ``python -m aggregator.jobs run JOB``
in its own session (it survives a restart of the web workers). That process
runs ``fedser-train train`` (on a GPU when the Keras backend sees one: TensorFlow's, or JAX's with
``KERAS_BACKEND=jax`` in the aggregator's environment where TensorFlow has no GPU build, the model then exported to
TFLite by TensorFlow in a second process), writes its log
to ``<instance>/jobs/<id>/log.txt``, and on success publishes the model as a
new base through the validation gate. Job state lives in the database, and so
does the tail of the log (copied every few seconds with a heartbeat), so that
any host sharing the database shows the job, and only the host that runs it
judges whether its process is gone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from flask import Flask
from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError

from aggregator.db import Job

log = logging.getLogger("aggregator")

__all__ = ["JobError", "start_job", "log_tail", "job_dir", "reap", "feature_cache_dir", "trim_feature_cache",
           "prune_job_folders"]

ALLOWED = {
    "architecture": str, "corpus": str, "data": str, "synthetic": bool, "epochs": int, "patience": int,
    "seed": int, "test_speakers": str, "val_speakers": str, "folds": int, "fold": int, "augment": int,
    "calm_as_neutral": bool, "features": str, "max_frames": int, "publish": bool, "input_affine_from": int,
    "utterance_norm": str, "augment_speed": str, "augment_gain_db": str, "augment_snr_db": str, "pitch": bool,
}
# "lo,hi" ranges of the augmented copies (fedser-train's --augment-speed, --augment-gain-db, --augment-snr-db)
RANGES = {"augment_speed": (0.5, 2.0), "augment_gain_db": (-24.0, 24.0), "augment_snr_db": (0.0, 90.0)}
MAX_AUGMENT = 8  # augmented copies per clip: each one is another copy of the training set's features in memory
MAX_FRAMES = 2000  # 20 s at 100 frames a second; with MAX_AUGMENT it bounds the features' memory
FEATURES = ("mfcc", "logmel")


class JobError(ValueError):
    pass


def job_dir(instance_path: str | os.PathLike, job_id: int) -> Path:
    return Path(instance_path) / "jobs" / str(job_id)


def feature_cache_dir(instance_path: str | os.PathLike) -> Path:
    """The features this host's jobs computed (``fedser-train --cache``), shared by its jobs: a second job on the
    same corpus and feature settings reads them instead of decoding the audio again. Bounded by
    ``JOB_FEATURE_CACHE_BYTES`` (:func:`trim_feature_cache`, after every job and in ``fedser-aggregator prune``)."""
    return Path(instance_path) / "jobs" / "feature-cache"


TMP_GRACE_SECONDS = 3600.0  # a cache file still being written (".tmp.npz") younger than this is left alone


def trim_feature_cache(folder: str | os.PathLike, max_bytes: int, *, dry_run: bool = False,
                       now: float | None = None) -> tuple[int, int]:
    """Delete the cache's least recently used files (by modification time, which a read sets to now:
    ``models.features``) until what is left holds at most ``max_bytes``
    (0: delete it all); returns (files, bytes) deleted. Another job reading a file deleted under it recomputes that
    clip (``models.features``); a file another job is writing stays until it is an hour old."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0, 0
    now = time.time() if now is None else now
    files, young = [], 0
    for path, st in _regular_files(folder):
        if path.name.endswith(".tmp.npz") and now - st.st_mtime < TMP_GRACE_SECONDS:
            young += st.st_size  # counts toward the limit, is not deleted
            continue
        files.append((st.st_mtime, str(path), st.st_size))
    files.sort()
    max_bytes = max(0, max_bytes - young)
    total = sum(size for _, _, size in files)
    count = freed = 0
    for _, path, size in files:
        if total - freed <= max_bytes:
            break
        if not dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
        count += 1
        freed += size
    if not dry_run and count:
        try:
            subs = sorted(folder.iterdir())
        except OSError:  # removed meanwhile by another trim
            subs = []
        for sub in subs:
            if sub.is_dir() and not sub.is_symlink():
                try:
                    sub.rmdir()  # only when empty
                except OSError:
                    pass
    if count:
        log.info("feature cache %s: %s %d files, %d bytes (%d bytes of files being written kept)", folder,
                 "would delete" if dry_run else "deleted", count, freed, young)
    return count, freed


def _regular_files(folder: Path):
    """(path, lstat) of every regular file under ``folder`` (links not followed); files and folders that vanish
    under the walk (another trim, a job) or cannot be read are skipped."""
    for root, _, names in os.walk(folder, onerror=lambda exc: None):
        for name in names:
            path = Path(root) / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield path, st


def prune_job_folders(session, instance_path: str | os.PathLike, days: float, *, dry_run: bool = False,
                      now: float | None = None) -> tuple[int, int]:
    """Delete the folders (log, trained model, report) of jobs that ended more than ``days`` ago, on this host;
    returns (folders, bytes). The database keeps each job's row: parameters, outcome, report and log tail; a
    published model is in the model store. Folders of jobs the database does not know are left alone."""
    now = time.time() if now is None else now
    root = Path(instance_path) / "jobs"
    if days <= 0 or not root.is_dir():
        return 0, 0
    cutoff = now - days * 86400.0
    ended = {str(i) for (i,) in session.execute(
        select(Job.id).where(Job.status.in_(("succeeded", "failed")), Job.finished_at < cutoff))}
    session.commit()  # SQLite: no read transaction held while deleting files
    count = freed = 0
    for sub in root.iterdir():
        if sub.name not in ended or not sub.is_dir() or sub.is_symlink():
            continue
        size = sum(st.st_size for _, st in _regular_files(sub))
        if not dry_run:
            shutil.rmtree(sub, ignore_errors=True)
            if sub.exists():  # not all of it could be deleted: not counted
                log.warning("job folder %s: not all of it could be deleted", sub)
                continue
        count += 1
        freed += size
    return count, freed


FINAL_WRITE_ATTEMPTS = 6  # recording a job's end: each attempt may wait the database's 30 s lock timeout
FINAL_WRITE_PAUSE = 5.0
HEARTBEAT_SECONDS = 10.0  # how often a job's process copies its log tail into the database
HEARTBEAT_LOST = 120.0  # another host's job with no heartbeat this long is marked failed


def host_name() -> str:
    return socket.gethostname()[:255]


def _file_tail(path: Path, max_bytes: int) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return None


def log_tail(instance_path: str | os.PathLike, job_id: int, max_bytes: int = 4000) -> str:
    """The end of a job's log: from this host's file when the job runs here, else the copy in the database."""
    text = _file_tail(job_dir(instance_path, job_id) / "log.txt", max_bytes)
    if text is not None:
        return text
    from flask import current_app, has_app_context

    if not has_app_context():
        return ""
    with current_app.extensions["fedser_read_sessionmaker"]() as session:
        job = session.get(Job, job_id)
        return (job.log_tail or "")[-max_bytes:] if job is not None else ""


def _check(params: dict) -> dict:
    from models.architectures import ARCHITECTURES
    from models.datasets import CORPORA

    if not isinstance(params, dict):
        raise JobError("job parameters must be a JSON object")
    unknown = set(params) - set(ALLOWED)
    if unknown:
        raise JobError(f"unknown job parameters {sorted(unknown)}; allowed: {sorted(ALLOWED)}")
    out = {}
    for key, value in params.items():
        kind = ALLOWED[key]
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise JobError(f"{key} must be a non-negative integer, got {value!r}")
        if kind is bool and not isinstance(value, bool):
            raise JobError(f"{key} must be true or false, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise JobError(f"{key} must be a string, got {value!r}")
        out[key] = value
    if out.get("architecture", "cnn") not in ARCHITECTURES:
        raise JobError(f"architecture must be one of {ARCHITECTURES}, got {out['architecture']!r}")
    from edge_sdk.features import UTTERANCE_NORMS
    from models.cli import _pair, corpus_list, data_roots

    try:  # several: "ravdess,nemo", each speaker-independent; parsed as fedser-train parses them
        corpora = corpus_list(out.get("corpus", "ravdess"))
        roots = data_roots(out.get("data"), corpora) if "data" in out else {}
    except SystemExit as exc:
        raise JobError(f"corpus must be one or several (comma-separated, each once) of {sorted(CORPORA)}, with "
                       f"data as one folder per corpus: {exc}") from None
    # the front end is recorded in the job's parameters as it will train (fedser-train's defaults when not named),
    # so a job listed later says what it used even after those defaults change
    defaults = _train_defaults()
    out.setdefault("features", defaults.features)
    out.setdefault("utterance_norm", defaults.utterance_norm)
    if out["features"] not in FEATURES:
        raise JobError(f"features must be one of {FEATURES}, got {out['features']!r}")
    if "max_frames" in out and not 1 <= out["max_frames"] <= MAX_FRAMES:
        raise JobError(f"max_frames must be in 1..{MAX_FRAMES}")
    if not 0 <= out.get("augment", 0) <= MAX_AUGMENT:
        raise JobError(f"augment must be in 0..{MAX_AUGMENT} copies per clip")
    if out["utterance_norm"] not in UTTERANCE_NORMS:
        raise JobError(f"utterance_norm must be one of {UTTERANCE_NORMS}, got {out['utterance_norm']!r}")
    for key, (low, high) in RANGES.items():
        if key in out:
            try:
                lo, hi = _pair(out[key])
            except ValueError:
                raise JobError(f"{key} must be two numbers 'lo,hi', got {out[key]!r}") from None
            if not low <= lo <= hi <= high:
                raise JobError(f"{key} must be 'lo,hi' with {low:g} <= lo <= hi <= {high:g}, got {out[key]!r}")
    if not 1 <= out.get("epochs", 40) <= 1000:
        raise JobError("epochs must be in 1..1000")
    from edge_sdk.model import MAX_INPUT_AFFINE_FROM

    if out.get("input_affine_from", 0) > MAX_INPUT_AFFINE_FROM:
        raise JobError(f"input_affine_from must be in 0..{MAX_INPUT_AFFINE_FROM}")
    if out.get("input_affine_from") and out.get("architecture", "cnn") != "cnn":
        raise JobError("input_affine_from needs architecture cnn (the input_grad signature)")
    for corpus, folder in roots.items():  # "data": one folder, or one per corpus (DIR1,DIR2 or ravdess=DIR1,...)
        if folder is None or str(folder) in ("", ".") or not folder.exists():
            raise JobError(f"data for {corpus} not found on the server: {str(folder)!r}")
    return out


def _train_defaults():
    """``fedser-train train``'s own defaults (an argparse namespace), read from its parser."""
    from models.cli import build_parser

    return build_parser().parse_args(["train", "--out", "unused"])


def _child_env(app: Flask) -> dict:
    from aggregator import DEFAULTS

    env = dict(os.environ)
    for key in DEFAULTS:
        value = app.config.get(key)
        if key == "ADMIN_TOKEN" and app.config.get("ADMIN_TOKEN_FILE"):
            continue  # the child reads the same file (both set is a configuration error)
        if value is not None:
            env[f"FEDSER_{key}"] = str(value)
    env["FEDSER_INSTANCE_PATH"] = app.instance_path
    return env


def start_job(app: Flask, session, params: dict) -> Job:
    params = _check(params)
    job = Job(kind="baseline", status="queued", params=json.dumps(params), created_at=time.time(), host=host_name())
    session.add(job)
    session.commit()
    folder = job_dir(app.instance_path, job.id)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "log.txt", "ab") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "aggregator.jobs", "run", str(job.id)], stdout=logf,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_child_env(app),
                                    start_new_session=True, cwd=os.getcwd())
    except Exception as exc:  # the row is committed: mark it failed with the reason, not "queued" for ever
        session.rollback()
        job.status, job.finished_at = "failed", time.time()
        job.detail = f"the job's process could not be started: {exc}"[:4000]
        session.commit()
        log.error("baseline job %d not started: %s", job.id, exc)
        raise
    job.pid = proc.pid
    session.commit()
    log.info("baseline job %d started (pid %d): %s", job.id, proc.pid, params)
    return job


def reap(session, job: Job) -> None:
    """Mark a running job whose process has gone (killed, machine restarted) as failed.

    Its pid means something only on the host that started it; elsewhere, a job whose heartbeat stopped
    :data:`HEARTBEAT_LOST` seconds ago (its host went down) is marked failed.
    """
    if job.status not in ("queued", "running") or not job.pid:
        return
    if job.host and job.host != host_name():
        beat = job.heartbeat_at or job.started_at or job.created_at
        if time.time() - beat < HEARTBEAT_LOST:
            return
        _mark_failed(session, job, f"no heartbeat from host {job.host} for {HEARTBEAT_LOST:g} s (host down?)")
        return
    if time.time() - job.created_at < 5:
        return
    try:  # a job this process started and that has exited stays a zombie, "alive" to kill(pid, 0), until waited
        exited = os.waitpid(job.pid, os.WNOHANG)[0] == job.pid
    except ChildProcessError:  # not our child (another worker's job): a zombie there has exited all the same
        exited = _is_zombie(job.pid)
    if not exited:
        try:
            os.kill(job.pid, 0)
            return
        except ProcessLookupError:
            pass
        except PermissionError:
            return
    _mark_failed(session, job, "the job's process exited without reporting (killed?)")


def _is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits for its parent to collect it (Linux: state Z in /proc/PID/stat; False
    where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    fields = data.rsplit(b")", 1)[-1].split()  # after "(comm)", which may hold spaces and parentheses
    return bool(fields) and fields[0] == b"Z"


def _mark_failed(session, job: Job, detail: str) -> None:
    """Failed, only if the row still says queued or running: the job may have recorded its end since it was read
    (a conditional update, so a reaper on another host cannot overwrite a success committed meanwhile)."""
    done = session.execute(update(Job).where(Job.id == job.id, Job.status.in_(("queued", "running")))
                           .values(status="failed", finished_at=time.time(),
                                   detail=func.coalesce(func.nullif(Job.detail, ""), detail)))
    session.commit()
    session.refresh(job)
    if done.rowcount:
        log.warning("job %d marked failed: %s", job.id, job.detail)


def _train_argv(params: dict, out: Path, cache: Path | None = None) -> list[str]:
    argv = ["train", "--out", str(out), "--no-progress"] + ([f"--cache={cache}"] if cache is not None else [])
    for key, value in params.items():
        if key == "publish":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
        else:  # one token: a value starting with "-" ("-6,6") is not read as another option
            argv.append(f"{flag}={value}")
    return argv


def run_job(job_id: int) -> int:
    from aggregator import create_app

    app = create_app()
    maker = app.extensions["fedser_sessionmaker"]
    with maker() as session:
        job = session.get(Job, job_id)
        if job is None:
            print(f"no job {job_id}", file=sys.stderr)
            return 2
        job.status, job.started_at, job.pid, job.host = "running", time.time(), os.getpid(), host_name()
        job.heartbeat_at = job.started_at
        session.commit()
        params = json.loads(job.params)
    log_path = job_dir(app.instance_path, job_id) / "log.txt"
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(maker, job_id, log_path, stop), daemon=True)
    beat.start()
    out = job_dir(app.instance_path, job_id) / "model"
    cache = feature_cache_dir(app.instance_path)
    argv = _train_argv(params, out, cache)
    print(f"job {job_id}: fedser-train {' '.join(argv)}", flush=True)
    status, detail, report, version = "failed", "", "", None
    try:
        from models.cli import main as train_main

        code = train_main(argv)
        if code != 0:
            raise RuntimeError(f"fedser-train exited with {code}")
        if not (out / "model.tflite").exists() and (out / "trained.npz").exists():
            _export_with_tensorflow(out)
        report = (out / "report.json").read_text()
        if params.get("publish", True):
            from edge_sdk.model import ModelMetadata

            with app.app_context():
                from aggregator.api.admin import publish_checked
                from aggregator.db import get_session

                body, code = publish_checked(get_session(), (out / "model.tflite").read_bytes(),
                                             ModelMetadata.load(out / "model.json"), note=f"baseline job {job_id}")
            if code != 201:
                raise RuntimeError(f"not published: {body['detail']}")
            version = body["version"]
            detail = f"published as version {version}"
        else:
            detail = "trained; not published (publish: false)"
        status = "succeeded"
    except BaseException as exc:  # the job must always record how it ended
        detail = f"{type(exc).__name__}: {exc}"
        log.exception("job %d failed", job_id)
    print(f"job {job_id}: {status}: {detail}", flush=True)
    stop.set()
    beat.join(timeout=30)
    for attempt in range(FINAL_WRITE_ATTEMPTS):  # minutes of training are not lost to one busy database moment
        try:
            with maker() as session:
                job = session.get(Job, job_id)
                job.status, job.finished_at, job.detail, job.report = status, time.time(), detail[:4000], report
                job.published_version = version
                job.log_tail, job.heartbeat_at = _file_tail(log_path, 4000), time.time()
                session.commit()
            break
        except DBAPIError:  # a busy SQLite, a PostgreSQL connection dropped
            if attempt == FINAL_WRITE_ATTEMPTS - 1:
                raise
            log.exception("job %d: recording its end failed (attempt %d of %d); trying again in %g s", job_id,
                          attempt + 1, FINAL_WRITE_ATTEMPTS, FINAL_WRITE_PAUSE)
            time.sleep(FINAL_WRITE_PAUSE)
    try:  # after the job's end is recorded: what it added to the shared feature cache may take it over its limit
        trim_feature_cache(cache, int(app.config["JOB_FEATURE_CACHE_BYTES"]))
    except Exception:  # noqa: BLE001 - the job is over and recorded; a failed trim is retried by the next
        log.exception("job %d: trimming the feature cache %s failed", job_id, cache)
    return 0 if status == "succeeded" else 1


def _export_with_tensorflow(out: Path) -> None:
    """A model trained on another Keras backend (``KERAS_BACKEND=jax``, e.g. on a GPU TensorFlow cannot use) left
    trained.npz: ``fedser-train export`` writes its .tflite in a process on the TensorFlow backend (Keras's backend
    is fixed once imported). Its output goes to the job's log."""
    backend = os.environ.get("KERAS_BACKEND", "")
    print(f"trained on Keras backend {backend!r}: exporting {out}/trained.npz to TFLite with TensorFlow", flush=True)
    done = subprocess.run([sys.executable, "-m", "models.cli", "export", "--trained", str(out)],
                          env={**os.environ, "KERAS_BACKEND": "tensorflow"}, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0 or not (out / "model.tflite").exists():
        raise RuntimeError(f"trained on Keras backend {backend!r}, but the TFLite export (fedser-train export "
                           f"--trained {out}, TensorFlow backend) exited with {done.returncode}: is TensorFlow "
                           "installed on this host? The trained weights are kept in trained.npz")


def _heartbeat(maker, job_id: int, log_path: Path, stop: threading.Event) -> None:
    """Copy the log's tail into the job's row every :data:`HEARTBEAT_SECONDS` until ``stop``."""
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            with maker() as session:
                job = session.get(Job, job_id)
                job.log_tail, job.heartbeat_at = _file_tail(log_path, 4000), time.time()
                session.commit()
        except Exception:  # the job goes on; the next beat retries
            log.exception("job %d: heartbeat failed", job_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aggregator.jobs")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one queued job (the aggregator starts this)")
    run.add_argument("job_id", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_job(args.job_id)


if __name__ == "__main__":
    sys.exit(main())
