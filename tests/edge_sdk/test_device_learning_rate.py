"""The model's metadata carries the SGD rate of its federated updates (``device_learning_rate``).

A deep head (``fedser-train train --trainable-embedding``) federates at 0.01, not the device default 0.05
(docs/results/federated-recovery/deep-head/report.md). The rate travels in the metadata (and so in the signed
manifest); a device whose policy sets no rate uses it, a policy's own rate wins, and without it the device keeps
0.05. Against a real aggregator (the bundled model's file, its metadata with and without the field).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from edge_sdk.device import DEFAULT_LEARNING_RATE, TrainPolicy
from edge_sdk.errors import ModelError, ParameterError
from edge_sdk.manifest import BlobRef, Manifest
from edge_sdk.model import ModelMetadata, bundled_model_paths
from edge_sdk.wire import UpdateEnvelope
from tests.conftest import start_live_aggregator
from tests.edge_sdk.conftest import ModelFiles, clip

pytestmark = pytest.mark.skipif(bundled_model_paths() is None, reason="no bundled model in this checkout")

POLICY = TrainPolicy(min_examples=4, holdout_every=0, epochs=3)  # no learning_rate: the model's, else 0.05
LABELS = ("angry", "happy", "neutral", "sad")


def _bundled_meta() -> dict:
    return json.loads(bundled_model_paths()[1].read_text())


def test_metadata_with_the_rate_loads_and_round_trips_through_the_signed_manifest():
    raw = _bundled_meta()
    old = ModelMetadata.from_dict(raw)
    assert old.device_learning_rate is None and "device_learning_rate" not in old.to_dict()  # old files as before
    meta = ModelMetadata.from_dict({**raw, "device_learning_rate": 0.01})
    assert meta.device_learning_rate == 0.01
    assert meta.to_dict()["device_learning_rate"] == 0.01
    assert ModelMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    assert ModelMetadata.from_dict({**raw, "device_learning_rate": 1}).device_learning_rate == 1.0
    ref = BlobRef(sha256="0" * 64, size=1, url="/blobs/x")
    manifest = Manifest(version=1, parent_version=None, round_id=None, base=ref, head=ref, metadata=meta,
                        created_at="2026-11-30T00:00:00Z")
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))).metadata.device_learning_rate == 0.01


@pytest.mark.parametrize("bad", [0, 0.0, -0.01, 1.5, math.nan, math.inf, "0.01", True, [0.01]])
def test_an_out_of_range_or_non_numeric_rate_is_refused_naming_the_field(bad):
    with pytest.raises(ModelError, match="device_learning_rate"):
        ModelMetadata.from_dict({**_bundled_meta(), "device_learning_rate": bad})


@pytest.mark.parametrize("bad", [0, -0.05, math.nan, math.inf])
def test_a_policy_rate_must_be_finite_and_positive(bad):
    with pytest.raises(ParameterError, match="learning_rate"):
        TrainPolicy(learning_rate=bad)


def test_the_policy_rate_resolves_policy_then_model_then_default():
    raw = _bundled_meta()
    with_rate = ModelMetadata.from_dict({**raw, "device_learning_rate": 0.01})
    without = ModelMetadata.from_dict(raw)
    assert TrainPolicy().learning_rate is None
    assert TrainPolicy().sgd_learning_rate(with_rate) == 0.01
    assert TrainPolicy().sgd_learning_rate(without) == DEFAULT_LEARNING_RATE == 0.05
    assert TrainPolicy(learning_rate=0.2).sgd_learning_rate(with_rate) == 0.2


@pytest.fixture
def aggregator(tmp_path):
    started = []

    def start(device_learning_rate: float | None):
        tflite, meta_path = bundled_model_paths()
        meta = _bundled_meta()
        if device_learning_rate is not None:
            meta["device_learning_rate"] = device_learning_rate
        meta_path = tmp_path / f"model{len(started)}.json"
        meta_path.write_text(json.dumps(meta))
        agg = start_live_aggregator(tmp_path / f"srv{len(started)}", min_updates=5, workers=0)
        started.append(agg)
        assert agg.publish(ModelFiles(tflite, meta_path)) == 1
        return agg

    yield start
    for agg in started:
        agg.process.terminate()
        agg.process.wait(timeout=30)


def _update_and_sgd_fits(device, policy, rates):
    """The delta ``make_update(policy=policy)`` made, and SGD fits from the global head at each of ``rates``."""
    for i in range(6):
        pred = device.classify(clip(40 + i))
        device.feedback(pred.id, LABELS[i % 4])
    seq = device.make_update(policy=policy)
    assert seq is not None
    envelope, _ = UpdateEnvelope.from_bytes(next(i for i in device.store.outbox_items() if i.seq == seq).envelope)
    fits = []
    for rate in rates:
        device.model.set_weights(device.global_head)
        device._fit(device.model, device._examples(),
                    dataclasses.replace(policy, optimizer="sgd", adapter=False, learning_rate=rate))
        fits.append(device.model.get_weights())
    return envelope.deltas(), fits


def _matches(device, deltas, fitted) -> bool:
    return all(np.allclose(device.global_head[n] + d, fitted[n], rtol=0, atol=1e-6) for n, d in deltas.items())


@pytest.mark.parametrize("model_rate, policy_rate, expected", [
    (0.01, None, 0.01),  # the model's rate
    (None, None, 0.05),  # no rate in the model: the device default
    (0.01, 0.05, 0.05),  # an explicit policy rate wins
])
def test_the_federated_update_is_an_sgd_fit_at_the_resolved_rate(aggregator, tmp_path, model_rate, policy_rate,
                                                                  expected):
    agg = aggregator(model_rate)
    policy = dataclasses.replace(POLICY, learning_rate=policy_rate)
    dev = agg.enroll(tmp_path / "dev", train_policy=policy)
    assert dev.metadata.device_learning_rate == model_rate  # through the signed manifest
    other = 0.05 if expected == 0.01 else 0.01
    deltas, (fit, fit_other) = _update_and_sgd_fits(dev, policy, [expected, other])
    assert any(np.abs(d).max() > 0 for d in deltas.values())
    assert _matches(dev, deltas, fit)
    assert not _matches(dev, deltas, fit_other)


def test_fedser_edge_config_leaves_the_rate_to_the_model_unless_set(tmp_path):
    """``[training] learning_rate`` unset: None (the model's rate, else 0.05); set in the file or environment: it."""
    from edge_sdk.config import load_config

    assert load_config(state_dir=tmp_path, environ={}).training.learning_rate is None
    (tmp_path / "config.toml").write_text("[training]\nlearning_rate = 0.02\n")
    assert load_config(state_dir=tmp_path, environ={}).training.learning_rate == 0.02
    env = {"FEDSER_EDGE_TRAINING_LEARNING_RATE": "0.03"}
    assert load_config(state_dir=tmp_path, environ=env).training.learning_rate == 0.03
