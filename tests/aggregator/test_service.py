"""The aggregator app in-process (Flask's test client over the real app, SQLite): policies, gate, API surface."""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator import create_app
from aggregator.fedavg import ServerOptimizer
from edge_sdk.signing import SigningKey
from edge_sdk.wire import REQUEST_HEADERS, request_signing_message, unpack_arrays
from tests.conftest import signed_update


class Server:
    def __init__(self, tmp_path, trained_model, **config):
        self.app = create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "LOG_JSON": True, **config})
        self.client = self.app.test_client()
        self.auth = {"Authorization": f"Bearer {self.app.config['ADMIN_TOKEN']}"}
        self.layout = trained_model.metadata.head_layout
        self.model = trained_model

    def publish(self):
        with open(self.model.tflite_path, "rb") as t, open(self.model.metadata_path, "rb") as m:
            r = self.client.post("/api/v1/admin/models", headers=self.auth,
                                 data={"tflite": (t, "model.tflite"), "metadata": (m, "model.json")})
        return r

    def enroll(self) -> tuple[str, SigningKey]:
        token = self.client.post("/api/v1/admin/enrollment-tokens", headers=self.auth, json={}).json["token"]
        key = SigningKey.generate()
        r = self.client.post("/api/v1/devices/enroll", json={"token": token, "public_key": key.verify_key.to_b64()})
        assert r.status_code == 201, r.json
        return r.json["device_id"], key

    def post(self, envelope):
        return self.client.post("/api/v1/updates", data=envelope.to_bytes())

    def status(self):
        return self.client.get("/api/v1/admin/status", headers=self.auth).json

    def head(self, version: int) -> dict:
        dev, key = getattr(self, "_reader", None) or self.enroll()
        self._reader = (dev, key)
        path = f"/api/v1/manifest/{version}"
        manifest = self.get_signed(path, dev, key).json["manifest"]
        raw = self.get_signed(manifest["head"]["url"], dev, key).data
        return unpack_arrays(self.layout, raw)

    def get_signed(self, path, dev, key, *, ts=None, sign=None):
        ts = ts or f"{time.time():.3f}"
        sig = (sign or key.sign)(request_signing_message("GET", path, ts))
        return self.client.get(path, headers=dict(zip(REQUEST_HEADERS, (dev, ts, base64.b64encode(sig).decode()),
                                                      strict=True)))


def test_openapi_document_is_valid_and_covers_every_route(tmp_path, trained_model):
    from openapi_spec_validator import validate

    srv = Server(tmp_path, trained_model)
    doc = srv.client.get("/api/v1/openapi.json").json
    validate(doc)
    for rule in srv.app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = str(rule).replace("<int:", "<").replace("<", "{").replace(">", "}")
        assert path in doc["paths"], f"{path} is served but not documented"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in doc["paths"][path], f"{method} {path} is not documented"


def test_request_ids_and_json_logs(tmp_path, trained_model):
    from aggregator.observability import JsonFormatter

    srv = Server(tmp_path, trained_model)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("aggregator.http").addHandler(handler)
    try:
        r = srv.client.get("/api/v1/manifest", headers={"X-Request-Id": "abc-123"})
        assert r.headers["X-Request-Id"] == "abc-123"
        r2 = srv.client.get("/api/v1/manifest", headers={"X-Request-Id": "bad id with spaces"})
        assert len(r2.headers["X-Request-Id"]) == 32
    finally:
        logging.getLogger("aggregator.http").removeHandler(handler)
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert lines[0]["request_id"] == "abc-123" and lines[0]["status"] == 401 and lines[0]["path"] == "/api/v1/manifest"
    assert "ms" in lines[0] and lines[1]["request_id"] == r2.headers["X-Request-Id"]


