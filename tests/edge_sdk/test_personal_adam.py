"""On-device Adam without re-exporting: the gradient is read back from the model's own ``train`` signature.

Real TFLite model (the session's trained one); the reference is Adam written out in numpy on the same head
(``relu(e W0 + b0) W1 + b1``, the same weighted mean loss as the export's ``train`` signature).
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.device import Adam, Device, TrainPolicy, head_gradient
from edge_sdk.errors import ParameterError
from edge_sdk.model import TFLiteModel


def _numpy_gradient(w: dict, x: np.ndarray, targets: np.ndarray, sign: np.ndarray, weight: np.ndarray) -> dict:
    """The export's loss: weighted mean of cross-entropy (sign +1) or -log(1 - p[target] + 1e-6) (sign -1)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    pre = x.astype(np.float64) @ w["w0"] + w["b0"]
    h = np.maximum(pre, 0.0)
    z = h @ w["w1"] + w["b1"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pt = (p * targets).sum(1, keepdims=True)
    dz = np.where(sign[:, None] > 0, p - targets, pt / (1.0 - pt + 1e-6) * (targets - p))
    dz = dz * (weight / weight.sum())[:, None]
    dh = (dz @ w["w1"].T) * (pre > 0)
    return {"w0": x.T @ dh, "b0": dh.sum(0), "w1": h.T @ dz, "b1": dz.sum(0)}


def _numpy_adam_step(w: dict, g: dict, lr: float, state: dict, t: int) -> dict:
    out = {}
    for k in w:
        state.setdefault(k, [0.0, 0.0])
        m = state[k][0] = 0.9 * state[k][0] + 0.1 * g[k]
        v = state[k][1] = 0.999 * state[k][1] + 0.001 * g[k] ** 2
        out[k] = w[k] - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-7)
    return out


def _answers(model: TFLiteModel, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    meta = model.metadata
    x = rng.normal(size=(n, meta.embedding_dim)).astype(np.float32)
    targets = np.eye(meta.num_classes, dtype=np.float32)[rng.integers(0, meta.num_classes, n)]
    sign = np.where(rng.random(n) < 0.3, -1.0, 1.0).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, n).astype(np.float32)
    return x, targets, sign, weight


@pytest.mark.parametrize("n", [5, 37], ids=["one-batch", "three-batches"])
def test_gradient_read_from_the_train_signature_is_the_numpy_gradient(trained_model, n):
    model = TFLiteModel(trained_model.tflite_path, trained_model.metadata)
    w = model.get_weights()
    x, targets, sign, weight = _answers(model, n)
    grad, _ = head_gradient(model, w, x, targets, sign, weight)
    ref = _numpy_gradient(w, x, targets, sign, weight)
    for k in ref:
        assert np.abs(grad[k] - ref[k]).max() < 1e-6 * max(1.0, np.abs(ref[k]).max()), k
    assert all(np.array_equal(v, w[k]) for k, v in model.get_weights().items())  # the weights are left as given


def test_adam_steps_through_the_signature_reproduce_numpy_adam_on_the_same_head(trained_model):
    model = TFLiteModel(trained_model.tflite_path, trained_model.metadata)
    w0 = model.get_weights()
    x, targets, sign, weight = _answers(model, 21, seed=1)
    ours, adam = {k: v.astype(np.float64) for k, v in w0.items()}, Adam(learning_rate=0.01)
    ref, state = {k: v.astype(np.float64) for k, v in w0.items()}, {}
    for t in range(1, 4):
        ours = adam.step(ours, head_gradient(model, ours, x, targets, sign, weight)[0])
        ref = _numpy_adam_step(ref, _numpy_gradient(ref, x, targets, sign, weight), 0.01, state, t)
        for k in ref:
            assert np.abs(ours[k] - ref[k]).max() < 1e-5, (t, k)
    # ... and the steps moved the head (by about the learning rate per step, Adam's scale)
    assert max(np.abs(ours[k] - w0[k]).max() for k in w0) > 0.01


def test_the_adam_fit_through_a_device_is_numpy_adam_from_the_global_head(tmp_path, trained_model):
    """TrainPolicy(optimizer="adam"), no balancing, replay or guard: the personal head is 100 numpy Adam steps on
    the answers from the global head (within 1e-4 after 100 steps of float32 forward passes)."""
    policy = TrainPolicy(optimizer="adam", holdout_every=0, balance_classes=False, replay_weight=0.0)
    dev = Device(tmp_path / "dev", model_files=(trained_model.tflite_path, trained_model.metadata_path),
                 train_policy=policy)
    labels = list(dev.metadata.labels)
    x, targets, _, _ = _answers(dev.model, 12, seed=2)
    for i in range(len(x)):
        probs = dev.model.head_probs(x[i][None])[0]
        dev.store.add_prediction(prediction_id=f"p{i:03d}", model_version=0, label=labels[int(np.argmax(probs))],
                                 probs=probs, embedding=x[i], features=None, latency_ms=0.0)
        dev.feedback(f"p{i:03d}", labels[int(np.argmax(targets[i]))])
    assert dev.personalize().status == "kept"
    ref, state = {k: v.astype(np.float64) for k, v in dev.global_head.items()}, {}
    ones = np.ones(len(x), np.float32)
    for t in range(1, 101):
        ref = _numpy_adam_step(ref, _numpy_gradient(ref, x, targets, ones, ones), 0.01, state, t)
    got = dev.model.get_weights()
    for k in ref:
        assert np.abs(got[k] - ref[k]).max() < 1e-4, k


