"""The device's local feedback page: live predictions, right / wrong, a corrected-label picker, personal accuracy.

Standard library only (``http.server``); it listens on 127.0.0.1 by default. What it checks on every request:

- **Host**: the request's ``Host`` must be one of the names this server answers to (``allowed_hosts``; by
  default the loopback names, and when bound beyond loopback also the bound address, this machine's host
  name, ``<hostname>.local`` and its addresses; and always the IP address the client connected to, which no
  DNS answer can rebind) with the bound port. A DNS-rebinding page (``evil.example``
  resolving to 127.0.0.1) sends its own name as Host and is refused (403 ``host_not_allowed``).
- **Origin**: a POST that carries an Origin must come from this page's own origin (403 ``cross_origin``).
- **Token**: when the server has one (always when bound beyond loopback: generated once and kept in the
  device's state folder as ``web-token``), ``/api/*`` needs it in ``X-Fedser-Token`` (401 ``token_required``);
  the page takes it from its URL's fragment (``/#token=...``, never sent to the server), keeps it in the browser and
  takes it out of the address bar.
- **Body**: ``application/json`` (415), a ``Content-Length`` of 1 to :data:`MAX_BODY` bytes (411, 400, 413),
  read within ``timeout`` seconds in all (408, then the connection is closed), a flat object
  ``{"id": str, "answer": str}`` (400 ``malformed``, nesting included); ``POST /api/wipe`` exactly
  ``{"confirm": "wipe"}`` (and 403 ``wipe_disabled`` with ``allow_wipe`` off).
- **Download**: everything the device keeps about its user, streamed in HTTP/1.1 chunks (505 to an HTTP/1.0
  request), one download at a time (429 ``busy``), each piece sent within ``timeout`` s, memory bounded whatever
  the store holds (403 ``export_disabled`` with ``allow_export`` off). A script sends ``GET /api/export`` with the
  token. The page posts ``{"confirm": "export"}`` to ``/api/export`` (the POST checks above) for a link
  ``/download/<ticket>``, good for :data:`TICKET_SECONDS` and :data:`TICKET_USES` downloads started (404
  ``no_such_download`` after; a refused request uses none), which the browser then
  saves to disk itself, with its own progress, instead of the page holding it all in the phone's memory; a
  request another site started (``Sec-Fetch-Site``) is refused (403 ``cross_origin``).
- **Framing and sniffing**: every response has ``X-Frame-Options: DENY``, CSP ``frame-ancestors 'none'``,
  ``X-Content-Type-Options: nosniff`` and ``Cache-Control: no-store``; the page's CSP lets only its own script run
  (by its sha256: no inline handler, no injected ``<script>``).

The page speaks its user's language (:mod:`edge_sdk.i18n`: the catalogues, checked, are embedded in it once at
start); it posts the model's own labels whatever the language shown.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import quote, urlsplit

from edge_sdk.errors import FedserError, ParameterError, StorageFullError
from edge_sdk.i18n import bundled_catalogues, check_language_setting, page_json

log = logging.getLogger("edge_sdk")

__all__ = ["FeedbackServer", "MAX_BODY", "configured_allowed_hosts", "default_allowed_hosts", "is_loopback"]

MAX_BODY = 4096  # bytes of a feedback POST: {"id": 32 hex, "answer": a label} needs well under 200
MAX_FIELD = 200  # characters of id and answer
TICKET_SECONDS = 60.0  # a download link (POST /api/export) is good for this long
TICKET_USES = 3  # downloads it may start (some phone browsers fetch a download twice: a try, then their own)
MAX_TICKETS = 4  # outstanding at once; a fifth replaces the oldest
MAX_CONNECTIONS = 32  # open at once; each lasts at most `timeout` seconds unless it is being answered
_SAFE_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                 ("Referrer-Policy", "no-referrer"))  # on every response
_I18N_SLOT = b"/*I18N*/null"  # in static/feedback.html: the catalogues go here
_CSP = ("default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def script_hashes(page: bytes) -> str:
    """A CSP ``script-src`` list naming the page's own inline ``<script>`` elements by their sha256 (the device's
    page and the aggregator's console): nothing else runs, no inline handler, no injected script."""
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.S)
    # a <script type=...> or <SCRIPT> is not hashed (nor would it run); the pages hold no "<script" text in their
    # scripts, and the embedded catalogues cannot (page_json writes "<" as \u003c)
    if len(scripts) != len(re.findall(rb"<script", page, re.I)):
        raise FedserError("a page's <script> elements must be written <script>...</script>, without attributes, "
                          "for the Content-Security-Policy to name them")
    # hashed with the line ends a browser parses them with (CRLF and CR become LF): a copy checked out with Windows
    # line ends would otherwise block its own script
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(_lf(s)).digest()).decode()}'" for s in scripts)