def test_device_reads_need_a_valid_signature_and_each_refusal_is_audited(tmp_path, trained_model):
    srv = Server(tmp_path, trained_model)
    assert srv.publish().status_code == 201
    dev, key = srv.enroll()
    assert srv.get_signed("/api/v1/manifest", dev, key).status_code == 200
    cases = [
        (srv.client.get("/api/v1/manifest"), 401, "missing_device_auth"),
        (srv.get_signed("/api/v1/manifest", dev, key, sign=SigningKey.generate().sign), 401, "bad_signature"),
        (srv.get_signed("/api/v1/manifest", "dev-nobody", key), 401, "unknown_device"),
        (srv.get_signed("/api/v1/manifest", dev, key, ts=f"{time.time() - 3600:.3f}"), 401, "clock_skew"),
    ]
    # a signature for one path does not open another
    ts = f"{time.time():.3f}"
    sig = base64.b64encode(key.sign(request_signing_message("GET", "/api/v1/manifest", ts))).decode()
    other = srv.client.get("/api/v1/manifest/1", headers=dict(zip(REQUEST_HEADERS, (dev, ts, sig), strict=True)))
    cases.append((other, 401, "bad_signature"))
    for resp, status, reason in cases:
        assert (resp.status_code, resp.json["error"]) == (status, reason)
    srv.client.post(f"/api/v1/admin/devices/{dev}/revoke", headers=srv.auth)
    r = srv.get_signed("/api/v1/manifest", dev, key)
    assert (r.status_code, r.json["error"]) == (403, "revoked_device")
    assert srv.status()["refusals"] == {"missing_device_auth": 1, "bad_signature": 2, "unknown_device": 1,
                                        "clock_skew": 1, "revoked_device": 1}
    metrics = srv.client.get("/metrics", headers=srv.auth).data.decode()
    assert 'fedser_refusals_total{reason="bad_signature"} 2' in metrics
    assert "fedser_model_version 1" in metrics
    assert srv.client.get("/metrics").status_code == 401
    assert srv.client.get("/healthz").json == {"status": "ok"}


def test_stale_updates_are_accepted_within_the_limit_and_down_weighted(tmp_path, trained_model):
    srv = Server(tmp_path, trained_model, ROUND_MIN_UPDATES=2, STALENESS_LIMIT=1, STALENESS_EXPONENT=0.5)
    srv.publish()
    (a, ka), (b, kb), (c, kc) = srv.enroll(), srv.enroll(), srv.enroll()
    assert srv.post(signed_update(a, ka, srv.layout, sequence=1, num_examples=4)).status_code == 202
    r = srv.post(signed_update(b, kb, srv.layout, sequence=1, num_examples=4))
    assert r.json["published_version"] == 2
    head2 = srv.head(2)
    stale = signed_update(c, kc, srv.layout, sequence=1, base_version=1, num_examples=8)  # one version behind
    fresh = signed_update(a, ka, srv.layout, sequence=2, base_version=2, num_examples=2)
    assert srv.post(stale).status_code == 202
    r = srv.post(fresh)
    assert r.json["published_version"] == 3
    # the stale update's 8 examples are capped at the round's lower median count (2), then / sqrt(1 + 1)
    w_stale, w_fresh = 2 / np.sqrt(2), 2.0
    ds, df = stale.deltas(), fresh.deltas()
    head3 = srv.head(3)
    for name in head2:
        expected = head2[name] + (w_stale * ds[name].astype(np.float64) + w_fresh * df[name]) / (w_stale + w_fresh)
        np.testing.assert_allclose(head3[name], expected, atol=1e-6)
    too_old = signed_update(b, kb, srv.layout, sequence=2, base_version=1)  # two behind now
    r = srv.post(too_old)
    assert (r.status_code, r.json["error"]) == (409, "stale_base")


