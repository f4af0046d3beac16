"""HTTP client of the aggregator's device API (``/api/v1``).

Every failure becomes a :class:`~edge_sdk.errors.ServerError` carrying the
HTTP status (``None`` when the server could not be reached) and the server's
machine-readable reason, so callers decide between retrying and giving up.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import requests

from edge_sdk.errors import ServerError
from edge_sdk.wire import REQUEST_HEADERS, request_signing_message

log = logging.getLogger("edge_sdk")

__all__ = ["ServerClient", "API_PREFIX"]

API_PREFIX = "/api/v1"


class ServerClient:
    """Talks to one aggregator.

    Parameters
    ----------
    base_url : str
        ``http://host:port`` of the aggregator.
    timeout : float
        Seconds per request.
    device_id, sign : str, callable
        Once enrolled: requests without a signed body (manifest, model files)
        carry the device id, a timestamp and an Ed25519 signature over
        :func:`edge_sdk.wire.request_signing_message`.
    """

    def __init__(self, base_url: str, *, timeout: float = 30.0, session: requests.Session | None = None,
                 device_id: str | None = None, sign: Callable[[bytes], bytes] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
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

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        url = self.url(path)
        if method == "GET":
            kwargs["headers"] = {**kwargs.get("headers", {}), **self._auth_headers(method, url)}
        try:
            resp = self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ServerError(f"cannot reach the aggregator at {url}: {exc}", status=None,
                              reason="unreachable") from exc
        if resp.status_code >= 400:
            reason, detail = "http_error", resp.text[:300]
            try:
                body = resp.json()
                reason, detail = body.get("error", reason), body.get("detail", detail)
            except ValueError:
                pass
            raise ServerError(
                f"{method} {url} was refused with HTTP {resp.status_code} ({reason}): {detail}",
                status=resp.status_code,
                reason=reason,
            )
        return resp

    def enroll(self, *, token: str, public_key: str, name: str = "") -> dict:
        """Register this device's public key with a one-time token.

        Returns the server's JSON: ``device_id``, ``server_public_key`` (base64)
        and ``manifest`` (the signed current manifest document, or null).
        """
        return self._request("POST", "/devices/enroll", json={"token": token, "public_key": public_key,
                                                               "name": name}).json()

    def post_update(self, envelope: bytes) -> dict:
        resp = self._request(
            "POST", "/updates", data=envelope, headers={"Content-Type": "application/octet-stream"}
        )
        return resp.json()

    def get_manifest(self, etag: str | None = None) -> tuple[bytes | None, str | None]:
        """Current signed manifest bytes and ETag; ``(None, etag)`` when unchanged (HTTP 304)."""
        headers = {"If-None-Match": etag} if etag else {}
        resp = self._request("GET", "/manifest", headers=headers)
        if resp.status_code == 304:
            return None, etag
        return resp.content, resp.headers.get("ETag")

    def get_blob(self, url: str) -> bytes:
        return self._request("GET", url).content
