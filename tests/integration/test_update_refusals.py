"""Every refusal of the intake over real HTTP: a 4xx, a reason, an audit row, no change to the model."""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from edge_sdk.wire import UPDATE_DOMAIN, UpdateEnvelope, UpdateHeader
from tests.conftest import signed_update


def _signed(dev, *, sequence: int, **kwargs):
    return signed_update(dev.device_id, dev.key, dev.metadata.head_layout, sequence=sequence, **kwargs)


def test_refusals_are_reasoned_audited_and_harmless(live_aggregator, trained_model, tmp_path):
    agg = live_aggregator
    agg.publish(trained_model)
    dev = agg.enroll(tmp_path / "dev")
    other = agg.enroll(tmp_path / "other")

    assert agg.post_update(_signed(dev, sequence=5).to_bytes()).status_code == 202
    r = agg.post_update(_signed(dev, sequence=5, rng=np.random.default_rng(9)).to_bytes())
    assert (r.status_code, r.json()["error"]) == (409, "replayed_sequence")
    r = agg.post_update(_signed(dev, sequence=6).to_bytes())
    assert (r.status_code, r.json()["error"]) == (409, "already_contributed")
    r = agg.post_update(_signed(other, sequence=1, base_version=7).to_bytes())
    assert (r.status_code, r.json()["error"]) == (409, "unknown_base")
    r = agg.post_update(_signed(other, sequence=2, scale=1e4).to_bytes())
    assert (r.status_code, r.json()["error"]) == (422, "norm_too_large")

    # NaN in a correctly framed and signed body.
    good = _signed(other, sequence=3)
    body = bytearray(good.body)
    body[0:4] = struct.pack("<f", float("nan"))
    header = UpdateHeader(**{**good.header.__dict__, "body_sha256": hashlib.sha256(bytes(body)).hexdigest()})
    hb = header.to_bytes()
    data = b"FSU1" + struct.pack("<I", len(hb)) + hb + other.key.sign(UPDATE_DOMAIN + hb) + bytes(body)
    r = agg.post_update(data)
    assert (r.status_code, r.json()["error"]) == (422, "bad_values") and "NaN" in r.json()["detail"]

    # A different head layout than the model's.
    from edge_sdk.wire import ArraySpec, HeadLayout

    wrong = HeadLayout([ArraySpec("w0", (2, 2))])
    env = UpdateEnvelope.create(device_id=other.device_id, base_version=1, layout=wrong,
                                deltas={"w0": np.zeros((2, 2), np.float32)}, num_examples=1, sequence=4,
                                sign=other.key.sign)
    r = agg.post_update(env.to_bytes())
    assert (r.status_code, r.json()["error"]) == (422, "layout_mismatch")

    r = agg.post_update(b"x" * (9 * 1024 * 1024))
    assert (r.status_code, r.json()["error"]) == (413, "too_large")

    assert agg.post_admin(f"/devices/{other.device_id}/revoke").status_code == 200
    r = agg.post_update(_signed(other, sequence=10).to_bytes())
    assert (r.status_code, r.json()["error"]) == (403, "revoked_device")

    status = agg.status()
    assert status["current_version"] == 1 and status["open_round"]["updates"] == 1
    assert status["refusals"] == {"replayed_sequence": 1, "already_contributed": 1, "unknown_base": 1,
                                  "norm_too_large": 1, "bad_values": 1, "layout_mismatch": 1,
                                  "revoked_device": 1, "too_large": 1}
    counts = {d["id"]: (d["updates_accepted"], d["updates_refused"]) for d in status["devices"]}
    assert counts[dev.device_id] == (1, 2) and counts[other.device_id] == (0, 5)