def test_rate_limit_per_device(tmp_path, trained_model):
    srv = Server(tmp_path, trained_model, RATE_LIMIT_PER_HOUR=3, ROUND_MIN_UPDATES=50)
    srv.publish()
    dev, key = srv.enroll()
    codes = [srv.post(signed_update(dev, key, srv.layout, sequence=s)).status_code for s in (1, 2, 3, 4)]
    assert codes[:3] == [202, 409, 409]  # one per round; the others are refusals, which count too
    r = srv.post(signed_update(dev, key, srv.layout, sequence=5))
    assert (r.status_code, r.json["error"]) == (429, "rate_limited")
    other, okey = srv.enroll()
    assert srv.post(signed_update(other, okey, srv.layout, sequence=1)).status_code == 202  # per device


def test_median_resists_a_scaled_attacker_that_fedavg_follows(tmp_path, trained_model):
    heads = {}
    for method in ("fedavg", "median"):
        srv = Server(tmp_path / method, trained_model, ROUND_MIN_UPDATES=5, AGGREGATION=method,
                     MAX_UPDATE_L2_NORM=1e9)
        srv.publish()
        rng = np.random.default_rng(7)
        envs = []
        for i in range(5):
            dev, key = srv.enroll()
            scale = 1000.0 if i == 0 else 0.01
            envs.append(signed_update(dev, key, srv.layout, sequence=1, scale=scale, rng=rng))
            r = srv.post(envs[-1])
        assert r.json["published_version"] == 2
        heads[method] = (srv.head(1), srv.head(2), envs)
    base, fed, _ = heads["fedavg"]
    _, med, envs = heads["median"]
    honest = np.stack([e.deltas()["w0"] for e in envs[1:]] + [envs[0].deltas()["w0"]])
    np.testing.assert_allclose(med["w0"] - base["w0"], np.median(honest, axis=0), atol=1e-6)
    assert np.abs(med["w0"] - base["w0"]).max() < 0.1 < np.abs(fed["w0"] - base["w0"]).max()


def test_fedadam_state_carries_across_rounds(tmp_path, trained_model):
    srv = Server(tmp_path, trained_model, ROUND_MIN_UPDATES=1, SERVER_OPTIMIZER="fedadam", SERVER_LR=0.01)
    srv.publish()
    dev, key = srv.enroll()
    opt = ServerOptimizer("fedadam", lr=0.01)
    weights, state = srv.head(1), None
    for version in (1, 2, 3):
        env = signed_update(dev, key, srv.layout, sequence=version, base_version=version)
        assert srv.post(env).json["published_version"] == version + 1
        weights, state = opt.step(weights, env.deltas(), state)
        got = srv.head(version + 1)
        for name in weights:
            np.testing.assert_allclose(got[name], weights[name], rtol=1e-5, atol=1e-7)


def test_rollback_republishes_an_earlier_version(tmp_path, trained_model):
    srv = Server(tmp_path, trained_model, ROUND_MIN_UPDATES=1)
    srv.publish()
    dev, key = srv.enroll()
    srv.post(signed_update(dev, key, srv.layout, sequence=1))
    assert srv.status()["current_version"] == 2
    r = srv.client.post("/api/v1/admin/models/1/rollback", headers=srv.auth)
    assert r.status_code == 201 and r.json == {"version": 3, "rollback_of": 1}
    for name, arr in srv.head(1).items():
        np.testing.assert_array_equal(srv.head(3)[name], arr)
    versions = srv.client.get("/api/v1/admin/models", headers=srv.auth).json["versions"]
    assert versions[0]["version"] == 3 and versions[0]["current"] and "rollback" in versions[0]["note"]
    assert srv.client.post("/api/v1/admin/models/99/rollback", headers=srv.auth).status_code == 404


@pytest.fixture(scope="module")
def validation_csv(tmp_path_factory, synthetic_clips):
    speakers = sorted({c.speaker for c in synthetic_clips})
    path = tmp_path_factory.mktemp("val") / "validation.csv"
    path.write_text("path,speaker,label\n" + "".join(f"{c.path},{c.speaker},{c.label}\n" for c in synthetic_clips
                                                      if c.speaker == speakers[-1]))
    return path