def _lf(text: bytes) -> bytes:
    return text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def page_csp(page: bytes) -> str:
    """The page's Content-Security-Policy: only its own inline scripts run (so no markup that ever reached the page,
    a label or a message, could run script), and it may talk to this server only."""
    return _CSP.format(scripts=script_hashes(page))


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) is this machine's loopback only."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(host: str) -> set[str]:
    """The Host names a server bound to ``host`` answers to by default (lowercase, IPv6 in brackets)."""
    names = {"localhost", "127.0.0.1", "[::1]"}
    if is_loopback(host):
        return names
    wildcard = host in ("", "0.0.0.0", "::")
    if not wildcard:
        names.add(_host_name(host))
    hostname = socket.gethostname().lower()
    names |= {hostname, f"{hostname}.local", socket.getfqdn().lower()}
    if wildcard:
        try:
            for info in socket.getaddrinfo(hostname, None):
                names.add(_host_name(info[4][0]))
        except OSError:
            pass
    return names


def configured_allowed_hosts(web_cfg) -> set[str]:
    """:func:`default_allowed_hosts` of ``web.host`` plus the comma-separated ``web.allowed_hosts`` names."""
    extra = {_host_name(h.strip()) for h in web_cfg.allowed_hosts.split(",") if h.strip()}
    return default_allowed_hosts(web_cfg.host) | extra


