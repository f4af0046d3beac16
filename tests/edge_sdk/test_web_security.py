"""The local feedback page over real HTTP on loopback, as an attacker would try it (issue 11, item 12): DNS
rebinding, deep JSON, lying Content-Length, stalled and dripping clients, framing and sniffing headers; and the
token the page needs once it is open beyond loopback."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import socket
import stat
import time
from urllib.parse import quote

import numpy as np
import pytest
import requests

from edge_sdk.errors import ParameterError
from edge_sdk.web import MAX_BODY, FeedbackServer
from tools.demo import free_port


@pytest.fixture
def pred(device):
    t = np.arange(16000) / 16000
    return device.classify((0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32))


@pytest.fixture
def server(device):
    srv = FeedbackServer(device, port=free_port(), timeout=1.0).start()
    yield srv
    srv.stop()


def _raw(server, data: bytes, *, wait: float = 30.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (or ``wait`` s pass)."""
    host, port = server.httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                return out
            out += chunk
        raise AssertionError(f"the server still held the connection after {wait} s; got {out[:300]!r}")


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0


def _post(server, body: bytes, *, length: str | None = None, host: str | None = None, extra: str = "") -> bytes:
    port = server.httpd.server_address[1]
    head = (f"POST /api/feedback HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\n"
            f"Content-Type: application/json\r\n{extra}")
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return head.encode() + b"\r\n" + body


def test_dns_rebinding_is_refused_by_the_host_header(server, device, pred):
    """evil.example resolving to 127.0.0.1: the browser sends Host and Origin of evil.example, which match."""
    port = server.httpd.server_address[1]
    evil = f"evil.example:{port}"
    r = requests.post(server.url + "api/feedback", json={"id": pred.id, "answer": "up"},
                      headers={"Host": evil, "Origin": f"http://{evil}"})
    assert (r.status_code, r.json()["error"]) == (403, "host_not_allowed")
    for path in ("api/state", ""):
        r = requests.get(server.url + path, headers={"Host": evil})
        assert (r.status_code, r.json()["error"]) == (403, "host_not_allowed"), path
        assert pred.id not in r.text
    for bad in (f"127.0.0.1:{port + 1}", "127.0.0.1", f"localhost.evil.example:{port}", "", "127.0.0.1:80x",
                f"user@127.0.0.1:{port}"):
        assert requests.get(server.url + "api/state", headers={"Host": bad}).status_code == 403, bad
    assert device.store.counts()["feedback"] == 0 and server.refusals["host_not_allowed"] >= 9
    for good in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        r = requests.get(server.url + "api/state", headers={"Host": good})
        assert r.status_code == 200 and r.json()["predictions"][0]["id"] == pred.id, good
    r = requests.post(server.url + "api/feedback", json={"id": pred.id, "answer": "up"},
                      headers={"Origin": f"http://127.0.0.1:{port}"})
    assert r.status_code == 200 and device.store.counts()["feedback"] == 1