def test_validation_gate_rejects_a_harmful_round_and_publishes_a_harmless_one(tmp_path, trained_model,
                                                                              validation_csv):
    srv = Server(tmp_path, trained_model, ROUND_MIN_UPDATES=1, VALIDATION_MANIFEST=str(validation_csv),
                 VALIDATION_MARGIN=0.0, MAX_UPDATE_L2_NORM=1e9)
    r = srv.publish()
    assert r.status_code == 201 and r.json["validation"]["candidate"]["num_examples"] == 16
    base = srv.head(1)
    dev, key = srv.enroll()
    # a delta that sends every embedding to one class: the gate must refuse it
    from edge_sdk.wire import UpdateEnvelope

    harm = {k: np.zeros_like(v) for k, v in base.items()}
    harm["b1"] = np.array([50.0, -50, -50, -50], np.float32)
    env = UpdateEnvelope.create(device_id=dev, base_version=1, layout=srv.layout, deltas=harm, num_examples=5,
                                sequence=1, sign=key.sign)
    r = srv.post(env)
    assert r.status_code == 202 and "validation UAR would drop" in r.json["round_rejected"]
    status = srv.status()
    assert status["current_version"] == 1 and status["rounds"][1]["status"] == "rejected"
    assert status["open_round"]["id"] == 2 and status["open_round"]["base_version"] == 1
    ok = signed_update(dev, key, srv.layout, sequence=2, scale=1e-6)
    r = srv.post(ok)
    assert r.json.get("published_version") == 2 and "round_rejected" not in r.json
    metrics = srv.status()["current_metrics"]["validation"]
    assert metrics["candidate"]["uar"] >= metrics["current"]["uar"]


def test_malformed_base_figures_are_refused_before_the_validation_gate_runs(tmp_path, trained_model, validation_csv):
    """With a validation gate, a base whose extra.test is not an object was scored (both models) before being
    refused, and a base that also failed the gate was answered validation_failed: now bad_model at once."""
    srv = Server(tmp_path, trained_model, VALIDATION_MANIFEST=str(validation_csv))
    meta = json.loads(trained_model.metadata_path.read_text())
    meta["extra"]["test"] = [["uar", 0.5]]
    validator = srv.app.extensions["fedser_validator"]
    calls = []
    check = validator.check_base
    validator.check_base = lambda *a, **k: calls.append(1) or check(*a, **k)
    with open(trained_model.tflite_path, "rb") as t:
        r = srv.client.post("/api/v1/admin/models", headers=srv.auth, data={
            "tflite": (t, "model.tflite"), "metadata": (io.BytesIO(json.dumps(meta).encode()), "model.json")})
    assert (r.status_code, r.json["error"]) == (422, "bad_model") and "extra.test" in r.json["detail"]
    assert calls == []  # the gate never ran
    assert srv.publish().status_code == 201 and calls == [1]


def _finished_job(srv: Server, job_id: int, seconds: float) -> dict:
    """The job as the API shows it once it succeeded or failed (or as it is after ``seconds``)."""
    deadline = time.time() + seconds
    while True:
        job = srv.client.get(f"/api/v1/admin/jobs/{job_id}", headers=srv.auth).json
        if job["status"] in ("succeeded", "failed") or time.time() > deadline:
            return job
        time.sleep(1)


