"""HTTP client of the aggregator's device API (``/api/v1``).

Every failure becomes a :class:`~edge_sdk.errors.ServerError` carrying the
HTTP status (``None`` when the server could not be reached) and the server's
machine-readable reason, so callers decide between retrying and giving up.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from edge_sdk.errors import ParameterError, ServerError
from edge_sdk.wire import REQUEST_HEADERS, request_signing_message

log = logging.getLogger("edge_sdk")

__all__ = ["ServerClient", "API_PREFIX"]

API_PREFIX = "/api/v1"
DEFAULT_DEADLINE = 300.0  # seconds for one whole request, body included (the per-read timeout is `timeout`)
MAX_RESPONSE_BYTES = 16 << 20  # any reply but a model file (those are bounded by the manifest's size)


# The connection each `fedser-http` helper thread is using, so that the caller can cut it when the deadline
# passes: a thread blocked reading a dripping server then ends at once, and its socket is closed.
_REGISTRY_LOCK = threading.Lock()
_WATCHED: set[int] = set()  # helper threads (ident) whose connections are recorded
_IN_USE: dict[int, HTTPConnection] = {}
_CUT: set[int] = set()  # helper threads whose deadline has passed


def _shutdown(conn: HTTPConnection) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked in another thread; close() alone does not
        except OSError:
            pass


def _note_connection(conn: HTTPConnection) -> None:
    ident = threading.get_ident()
    with _REGISTRY_LOCK:
        if ident not in _WATCHED:
            return
        _IN_USE[ident] = conn
        cut = ident in _CUT
    if cut:  # connected after the deadline passed
        _shutdown(conn)


def _cut_connection_of(ident: int) -> None:
    with _REGISTRY_LOCK:
        _CUT.add(ident)
        conn = _IN_USE.get(ident)
    if conn is not None:
        _shutdown(conn)


class _Cuttable:
    def connect(self) -> None:
        super().connect()
        _note_connection(self)

    def request(self, *args, **kwargs):
        _note_connection(self)  # a kept-alive connection is reused without connect()
        return super().request(*args, **kwargs)


class _CuttableHTTPConnection(_Cuttable, HTTPConnection):
    pass


class _CuttableHTTPSConnection(_Cuttable, HTTPSConnection):
    pass


class _CuttableHTTPPool(HTTPConnectionPool):
    ConnectionCls = _CuttableHTTPConnection


class _CuttableHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CuttableHTTPSConnection


class _CuttableAdapter(HTTPAdapter):
    """requests' adapter whose connections record themselves, so :meth:`ServerClient._send` can cut them."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _CuttableHTTPPool, "https": _CuttableHTTPSPool}


