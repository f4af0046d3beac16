"""A bounded schemathesis run over the served OpenAPI document, against a real gunicorn aggregator on loopback.

Positive and negative cases for every documented operation (admin token set; device reads signed by an enrolled
device through a ``before_call`` hook in this file), a fixed seed and example count: no 5xx, no status the
document does not list, the documented content types and response schemas. ``POST /api/v1/admin/jobs`` is left
out (a valid body starts a training process); its bodies are covered in ``test_bounds.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

_KEY_ENV = "FEDSER_ST_DEVICE_KEY"
_ID_ENV = "FEDSER_ST_DEVICE_ID"

if os.environ.get(_KEY_ENV):  # loaded by the schemathesis CLI as its hooks file (SCHEMATHESIS_HOOKS)
    import base64

    import schemathesis

    from edge_sdk.signing import SigningKey
    from edge_sdk.wire import REQUEST_HEADERS, request_signing_message

    _DEVICE_KEY = SigningKey.load(os.environ[_KEY_ENV])

    @schemathesis.hook
    def before_call(context, case, kwargs):
        """Sign the device reads (manifest, blobs) as an enrolled device would, so the fuzzer gets past 401."""
        path = case.formatted_path
        if not path.startswith(("/api/v1/manifest", "/api/v1/blobs/")):
            return
        ts = f"{time.time():.3f}"
        sig = base64.b64encode(_DEVICE_KEY.sign(request_signing_message(case.method, path, ts))).decode()
        case.headers = {**(case.headers or {}),
                        **dict(zip(REQUEST_HEADERS, (os.environ[_ID_ENV], ts, sig), strict=True))}


REPO = Path(__file__).resolve().parents[2]
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def _run(tmp_path: Path, database_url: str | None, *, max_examples: int, seed: int = 20261130) -> None:
    pytest.importorskip("schemathesis")
    import requests

    from edge_sdk.signing import SigningKey
    from tests.conftest import start_live_aggregator

    agg = start_live_aggregator(tmp_path, min_updates=2, database_url=database_url)
    try:
        data = REPO / "edge_sdk" / "data"
        with open(data / "default_model.tflite", "rb") as t, open(data / "default_model.json", "rb") as m:
            assert agg.post_admin("/models", files={"tflite": t, "metadata": m}).status_code == 201
        token = agg.post_admin("/enrollment-tokens", json={}).json()["token"]
        key = SigningKey.generate()
        key.save(tmp_path / "device.pem")
        r = requests.post(f"{agg.base_url}/api/v1/devices/enroll", timeout=30,
                          json={"token": token, "public_key": key.verify_key.to_b64()})
        assert r.status_code == 201, r.text
        env = dict(os.environ, SCHEMATHESIS_HOOKS=str(Path(__file__).resolve()), PYTHONPATH=str(REPO),
                   **{_KEY_ENV: str(tmp_path / "device.pem"), _ID_ENV: r.json()["device_id"]})
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{agg.base_url}/api/v1/openapi.json",
               "-H", f"Authorization: Bearer {agg.admin_token}", "--checks", CHECKS,
               "--max-examples", str(max_examples), "--seed", str(seed), "--workers", "1",
               "--phases", "examples,coverage,fuzzing", "--exclude-name", "POST /api/v1/admin/jobs",
               "--generation-database", "none", "--request-timeout", "30", "--no-color",
               "--report", "junit", "--report-dir", str(tmp_path / "report")]
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        print(proc.stdout[-6000:], proc.stderr[-2000:])
        print(f"schemathesis: {time.perf_counter() - started:.1f} s")
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
        selected = re.search(r"Selected: (\d+)/(\d+)", proc.stdout)
        assert selected and int(selected[1]) == int(selected[2]) - 1  # every operation but POST /admin/jobs
        # Nothing the fuzzer sent made a 500 the server logged either.
        log = (tmp_path / "aggregator.log").read_text(errors="replace")
        assert "Traceback" not in log
        # The access log's status field (a substring test matched " 500" inside a fuzzed "version 50015" once)
        served = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"status": ' in line]
        assert served and not [e for e in served if isinstance(e.get("status"), int) and e["status"] >= 500]
    finally:
        agg.process.terminate()
        agg.process.wait(timeout=30)


def test_schemathesis_finds_no_5xx_and_no_undocumented_status_sqlite(tmp_path):
    _run(tmp_path, None, max_examples=25)


@pytest.mark.postgres
@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_undocumented_status_postgresql(tmp_path):
    from tests.conftest import postgres_database

    _run(tmp_path, postgres_database(), max_examples=25)