def test_baseline_job_runs_in_a_worker_process_and_publishes(tmp_path, trained_model):
    srv = Server(tmp_path, trained_model)
    r = srv.client.post("/api/v1/admin/jobs", headers=srv.auth, json={"architecture": "dnn", "epochs": 30000})
    assert (r.status_code, r.json["error"]) == (400, "bad_job")
    r = srv.client.post("/api/v1/admin/jobs", headers=srv.auth, json={"shell": "rm -rf /"})
    assert r.status_code == 400 and "unknown job parameters" in r.json["detail"]
    for body in ('{"data": "\\ud800"}', '{"\\udcff": 1}'):  # lone surrogates: not text (were a 500)
        r = srv.client.post("/api/v1/admin/jobs", headers={**srv.auth, "Content-Type": "application/json"},
                            data=body)
        assert (r.status_code, r.json["error"]) == (400, "bad_job") and "UTF-8" in r.json["detail"], r.json
    r = srv.client.post("/api/v1/admin/jobs", headers=srv.auth,
                        json={"architecture": "dnn", "epochs": 2, "synthetic": True, "max_frames": 100})
    assert r.status_code == 202
    job = _finished_job(srv, r.json["id"], 240)
    assert job["status"] == "succeeded", job["detail"] + job["log_tail"][-2000:]
    assert job["published_version"] == 1 and job["report"]["architecture"]["name"] == "dnn"
    assert "job 1: succeeded" in job["log_tail"]  # the tail is the last 4000 bytes; the command is at the start
    assert "fedser-train train" in (tmp_path / "inst" / "jobs" / "1" / "log.txt").read_text()
    # its features are cached in the instance (they were in the server's working folder, never pruned)
    assert list((tmp_path / "inst" / "jobs" / "feature-cache").rglob("*.npz"))
    assert srv.status()["current_version"] == 1


@pytest.mark.slow  # 30 s: JAX trains, TensorFlow exports (scripts/test.sh --slow); the default suite trains on JAX
# in tests/models/test_training_backends.py and runs a baseline job on TensorFlow above
def test_a_baseline_job_on_the_jax_backend_is_exported_with_tensorflow_and_published(tmp_path, trained_model,
                                                                                       monkeypatch):
    """An aggregator whose environment says KERAS_BACKEND=jax (a GPU host where TensorFlow has no GPU build) trains
    there; the job exports the model with TensorFlow in a second process and publishes it."""
    pytest.importorskip("jax")
    monkeypatch.setenv("KERAS_BACKEND", "jax")  # the job's process inherits the aggregator's environment
    srv = Server(tmp_path, trained_model)
    r = srv.client.post("/api/v1/admin/jobs", headers=srv.auth,
                        json={"architecture": "dnn", "epochs": 2, "synthetic": True, "max_frames": 100})
    assert r.status_code == 202
    job = _finished_job(srv, r.json["id"], 300)
    log_text = (tmp_path / "inst" / "jobs" / "1" / "log.txt").read_text()
    assert job["status"] == "succeeded", job["detail"] + log_text[-3000:]
    assert job["report"]["hardware"]["backend"] == "jax" and job["published_version"] == 1
    assert "trained on Keras backend 'jax': exporting" in log_text
    model = tmp_path / "inst" / "jobs" / "1" / "model"
    assert (model / "trained.npz").exists() and (model / "model.tflite").exists()
    assert srv.status()["current_version"] == 1


def test_clip_norm_bounds_each_update_before_averaging(tmp_path, trained_model):
    from aggregator.fedavg import l2_norm

    srv = Server(tmp_path, trained_model, ROUND_MIN_UPDATES=2, CLIP_NORM=0.5, MAX_UPDATE_L2_NORM=1e9)
    srv.publish()
    (a, ka), (b, kb) = srv.enroll(), srv.enroll()
    big = signed_update(a, ka, srv.layout, sequence=1, scale=5.0, num_examples=1)
    small = signed_update(b, kb, srv.layout, sequence=1, scale=1e-4, num_examples=1)
    srv.post(big)
    assert srv.post(small).json["published_version"] == 2
    base, new = srv.head(1), srv.head(2)
    delta = {k: new[k] - base[k] for k in base}
    # the big update was scaled to norm 0.5, then averaged with a tiny one: the step is about 0.25
    assert 0.24 < l2_norm(delta) < 0.26
    np.testing.assert_allclose(delta["w0"], (big.deltas()["w0"] * 0.5 / l2_norm(big.deltas())
                                             + small.deltas()["w0"]) / 2, atol=1e-5)


