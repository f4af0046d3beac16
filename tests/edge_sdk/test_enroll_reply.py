"""Enrolling against a server that is not a fedser aggregator (or a broken one): its reply is checked before
anything is written. Before, a reply of ``{}`` was a KeyError traceback, and a reply with a server key that is not
one (or a device id that is a number, or holds "../") was written to identity.json and pinned: every later sync
failed, and enrolling again was refused ("already enrolled")."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edge_sdk.device import Device
from edge_sdk.errors import ServerError

GOOD_KEY = base64.b64encode(bytes(range(32))).decode()  # 32 bytes decode as an Ed25519 public key


@pytest.fixture
def fake_server():
    replies = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps(replies[0]).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", replies
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("reply, named", [
    ({}, "device_id"),
    ([1, 2], "not an object"),
    ({"device_id": 5, "server_public_key": GOOD_KEY}, "device_id"),
    ({"device_id": "../../etc", "server_public_key": GOOD_KEY}, "device_id"),
    ({"device_id": "dev-1\nX-Injected: 1", "server_public_key": GOOD_KEY}, "device_id"),
    ({"device_id": "dev-1", "server_public_key": "AAAA"}, "server_public_key"),
    ({"device_id": "dev-1", "server_public_key": 7}, "server_public_key"),
    ({"device_id": "dev-1", "server_public_key": GOOD_KEY, "manifest": [1]}, "manifest"),
])
def test_a_bad_enrolment_reply_is_refused_by_name_and_nothing_is_written(tmp_path, fake_server, reply, named):
    url, replies = fake_server
    replies[:] = [reply]
    device = Device(tmp_path / "dev")
    with pytest.raises(ServerError, match=named) as info:
        device.enroll(url, "token")
    assert "not enrolled" in str(info.value) or not isinstance(reply, dict)  # the client refuses a non-object
    assert not (tmp_path / "dev" / "identity.json").exists() and not device.enrolled
    # the device can enroll once a real answer comes (here: a well-formed one, no model yet)
    replies[:] = [{"device_id": "dev-0123456789abcdef", "server_public_key": GOOD_KEY, "manifest": None}]
    assert device.enroll(url, "token") == "dev-0123456789abcdef"
    assert json.loads((tmp_path / "dev" / "identity.json").read_text())["server_public_key"] == GOOD_KEY