class ServerClient:
    """Talks to one aggregator.

    Parameters
    ----------
    base_url : str
        ``http://host:port`` of the aggregator.
    timeout : float
        Seconds one socket read may wait.
    deadline : float
        Seconds one whole request may take, body included (a server that drips bytes is cut off).
    max_response_bytes : int
        Longest reply read, except model files, which :meth:`get_blob` bounds by the manifest's size.
    device_id, sign : str, callable
        Once enrolled: requests without a signed body (manifest, model files)
        carry the device id, a timestamp and an Ed25519 signature over
        :func:`edge_sdk.wire.request_signing_message`.
    """

    def __init__(self, base_url: str, *, timeout: float = 30.0, session: requests.Session | None = None,
                 device_id: str | None = None, sign: Callable[[bytes], bytes] | None = None,
                 deadline: float = DEFAULT_DEADLINE, max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        if not (timeout > 0 and deadline > 0 and max_response_bytes > 0):
            raise ParameterError("timeout, deadline and max_response_bytes must be positive")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.deadline = deadline
        self.max_response_bytes = max_response_bytes
        if session is None:
            session = requests.Session()
            for prefix in ("http://", "https://"):  # a caller's own session keeps its adapters
                session.mount(prefix, _CuttableAdapter())
        self.session = session
        self.device_id, self.sign = device_id, sign

    def _auth_headers(self, method: str, url: str) -> dict:
        if not (self.device_id and self.sign):
            return {}
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        ts = f"{time.time():.3f}"
        sig = self.sign(request_signing_message(method, path, ts))
        return dict(zip(REQUEST_HEADERS, (self.device_id, ts, base64.b64encode(sig).decode()), strict=True))

    def url(self, path: str) -> str:
        if path.startswith("http://") or path.startswith("https://"):
            return path
        if not path.startswith(API_PREFIX):
            path = API_PREFIX + path
        return self.base_url + path

    def _request(self, method: str, path: str, *, max_bytes: int | None = None,
                 **kwargs) -> tuple[requests.Response, bytes]:
        """``(response, body)``; the body is read in full but never past ``max_bytes`` (default
        ``max_response_bytes``) nor past ``deadline`` seconds from the start of the request."""
        url = self.url(path)
        limit = self.max_response_bytes if max_bytes is None else max_bytes
        started = time.monotonic()
        if method == "GET":
            kwargs["headers"] = {**kwargs.get("headers", {}), **self._auth_headers(method, url)}
        deadline_at = started + self.deadline
        try:
            per_read = min(self.timeout, self.deadline)
            resp = self._send(method, url, deadline_at, timeout=(per_read, per_read), stream=True, **kwargs)
        except requests.RequestException as exc:
            raise ServerError(f"cannot reach the aggregator at {url}: {exc}", status=None,
                              reason="unreachable") from exc
        try:
            body = _read_body(resp, url, limit, deadline_at, self.deadline)
        finally:
            resp.close()
        if resp.status_code >= 400:
            reason, detail = "http_error", body[:300].decode("utf-8", "replace")
            try:
                doc = json.loads(body)
                reason, detail = doc.get("error", reason), doc.get("detail", detail)
            except (ValueError, AttributeError):
                pass
            err = ServerError(
                f"{method} {url} was refused with HTTP {resp.status_code} ({reason}): {detail}",
                status=resp.status_code,
                reason=reason,
            )
            # Seconds the server asks the caller to wait before trying again (a 503 lock_timeout sends it), or None.
            err.retry_after = _retry_after(resp.headers.get("Retry-After"))
            raise err
        return resp, body

    def _send(self, method: str, url: str, deadline_at: float, **kwargs) -> requests.Response:
        """The response (status and headers; the body is streamed), or ServerError once the deadline passes.

        Connecting and reading the headers run on a helper thread: a server that drips its status line or
        headers one byte at a time resets every per-read timeout, so only a wait with a deadline bounds them.
        At the deadline the helper's connection is shut down (with the client's own session), so the thread
        ends at once instead of reading for as long as the server drips; a response it still gets is closed.
        """
        box: dict = {}
        done, abandoned = threading.Event(), threading.Event()

        def run() -> None:
            ident = threading.get_ident()
            with _REGISTRY_LOCK:
                _WATCHED.add(ident)
            try:
                box["resp"] = self.session.request(method, url, **kwargs)
            except BaseException as exc:  # handed to the caller below
                box["exc"] = exc
            finally:
                with _REGISTRY_LOCK:
                    _WATCHED.discard(ident)
                    _IN_USE.pop(ident, None)
                    _CUT.discard(ident)
                done.set()
                if abandoned.is_set() and "resp" in box:
                    box["resp"].close()

        helper = threading.Thread(target=run, name="fedser-http", daemon=True)
        helper.start()
        if not done.wait(max(0.0, deadline_at - time.monotonic())):
            abandoned.set()
            if helper.ident is not None:
                _cut_connection_of(helper.ident)
            if done.is_set() and "resp" in box:  # it arrived just now: not left open
                box["resp"].close()
            raise ServerError(f"{url} sent no complete status line and headers within {self.deadline:g} s",
                              status=None, reason="deadline")
        if "exc" in box:
            raise box["exc"]
        return box["resp"]

    @staticmethod
    def _json(url: str, body: bytes) -> dict:
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise ServerError(f"{url} answered with a body that is not JSON: {exc}", status=None,
                              reason="bad_reply") from exc
        if not isinstance(doc, dict):
            raise ServerError(f"{url} answered with JSON that is not an object", status=None, reason="bad_reply")
        return doc

    def enroll(self, *, token: str, public_key: str, name: str = "") -> dict:
        """Register this device's public key with a one-time token.

        Returns the server's JSON: ``device_id``, ``server_public_key`` (base64)
        and ``manifest`` (the signed current manifest document, or null).
        """
        _, body = self._request("POST", "/devices/enroll", json={"token": token, "public_key": public_key,
                                                                  "name": name})
        return self._json(self.url("/devices/enroll"), body)

    def post_update(self, envelope: bytes) -> dict:
        _, body = self._request(
            "POST", "/updates", data=envelope, headers={"Content-Type": "application/octet-stream"}
        )
        return self._json(self.url("/updates"), body)

    def get_manifest(self, etag: str | None = None) -> tuple[bytes | None, str | None]:
        """Current signed manifest bytes and ETag; ``(None, etag)`` when unchanged (HTTP 304)."""
        headers = {"If-None-Match": etag} if etag else {}
        resp, body = self._request("GET", "/manifest", headers=headers)
        if resp.status_code == 304:
            return None, etag
        return body, resp.headers.get("ETag")

    def get_blob(self, url: str, *, size: int | None = None) -> bytes:
        """The file at ``url``; with ``size`` (the manifest's), refused as soon as it would be longer."""
        return self._request("GET", url, max_bytes=size)[1]


def _retry_after(value: str | None) -> int | None:
    """``Retry-After`` in seconds (delta-seconds form only, at most a day), else None."""
    value = (value or "").strip()
    return min(int(value), 86400) if value.isdigit() and len(value) <= 9 else None


def _read_body(resp: requests.Response, url: str, limit: int, deadline_at: float, deadline: float) -> bytes:
    """Read ``resp``'s body, stopping past ``limit`` bytes or at ``deadline_at`` (time.monotonic)."""
    declared = resp.headers.get("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise ServerError(f"{url} announces {int(declared)} bytes; at most {limit} are expected", status=None,
                          reason="too_large")
    read1 = getattr(resp.raw, "read1", None)  # urllib3 2: returns what has arrived, so the clock is checked often
    chunks, total = [], 0
    while True:
        if time.monotonic() > deadline_at:
            raise ServerError(f"{url} did not finish within {deadline:g} s ({total} bytes came)", status=None,
                              reason="deadline")
        try:
            chunk = read1(65536, decode_content=True) if read1 else resp.raw.read(8192, decode_content=True)
        except Exception as exc:  # socket, urllib3 (protocol, read timeout) and requests errors alike
            raise ServerError(f"reading {url} failed after {total} bytes: {exc}", status=None,
                              reason="unreachable") from exc
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise ServerError(f"{url} sent more than the {limit} bytes expected", status=None, reason="too_large")
        chunks.append(chunk)