def test_enrollment_tokens_never_look_like_command_line_options(tmp_path, trained_model):
    srv = Server(tmp_path, trained_model)
    tokens = [srv.client.post("/api/v1/admin/enrollment-tokens", headers=srv.auth, json={}).json["token"]
              for _ in range(100)]
    assert len(set(tokens)) == 100 and not any(t.startswith("-") for t in tokens)  # `--token -x...` broke argparse


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_config(request) -> dict:
    if request.param == "sqlite":
        return {}
    from tests.conftest import postgres_database

    return {"DATABASE_URL": postgres_database()}


def test_an_inflated_example_count_is_weighed_at_the_cap(tmp_path, trained_model, db_config):
    # defaults: MAX_EXAMPLES_WEIGHT 1000, MAX_EXAMPLES_WEIGHT_OVER_MEDIAN 1
    srv = Server(tmp_path, trained_model, ROUND_MIN_UPDATES=3, **db_config)
    srv.publish()
    devs = [srv.enroll() for _ in range(3)]
    envs = [signed_update(d, k, srv.layout, sequence=1, num_examples=n, scale=s)
            for (d, k), n, s in zip(devs, (4, 6, 1_000_000), (0.01, 0.01, 1.0), strict=True)]
    for env in envs:
        r = srv.post(env)
    assert r.json["published_version"] == 2
    base, new = srv.head(1), srv.head(2)
    weights = (4.0, 6.0, 6.0)  # the claimed million is weighed as the median count (6)
    for name in base:
        expected = base[name] + sum(w * e.deltas()[name].astype(np.float64) for w, e in zip(weights, envs,
                                                                                           strict=True)) / 16
        np.testing.assert_allclose(new[name], expected, rtol=1e-5, atol=1e-6)
    status = srv.status()
    closed = status["rounds"][1]
    assert closed["num_examples"] == 1_000_010 and "1 of 3 updates claimed more examples than the cap" in closed["note"]
    assert status["current_metrics"]["capped_counts"] == 1


def _open_round_gauge(srv) -> int:
    import re

    metrics = srv.client.get("/metrics", headers=srv.auth).data.decode()
    return int(float(re.search(r'^fedser_rounds\{status="open"\} (\S+)$', metrics, re.M).group(1)))


@pytest.mark.parametrize("publish", ["upload", "rollback"])
def test_publishing_supersedes_the_open_round_and_one_round_stays_open(tmp_path, trained_model, db_config, publish):
    srv = Server(tmp_path, trained_model, ROUND_MIN_UPDATES=3, **db_config)
    srv.publish()
    (a, ka), (b, kb) = srv.enroll(), srv.enroll()
    assert srv.post(signed_update(a, ka, srv.layout, sequence=1, num_examples=3)).status_code == 202
    assert srv.post(signed_update(b, kb, srv.layout, sequence=1, num_examples=5)).status_code == 202
    assert _open_round_gauge(srv) == 1
    if publish == "upload":
        assert srv.publish().status_code == 201
    else:
        assert srv.client.post("/api/v1/admin/models/1/rollback", headers=srv.auth).status_code == 201
    status = srv.status()
    old = next(r for r in status["rounds"] if r["base_version"] == 1)
    assert old["status"] == "superseded" and old["num_updates"] == 2 and old["num_examples"] == 8
    assert "not aggregated" in old["note"]
    assert status["current_version"] == 2 and status["open_round"]["base_version"] == 2
    assert status["open_round"]["updates"] == 0
    assert _open_round_gauge(srv) == 1
    assert 'fedser_rounds{status="superseded"} 1' in srv.client.get("/metrics", headers=srv.auth).data.decode()
    # the devices send for the new version; the round closes on updates of version 2 only
    c, kc = srv.enroll()
    for seq, (dev, key) in enumerate([(a, ka), (b, kb), (c, kc)], start=2):
        r = srv.post(signed_update(dev, key, srv.layout, sequence=seq, base_version=2))
    assert r.json["published_version"] == 3
    assert next(r for r in srv.status()["rounds"] if r["published_version"] == 3)["num_updates"] == 3
    assert _open_round_gauge(srv) == 1


