"""The device's local feedback page: live predictions, 👍 / 👎, a corrected-label picker, personal accuracy.

Standard library only (``http.server``); it listens on 127.0.0.1 by default.
A feedback POST must be JSON and, when the browser sends an Origin, come from
this page's own origin: another web site open in the same browser cannot
answer predictions.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

from edge_sdk.errors import FedserError

log = logging.getLogger("edge_sdk")

__all__ = ["FeedbackServer"]


class FeedbackServer:
    """Serves the page for one :class:`~edge_sdk.device.Device` in a background thread."""

    def __init__(self, device, *, host: str = "127.0.0.1", port: int = 8090, stats=None) -> None:
        self.device, self.stats = device, stats
        page = resources.files("edge_sdk").joinpath("static/feedback.html").read_bytes()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet: the device's log is for the device
                log.debug("web: " + fmt, *args)

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                if ctype.startswith("text/html"):
                    self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                                     "style-src 'unsafe-inline'; connect-src 'self'")
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, obj) -> None:
                self._send(status, json.dumps(obj).encode())

            def do_GET(self):  # noqa: N802 - http.server's naming
                path = urlsplit(self.path).path
                if path in ("/", "/index.html"):
                    self._send(200, page, "text/html; charset=utf-8")
                elif path == "/api/state":
                    self._json(200, server.state())
                else:
                    self._json(404, {"error": "not_found", "detail": path})

            def do_POST(self):  # noqa: N802
                if urlsplit(self.path).path != "/api/feedback":
                    return self._json(404, {"error": "not_found", "detail": self.path})
                origin = self.headers.get("Origin")
                if origin and urlsplit(origin).netloc != self.headers.get("Host"):
                    return self._json(403, {"error": "cross_origin", "detail": f"origin {origin} is not this page"})
                if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                    return self._json(415, {"error": "not_json", "detail": "send application/json"})
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = json.loads(self.rfile.read(min(length, 10_000)) or b"{}")
                    server.device.feedback(str(body["id"]), str(body["answer"]))
                except (KeyError, ValueError, TypeError) as exc:
                    return self._json(400, {"error": "malformed", "detail": f"send {{id, answer}}: {exc}"})
                except FedserError as exc:
                    return self._json(400, {"error": "refused", "detail": str(exc)})
                self._json(200, {"stored": True, "accuracy": server.device.store.personal_accuracy()})

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def state(self) -> dict:
        d = self.device
        return {"labels": list(d.metadata.labels) if d.model else [], "model_version": d.model_version,
                "model_source": d.model_source, "personalized": d.personalized,
                "predictions": d.store.recent(20), "accuracy": d.store.personal_accuracy(),
                "listener": self.stats() if self.stats else None}

    def start(self) -> FeedbackServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fedser-web", daemon=True)
        self._thread.start()
        log.info("feedback page on %s", self.url)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