def _host_name(addr: str) -> str:
    addr = addr.lower()
    try:
        return f"[{addr.strip('[]')}]" if ipaddress.ip_address(addr.strip("[]")).version == 6 else addr
    except ValueError:
        return addr


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header -> (lowercase name, port or None), or None when it is not a host[:port]."""
    value = value.strip().lower()
    if not value or any(c.isspace() or c in "/?#@\\" for c in value) or len(value) > 300:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1:]
    else:
        name, _, port = value.partition(":")
        rest = ":" + port if _ else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6):
        return None
    return name, int(rest[1:]) if rest else None


class _BoundedServer(ThreadingHTTPServer):
    """At most :data:`MAX_CONNECTIONS` connections at once; one more is closed at once (and counted)."""

    daemon_threads = True
    request_queue_size = 64  # the listen backlog: a burst of connections waits here, not in SYN retries

    def __init__(self, *args, **kwargs) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.turned_away = 0
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.turned_away += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _BoundedServer6(_BoundedServer):
    """The same, bound to an IPv6 address ("::" also takes IPv4 where the system allows dual-stack sockets)."""

    address_family = socket.AF_INET6


class _Refusal(Exception):
    def __init__(self, status: int, error: str, detail: str, close: bool = False) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.close = status, error, detail, close


class FeedbackServer:
    """Serves the page for one :class:`~edge_sdk.device.Device` in a background thread.

    Parameters
    ----------
    host, port
        Where to listen; 127.0.0.1 (this machine only) by default. Beyond loopback the page needs a token.
    allowed_hosts
        Host names (without port) the page answers to; default :func:`default_allowed_hosts`.
    token
        Required in ``X-Fedser-Token`` on ``/api/*``. None: none on loopback; beyond loopback the one kept in
        ``<state>/web-token`` (made on first use). "" disables it (only for a network you fully trust).
    timeout
        Seconds a client has to send its request line, headers and body in all.
    language
        ``auto`` (the browser's languages choose) or the tag of a catalogue the page starts in (``[feedback]
        language``); its user can switch on the page.
    languages
        The page's catalogues (:func:`edge_sdk.i18n.load_languages`); None: the bundled ones.
    allow_wipe
        Whether the page's user may delete what the device learned from them (``POST /api/wipe``, the "Your data"
        panel; ``[web] allow_wipe``). Off: 403 ``wipe_disabled``, and the panel only shows what is kept.
    keeps_audio
        Whether new predictions keep their recording (``[privacy] store_audio``): the panel says so.
    allow_export
        Whether the page's user may download a copy of everything the device keeps about them (``GET /api/export``,
        what ``fedser-edge export-data`` writes; ``[web] allow_export``). Off: 403 ``export_disabled``, no button.
    """

    def __init__(self, device, *, host: str = "127.0.0.1", port: int = 8090, stats=None,
                 allowed_hosts: set[str] | list[str] | None = None, token: str | None = None,
                 timeout: float = 10.0, language: str = "auto", languages: dict | None = None,
                 allow_wipe: bool = True, keeps_audio: bool = False, allow_export: bool = True) -> None:
        self.device, self.stats = device, stats
        self.allow_wipe, self.keeps_audio, self.wipes = bool(allow_wipe), bool(keeps_audio), 0
        self.allow_export, self.exports = bool(allow_export), 0
        self._wiping = threading.Lock()  # held while a wipe runs
        self._exporting = threading.Lock()  # held while a download of the user's data runs
        self._tickets: dict[str, tuple[float, int]] = {}  # the page's download links: ticket -> (expiry, uses left)
        if token is None and not is_loopback(host):
            token = self._stored_token(Path(device.state_dir))
        self.token = token or None
        if self.token is not None and not (16 <= len(self.token) <= 200 and self.token.isascii()
                                           and self.token.isprintable()):
            raise ParameterError("the web token must be 16 to 200 printable ASCII characters")
        check_language_setting(language)
        page = resources.files("edge_sdk").joinpath("static/feedback.html").read_bytes()
        if page.count(_I18N_SLOT) != 1:
            raise FedserError("edge_sdk/static/feedback.html has lost its I18N placeholder: reinstall fedser")
        self.languages = bundled_catalogues() if languages is None else dict(languages)
        page = page.replace(_I18N_SLOT, page_json(self.languages, language).encode("ascii"))
        csp = page_csp(page)  # of the page with its catalogues in place
        server = self
        self.refusals: dict[str, int] = {}
        self._refusals_lock = threading.Lock()
        self._state_error: str | None = None  # the last failure to read the page's state that was logged

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet: the device's log is for the device
                log.debug("web: " + fmt, *args)

            def setup(self):
                super().setup()
                self.connection.settimeout(timeout)

            def handle_one_request(self):
                # each request (and the wait for it on a kept-alive connection) has `timeout` s in all to arrive
                # (a body that is late is answered 408); a watchdog shuts the socket down 2 s after that, so no
                # client holds a thread by dripping bytes
                self.deadline = time.monotonic() + timeout
                self._watchdog = threading.Timer(timeout + 2.0, self._expire)
                self._watchdog.daemon = True
                self._watchdog.start()
                try:
                    super().handle_one_request()
                except (TimeoutError, ConnectionError, ValueError):
                    self.close_connection = True
                finally:
                    self._watchdog.cancel()

            def _expire(self):
                with server._refusals_lock:
                    server.refusals["timeout"] = server.refusals.get("timeout", 0) + 1
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in _SAFE_HEADERS:
                    self.send_header(name, value)
                self.send_header("Content-Security-Policy", csp if ctype.startswith("text/html")
                                 else "default-src 'none'; frame-ancestors 'none'")
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, obj) -> None:
                self._send(status, json.dumps(obj).encode())

            def send_error(self, code, message=None, explain=None):  # http.server's own refusals: JSON too
                self.close_connection = True
                if self.request_version == "HTTP/0.9":  # a line it could not parse: answer with headers anyway
                    self.request_version = "HTTP/1.0"
                try:
                    self._json(code, {"error": "bad_request" if code < 500 else "unsupported",
                                      "detail": str(message or "")[:200]})
                except OSError:
                    pass

            def _refuse(self, r: _Refusal) -> None:
                with server._refusals_lock:
                    server.refusals[r.error] = server.refusals.get(r.error, 0) + 1
                if r.close:
                    self.close_connection = True
                self._json(r.status, {"error": r.error, "detail": r.detail})

            def _check_host(self) -> None:
                got = _split_host(self.headers.get("Host") or "")
                bound_port = server.httpd.server_address[1]
                # the address the client reached, as an IP literal, is this machine's own (no DNS to rebind)
                reached = _host_name(self.connection.getsockname()[0])
                if got is None or (got[0] not in server.allowed_hosts and got[0] != reached) or \
                        (got[1] or 80) != bound_port:
                    raise _Refusal(403, "host_not_allowed", f"Host {self.headers.get('Host')!r} is not this page "
                                   f"(allowed: {sorted(server.allowed_hosts)} on port {bound_port})")

            def _check_token(self) -> None:
                if server.token is None:
                    return
                given = (self.headers.get("X-Fedser-Token") or "").encode("utf-8", "surrogateescape")
                if not hmac.compare_digest(given, server.token.encode()):
                    raise _Refusal(401, "token_required", "open the page with the link that has #token=... "
                                   "(the device prints it; it is in <state>/web-token)")

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding"):
                    raise _Refusal(411, "length_required", "send a Content-Length, not chunks", close=True)
                text = self.headers.get("Content-Length")
                if text is None:
                    raise _Refusal(411, "length_required", "send a Content-Length", close=True)
                if not text.strip().isdigit() or not text.isascii():
                    raise _Refusal(400, "bad_length", f"Content-Length {text!r} is not a length", close=True)
                length = int(text)
                if length > MAX_BODY:
                    raise _Refusal(413, "too_large", f"{length} bytes; at most {MAX_BODY}", close=True)
                chunks, got = [], 0
                while got < length:
                    remaining = self.deadline - time.monotonic()
                    if remaining <= 0:
                        raise _Refusal(408, "timeout", f"the body did not arrive within {timeout} s", close=True)
                    self.connection.settimeout(remaining)
                    try:
                        chunk = self.rfile.read1(length - got)
                    except TimeoutError:
                        raise _Refusal(408, "timeout", f"the body did not arrive within {timeout} s",
                                       close=True) from None
                    if not chunk:
                        raise _Refusal(400, "short_body", f"{got} of {length} bytes arrived", close=True)
                    chunks.append(chunk)
                    got += len(chunk)
                return b"".join(chunks)

            def do_GET(self):  # noqa: N802 - http.server's naming
                self._watchdog.cancel()  # the request is in: answering it is up to us
                try:
                    self._check_host()
                    path = urlsplit(self.path).path
                    if path in ("/", "/index.html"):
                        return self._send(200, page, "text/html; charset=utf-8")
                    if path == "/api/state":
                        self._check_token()
                        return self._json(200, self._state())
                    if path == "/api/export":  # a script's download, with the token header
                        self._check_fetch_site()
                        self._check_token()
                        return self._export()
                    if path.startswith("/download/"):  # the page's: a short-lived ticket the browser saves natively
                        self._check_fetch_site()
                        return self._export(ticket=self._find_ticket(path[len("/download/"):]))
                    raise _Refusal(404, "not_found", path[:200])
                except _Refusal as r:
                    self._refuse(r)

            def _state(self) -> dict:
                """What the page shows; a store that cannot be read (locked by a CLI writing beside listen, a
                damaged SD card) is a 503 the page shows, never a connection dropped unanswered."""
                try:
                    state = server.state()
                except (FedserError, sqlite3.Error, OSError) as exc:
                    server._state_failed(exc, bug=False)
                    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)  # (no file paths)
                    raise _Refusal(503, "state_unavailable", f"the device could not read what it stored ("
                                   f"{why[:200]}); it tries again") from None
                except Exception as exc:  # a bug: answered, and logged with its traceback
                    server._state_failed(exc, bug=True)
                    raise _Refusal(500, "state_unavailable", f"the device failed ({type(exc).__name__}); its log "
                                   "says where") from None
                server._state_failed(None)
                return state

            def _check_fetch_site(self) -> None:
                # a browser says where a request came from: another site may not even start a download (its page
                # could not read it, but it would take the one download slot and the Pi's time)
                if (self.headers.get("Sec-Fetch-Site") or "same-origin") not in ("same-origin", "none"):
                    raise _Refusal(403, "cross_origin", f"Sec-Fetch-Site {self.headers['Sec-Fetch-Site'][:50]}")

            def _find_ticket(self, ticket: str) -> str:
                now = time.monotonic()
                with server._refusals_lock:
                    for known, (expires, _) in list(server._tickets.items()):
                        if expires < now:
                            del server._tickets[known]
                    match = next((k for k in server._tickets
                                  if hmac.compare_digest(k.encode(), ticket.encode("utf-8", "surrogateescape"))), None)
                if match is None:
                    raise _Refusal(404, "no_such_download", f"this download link was used {TICKET_USES} times or "
                                   f"is over {TICKET_SECONDS:.0f} s old: tap the download button again")
                return match

            def _use_ticket(self, ticket: str) -> None:
                """One of the ticket's uses, taken when its download starts (a refusal before, busy or HTTP/1.0,
                costs none); gone after the last, or if it expired meanwhile."""
                with server._refusals_lock:
                    expires, left = server._tickets.get(ticket, (0.0, 0))
                    if expires < time.monotonic() or left <= 0:
                        server._tickets.pop(ticket, None)
                        raise _Refusal(404, "no_such_download", "this download link was used up or expired: tap the "
                                       "download button again")
                    if left == 1:
                        del server._tickets[ticket]
                    else:
                        server._tickets[ticket] = (expires, left - 1)

            def _ticket(self, data) -> None:
                if data != {"confirm": "export"}:
                    raise _Refusal(400, "malformed", 'send {"confirm": "export"}, nothing else')
                self._export_allowed()
                if server._exporting.locked():
                    raise _Refusal(429, "busy", "a download of this device's data is under way; try again when it "
                                   "ends")
                ticket = secrets.token_urlsafe(24)
                with server._refusals_lock:
                    while len(server._tickets) >= MAX_TICKETS:  # the oldest goes
                        del server._tickets[min(server._tickets, key=lambda k: server._tickets[k][0])]
                    server._tickets[ticket] = (time.monotonic() + TICKET_SECONDS, TICKET_USES)
                self._json(200, {"url": f"/download/{ticket}", "expires_in": int(TICKET_SECONDS)})

            def _export_allowed(self) -> None:
                if not server.allow_export:
                    raise _Refusal(403, "export_disabled", "this device's keeper has turned downloading from the page "
                                   "off ([web] allow_export = false); they can run fedser-edge export-data")

            def _export(self, ticket: str | None = None) -> None:
                """Everything stored about the user (:meth:`FeedbackStore.iter_export`), streamed as it is read:
                HTTP/1.1 chunks, so a download cut short (the device's disk failing mid-read, say) ends inside a
                chunk it announced and the browser reports it failed instead of saving half a file as whole."""
                self._export_allowed()
                if self.request_version != "HTTP/1.1":
                    raise _Refusal(505, "http_1_1_required", "the download is sent in HTTP/1.1 chunks", close=True)
                if not server._exporting.acquire(blocking=False):  # one at a time: reading it all competes with
                    # the microphone's classifications on a Pi
                    raise _Refusal(429, "busy", "a download of this device's data is under way; try again when it "
                                   "ends")
                try:
                    if ticket is not None:
                        self._use_ticket(ticket)
                    self.protocol_version = "HTTP/1.1"
                    self.close_connection = True
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                    stamp = time.strftime("%Y%m%d-%H%M%S")
                    self.send_header("Content-Disposition", f'attachment; filename="fedser-my-data-{stamp}.json"')
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("Connection", "close")
                    for name, value in _SAFE_HEADERS:
                        self.send_header(name, value)
                    self.send_header("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
                    self.send_header("Cross-Origin-Resource-Policy", "same-origin")
                    self.end_headers()
                    # each piece must leave within `timeout` s: a reader that stops frees its thread
                    self.connection.settimeout(timeout)
                    sent, pending, size, counted = 0, [], 0, False
                    pieces = server.device.store.iter_export()
                    try:
                        while True:
                            try:
                                piece = next(pieces)
                            except StopIteration:
                                break
                            except Exception as exc:  # the store failed mid-read: end inside a chunk it announces,
                                # so every client sees the body is cut, even a lenient one (that takes a body ending
                                # on a chunk's edge as whole); the socket itself is fine
                                self.wfile.write(b"1000\r\n")
                                self.wfile.flush()
                                self._cut(sent, exc)
                                return
                            pending.append(piece.encode())
                            size += len(pending[-1])
                            if size >= 16384 or len(pending) >= 64:
                                sent += self._chunk(b"".join(pending))
                                pending, size = [], 0
                        sent += self._chunk(b"".join(pending)) if pending else 0
                        with server._refusals_lock:  # counted before the client can see the end (taken back if
                            server.exports += 1  # the end cannot be sent)
                        counted = True
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                    except OSError as exc:  # the reader went or stopped reading: nothing more can reach it
                        if counted:
                            with server._refusals_lock:
                                server.exports -= 1
                        self._cut(sent, exc)
                        return
                    log.info("%s downloaded what this device keeps about its user (%d bytes)",
                             "the page's user" if ticket else "a client of the page's API", sent)
                finally:
                    server._exporting.release()

            def _cut(self, sent: int, exc: BaseException) -> None:
                with server._refusals_lock:
                    server.refusals["export_cut"] = server.refusals.get("export_cut", 0) + 1
                if isinstance(exc, (OSError, sqlite3.Error)):
                    log.warning("the page's download of the user's data stopped after %d bytes: %s", sent, exc)
                else:  # a bug: logged with its traceback, the client sees a failed download
                    log.error("the page's download of the user's data failed after %d bytes", sent, exc_info=exc)

            def _chunk(self, data: bytes) -> int:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                return len(data)

            def _wipe(self, data) -> None:
                if data != {"confirm": "wipe"}:  # a deliberate request, never a stray or replayed feedback body
                    raise _Refusal(400, "malformed", 'send {"confirm": "wipe"}, nothing else')
                try:
                    with server._wiping:  # stop() waits for it (bounded)
                        removed = server.device.wipe_data()  # a fit under way stops; a post under way finishes
                except (FedserError, sqlite3.OperationalError) as exc:  # (a full disk still wipes, without VACUUM;
                    # "database is locked": a CLI writing beside listen)
                    raise _Refusal(503, "not_wiped", f"perhaps partly deleted; try again: {str(exc)[:500]}") from None
                except Exception as exc:  # a bug: answered (and logged), never a dropped connection
                    log.exception("the page's wipe failed")
                    raise _Refusal(500, "not_wiped", f"perhaps partly deleted: {type(exc).__name__}: "
                                   f"{str(exc)[:300]}") from None
                with server._refusals_lock:
                    server.wipes += 1
                log.warning("the page's user deleted what this device learned from them: %d predictions, %d pending "
                            "updates, personal files %s", removed["predictions"], removed["pending_updates"],
                            removed["personal_files"] or "none")
                self._json(200, {"wiped": removed})

            def do_POST(self):  # noqa: N802
                try:
                    self._check_host()
                    path = urlsplit(self.path).path
                    if path not in ("/api/feedback", "/api/wipe", "/api/export"):
                        raise _Refusal(404, "not_found", self.path[:200], close=True)
                    origin = self.headers.get("Origin")
                    if origin is not None and urlsplit(origin).netloc.lower() != self.headers["Host"].lower():
                        raise _Refusal(403, "cross_origin", f"origin {origin[:200]} is not this page", close=True)
                    self._check_token()
                    if path == "/api/wipe" and not server.allow_wipe:
                        raise _Refusal(403, "wipe_disabled", "this device's keeper has turned deleting from the page "
                                       "off ([web] allow_wipe = false); they can run fedser-edge wipe-data",
                                       close=True)
                    if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                        raise _Refusal(415, "not_json", "send application/json", close=True)
                    body = self._read_body()
                    self._watchdog.cancel()
                    try:
                        data = json.loads(body)
                    except (ValueError, RecursionError) as exc:
                        raise _Refusal(400, "malformed", f"not JSON: {str(exc)[:200]}") from None
                    if path == "/api/wipe":
                        return self._wipe(data)
                    if path == "/api/export":
                        return self._ticket(data)
                    if not (isinstance(data, dict) and set(data) == {"id", "answer"}
                            and all(isinstance(v, str) and 0 < len(v) <= MAX_FIELD for v in data.values())):
                        raise _Refusal(400, "malformed", f"send {{\"id\": str, \"answer\": str}} (strings of 1 to "
                                       f"{MAX_FIELD} characters), nothing else")
                    try:
                        server.device.feedback(data["id"], data["answer"])
                    except StorageFullError as exc:  # not the request's fault: nothing stored, try again later
                        raise _Refusal(507, "storage_full", str(exc)[:500]) from None
                    except FedserError as exc:
                        raise _Refusal(400, "refused", str(exc)[:500]) from None
                    self._json(200, {"stored": True, "accuracy": server.device.store.personal_accuracy()})
                except _Refusal as r:
                    self._refuse(r)

        bind = host.strip("[]")
        server_class = _BoundedServer6 if ":" in bind else _BoundedServer  # "::" (every interface) and "::1"
        self.httpd = server_class((bind, port), Handler)
        self.allowed_hosts = ({_host_name(h) for h in allowed_hosts} if allowed_hosts is not None
                              else default_allowed_hosts(host))
        self._thread: threading.Thread | None = None

    @staticmethod
    def _stored_token(state_dir: Path) -> str:
        path = state_dir / "web-token"
        try:
            token = path.read_text(encoding="ascii").strip()
            if len(token) >= 16:
                os.chmod(path, 0o600)  # a file made or copied with a looser mode: the token is the page's key
                return token
        except (OSError, UnicodeDecodeError):
            pass
        token = secrets.token_urlsafe(24)
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token + "\n")
        return token

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{_host_name(host)}:{port}/"

    @property
    def page_url(self) -> str:
        """The link to open: :attr:`url` (``<hostname>.local`` when bound to every interface), with ``#token=...``
        when the server has a token."""
        host, port = self.httpd.server_address[:2]
        base = f"http://{socket.gethostname().lower()}.local:{port}/" if host in ("0.0.0.0", "::") else self.url
        return base + (f"#token={quote(self.token, safe='')}" if self.token else "")  # (the page decodes it)

    def _state_failed(self, exc: BaseException | None, bug: bool = False) -> None:
        """Log a failure to read the page's state once, not at every poll of every open page (once a second): again
        only when it changes, or after the state was read again (``exc`` None)."""
        what = None if exc is None else f"{type(exc).__name__}: {str(exc)[:300]}"
        with self._refusals_lock:
            if what == self._state_error:
                return
            self._state_error = what
        if exc is None:
            log.info("the page's state is readable again")
        elif bug:
            log.error("the page's state failed (logged once until it changes)", exc_info=exc)
        else:
            log.warning("the page's state cannot be read (logged once until it changes): %s", what)

    def state(self) -> dict:
        d = self.device
        counts = d.store.counts()
        return {"labels": list(d.metadata.labels) if d.model else [], "model_version": d.model_version,
                "model_source": d.model_source, "personalized": d.personalized,
                "predictions": d.store.recent(20), "accuracy": d.store.personal_accuracy(),
                "listener": self.stats() if self.stats else None,
                # the "Your data" panel: what stays on the device, what left it (weight changes, never audio)
                "data": {"predictions": counts["predictions"], "answers": counts["feedback"],
                         "recordings": counts["audio_kept"], "keeps_audio": self.keeps_audio,
                         "updates_sent": counts["outbox_sent"],  # accepted or refused by the server
                         "updates_waiting": counts["outbox_pending"], "enrolled": bool(d.enrolled),
                         "allow_wipe": self.allow_wipe, "allow_export": self.allow_export}}

    def start(self) -> FeedbackServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fedser-web", daemon=True)
        self._thread.start()
        link = self.page_url.split("#", 1)[0]  # the token stays out of the journal (the CLI prints the link)
        host = self.httpd.server_address[0]
        if self.token and not is_loopback(host):
            log.warning("feedback page open beyond this machine at %s (answers to %s, or this machine's address); "
                        "open %s#token=<the token in %s, percent-encoded> on the phone (or the same link with "
                        "the device's address)", self.url, ", ".join(sorted(self.allowed_hosts)), link,
                        Path(self.device.state_dir) / "web-token")
        elif self.token:
            log.info("feedback page on %s (this machine only; the API needs the token)", self.url)
        else:
            log.info("feedback page on %s", self.url)
        return self

    def stop(self, wipe_wait: float = 60.0) -> None:
        """Stop serving; a wipe under way is given ``wipe_wait`` seconds to finish (it may be waiting for a post)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._wiping.acquire(timeout=wipe_wait):
            self._wiping.release()
        else:
            log.warning("stopping with the page's wipe still under way (waiting for a post under way)")