def test_adaptive_optimizers_default_to_a_small_server_learning_rate(tmp_path, trained_model):
    srv = Server(tmp_path, trained_model, ROUND_MIN_UPDATES=1, SERVER_OPTIMIZER="fedadam")
    srv.publish()
    dev, key = srv.enroll()
    assert srv.post(signed_update(dev, key, srv.layout, sequence=1, scale=0.5)).json["published_version"] == 2
    base, new = srv.head(1), srv.head(2)
    # Adam's first step is lr * sign(delta) (m / sqrt(v) = 1): 0.01, not the 1.0 SERVER_LR used to default to
    step = max(float(np.abs(new[k] - base[k]).max()) for k in base)
    assert 0.009 < step <= 0.0101
    assert srv.status()["current_metrics"]["aggregation"]["server_lr"] == 0.01


def test_a_trimmed_mean_that_cannot_trim_says_so(tmp_path, trained_model):
    srv = Server(tmp_path, trained_model, ROUND_MIN_UPDATES=2, AGGREGATION="trimmed_mean", TRIM_FRACTION=0.1)
    srv.publish()
    (a, ka), (b, kb) = srv.enroll(), srv.enroll()
    srv.post(signed_update(a, ka, srv.layout, sequence=1))
    assert srv.post(signed_update(b, kb, srv.layout, sequence=1)).json["published_version"] == 2
    status = srv.status()
    assert status["current_metrics"]["trimmed_per_end"] == 0
    assert "plain mean" in status["current_metrics"]["notes"][0] and "plain mean" in status["rounds"][1]["note"]
    # three updates with TRIM_FRACTION 0.1: one is cut from each end (floor(0.3) would have cut none)
    srv3 = Server(tmp_path / "three", trained_model, ROUND_MIN_UPDATES=3, AGGREGATION="trimmed_mean",
                  TRIM_FRACTION=0.1, MAX_UPDATE_L2_NORM=1e9)
    srv3.publish()
    envs = []
    for i, scale in enumerate((0.01, 0.02, 1000.0)):
        d, k = srv3.enroll()
        envs.append(signed_update(d, k, srv3.layout, sequence=1, scale=scale, rng=np.random.default_rng(i)))
        r = srv3.post(envs[-1])
    assert r.json["published_version"] == 2 and srv3.status()["current_metrics"]["trimmed_per_end"] == 1
    base, new = srv3.head(1), srv3.head(2)
    stacked = np.stack([e.deltas()["w0"] for e in envs])
    np.testing.assert_allclose(new["w0"] - base["w0"], np.median(stacked, axis=0), atol=1e-5)


def test_sqlite_reads_do_not_wait_for_the_write_lock(tmp_path, trained_model):
    import sqlite3
    import threading

    srv = Server(tmp_path, trained_model)
    srv.publish()
    dev, key = srv.enroll()
    db = srv.app.config["DATABASE_URL"].removeprefix("sqlite:///")
    with srv.app.app_context():  # the device was last seen long ago: the manifest GET would refresh it
        from sqlalchemy import update

        from aggregator.db import Device, get_session

        get_session().execute(update(Device).values(last_seen=1.0))
        get_session().commit()
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another worker closing a round holds the write lock
    answers = {}

    def reads():
        answers["healthz"] = srv.client.get("/healthz").status_code
        answers["metrics"] = srv.client.get("/metrics", headers=srv.auth).status_code
        answers["manifest"] = srv.get_signed("/api/v1/manifest", dev, key).status_code
        answers["manifest/1"] = srv.get_signed("/api/v1/manifest/1", dev, key).status_code
        answers["status"] = srv.client.get("/api/v1/admin/status", headers=srv.auth).status_code
        answers["console"] = srv.client.get("/api/v1/admin/console", headers=srv.auth).status_code

    try:
        thread = threading.Thread(target=reads, daemon=True)
        thread.start()
        thread.join(20)  # with BEGIN IMMEDIATE on every read they queue for SQLite's 30 s busy timeout
        assert not thread.is_alive(), f"reads blocked behind the write lock; answered so far: {answers}"
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert answers == {"healthz": 200, "metrics": 200, "manifest": 200, "manifest/1": 200, "status": 200,
                       "console": 200}