@pytest.mark.parametrize("depth, status", [(4000, 413), (1500, 400)])
def test_deeply_nested_json_is_a_4xx_not_a_dropped_connection(server, device, depth, status):
    body = b"[" * depth + b"]" * depth
    r = requests.post(server.url + "api/feedback", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status and r.json()["error"] in ("too_large", "malformed")
    assert (len(body) > MAX_BODY) == (status == 413)
    assert device.store.counts()["feedback"] == 0


@pytest.mark.parametrize("body", [
    [], {"id": ["x"], "answer": "up"}, {"id": "x", "answer": 1}, {"id": "x"}, {"id": "x", "answer": "up", "more": 1},
    {"id": "x" * 201, "answer": "up"}, "up", None,
])
def test_feedback_bodies_of_the_wrong_shape_are_400(server, device, body):
    r = requests.post(server.url + "api/feedback", data=json.dumps(body), headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (400, "malformed"), body


@pytest.mark.parametrize("length, status", [("-1", 400), ("+5", 400), ("1e3", 400), ("99999999999999999999", 413),
                                            (str(MAX_BODY + 1), 413), (None, 411)])
def test_bad_content_lengths_are_refused_at_once(server, length, status):
    reply = _raw(server, _post(server, b'{"id": "x", "answer": "up"}', length=length))
    assert _status(reply) == status, reply[:300]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"] in ("bad_length", "too_large", "length_required")


def test_chunked_bodies_are_refused(server):
    reply = _raw(server, _post(server, b"5\r\nhello\r\n0\r\n\r\n", extra="Transfer-Encoding: chunked\r\n"))
    assert _status(reply) == 411


def test_a_body_shorter_than_its_length_is_dropped_after_the_timeout(server, device, pred):
    """Content-Length 100, 10 bytes sent, then nothing: 408 and the connection closed (before: held forever)."""
    reply = _raw(server, _post(server, b'{"id": "x"', length="100"))
    assert _status(reply) == 408, reply[:300]
    assert server.refusals["timeout"] >= 1


def test_dripping_headers_cannot_hold_a_connection(server):
    host, port = server.httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"GET /api/state HTTP/1.1\r\n")
        closed = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # one header byte every 0.2 s: each recv is quick, the whole is not
            try:
                s.sendall(b"X")
                time.sleep(0.2)
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        closed = True
                        break
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed, "a client dripping header bytes held the connection for 30 s"


def test_fifty_stalled_posts_all_end_and_the_page_still_answers(server, device, pred):
    host, port = server.httpd.server_address[:2]
    socks = []
    for _ in range(50):
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(_post(server, b'{"id": ', length="100"))
        socks.append(s)
    try:
        for s in socks:  # every one is answered 408 and closed, or closed (turned away beyond the cap)
            out = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                out += chunk
            assert out == b"" or _status(out) == 408, out[:200]
    finally:
        for s in socks:
            s.close()
    r = requests.post(server.url + "api/feedback", json={"id": pred.id, "answer": "down"})
    assert r.status_code == 200 and device.store.counts()["feedback_down"] == 1


def test_every_response_forbids_framing_and_sniffing(server):
    for path, host in (("", None), ("api/state", None), ("nowhere", None), ("api/state", "evil.example")):
        r = requests.get(server.url + path, headers={"Host": host} if host else {})
        assert r.headers["X-Frame-Options"] == "DENY", path
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"], path
        assert r.headers["X-Content-Type-Options"] == "nosniff", path
    page = requests.get(server.url)
    assert page.headers["Content-Type"].startswith("text/html")


def test_only_the_pages_own_script_may_run(server):
    """The page's CSP names its one inline script (with the catalogues in place) by its sha256: an inline handler
    or a script element that ever reached the page through a label or a message would not run."""
    import base64
    import hashlib
    import re

    page = requests.get(server.url)
    script_src = re.search(r"script-src ([^;]*)", page.headers["Content-Security-Policy"]).group(1)
    assert "unsafe-inline" not in script_src and "unsafe-eval" not in script_src
    scripts = re.findall(rb"<script>(.*?)</script>", page.content, re.S)
    assert len(scripts) == 1 and b"/*I18N*/null" not in scripts[0]
    assert script_src.split() == [f"'sha256-{base64.b64encode(hashlib.sha256(scripts[0]).digest()).decode()}'"]


def test_a_store_that_cannot_be_read_is_a_503_the_page_shows(server, device, pred, monkeypatch, caplog):
    """A read of the state failing (the store locked by a CLI writing beside listen) dropped the connection
    unanswered: the page could only guess."""
    import sqlite3

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(device.store, "recent", locked)
    with caplog.at_level(logging.WARNING, logger="edge_sdk"):
        for _ in range(3):  # an open page polls every second: the log (on the Pi's SD card) says it once
            r = requests.get(server.url + "api/state")
            assert (r.status_code, r.json()["error"]) == (503, "state_unavailable") and "locked" in r.json()["detail"]
    assert len([rec for rec in caplog.records if "cannot be read" in rec.getMessage()]) == 1
    monkeypatch.undo()
    assert requests.get(server.url + "api/state").json()["predictions"][0]["id"] == pred.id

    def unreadable(*args, **kwargs):  # the answer names the reason, not the device's file paths
        raise PermissionError(13, "Permission denied", "/home/someone/.local/state/fedser/store.sqlite")

    monkeypatch.setattr(device.store, "recent", unreadable)
    r = requests.get(server.url + "api/state")
    assert r.status_code == 503 and "Permission denied" in r.json()["detail"] and "/home" not in r.text


@pytest.mark.parametrize("body", [b'{"id": "\\ud800", "answer": "up"}', b'{"id": "a\\udcff", "answer": "down"}'])
def test_a_lone_surrogate_in_the_id_is_a_400_not_a_dropped_connection(server, device, pred, body):
    """JSON may spell a lone surrogate, which SQLite cannot look up: the connection was dropped unanswered."""
    reply = _raw(server, _post(server, body, length=str(len(body))))
    assert _status(reply) == 400, reply[:300]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"] == "refused"
    assert device.store.counts()["feedback"] == 0
    r = requests.post(server.url + "api/feedback", json={"id": pred.id, "answer": "up"})  # the page goes on
    assert r.status_code == 200 and device.store.counts()["feedback"] == 1


def _lan_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without a network."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def test_beyond_loopback_the_api_needs_the_token_kept_in_the_state_folder(device, pred):
    port = free_port()
    srv = FeedbackServer(device, host="0.0.0.0", port=port, timeout=1.0).start()
    try:
        token_file = device.state_dir / "web-token"
        assert srv.token and token_file.read_text().strip() == srv.token
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert srv.page_url == f"http://{socket.gethostname().lower()}.local:{port}/#token={quote(srv.token, safe='')}"
        base = f"http://127.0.0.1:{port}/"
        assert requests.get(base).status_code == 200  # the page itself holds no data
        r = requests.get(base + "api/state")
        assert (r.status_code, r.json()["error"]) == (401, "token_required")
        assert requests.get(base + "api/state", headers={"X-Fedser-Token": srv.token[:-1] + "?"}).status_code == 401
        assert requests.post(base + "api/feedback", json={"id": pred.id, "answer": "up"}).status_code == 401
        ok = {"X-Fedser-Token": srv.token}
        assert requests.get(base + "api/state", headers=ok).status_code == 200
        hostname = socket.gethostname().lower()
        assert requests.get(base + "api/state", headers={**ok, "Host": f"{hostname}:{port}"}).status_code == 200
        assert requests.get(base + "api/state", headers={**ok, "Host": f"evil.example:{port}"}).status_code == 403
        r = requests.post(base + "api/feedback", json={"id": pred.id, "answer": "up"}, headers=ok)
        assert r.status_code == 200 and device.store.counts()["feedback_up"] == 1
        lan = _lan_address()
        if lan is not None:  # the phone types the device's address: an IP literal is never a rebinding
            r = requests.get(f"http://{lan}:{port}/api/state", headers=ok)
            assert r.status_code == 200, r.text
    finally:
        srv.stop()
    again = FeedbackServer(device, host="0.0.0.0", port=free_port())  # the phone's bookmark keeps working
    try:
        assert again.token == srv.token
    finally:
        again.httpd.server_close()
    local = FeedbackServer(device, port=free_port())  # loopback only: no token unless one is given
    try:
        assert local.token is None and local.page_url == local.url
    finally:
        local.httpd.server_close()
    with pytest.raises(ParameterError, match="16 to 200"):
        FeedbackServer(device, port=free_port(), token="short")


def test_the_admin_console_forbids_framing_and_sniffing_too(tmp_path):
    """The aggregator's /admin page over real HTTP (werkzeug's server on loopback)."""
    import threading

    from werkzeug.serving import make_server

    from aggregator import create_app

    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "LOG_JSON": False})
    httpd = make_server("127.0.0.1", free_port(), app, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        r = requests.get(f"http://127.0.0.1:{httpd.server_port}/admin")
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
        assert r.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("request_line, status", [(b"GARBAGE\r\n\r\n", 400), (b"PUT / HTTP/1.1\r\n\r\n", 501),
                                                  (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414)])
def test_requests_http_server_refuses_itself_are_json_with_the_same_headers(server, request_line, status):
    reply = _raw(server, request_line)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert _status(reply) == status and b"X-Frame-Options: DENY" in head, reply[:300]
    assert "error" in json.loads(body)


def test_extra_allowed_host_names_come_from_the_configuration(device, pred):
    """web.allowed_hosts (FEDSER_EDGE_WEB_ALLOWED_HOSTS) adds names the page answers to; others stay refused."""
    from edge_sdk.config import load_config
    from edge_sdk.web import configured_allowed_hosts

    cfg = load_config(environ={"FEDSER_EDGE_WEB_ALLOWED_HOSTS": "Pi-Kitchen.lan, speaker.home"})
    srv = FeedbackServer(device, port=free_port(), timeout=1.0, allowed_hosts=configured_allowed_hosts(cfg.web))
    srv.start()
    try:
        port = srv.httpd.server_address[1]
        for name in ("pi-kitchen.lan", "speaker.home", "127.0.0.1"):
            r = requests.get(srv.url + "api/state", headers={"Host": f"{name}:{port}"})
            assert r.status_code == 200 and r.json()["predictions"][0]["id"] == pred.id, name
        r = requests.get(srv.url + "api/state", headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 403
    finally:
        srv.stop()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("host", ["::1", "::"])
def test_ipv6_hosts_bind_and_answer(device, host):
    """`[web] host = "::1"` or "::" (every interface) binds an IPv6 socket (was: gaierror, address family)."""
    srv = FeedbackServer(device, host=host, port=free_port(), timeout=1.0).start()
    try:
        port = srv.httpd.server_address[1]
        headers = {"X-Fedser-Token": srv.token} if srv.token else {}
        assert (srv.token is None) == (host == "::1")  # beyond loopback the page needs a token
        r = requests.get(f"http://[::1]:{port}/api/state", headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        assert srv.url == f"http://[::1]:{port}/" or host == "::"
    finally:
        srv.stop()


def test_the_token_stays_out_of_the_log_and_the_wording_fits_loopback(device, caplog):
    caplog.set_level("DEBUG", logger="edge_sdk")
    srv = FeedbackServer(device, host="0.0.0.0", port=free_port(), timeout=1.0).start()
    srv.stop()
    open_beyond = " ".join(r.getMessage() for r in caplog.records if "feedback page" in r.getMessage())
    assert "beyond this machine" in open_beyond and srv.token not in open_beyond and "#token=<" in open_beyond
    caplog.clear()
    local = FeedbackServer(device, port=free_port(), token="a-token-given-by-the-developer", timeout=1.0).start()
    local.stop()
    said = " ".join(r.getMessage() for r in caplog.records if "feedback page" in r.getMessage())
    assert said and "beyond this machine" not in said and "a-token-given-by-the-developer" not in said


def test_an_existing_token_file_is_tightened_to_0600(device):
    token_file = device.state_dir / "web-token"
    token_file.write_text("x" * 32 + "\n")
    token_file.chmod(0o644)
    srv = FeedbackServer(device, host="0.0.0.0", port=free_port())
    try:
        assert srv.token == "x" * 32
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    finally:
        srv.httpd.server_close()


def _fulfill(route, body: bytes, headers: dict) -> None:
    route.fulfill(body=body, headers=headers)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (scripts/setup.sh "
                    "installs it)")
def test_the_pages_script_runs_under_its_own_csp_whatever_the_line_ends():
    """A browser hashes a script with CRLF turned into LF: a page checked out with Windows line ends blocked its own
    script (the feedback page dead) until the hash was taken the same way. A ``<script>`` the hash cannot name
    (attributes, capitals) is refused at start instead of being blocked without a word."""
    from playwright.sync_api import sync_playwright

    from edge_sdk.errors import FedserError
    from edge_sdk.web import page_csp

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page()
        for ends in (b"\n", b"\r\n", b"\r"):
            body = (b"<!doctype html><title>t</title><script>" + ends + b"const a = 1;" + ends
                    + b"document.title = 'ran';" + ends + b"</script>")
            headers = {"Content-Type": "text/html", "Content-Security-Policy": page_csp(body)}
            page.route("http://fedser.test/", functools.partial(_fulfill, body=body, headers=headers))
            page.goto("http://fedser.test/")
            assert page.title() == "ran", ends
            page.unroute("http://fedser.test/")
        browser.close()
    for bad in (b"<script type=module>x</script>", b"<SCRIPT>x</SCRIPT>"):
        with pytest.raises(FedserError, match="without attributes"):
            page_csp(b"<!doctype html>" + bad)
