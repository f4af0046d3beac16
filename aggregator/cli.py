"""``fedser-aggregator``: run and administer the aggregator from a shell.

    fedser-aggregator --instance DIR serve [--host 127.0.0.1] [--port 8080] [--workers 2]
    fedser-aggregator --instance DIR create-token [--ttl 86400]
    fedser-aggregator --instance DIR publish-base MODEL.tflite MODEL.json
    fedser-aggregator --instance DIR close-round [--min-updates 1]
    fedser-aggregator --instance DIR status
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from flask import Flask, current_app

__all__ = ["main"]


def _app(instance: str, database_url: str | None):
    from aggregator import create_app

    cfg = {"DATABASE_URL": database_url} if database_url else None
    return create_app(cfg, instance_path=instance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedser-aggregator", description=__doc__.split("\n")[0])
    parser.add_argument("--instance", default="instance", help="folder of the database, keys and model files")
    parser.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: SQLite in the instance)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=2, help="gunicorn workers (0: single-threaded werkzeug)")
    tok = sub.add_parser("create-token", help="print a one-time enrollment token")
    tok.add_argument("--ttl", type=float, default=24 * 3600)
    pub = sub.add_parser("publish-base", help="publish a new base model")
    pub.add_argument("tflite", type=Path)
    pub.add_argument("metadata", type=Path)
    close = sub.add_parser("close-round", help="close the open round now")
    close.add_argument("--min-updates", type=int, default=1)
    sub.add_parser("status", help="print the aggregator's state as JSON")
    sub.add_parser("admin-token", help="print the admin token")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    app = _app(args.instance, args.database_url)
    if args.command == "serve":
        return _serve(app, args)
    with app.app_context():
        from aggregator.api.admin import create_enrollment_token, summary
        from aggregator.db import get_session
        from aggregator.registry import publish_base
        from aggregator.rounds import close_round, open_round
        from edge_sdk.errors import FedserError
        from edge_sdk.model import ModelMetadata

        session = get_session()
        ext = current_app.extensions
        try:
            if args.command == "create-token":
                print(create_enrollment_token(session, args.ttl)[0])
            elif args.command == "publish-base":
                manifest = publish_base(session, ext["fedser_blobs"], ext["fedser_server_key"],
                                        args.tflite.read_bytes(), ModelMetadata.load(args.metadata))
                session.commit()
                print(json.dumps({"version": manifest.version, "base_sha256": manifest.base.sha256}))
            elif args.command == "close-round":
                rnd = open_round(session)
                if rnd is None:
                    print("no open round", file=sys.stderr)
                    return 1
                result = close_round(session, ext["fedser_blobs"], ext["fedser_server_key"], rnd.id,
                                     min_updates=args.min_updates)
                print(json.dumps(result.__dict__))
                return 0 if result.closed else 1
            elif args.command == "status":
                print(json.dumps(summary(session), indent=2))
            elif args.command == "admin-token":
                print(app.config["ADMIN_TOKEN"])
        except (FedserError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


def _serve(app: Flask, args) -> int:
    if args.workers <= 0:
        from werkzeug.serving import run_simple

        run_simple(args.host, args.port, app, threaded=True)
        return 0
    from gunicorn.app.base import BaseApplication

    class _Gunicorn(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("accesslog", "-" if args.verbose else None)
            self.cfg.set("graceful_timeout", 10)
            # The engine was made before the fork: each worker must open its own connections.
            self.cfg.set("post_fork", lambda _server, _worker: app.extensions["fedser_engine"].dispose(close=False))

        def load(self):
            return app

    _Gunicorn().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
