"""Downloads stop at the expected size and at an overall deadline (issue 11, item 6).

Real HTTP servers on 127.0.0.1: one that sends far more than the manifest's size, one that announces too much,
and one that drips bytes slowly, each to the SDK's real client.
"""

from __future__ import annotations

import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edge_sdk.client import ServerClient
from edge_sdk.errors import ServerError

HUGE = 64 << 20  # what the oversized server would send: far more than loopback's socket buffers hold


class _QuietServer(ThreadingHTTPServer):
    """The client hanging up on a misbehaving reply is the point of these tests, not an error to print (it
    surfaced as a stray traceback when the reset came between two requests of a kept-alive connection)."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Server:
    """A ThreadingHTTPServer whose GET handler is ``behaviour(handler, server)``; counts the bytes it sent."""

    def __init__(self, behaviour) -> None:
        self.sent = 0
        self.finished = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802 (http.server's name)
                try:
                    behaviour(self, outer)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    outer.finished.set()

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _oversized(handler, server):
    """No Content-Length, connection-delimited body of HUGE bytes, written 64 KB at a time."""
    handler.protocol_version = "HTTP/1.0"
    handler.send_response(200)
    handler.send_header("Content-Type", "application/octet-stream")
    handler.end_headers()
    chunk = b"\0" * 65536
    while server.sent < HUGE:
        handler.wfile.write(chunk)
        server.sent += len(chunk)


def _announces_too_much(handler, server):
    handler.send_response(200)
    handler.send_header("Content-Length", str(HUGE))
    handler.end_headers()
    handler.wfile.write(b"\0" * 1000)
    server.sent += 1000


def _drips(handler, server):
    """Announces 100 bytes and sends one every 0.1 s (10 s in all), each read well inside any per-read timeout."""
    handler.send_response(200)
    handler.send_header("Content-Length", "100")
    handler.end_headers()
    handler.wfile.flush()
    for _ in range(100):
        handler.wfile.write(b"x")
        handler.wfile.flush()
        server.sent += 1
        time.sleep(0.1)


def _drips_headers(handler, server):
    """A status line, then one header byte every 0.1 s for 60 s: every per-read timeout is reset each time."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
    handler.wfile.flush()
    for _ in range(600):
        handler.wfile.write(b"X")
        handler.wfile.flush()
        server.sent += 1
        time.sleep(0.1)
    handler.wfile.write(b": y\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture
def serve():
    servers = []

    def start(behaviour) -> _Server:
        servers.append(_Server(behaviour))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_a_body_longer_than_the_manifest_size_is_cut_off_at_that_size(serve):
    server = serve(_oversized)
    client = ServerClient(server.url, timeout=30)
    with pytest.raises(ServerError) as exc:
        client.get_blob(server.url + "/blob", size=700_000)
    assert exc.value.reason == "too_large" and exc.value.status is None  # transient: a later sync tries again
    assert "700000" in str(exc.value)
    assert server.finished.wait(30)
    assert server.sent < HUGE  # the client hung up: the server could not send it all


def test_a_declared_length_over_the_size_is_refused_before_reading(serve):
    server = serve(_announces_too_much)
    with pytest.raises(ServerError) as exc:
        ServerClient(server.url).get_blob(server.url + "/blob", size=700_000)
    assert exc.value.reason == "too_large" and str(HUGE) in str(exc.value)


def test_replies_other_than_model_files_are_bounded_too(serve):
    server = serve(_oversized)
    client = ServerClient(server.url, max_response_bytes=1 << 20)
    with pytest.raises(ServerError) as exc:
        client.get_manifest()
    assert exc.value.reason == "too_large"
    assert server.finished.wait(30) and server.sent < HUGE


def test_a_server_that_drips_bytes_is_cut_off_at_the_overall_deadline(serve):
    server = serve(_drips)
    # 30 s per read never fires (a byte comes every 0.1 s); the 1 s deadline for the whole request does.
    client = ServerClient(server.url, timeout=30, deadline=1.0)
    with pytest.raises(ServerError) as exc:
        client.get_blob(server.url + "/blob", size=100)
    assert exc.value.reason == "deadline" and exc.value.status is None
    assert "within 1 s" in str(exc.value)
    assert server.sent < 100  # it stopped long before the body was complete


def test_a_server_that_drips_its_headers_is_cut_off_at_the_overall_deadline(serve):
    server = serve(_drips_headers)
    client = ServerClient(server.url, timeout=30, deadline=1.0)
    with pytest.raises(ServerError) as exc:
        client.get_manifest()
    assert exc.value.reason == "deadline" and "headers within 1 s" in str(exc.value)
    assert not server.finished.is_set()  # the call came back while the server was still dripping


def test_a_well_behaved_download_is_unchanged(serve):
    body = bytes(range(256)) * 40

    def ok(handler, server):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    server = serve(ok)
    assert ServerClient(server.url, deadline=5).get_blob(server.url + "/blob", size=len(body)) == body
    with pytest.raises(ServerError) as exc:  # one byte less than it sends is already too much
        ServerClient(server.url).get_blob(server.url + "/blob", size=len(body) - 1)
    assert exc.value.reason == "too_large"


@pytest.mark.parametrize("size", [0, -1, True, 1.5, "700", (1 << 30) + 1])
def test_a_manifest_size_outside_the_range_is_refused_before_any_download(size):
    from edge_sdk.errors import WireFormatError
    from edge_sdk.manifest import BlobRef

    with pytest.raises(WireFormatError, match="blob size"):
        BlobRef.from_dict({"sha256": "0" * 64, "size": size, "url": "/api/v1/blobs/x"})
    assert BlobRef.from_dict({"sha256": "0" * 64, "size": 700_000, "url": "/x"}).size == 700_000


def test_the_helper_thread_and_its_connection_end_at_the_deadline(serve):
    """The helper thread reading a dripping server's headers does not outlive the deadline error: its connection
    is shut down, so the thread ends and the server sees the client hang up (review item 3)."""
    server = serve(_drips_headers)
    client = ServerClient(server.url, timeout=30, deadline=1.0)
    with pytest.raises(ServerError) as exc:
        client.get_manifest()
    assert exc.value.reason == "deadline"
    gone = False
    for _ in range(40):  # up to about 2 s
        if not any(t.name == "fedser-http" and t.is_alive() for t in threading.enumerate()):
            gone = True
            break
        time.sleep(0.05)
    assert gone, [t.name for t in threading.enumerate()]
    assert server.finished.wait(5)  # its next writes failed: the connection was closed
    assert server.sent < 100  # long before its 600 header bytes
