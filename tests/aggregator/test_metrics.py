"""``/metrics`` through prometheus_client, the answer reports stored per update, and the console's data.

In-process over the real app and SQLite; the output is read back with prometheus_client's own parser, so
anything a Prometheus server could not read fails here.
"""

from __future__ import annotations

import io
import sqlite3
import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator import create_app
from edge_sdk.signing import SigningKey
from edge_sdk.wire import UpdateEnvelope

# Names the README, the dashboards and older tests use: kept.
KEPT = ("fedser_updates_accepted_total", "fedser_refusals_total", "fedser_rounds", "fedser_devices",
        "fedser_devices_seen_24h", "fedser_model_version", "fedser_model_versions", "fedser_open_round_updates",
        "fedser_jobs")


def _app(tmp_path, **config):
    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "LOG_JSON": False, **config})
    return app, app.test_client(), {"Authorization": f"Bearer {app.config['ADMIN_TOKEN']}"}


def _samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value}, parsed by prometheus_client (raises on a malformed line)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_label_values_are_escaped_newline_included(tmp_path):
    app, client, auth = _app(tmp_path)
    from aggregator.api.updates import audit_refusal

    weird = 'bad\nreason "quoted" \\ back'
    with app.test_request_context("/api/v1/updates", method="POST"):
        from aggregator.db import get_session

        audit_refusal(get_session(), 400, weird, "a reason with a newline in it")
    text = client.get("/metrics", headers=auth).data.decode()
    assert 'reason="bad\\nreason \\"quoted\\" \\\\ back"' in text
    samples = _samples(text)  # the hand-written exposition split the sample at the newline: unparsable
    assert _value(samples, "fedser_refusals_total", reason=weird) == 1


def test_existing_metric_names_are_kept_and_the_format_is_prometheus_text(tmp_path):
    _, client, auth = _app(tmp_path)
    r = client.get("/metrics", headers=auth)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    names = {name for name, _ in _samples(r.data.decode())}
    assert set(KEPT) <= names
    assert client.get("/metrics").status_code == 401