def test_unknown_optimizer_is_refused():
    with pytest.raises(ParameterError, match="optimizer"):
        TrainPolicy(optimizer="lbfgs")


def _numpy_balance(targets: np.ndarray) -> np.ndarray:
    """Each class present counts equally: n / (classes present x the answer's class count)."""
    counts = targets.sum(0)
    present = int((counts > 0).sum())
    return np.array([len(targets) / (present * counts[np.argmax(t)]) for t in targets])


def _answer_all(dev: Device, x: np.ndarray, targets: np.ndarray, down_every: int = 0) -> np.ndarray:
    """Store and answer each row (a correction to its target; every down_every-th a bare thumbs-down on what the
    global head shows); returns the signs the device trains with, and rewrites ``targets`` to the trained ones."""
    labels = list(dev.metadata.labels)
    sign = np.ones(len(x), np.float32)
    for i in range(len(x)):
        probs = dev.model.head_probs(x[i][None])[0]
        shown = int(np.argmax(probs))
        dev.store.add_prediction(prediction_id=f"p{i:04d}", model_version=0, label=labels[shown], probs=probs,
                                 embedding=x[i], features=None, latency_ms=0.0)
        if down_every and i % down_every == down_every - 1:
            dev.feedback(f"p{i:04d}", "down")
            sign[i], targets[i] = -1.0, np.eye(len(labels), dtype=np.float32)[shown]
        else:
            dev.feedback(f"p{i:04d}", labels[int(np.argmax(targets[i]))])
    return sign


def test_the_adam_fit_with_replay_and_class_balance_is_the_numpy_reference(tmp_path, trained_model):
    """Replay mixing and class-balance weights against numpy: each step's gradient is (1 - s) x the answers'
    (class-balanced, thumbs-down included) + s x that of train_batch_size replay rows drawn from the seeded
    generator, s = replay_weight / (1 + replay_weight)."""
    import json

    from edge_sdk.model import ModelMetadata

    meta = json.loads(trained_model.metadata_path.read_text())
    rng = np.random.default_rng(5)
    emb_dim, classes = trained_model.metadata.embedding_dim, trained_model.metadata.num_classes
    replay_x = rng.normal(size=(20, emb_dim)).astype(np.float32)
    replay_y = rng.integers(0, classes, 20)
    meta.setdefault("extra", {})["replay"] = ModelMetadata.replay_extra(replay_x, replay_y)
    meta_path = tmp_path / "replay.json"
    meta_path.write_text(json.dumps(meta))
    policy = TrainPolicy(optimizer="adam", holdout_every=0, balance_classes=True, replay_weight=0.25, adam_steps=30,
                         seed=3)
    dev = Device(tmp_path / "dev", model_files=(trained_model.tflite_path, meta_path), train_policy=policy)
    assert dev.metadata.replay_set() is not None
    x, targets, _, _ = _answers(dev.model, 14, seed=4)
    targets[:8] = np.eye(classes, dtype=np.float32)[0]  # skewed: class balancing matters
    sign = _answer_all(dev, x, targets, down_every=5)
    assert dev.personalize().status == "kept"
    weight = _numpy_balance(targets)
    assert weight.max() > 1.5 * weight.min()
    draw, batch, share = np.random.default_rng(3), dev.metadata.train_batch_size, 0.25 / 1.25
    onehot = np.eye(classes)[replay_y]
    ref, state = {k: v.astype(np.float64) for k, v in dev.global_head.items()}, {}
    for t in range(1, 31):
        g = _numpy_gradient(ref, x, targets, sign, weight)
        pick = draw.choice(len(replay_x), size=min(batch, len(replay_x)), replace=False)
        r = _numpy_gradient(ref, replay_x[pick], onehot[pick], np.ones(len(pick)), np.ones(len(pick)))
        ref = _numpy_adam_step(ref, {k: (1 - share) * g[k] + share * r[k] for k in g}, 0.01, state, t)
    got = dev.model.get_weights()
    for k in ref:
        assert np.abs(got[k] - ref[k]).max() < 1e-4, k


def test_adam_steps_above_adam_max_rows_take_a_seeded_draw_of_the_answers(tmp_path, trained_model):
    """300 answers, cap 256, no replay: each step's gradient is numpy's on 256 answers drawn from the seeded
    generator (reproducible); up to the cap every step takes every answer (the test above and the 12-answer one)."""
    policy = TrainPolicy(optimizer="adam", holdout_every=0, balance_classes=False, replay_weight=0.0, adam_steps=4,
                         seed=9)
    dev = Device(tmp_path / "dev", model_files=(trained_model.tflite_path, trained_model.metadata_path),
                 train_policy=policy)
    x, targets, _, _ = _answers(dev.model, 300, seed=6)
    sign = _answer_all(dev, x, targets)
    assert dev.personalize().status == "kept"
    draw, ones = np.random.default_rng(9), np.ones(300)
    ref, state = {k: v.astype(np.float64) for k, v in dev.global_head.items()}, {}
    full = {k: v.copy() for k, v in ref.items()}
    full_state: dict = {}
    for t in range(1, 5):
        rows = draw.choice(300, size=256, replace=False)
        ref = _numpy_adam_step(ref, _numpy_gradient(ref, x[rows], targets[rows], sign[rows], ones[rows]), 0.01,
                               state, t)
        full = _numpy_adam_step(full, _numpy_gradient(full, x, targets, sign, ones), 0.01, full_state, t)
    got = dev.model.get_weights()
    for k in ref:
        assert np.abs(got[k] - ref[k]).max() < 1e-5, k
    assert max(np.abs(full[k] - ref[k]).max() for k in ref) > 1e-4  # the draw is not the full batch
