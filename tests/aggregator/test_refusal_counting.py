"""Every refusal is counted in ``fedser_refusals_total{reason}`` (and the status's refusal counts), the ones that
answered through a bare ``error()`` before included; blobs are served ``Cache-Control: private`` (they sit
behind device authentication). Real HTTP to gunicorn, SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import requests

from edge_sdk.signing import SigningKey
from edge_sdk.wire import REQUEST_HEADERS, request_signing_message

DATA = Path(__file__).resolve().parents[2] / "edge_sdk" / "data"


def _get_signed(agg, path, dev, key):
    ts = f"{time.time():.3f}"
    sig = base64.b64encode(key.sign(request_signing_message("GET", path, ts))).decode()
    return requests.get(agg.base_url + path, timeout=30, headers=dict(zip(REQUEST_HEADERS, (dev, ts, sig),
                                                                          strict=True)))


def _enroll(agg, key):
    token = agg.post_admin("/enrollment-tokens", json={}).json()["token"]
    return requests.post(f"{agg.base_url}/api/v1/devices/enroll", timeout=30,
                         json={"token": token, "public_key": key.verify_key.to_b64()})


def test_every_refusal_is_counted(live_aggregator):
    agg = live_aggregator
    key = SigningKey.generate()
    dev = _enroll(agg, key).json()["device_id"]
    expected = {
        "no_model": _get_signed(agg, "/api/v1/manifest", dev, key),
        "no_open_round": agg.post_admin("/rounds/close", json={}),
    }
    with open(DATA / "default_model.tflite", "rb") as t, open(DATA / "default_model.json", "rb") as m:
        assert agg.post_admin("/models", files={"tflite": t, "metadata": m}).status_code == 201
    with open(DATA / "default_model.json", "rb") as m:
        expected["bad_model"] = agg.post_admin("/models", files={"tflite": ("m.tflite", b"not a model"),
                                                                 "metadata": m})
    manifest = _get_signed(agg, "/api/v1/manifest", dev, key)
    assert manifest.status_code == 200
    blob = _get_signed(agg, manifest.json()["manifest"]["head"]["url"], dev, key)
    assert blob.status_code == 200
    assert blob.headers["Cache-Control"].split(",")[0] == "private", blob.headers["Cache-Control"]
    expected.update({
        "unknown_version": _get_signed(agg, "/api/v1/manifest/7", dev, key),
        "bad_digest": _get_signed(agg, "/api/v1/blobs/nothex", dev, key),
        "unknown_blob": _get_signed(agg, "/api/v1/blobs/" + "0" * 64, dev, key),
        "key_enrolled": _enroll(agg, key),
        "not_closed": agg.post_admin("/rounds/close", json={"min_updates": 5}),
        "unknown_device": agg.post_admin("/devices/dev-nobody/revoke"),
        "unknown_job": requests.get(f"{agg.base_url}/api/v1/admin/jobs/9", headers=agg.auth, timeout=30),
    })
    rollback = agg.post_admin("/models/9/rollback")
    assert rollback.status_code == 404 and rollback.json()["error"] == "unknown_version"
    for reason, reply in expected.items():
        assert 400 <= reply.status_code < 500 and reply.json()["error"] == reason, (reason, reply.text)
    counts = agg.status()["refusals"]
    want = {reason: 1 for reason in expected} | {"unknown_version": 2}
    assert {k: counts.get(k) for k in want} == want, counts
    metrics = requests.get(f"{agg.base_url}/metrics", headers=agg.auth, timeout=30).text
    for reason, n in want.items():
        assert f'fedser_refusals_total{{reason="{reason}"}} {float(n)}' in metrics, reason
