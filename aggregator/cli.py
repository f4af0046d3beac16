"""``fedser-aggregator``: run and administer the aggregator from a shell.

    fedser-aggregator --instance DIR serve [--host 127.0.0.1] [--port 8080] [--workers 2]
                      [--certfile CERT.pem --keyfile KEY.pem] [--control-socket PATH]
    fedser-aggregator --instance DIR create-token [--ttl 86400]
    fedser-aggregator --instance DIR publish-base MODEL.tflite MODEL.json
    fedser-aggregator --instance DIR close-round [--min-updates 1]
    fedser-aggregator --instance DIR train-baseline [--architecture cnn] [--epochs 40] [--wait]
    fedser-aggregator --instance DIR jobs | rollback VERSION | revoke DEVICE | status | admin-token
    fedser-aggregator --instance DIR prune [--dry-run] [--refusal-days N] [--update-body-days N] [--blob-days N]
        [--job-days N]
    fedser-aggregator gen-server-key PATH   (a new signing key for SERVER_KEY_FILE; docs/deploy-multihost.md)

Configuration: ``<instance>/config.json`` and ``FEDSER_*`` environment variables
(see ``aggregator.DEFAULTS``).

The same commands run under Flask's CLI, configured by the environment alone:
``FEDSER_INSTANCE_PATH=DIR flask --app aggregator status`` (see :func:`register_flask_commands`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from flask import Flask, current_app
from sqlalchemy.exc import OperationalError

__all__ = ["main"]


def _app(instance: str, database_url: str | None):
    from aggregator import create_app

    cfg = {"DATABASE_URL": database_url} if database_url else None
    return create_app(cfg, instance_path=instance)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedser-aggregator", description=__doc__.split("\n")[0])
    parser.add_argument("--instance", default="instance", help="folder of the database, keys and model files")
    parser.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: SQLite in the instance)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=2, help="gunicorn workers (0: single-threaded werkzeug)")
    serve.add_argument("--certfile", default=None, help="TLS certificate chain (PEM): serve HTTPS (see deploy/tls/)")
    serve.add_argument("--keyfile", default=None, help="TLS private key (PEM) of --certfile")
    serve.add_argument("--control-socket", default=None, metavar="PATH",
                       help="gunicorn's control socket (for gunicornc); default: none. Without this gunicorn would "
                            "put every server on the host at one shared path, ~/.gunicorn/gunicorn.ctl")
    serve.add_argument("--threads", type=int, default=None,
                       help="threads per worker (gthread: keep-alive, one request's I/O wait overlaps another's); "
                            "default 4 on PostgreSQL, 2 on SQLite (one writer at a time: more threads only queue)")
    tok = sub.add_parser("create-token", help="print a one-time enrollment token")
    tok.add_argument("--ttl", type=_ttl, default=24 * 3600, help="seconds the token stays valid (0 < TTL <= 30 days)")
    pub = sub.add_parser("publish-base", help="publish a new base model")
    pub.add_argument("tflite", type=Path)
    pub.add_argument("metadata", type=Path)
    close = sub.add_parser("close-round", help="close the open round now")
    close.add_argument("--min-updates", type=_whole(1, 1_000_000), default=1)
    job = sub.add_parser("train-baseline", help="start a baseline training job (a separate process)")
    job.add_argument("--architecture", default="cnn")
    job.add_argument("--epochs", type=int, default=40)
    job.add_argument("--corpus", default=None)
    job.add_argument("--data", default=None)
    job.add_argument("--synthetic", action="store_true")
    job.add_argument("--no-publish", action="store_true", help="train and report, but do not publish")
    job.add_argument("--params", default=None, metavar="JSON",
                     help='more job parameters as a JSON object, e.g. the bundled recipe\'s: \'{"corpus": '
                          '"ravdess,nemo", "features": "logmel", "utterance_norm": "level", "augment": 2, '
                          '"augment_speed": "0.8,1.25", "augment_gain_db": "0,0", "augment_snr_db": "90,90", '
                          '"epochs": 20, "val_speakers": "none", "input_affine_from": 20}\'')
    job.add_argument("--wait", action="store_true", help="wait for the job and print its outcome")
    sub.add_parser("jobs", help="list baseline jobs")
    rb = sub.add_parser("rollback", help="republish an earlier version as the current one")
    rb.add_argument("version", type=_whole(1, 2**31 - 1))
    rv = sub.add_parser("revoke", help="revoke a device")
    rv.add_argument("device_id")
    sub.add_parser("status", help="print the aggregator's state as JSON")
    sub.add_parser("admin-token", help="print the admin token")
    gk = sub.add_parser("gen-server-key", help="write a new server signing key (PEM, mode 0600) for SERVER_KEY_FILE "
                                               "and print its public key; needs no instance or database")
    gk.add_argument("path", type=Path)
    pr = sub.add_parser("prune", help="apply the retention settings: old refusal audit rows, update bodies of "
                                      "closed rounds, unreferenced model files, old baseline job folders, the "
                                      "jobs' feature cache over its limit (prints what it removed as JSON)")
    pr.add_argument("--dry-run", action="store_true", help="count what would go, remove nothing")
    pr.add_argument("--refusal-days", type=float, default=None,
                    help="audit rows of refusals older than this (default RETENTION_REFUSAL_DAYS; 0: keep)")
    pr.add_argument("--update-body-days", type=float, default=None,
                    help="update bodies of rounds closed longer ago (default RETENTION_UPDATE_BODY_DAYS; 0: keep)")
    pr.add_argument("--blob-days", type=float, default=None,
                    help="unreferenced model files older than this (default RETENTION_BLOB_DAYS; 0: keep)")
    pr.add_argument("--job-days", type=float, default=None,
                    help="folders of baseline jobs that ended longer ago, on this host (default RETENTION_JOB_DAYS; "
                         "0: keep)")
    return parser


def _whole(low: int, high: int):
    """An argparse type: an integer in low..high, else argparse's usage error naming the value (before, a version
    past 64 bits was an OverflowError traceback and --min-updates -1 a ValueError one)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, got {value}")
        return value
    return parse


