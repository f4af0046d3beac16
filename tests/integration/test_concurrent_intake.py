"""Concurrent posts to several gunicorn workers: every accepted update is aggregated exactly once, and every
enrollment token enrolls exactly one device."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from edge_sdk.signing import SigningKey
from tests.conftest import signed_update, start_live_aggregator


@pytest.fixture
def busy_aggregator(tmp_path, database_url):
    agg = start_live_aggregator(tmp_path, min_updates=3, database_url=database_url, workers=3)
    yield agg
    agg.process.terminate()
    agg.process.wait(timeout=30)


def test_no_accepted_update_is_lost_or_counted_twice(busy_aggregator, trained_model, tmp_path):
    agg = busy_aggregator
    agg.publish(trained_model)
    from edge_sdk.model import ModelMetadata

    layout = ModelMetadata.load(trained_model.metadata_path).head_layout
    devices = []
    for _ in range(12):  # enrolled over HTTP with raw keys: the intake is what is under test here
        key = SigningKey.generate()
        token = agg.post_admin("/enrollment-tokens", json={}).json()["token"]
        reply = requests.post(f"{agg.base_url}/api/v1/devices/enroll", timeout=10,
                              json={"token": token, "public_key": key.verify_key.to_b64()}).json()
        devices.append((reply["device_id"], key))
    def post(dev):
        device_id, key = dev
        return agg.post_update(signed_update(device_id, key, layout, sequence=1, num_examples=4).to_bytes())

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(post, devices))
    accepted = [r for r in replies if r.status_code == 202]
    refused = [r for r in replies if r.status_code != 202]
    # All made on version 1: within STALENESS_LIMIT (1) they land in the round of version 1 or 2; later ones
    # are refused as stale.
    assert all(r.status_code == 409 and r.json()["error"] == "stale_base" for r in refused), \
        [r.text for r in refused]
    status = agg.status()
    closed = [r for r in status["rounds"] if r["status"] == "closed"]
    open_updates = status["open_round"]["updates"] if status["open_round"] else 0
    # Each round closed with K=3 updates or more, never fewer; every accepted update is in exactly one closed
    # round's count or waiting in the open round.
    assert closed and all(r["num_updates"] >= 3 for r in closed)
    assert sorted(r["published_version"] for r in closed) == list(range(2, 2 + len(closed)))
    assert sum(r["num_updates"] for r in closed) + open_updates == len(accepted)
    assert status["current_version"] == 1 + len(closed) and len(accepted) >= 3
    assert [r["status"] for r in status["rounds"]].count("open") == 1


def _enroll_at_once(agg, attempts) -> list[requests.Response]:
    """POST every (token, key) enrollment from 12 threads at once; the replies in the attempts' order."""
    def enroll(attempt):
        token, key = attempt
        return requests.post(f"{agg.base_url}/api/v1/devices/enroll", timeout=60,
                             json={"token": token, "public_key": key.verify_key.to_b64()})

    with ThreadPoolExecutor(12) as pool:
        return list(pool.map(enroll, attempts))


def test_an_enrollment_token_enrolls_one_device_however_many_race_for_it(busy_aggregator):
    """Before: enroll read used_at, then wrote it; concurrent requests on PostgreSQL all read it unset."""
    agg = busy_aggregator
    tokens = [agg.post_admin("/enrollment-tokens", json={}).json()["token"] for _ in range(8)]
    attempts = [(t, SigningKey.generate()) for t in tokens for _ in range(6)]
    replies = [(token, r) for (token, _), r in zip(attempts, _enroll_at_once(agg, attempts), strict=True)]
    for token in tokens:
        codes = sorted(r.status_code for t, r in replies if t == token)
        assert codes == [201] + [403] * 5, codes
    assert all(r.json()["error"] == "token_used" for _, r in replies if r.status_code == 403)
    assert len(agg.status()["devices"]) == len(tokens)


def test_one_public_key_enrolled_with_several_tokens_at_once_is_one_device_and_409s(busy_aggregator):
    """Before: the device's INSERT was autoflushed by the token UPDATE, outside the try around commit(), so on
    PostgreSQL the unique clash on public_key was a 500. Every 409 is counted in the refusal metric."""
    agg = busy_aggregator
    keys = [SigningKey.generate() for _ in range(4)]
    attempts = [(agg.post_admin("/enrollment-tokens", json={}).json()["token"], key) for key in keys
                for _ in range(6)]
    replies = [(key, r) for (_, key), r in zip(attempts, _enroll_at_once(agg, attempts), strict=True)]
    for key in keys:
        codes = sorted(r.status_code for k, r in replies if k is key)
        assert codes == [201] + [409] * 5, codes
    assert all(r.json()["error"] == "key_enrolled" for _, r in replies if r.status_code == 409)
    status = agg.status()
    assert len(status["devices"]) == len(keys)
    assert status["refusals"].get("key_enrolled") == 5 * len(keys)


def test_concurrent_closes_and_publishes_leave_one_open_round(busy_aggregator):
    """Before: on PostgreSQL a publish's SELECT of the open round (FOR UPDATE) missed the round a concurrent close
    was inserting, so both opened one. Publishing and round opening are serialised now."""
    from pathlib import Path

    from edge_sdk.model import ModelMetadata

    agg = busy_aggregator
    data = Path(__file__).resolve().parents[2] / "edge_sdk" / "data"
    tflite, meta = (data / "default_model.tflite").read_bytes(), (data / "default_model.json").read_bytes()

    def upload():
        return agg.post_admin("/models", files={"tflite": ("m.tflite", tflite), "metadata": ("m.json", meta)})

    assert upload().status_code == 201
    layout = ModelMetadata.load(data / "default_model.json").head_layout
    devices = []
    for _ in range(2):
        key = SigningKey.generate()
        token = agg.post_admin("/enrollment-tokens", json={}).json()["token"]
        devices.append((requests.post(f"{agg.base_url}/api/v1/devices/enroll", timeout=10, json={
            "token": token, "public_key": key.verify_key.to_b64()}).json()["device_id"], key))
    replies = []
    with ThreadPoolExecutor(4) as pool:
        for it in range(8):
            version = agg.status()["current_version"]
            dev, key = devices[it % 2]
            r = agg.post_update(signed_update(dev, key, layout, sequence=it + 1, base_version=version).to_bytes())
            assert r.status_code == 202, r.text
            futures = [pool.submit(agg.post_admin, "/rounds/close", json={"min_updates": 1}), pool.submit(upload),
                       pool.submit(upload), pool.submit(agg.post_admin, "/rounds/close", json={"min_updates": 1})]
            replies += [f.result() for f in futures]
            rounds = agg.status()["rounds"]
            assert [r["status"] for r in rounds].count("open") == 1, rounds
    assert all(r.status_code in (200, 201, 409) for r in replies), [(r.status_code, r.text[:200]) for r in replies]
    status = agg.status()
    published = sorted(r["published_version"] for r in status["rounds"] if r["published_version"])
    assert len(published) == len(set(published))
    assert [r["status"] for r in status["rounds"]].count("open") == 1
