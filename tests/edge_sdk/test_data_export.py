"""A copy of everything the device keeps about its user: ``FeedbackStore.iter_export`` (streamed, memory bounded by
a batch of predictions whatever the store holds), ``fedser-edge export-data`` and the page's ``GET /api/export``
(real HTTP on loopback: HTTP/1.1 chunks, so a download cut short is seen as failed)."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest
import requests

import edge_sdk.web
from edge_sdk.store import FeedbackStore
from edge_sdk.web import FeedbackServer
from tests.conftest import REPO
from tools.demo import free_port

SECONDS = 3.0  # of audio kept per prediction ([privacy] store_audio): 96 KB of PCM, 128 KB of base64


def _fill(store: FeedbackStore, n: int, *, audio: bool = True, start: int = 0) -> list[str]:
    rng = np.random.default_rng(start)
    ids = []
    for i in range(start, start + n):
        pid = f"{i:032x}"
        store.add_prediction(prediction_id=pid, model_version=1, label="sad", probs=np.full(4, 0.25),
                             embedding=rng.normal(size=64).astype(np.float32),
                             features=rng.normal(size=(100, 40)).astype(np.float32), latency_ms=3.0,
                             audio=rng.uniform(-0.5, 0.5, int(16000 * SECONDS)) if audio else None,
                             sample_rate=16000 if audio else None)
        if i % 3 == 0:
            store.add_feedback(pid, "label", "angry")
        ids.append(pid)
    return ids


def test_the_streamed_export_is_the_whole_store_in_bounded_memory(tmp_path):
    store = FeedbackStore(tmp_path / "fedser.db")
    ids = _fill(store, 120)  # 11.5 MB of recordings, 15 MB as base64
    store.set("speaker_stats:abc", json.dumps({"n": 3}))
    store.enqueue(1, 1, b"envelope")
    data = store.export()
    assert data["format"] == "fedser-edge-export/1" and [p["id"] for p in data["predictions"]] == ids
    first = data["predictions"][0]
    assert first["feedback"]["kind"] == "label" and first["feedback"]["label"] == "angry"
    assert len(base64.b64decode(first["audio"])) == 2 * int(16000 * SECONDS) and first["sample_rate"] == 16000
    assert np.frombuffer(base64.b64decode(first["embedding"]), "<f4").shape == (64,)
    assert data["outbox"] == [{"seq": 1, "base_version": 1, "created_at": data["outbox"][0]["created_at"],
                               "attempts": 0, "state": "pending"}]
    assert data["speaker_statistics"] == {"abc": {"n": 3}}

    tracemalloc.start()
    try:
        size = sum(len(piece) for piece in store.iter_export())
        streamed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        whole = len(json.dumps(store.export()))
        in_memory = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert abs(size - whole) < 0.01 * whole  # the same document (spacing aside)
    row = size / len(ids)
    # a batch of 16 predictions (read, then encoded one by one), not the 120 of the store
    assert streamed < 2 * store.EXPORT_BATCH * row, (streamed, row)
    assert in_memory > 3 * streamed, (in_memory, streamed)


def test_paging_takes_every_prediction_once_even_with_equal_times_and_changes_meanwhile(tmp_path):
    store = FeedbackStore(tmp_path / "fedser.db")
    ids = _fill(store, 7, audio=False)
    with store._tx() as c:  # several predictions in one clock tick (a coarse clock on a Pi)
        c.execute("UPDATE predictions SET created_at = 1000.0 WHERE id IN (?, ?, ?)", tuple(ids[2:5]))
        c.execute("UPDATE predictions SET probs = 'not json' WHERE id = ?", (ids[6],))  # a damaged field
    pieces = store.iter_export(batch=2)
    head = next(pieces) + next(pieces)  # the start and the first prediction
    store.enforce_retention(max_predictions=5)  # deletes two of the oldest meanwhile (ids[3], ids[4]: ties by id)
    _fill(store, 1, audio=False, start=100)  # a new one meanwhile: newest, so it comes at the end
    data = json.loads(head + "".join(pieces))
    got = [p["id"] for p in data["predictions"]]
    # ids[3] was read before its deletion (in the first batch), ids[4] after it; the new one is the newest
    assert got == [ids[2], ids[3], ids[0], ids[1], ids[5], ids[6], f"{100:032x}"], got
    assert next(p for p in data["predictions"] if p["id"] == ids[6])["probs"] is None  # the rest still exported


def test_cli_export_data_streams_to_a_private_file_and_to_stdout(tmp_path):
    state = tmp_path / "dev"
    state.mkdir()
    store = FeedbackStore(state / "fedser.db")
    ids = _fill(store, 20)
    store.close()
    cli = [sys.executable, "-m", "edge_sdk.cli", "--state", str(state)]
    out = subprocess.run([*cli, "export-data", "--out", str(tmp_path / "mine.json")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    written = json.loads(out.stdout)
    assert written["bytes"] == (tmp_path / "mine.json").stat().st_size
    assert (tmp_path / "mine.json").stat().st_mode & 0o777 == 0o600
    assert [p["id"] for p in json.loads((tmp_path / "mine.json").read_text())["predictions"]] == ids
    printed = subprocess.run([*cli, "export-data"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0 and [p["id"] for p in json.loads(printed.stdout)["predictions"]] == ids
    # a folder that cannot be written: an error naming it, not a traceback (found by an audit)
    (tmp_path / "a-file").write_text("x")  # a file where the folder should be
    refused = subprocess.run([*cli, "export-data", "--out", str(tmp_path / "a-file" / "mine.json")], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "cannot write" in refused.stderr and "a-file" in refused.stderr


@pytest.fixture
def filled(device):
    _fill(device.store, 100)
    return device


def _get(url, token=None, **kw):
    return requests.get(url + "api/export", headers={"X-Fedser-Token": token} if token else {}, timeout=30, **kw)


def test_the_page_download_is_checked_streamed_one_at_a_time_and_counted(filled):
    server = FeedbackServer(filled, port=free_port(), token="t" * 24).start()
    off = FeedbackServer(filled, port=free_port(), allow_export=False).start()
    try:
        assert _get(server.url).status_code == 401
        r = _get(off.url)
        assert (r.status_code, r.json()["error"]) == (403, "export_disabled") and "allow_export" in r.json()["detail"]
        assert requests.get(off.url + "api/state", timeout=10).json()["data"]["allow_export"] is False
        r = _get(server.url, "t" * 24, stream=True)
        assert r.status_code == 200 and r.headers["Transfer-Encoding"] == "chunked"
        assert r.headers["Content-Disposition"].startswith('attachment; filename="fedser-my-data-')
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Cache-Control"] == "no-store"
        busy = _get(server.url, "t" * 24)  # while the first is under way (13 MB: more than the sockets buffer)
        assert (busy.status_code, busy.json()["error"]) == (429, "busy")
        busy = requests.post(server.url + "api/export", json={"confirm": "export"}, timeout=10,
                             headers={"X-Fedser-Token": "t" * 24})
        assert (busy.status_code, busy.json()["error"]) == (429, "busy")  # no link while one runs
        data = json.loads(r.content)
        assert len(data["predictions"]) == 100 and server.exports == 1

        # the page's way: a POST (its checks: token, Origin, JSON body) for a one-time link the browser saves itself
        def ticket(server, body=b'{"confirm": "export"}', **headers):
            return requests.post(server.url + "api/export", data=body, timeout=10,
                                 headers={"Content-Type": "application/json", **headers})

        token = {"X-Fedser-Token": "t" * 24}
        assert ticket(server).status_code == 401
        assert ticket(server, Origin="http://evil.example", **token).json()["error"] == "cross_origin"
        for body in (b'{"confirm": "wipe"}', b'{}', b'{"confirm": "export", "x": 1}'):
            assert ticket(server, body, **token).json()["error"] == "malformed", body
        assert ticket(off).json()["error"] == "export_disabled"
        got = ticket(server, **token).json()
        assert got["url"].startswith("/download/") and got["expires_in"] == 60
        link = server.url + got["url"][1:]
        cross = requests.get(link, headers={"Sec-Fetch-Site": "cross-site"}, timeout=10)
        assert (cross.status_code, cross.json()["error"]) == (403, "cross_origin")  # and the link is still good
        r = requests.get(link, headers={"Sec-Fetch-Site": "same-origin"}, timeout=30)  # no token: the link is it
        assert r.status_code == 200 and r.headers["Content-Disposition"].startswith("attachment")
        assert r.headers["Cross-Origin-Resource-Policy"] == "same-origin"
        assert len(json.loads(r.content)["predictions"]) == 100 and server.exports == 2
        running = _get(server.url, "t" * 24, stream=True)  # a download under way: the link is refused, not used
        assert requests.get(link, timeout=10).json()["error"] == "busy"
        running.close()
        for _ in range(200):  # (the server sees the reader gone at its next write)
            if not server._exporting.locked():
                break
            threading.Event().wait(0.05)
        # three downloads started per link (a phone browser may fetch one twice), then it is gone
        assert [requests.get(link, timeout=30).status_code for _ in range(3)] == [200, 200, 404]
        assert requests.get(link, timeout=10).json()["error"] == "no_such_download"
        assert requests.get(server.url + "download/" + "x" * 32, timeout=10).status_code == 404
        links = [ticket(server, **token).json()["url"] for _ in range(5)]  # at most 4 outstanding: the 1st goes
        assert requests.get(server.url + links[0][1:], timeout=10).status_code == 404
        assert requests.get(server.url + links[4][1:], timeout=30).status_code == 200 and server.exports == 5
        old, edge_sdk.web.TICKET_SECONDS = edge_sdk.web.TICKET_SECONDS, 0.05
        try:
            late = ticket(server, **token).json()["url"]
        finally:
            edge_sdk.web.TICKET_SECONDS = old
        threading.Event().wait(0.2)
        assert requests.get(server.url + late[1:], timeout=10).json()["error"] == "no_such_download"  # expired

        # an HTTP/1.0 client cannot take chunks: refused, not sent as a body it could not tell cut from whole
        with socket.create_connection(("127.0.0.1", off.httpd.server_address[1]), timeout=10) as s:
            s.sendall(f"GET /api/export HTTP/1.0\r\nHost: 127.0.0.1:{off.httpd.server_address[1]}\r\n\r\n".encode())
            assert b" 403 " in s.recv(200)  # (off: its refusal comes first)
        with socket.create_connection(("127.0.0.1", server.httpd.server_address[1]), timeout=10) as s:
            port = server.httpd.server_address[1]
            s.sendall(f"GET /api/export HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nX-Fedser-Token: {'t' * 24}\r\n\r\n"
                      .encode())
            assert b" 505 " in s.recv(200)

        # a reader that goes away mid-download frees the download for the next one
        with socket.create_connection(("127.0.0.1", server.httpd.server_address[1]), timeout=10) as s:
            port = server.httpd.server_address[1]
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(f"GET /api/export HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Fedser-Token: {'t' * 24}\r\n\r\n"
                      .encode())
            assert b" 200 " in s.recv(4096)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
        done = threading.Event()
        for _ in range(100):
            if not server._exporting.locked():
                done.set()
                break
            done.wait(0.1)
        assert done.is_set() and server.refusals.get("export_cut") == 2, server.refusals
        assert len(json.loads(_get(server.url, "t" * 24).content)["predictions"]) == 100 and server.exports == 6
    finally:
        server.stop()
        off.stop()


def test_a_damaged_store_gives_a_download_that_fails_not_a_short_file_that_looks_whole(filled):
    """The SD card returns garbage for the store's pages mid-download: the body ends without its last chunk, so the
    client (requests here, the browser on the page) reports the download failed; the server counts it and goes on."""
    server = FeedbackServer(filled, port=free_port()).start()
    try:
        with filled.store._lock:
            filled.store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db = filled.state_dir / "fedser.db"
        size = db.stat().st_size
        with open(db, "r+b") as f:  # the second half of the file: the later predictions' pages
            f.seek(size // 2)
            f.write(b"\xa5" * (size - size // 2))
        with filled.store._lock:
            filled.store._conn.execute("PRAGMA shrink_memory")  # what the store had cached of them: dropped
        with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
            _get(server.url).content  # noqa: B018
        # on the wire: the body ends in a chunk it announced and never sent (a lenient client, which takes a body
        # ending on a chunk's edge as whole, sees this one cut too)
        port = server.httpd.server_address[1]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(f"GET /api/export HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"\r\n1000\r\n"), raw[-200:]
        assert server.refusals.get("export_cut") == 2 and server.exports == 0
        assert not server._exporting.locked()
        assert requests.get(server.url, timeout=10).status_code == 200  # the page goes on
    finally:
        server.stop()