def test_request_counts_and_latency_per_route_labelled_by_the_rule_not_the_path(tmp_path):
    _, client, auth = _app(tmp_path)
    for version in (7, 8, 9):  # three raw paths, one route
        assert client.post(f"/api/v1/admin/models/{version}/rollback", headers=auth).status_code == 404
    assert client.get("/no/such/path/123").status_code == 404
    client.get("/healthz")
    samples = _samples(client.get("/metrics", headers=auth).data.decode())
    rule = "/api/v1/admin/models/<int:version>/rollback"
    assert _value(samples, "fedser_http_requests_total", method="POST", route=rule, status="404") == 3
    assert _value(samples, "fedser_http_request_duration_seconds_count", method="POST", route=rule) == 3
    assert _value(samples, "fedser_http_request_duration_seconds_bucket", method="POST", route=rule, le="+Inf") == 3
    assert _value(samples, "fedser_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert _value(samples, "fedser_http_requests_total", method="GET", route="/healthz", status="200") == 1
    routes = {dict(labels).get("route") for _, labels in samples}
    assert not any(r and ("/7/" in r or "123" in r) for r in routes)  # raw paths never become label values


def test_each_app_has_its_own_request_counters(tmp_path):
    _, client_a, auth_a = _app(tmp_path / "a")
    _, client_b, auth_b = _app(tmp_path / "b")
    client_a.get("/healthz")
    client_a.get("/healthz")
    client_b.get("/healthz")
    a = _samples(client_a.get("/metrics", headers=auth_a).data.decode())
    b = _samples(client_b.get("/metrics", headers=auth_b).data.decode())
    key = dict(method="GET", route="/healthz", status="200")
    assert _value(a, "fedser_http_requests_total", **key) == 2
    assert _value(b, "fedser_http_requests_total", **key) == 1


def _enroll(client, auth) -> tuple[str, SigningKey]:
    token = client.post("/api/v1/admin/enrollment-tokens", headers=auth, json={}).json["token"]
    key = SigningKey.generate()
    r = client.post("/api/v1/devices/enroll", json={"token": token, "public_key": key.verify_key.to_b64()})
    assert r.status_code == 201, r.json
    return r.json["device_id"], key


def _update(device_id, key, layout, sequence, report=None):
    rng = np.random.default_rng(sequence)
    deltas = {s.name: (0.01 * rng.standard_normal(s.shape)).astype(np.float32) for s in layout}
    return UpdateEnvelope.create(device_id=device_id, base_version=1, layout=layout, deltas=deltas, num_examples=5,
                                 sequence=sequence, sign=key.sign, report=report).to_bytes()


def test_answer_reports_are_stored_per_update_and_shown_per_device_and_fleet_wide(tmp_path, trained_model):
    app, client, auth = _app(tmp_path, ROUND_MIN_UPDATES=10)
    with open(trained_model.tflite_path, "rb") as t, open(trained_model.metadata_path, "rb") as m:
        assert client.post("/api/v1/admin/models", headers=auth, data={"tflite": (t, "m.tflite"),
                                                                       "metadata": (m, "m.json")}).status_code == 201
    layout = trained_model.metadata.head_layout
    devices = [_enroll(client, auth) for _ in range(4)]
    reports = [{"answers_scored": 10, "personal_correct": 9, "global_correct": 6},
               {"answers_scored": 4, "personal_correct": 2, "global_correct": 3},
               {"answers_scored": 0, "personal_correct": 0, "global_correct": 0},  # nothing scored: not shown
               None]  # an older SDK: no report, still accepted
    for (dev, key), report in zip(devices, reports, strict=True):
        r = client.post("/api/v1/updates", data=_update(dev, key, layout, 1, report))
        assert r.status_code == 202, r.json
    # Out of range: refused as malformed, named, counted.
    dev, key = devices[3]
    env = _update(dev, key, layout, 2, {"answers_scored": 3, "personal_correct": 3, "global_correct": 0})
    bad = env.replace(b'"personal_correct":3', b'"personal_correct":4')
    r = client.post("/api/v1/updates", data=bad)
    assert r.status_code == 400 and "personal_correct must be in" in r.json["detail"]

    console = client.get("/api/v1/admin/console", headers=auth).json
    by_id = {d["id"]: d for d in console["devices"]}
    assert set(by_id) == {devices[0][0], devices[1][0]}
    assert by_id[devices[0][0]]["personal_accuracy"] == pytest.approx(0.9)
    assert by_id[devices[0][0]]["gain"] == pytest.approx(0.3)
    assert by_id[devices[1][0]]["gain"] == pytest.approx(-0.25)
    fleet = console["fleet"]
    assert fleet["devices_reporting"] == 2 and fleet["answers_scored"] == 14
    assert fleet["personal_accuracy"] == pytest.approx(11 / 14) and fleet["global_accuracy"] == pytest.approx(9 / 14)
    assert fleet["devices_better"] == 1 and fleet["devices_worse"] == 1 and sum(fleet["gain_histogram"]) == 2
    assert console["versions"][0]["version"] == 1 and console["versions"][0]["current"] is True

    samples = _samples(client.get("/metrics", headers=auth).data.decode())
    assert _value(samples, "fedser_device_personal_accuracy", device=devices[0][0]) == pytest.approx(0.9)
    assert _value(samples, "fedser_device_global_accuracy", device=devices[1][0]) == pytest.approx(0.75)
    assert _value(samples, "fedser_device_answers_scored", device=devices[0][0]) == 10
    assert _value(samples, "fedser_fleet_devices_reporting") == 2
    assert _value(samples, "fedser_fleet_personal_accuracy") == pytest.approx(11 / 14)
    assert _value(samples, "fedser_fleet_accuracy_gain_bucket", le="0.0") == 1  # -0.25
    assert _value(samples, "fedser_fleet_accuracy_gain_bucket", le="0.5") == 2  # +0.3
    assert _value(samples, "fedser_fleet_accuracy_gain_bucket", le="+Inf") == 2
    assert _value(samples, "fedser_fleet_accuracy_gain_mean") == pytest.approx(0.025)
    assert _value(samples, "fedser_updates_accepted_total") == 4
    assert _value(samples, "fedser_refusals_total", reason="malformed") == 1


def test_a_database_made_before_the_new_columns_gains_them(tmp_path):
    app, _, _ = _app(tmp_path)
    db = tmp_path / "inst" / "aggregator.db"
    app.extensions["fedser_engine"].dispose()
    conn = sqlite3.connect(db)
    for table, col in (("updates", "answers_scored"), ("updates", "personal_correct"),
                       ("updates", "global_correct"), ("rounds", "gate_report")):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {col}")  # as an older release made it
    conn.commit()
    conn.close()
    app, client, auth = _app(tmp_path)
    conn = sqlite3.connect(db)
    cols = {r[1] for r in conn.execute("PRAGMA table_info(updates)")}
    conn.close()
    assert {"answers_scored", "personal_correct", "global_correct"} <= cols
    assert client.get("/api/v1/admin/console", headers=auth).status_code == 200


def test_refused_rounds_carry_the_gate_figures(tmp_path):
    app, client, auth = _app(tmp_path)
    from aggregator.db import ModelVersion, Round, get_session

    gate = {"candidate": {"uar": 0.5, "accuracy": 0.55, "num_examples": 24}, "current": {"uar": 0.8,
            "accuracy": 0.81}, "margin": 0.02, "reason": "validation UAR would drop from 0.800 to 0.500"}
    with app.app_context():
        import json

        s = get_session()
        s.add(ModelVersion(version=1, base_sha256="0" * 64, head_sha256="0" * 64, signed_manifest=b"{}",
                           created_at=time.time(), is_current=False))
        s.flush()
        s.add(Round(base_version=1, status="rejected", opened_at=time.time(), closed_at=time.time(), num_updates=3,
                    num_examples=30, note=gate["reason"], gate_report=json.dumps(gate)))
        s.commit()
        from aggregator.console import refused_rounds

        (row,) = refused_rounds(s)
    assert row["candidate_uar"] == 0.5 and row["current_uar"] == 0.8 and row["margin"] == 0.02
    assert row["num_updates"] == 3 and row["validation_examples"] == 24 and "drop" in row["reason"]


def test_a_base_whose_metadata_asks_for_the_input_affine_needs_input_grad(tmp_path, trained_model):
    """A model that turns the device's input affine on (input_affine_from) without the input_grad signature is
    refused with 422 naming both; the same file without the switch, or a file with the signature, is published."""
    import json

    from models.export import export_tflite

    r = trained_model.result
    older = export_tflite(r.encoder, r.head_weights, r.metadata, tmp_path / "older", input_grad=False)
    meta = json.loads(older.metadata_path.read_text())
    app, client, auth = _app(tmp_path)

    def upload(path, metadata):
        with open(path, "rb") as t:
            return client.post("/api/v1/admin/models", headers=auth,
                               data={"tflite": (t, "m.tflite"), "metadata": (io.BytesIO(json.dumps(metadata).encode()),
                                                                            "m.json")})

    refused = upload(older.tflite_path, {**meta, "input_affine_from": 20})
    assert refused.status_code == 422 and refused.json["error"] == "bad_model", refused.json
    assert "input_grad" in refused.json["detail"] and "input_affine_from" in refused.json["detail"]
    assert upload(older.tflite_path, meta).status_code == 201
    with_grad = json.loads(trained_model.metadata_path.read_text())
    assert upload(trained_model.tflite_path, {**with_grad, "input_affine_from": 20}).status_code == 201
