"""TrainPolicy.personal_layers: a personal fit trains only the head's last layers; federated updates train all.

Real TFLite files: the session's trained model and its deep-head export (``trainable_embedding``: w0, b0 the
encoder's embedding layer, then w1, b1, w2, b2). The reference is the personalisation study's numpy Adam with the
same layers frozen.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.device import Device, TrainPolicy
from edge_sdk.errors import ParameterError
from tools.personalisation_study import plain_finetune


def _answered(state, files, policy: TrainPolicy, n: int = 12, seed: int = 3) -> tuple[Device, np.ndarray, np.ndarray]:
    dev = Device(state, model_files=files, train_policy=policy)
    labels = list(dev.metadata.labels)
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 1.0, size=(n, dev.metadata.embedding_dim)).astype(np.float32)
    targets = rng.integers(0, len(labels), n)
    for i in range(n):
        probs = dev.model.head_probs(x[i][None])[0]
        dev.store.add_prediction(prediction_id=f"p{i:03d}", model_version=0, label=labels[int(np.argmax(probs))],
                                 probs=probs, embedding=x[i], features=None, latency_ms=0.0)
        dev.feedback(f"p{i:03d}", labels[int(targets[i])])
    return dev, x, targets


PLAIN = dict(holdout_every=0, balance_classes=False, replay_weight=0.0)


def test_adam_with_personal_layers_2_fits_the_last_two_layers_like_numpy(tmp_path, deep_files):
    dev, x, targets = _answered(tmp_path / "adam", deep_files, TrainPolicy(**PLAIN, personal_layers=2))
    assert [s.name for s in dev.metadata.head_layout] == ["w0", "b0", "w1", "b1", "w2", "b2"]
    assert dev.personalize().status == "kept"
    got, start = dev.model.get_weights(), dev.global_head
    for k in ("w0", "b0"):
        np.testing.assert_array_equal(got[k], start[k])
    ref = plain_finetune(start, x, targets, np.ones(len(x)), lr=0.01, steps=100, train_last=2)
    np.testing.assert_array_equal(ref["w0"], start["w0"])
    for k in ("w1", "b1", "w2", "b2"):
        assert np.abs(got[k] - start[k]).max() > 1e-3, k  # it trained
        assert np.abs(got[k] - ref[k]).max() < 1e-4, k
    # every layer (the default, 0) moves the embedding layer too
    full, _, _ = _answered(tmp_path / "full", deep_files, TrainPolicy(**PLAIN))
    assert full.personalize().status == "kept"
    assert np.abs(full.model.get_weights()["w0"] - start["w0"]).max() > 1e-4


def test_sgd_with_personal_layers_keeps_the_first_layers(tmp_path, deep_files):
    policy = TrainPolicy(**PLAIN, optimizer="sgd", personal_layers=2, learning_rate=0.05)
    dev, _, _ = _answered(tmp_path / "sgd", deep_files, policy)
    assert dev.personalize().status == "kept"
    got, start = dev.model.get_weights(), dev.global_head
    for k in ("w0", "b0"):
        np.testing.assert_array_equal(got[k], start[k])
    for k in ("w1", "b1", "w2", "b2"):
        assert np.abs(got[k] - start[k]).max() > 1e-6, k  # the last two layers trained
    # federated updates train the whole head whatever personal_layers says:
    # tests/integration/test_deep_head_federation.py runs its devices with personal_layers=2


def test_personal_layers_is_range_checked():
    with pytest.raises(ParameterError, match="personal_layers"):
        TrainPolicy(personal_layers=-1)


def test_adapter_fits_keep_the_frozen_layers_too(tmp_path, deep_files):
    """TrainPolicy(adapter=True): head and adapter train from the stored features; with personal_layers=2 the
    embedding layer stays the global one while the adapter and the last layers move."""
    from tests.edge_sdk.conftest import clip

    dev = Device(tmp_path / "ad", model_files=deep_files,
                 train_policy=TrainPolicy(**PLAIN, adapter=True, personal_layers=2, optimizer="sgd",
                                          learning_rate=0.05))
    assert dev.model.has_adapter
    labels = dev.metadata.labels
    for i in range(8):
        pred = dev.classify(clip(i))
        dev.feedback(pred.id, labels[(i + 1) % len(labels)])
    assert dev.personalize().status == "kept"
    got, start = dev.model.get_weights(), dev.global_head
    for k in ("w0", "b0"):
        np.testing.assert_array_equal(got[k], start[k])
    assert np.abs(got["w2"] - start["w2"]).max() > 1e-6
    assert any(np.abs(a - 1.0 if "scale" in n else a).max() > 1e-6 for n, a in dev.model.get_adapter().items())