def _ttl(text: str) -> float:
    """An argparse type: the enrollment token's lifetime, in the range the HTTP route takes (before, NaN reached the
    database: an SQLAlchemy traceback)."""
    from aggregator.api.admin import MAX_TOKEN_TTL

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= MAX_TOKEN_TTL:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in (0, {MAX_TOKEN_TTL:g}] seconds, got {text}")
    return value


def main(argv: list[str] | None = None, *, app: Flask | None = None) -> int:
    """Run one command; ``app``: an app already made (``flask --app aggregator ...``) instead of ``--instance``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "gen-server-key":
        return _gen_server_key(args.path)
    from aggregator import ConfigError

    try:
        app = app or _app(args.instance, args.database_url)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(app, args)
    with app.app_context():
        from aggregator import service
        from aggregator.api.admin import create_enrollment_token, job_dict, publish_checked, summary
        from aggregator.db import Device, Job, ModelVersion, get_session
        from aggregator.jobs import JobError, reap, start_job
        from aggregator.registry import begin_durable, rollback_to
        from aggregator.rounds import open_round
        from edge_sdk.errors import FedserError
        from edge_sdk.model import ModelMetadata

        session = get_session()
        ext = current_app.extensions
        try:
            if args.command == "create-token":
                print(create_enrollment_token(session, args.ttl)[0])
            elif args.command == "publish-base":
                body, code = publish_checked(session, args.tflite.read_bytes(), ModelMetadata.load(args.metadata),
                                             note="published from the CLI")
                print(json.dumps(body))
                return 0 if code == 201 else 1
            elif args.command == "close-round":
                rnd = open_round(session)
                if rnd is None:
                    print("no open round", file=sys.stderr)
                    return 1
                result = service.close(session, rnd.id, min_updates=args.min_updates)
                print(json.dumps(result.to_dict()))
                return 0 if result.closed else 1
            elif args.command == "train-baseline":
                params = {"architecture": args.architecture, "epochs": args.epochs, "publish": not args.no_publish}
                params.update({k: v for k, v in (("corpus", args.corpus), ("data", args.data)) if v})
                if args.synthetic:
                    params["synthetic"] = True
                if args.params:
                    try:
                        extra = json.loads(args.params)
                    except ValueError as exc:
                        print(f"--params is not JSON: {exc}", file=sys.stderr)
                        return 2
                    if not isinstance(extra, dict):
                        print("--params must be a JSON object", file=sys.stderr)
                        return 2
                    params.update(extra)
                    if args.no_publish:  # the flag wins over a "publish" in the JSON
                        params["publish"] = False
                job = start_job(app, session, params)
                print(json.dumps(job_dict(job)), flush=True)
                job_id = job.id
                while args.wait:
                    # each look is a transaction of its own, ended before the sleep: on SQLite a transaction
                    # holds the host's write lock, and one left open kept the job from recording anything
                    session.close()
                    time.sleep(2)
                    try:
                        job = session.get(Job, job_id)
                        reap(session, job)
                    except OperationalError as exc:  # busy (a round closing): the job goes on, look again
                        print(f"job {job_id}: {exc.orig}; looking again", file=sys.stderr)
                        session.rollback()
                        continue
                    if job.status in ("succeeded", "failed"):
                        print(json.dumps(job_dict(job)))
                        return 0 if job.status == "succeeded" else 1
                    session.commit()
            elif args.command == "jobs":
                print(json.dumps([job_dict(j) for j in session.query(Job).order_by(Job.id.desc()).limit(50)], indent=2))
            elif args.command == "rollback":
                begin_durable(session)  # before the first read (SQLite: the publishing commit is synced)
                row = session.get(ModelVersion, args.version)
                if row is None:
                    print(f"no version {args.version}", file=sys.stderr)
                    return 1
                manifest = rollback_to(session, ext["fedser_blobs"], ext["fedser_server_key"], row,
                                       deadline_seconds=service.deadline_seconds())
                session.commit()
                print(json.dumps({"version": manifest.version, "rollback_of": args.version}))
            elif args.command == "revoke":
                device = session.get(Device, args.device_id)
                if device is None:
                    print(f"no device {args.device_id}", file=sys.stderr)
                    return 1
                device.revoked = True
                session.commit()
                print(json.dumps({"device_id": args.device_id, "revoked": True}))
            elif args.command == "status":
                print(json.dumps(summary(session), indent=2))
            elif args.command == "admin-token":
                print(app.config["ADMIN_TOKEN"])
            elif args.command == "prune":
                from aggregator.retention import RetentionPolicy, prune

                given = {"refusal_days": args.refusal_days, "update_body_days": args.update_body_days,
                         "blob_days": args.blob_days, "job_days": args.job_days}
                try:  # the flags given override the app's settings; replace() checks the ranges again
                    policy = dataclasses.replace(RetentionPolicy.from_config(app.config),
                                                 **{k: v for k, v in given.items() if v is not None})
                except ValueError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                print(json.dumps(prune(session, ext["fedser_blobs"], policy, dry_run=args.dry_run,
                                       instance_path=app.instance_path,
                                       feature_cache_bytes=int(app.config["JOB_FEATURE_CACHE_BYTES"])).to_dict()))
        except (FedserError, OSError, JobError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


def _gen_server_key(path: Path) -> int:
    from edge_sdk.signing import SigningKey

    if path.exists():
        print(f"error: {path} exists; a server key is never overwritten (devices pin it)", file=sys.stderr)
        return 2
    key = SigningKey.generate()
    key.save(path)
    print(json.dumps({"path": str(path), "public_key": key.verify_key.to_b64()}))
    return 0


def register_flask_commands(app: Flask) -> None:
    """The same commands under Flask's CLI: ``flask --app aggregator status``, ``flask --app aggregator rollback 3``.

    Each runs :func:`main` on the app Flask made (configured by ``FEDSER_*`` variables, e.g.
    ``FEDSER_INSTANCE_PATH`` and ``FEDSER_DATABASE_URL``, and ``<instance>/config.json``); its options are
    ``fedser-aggregator``'s (``flask --app aggregator rollback --help``).
    """
    import click
    from flask.cli import with_appcontext

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in commands._choices_actions}
    for name in commands.choices:
        if name in app.cli.commands:
            continue

        def callback(args: tuple[str, ...], _name: str = name) -> None:
            sys.exit(main([_name, *args], app=current_app._get_current_object()))

        app.cli.add_command(click.Command(
            name, callback=with_appcontext(callback),
            params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)], help=helps.get(name),
            add_help_option=False, context_settings={"ignore_unknown_options": True}))


def _clear_multiprocess_metrics() -> None:
    """Empty ``PROMETHEUS_MULTIPROC_DIR`` of an earlier run's files (aggregator.observability), if it is set."""
    import os

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for f in Path(folder).glob("*.db"):
            f.unlink(missing_ok=True)