@pytest.mark.parametrize("setting, value, words", [("TRIM_FRACTION", 0.5, "TRIM_FRACTION"),
                                                    ("MAX_EXAMPLES_WEIGHT", -1, "MAX_EXAMPLES_WEIGHT"),
                                                    ("SERVER_OPTIMIZER", "fedprox", "unknown server optimizer"),
                                                    ("AGGREGATION", "krum", "unknown aggregation method")])
def test_unusable_aggregation_settings_are_refused_at_start(tmp_path, setting, value, words):
    from aggregator import ConfigError

    with pytest.raises(ConfigError, match=words):
        create_app({"INSTANCE_PATH": str(tmp_path / "inst"), setting: value})


def _reap_running_jobs(app, dead_pid: int, alive_pid: int) -> None:
    """Once ``dead_pid`` is a zombie (exited, not waited for), record a running job for it and one for the live
    ``alive_pid``, reap both, and check that the first is marked failed and the second left running."""
    from aggregator.db import Job
    from aggregator.jobs import host_name, reap

    deadline = time.monotonic() + 30
    while Path(f"/proc/{dead_pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with app.extensions["fedser_sessionmaker"]() as s:
        s.add_all([Job(status="running", params="{}", created_at=time.time() - 60, pid=p, host=host_name())
                   for p in (dead_pid, alive_pid)])
        s.commit()
    with app.extensions["fedser_sessionmaker"]() as s:
        for job in s.query(Job).order_by(Job.id):
            reap(s, job)
        s.commit()
    with app.extensions["fedser_sessionmaker"]() as s:
        dead, alive = s.get(Job, 1), s.get(Job, 2)
        assert dead.status == "failed" and "exited without reporting" in dead.detail
        assert alive.status == "running"


def test_a_job_whose_process_exited_without_reporting_is_reaped_even_as_an_unwaited_child(tmp_path):
    """The process that starts a job (a worker, or `train-baseline --wait`) is its parent: a job that died without
    recording its end stays a zombie, which kill(pid, 0) calls alive, so the job showed "running" for ever. The
    reaper now waits for it and marks the job failed; a live job is left alone."""
    import subprocess
    import sys

    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst")})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _reap_running_jobs(app, dead.pid, alive.pid)
        assert not Path(f"/proc/{dead.pid}").exists()  # waited for: no zombie left
    finally:
        alive.kill()
        alive.wait()


def test_a_job_that_died_as_another_workers_child_is_reaped_by_any_worker_on_the_host(tmp_path):
    """Only the job's parent can wait for it; before, every other worker on the host saw its zombie as alive
    (kill(pid, 0) succeeds), so the job stayed "running" until the parent happened to look. Now a zombie counts as
    exited whoever looks."""
    import subprocess
    import sys

    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst")})
    # a parent (standing for another worker) that starts a child which exits at once, and never waits for it
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               "p = subprocess.Popen([sys.executable, '-c', 'pass'])\n"
                               "print(p.pid, flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        _reap_running_jobs(app, int(parent.stdout.readline()), parent.pid)  # a live non-child: left alone
    finally:
        parent.kill()
        parent.wait()