def _set_control_socket(cfg, control_socket: str | None) -> None:
    """Each server its own control socket, or none (gunicorn's default path is one per user).

    gunicorn has these settings only from 25.1 and ``Config.set`` raises AttributeError for a name it
    does not know, so they are set only where this gunicorn has them.
    """
    if control_socket and "control_socket" in cfg.settings:
        cfg.set("control_socket", str(Path(control_socket).resolve()))
    elif "control_socket_disable" in cfg.settings:
        cfg.set("control_socket_disable", True)


def _serve(app: Flask, args) -> int:
    from aggregator.service import start_deadline_thread

    if bool(args.certfile) != bool(args.keyfile):
        print("error: --certfile and --keyfile go together", file=sys.stderr)
        return 2
    for path in (args.certfile, args.keyfile):
        if path and not Path(path).is_file():
            print(f"error: TLS file not found: {path}", file=sys.stderr)
            return 2
    _clear_multiprocess_metrics()
    if args.workers <= 0:
        from werkzeug.serving import run_simple

        start_deadline_thread(app)
        run_simple(args.host, args.port, app, threaded=True,
                   ssl_context=(args.certfile, args.keyfile) if args.certfile else None)
        return 0

    def post_fork(_server, _worker):
        app.extensions["fedser_engine"].dispose(close=False)  # each worker opens its own connections
        app.extensions.pop("fedser_deadline_thread", None)
        start_deadline_thread(app)
    from gunicorn.app.base import BaseApplication

    class _Gunicorn(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            # Measured with tools.bench_aggregator (README, "Aggregator benchmark"): on SQLite 2 threads beat 1
            # (sync workers close every connection: no keep-alive) and 4 (writers queue for the one lock).
            threads = args.threads or (2 if app.config["DATABASE_URL"].startswith("sqlite") else 4)
            if threads > 1:
                self.cfg.set("worker_class", "gthread")
                self.cfg.set("threads", threads)
                self.cfg.set("keepalive", 5)
            self.cfg.set("accesslog", "-" if args.verbose else None)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("post_fork", post_fork)
            _set_control_socket(self.cfg, args.control_socket)
            if args.certfile:
                self.cfg.set("certfile", args.certfile)
                self.cfg.set("keyfile", args.keyfile)

        def load(self):
            return app

    _Gunicorn().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
