"""The adapter signatures of a CNN export: builtin ops only, TFLite equal to TensorFlow, the hand-written
gradients equal to TensorFlow's own, and an export without them (older files) still a working head-only model."""

from __future__ import annotations

import json
import subprocess
import textwrap

import numpy as np
import pytest

from edge_sdk.errors import ModelError
from edge_sdk.model import ADAPTER_SIGNATURES, TFLiteModel
from tests.conftest import REPO


@pytest.fixture(scope="module")
def head_only_export(trained_model, tmp_path_factory):
    """The same trained model exported without the adapter signatures (what exports before them wrote)."""
    from models.export import export_tflite

    r = trained_model.result
    return export_tflite(r.encoder, r.head_weights, r.metadata, tmp_path_factory.mktemp("head-only"), adapter=False)


def test_cnn_export_has_the_adapter_and_infer_gives_what_the_head_only_export_gives(trained_model,
                                                                                  head_only_export, rng):
    from models.export import check_builtin_ops

    check_builtin_ops(trained_model.tflite_path.read_bytes())  # raises on any Flex or custom op
    meta = trained_model.metadata
    model, old = TFLiteModel(trained_model.tflite_path, meta), TFLiteModel(head_only_export.tflite_path, meta)
    assert model.has_adapter and not old.has_adapter
    adapter = model.get_adapter()
    np.testing.assert_array_equal(adapter["scale"], 1.0)
    np.testing.assert_array_equal(adapter["shift"], 0.0)
    for _ in range(3):
        x = rng.normal(size=(meta.features.max_frames, meta.features.n_features)).astype(np.float32)
        probs, emb = model.infer(x)
        old_probs, old_emb = old.infer(x)
        np.testing.assert_allclose(emb, old_emb, rtol=0, atol=1e-5)
        np.testing.assert_allclose(probs, old_probs, rtol=0, atol=1e-5)
        a_probs, a_emb = model.adapted(model.frames(x)[None])
        np.testing.assert_allclose(a_emb[0], emb, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a_probs[0], probs, rtol=0, atol=1e-5)


def test_adapter_train_steps_match_tensorflow_and_move_the_adapter(trained_model, rng):
    from models.export import build_trainable_module

    r = trained_model.result
    tf_mod = build_trainable_module(r.encoder, r.head_weights, r.metadata)  # fresh variables
    model = TFLiteModel(trained_model.tflite_path, trained_model.metadata)
    b, c = r.metadata.train_batch_size, r.metadata.num_classes
    t, ch = model.frames_shape
    frames = rng.normal(size=(b, t, ch)).astype(np.float32)
    targets = np.eye(c, dtype=np.float32)[rng.integers(0, c, b)]
    sign = np.where(rng.random(b) < 0.5, 1.0, -1.0).astype(np.float32)
    weight = np.ones(b, np.float32)
    weight[-2:] = 0.0  # padding rows
    for _ in range(3):
        lite = model.adapter_train_step(frames, targets, sign, weight, learning_rate=0.1, adapter_learning_rate=0.2)
        ref = float(tf_mod.adapter_train(frames, targets, weight, sign, np.float32([0.1]), np.float32([0.2]))["loss"])
        assert lite == pytest.approx(ref, abs=1e-5)
    for k, v in model.get_weights().items():
        np.testing.assert_allclose(v, getattr(tf_mod, k).numpy(), rtol=0, atol=1e-5)
    adapter = model.get_adapter()
    np.testing.assert_allclose(adapter["scale"], tf_mod.adapter_scale.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(adapter["shift"], tf_mod.adapter_shift.numpy(), rtol=0, atol=1e-5)
    assert np.abs(adapter["scale"] - 1.0).max() > 1e-4  # it trained
    model.set_adapter(None)
    np.testing.assert_array_equal(model.get_adapter()["scale"], 1.0)


def test_hand_written_gradients_equal_tensorflows_own(trained_model, rng):
    """The builtin-only gradients (ReLU mask, max over time to its arg-max frames, mean as dy / T) against
    TensorFlow's ReluGrad / Max / Mean gradients on the same loss."""
    import tensorflow as tf

    from models.export import build_trainable_module

    r = trained_model.result
    mod = build_trainable_module(r.encoder, r.head_weights, r.metadata)
    mod.adapter_scale.assign(rng.uniform(0.5, 1.5, mod.adapter_scale.shape).astype(np.float32))
    mod.adapter_shift.assign(rng.normal(0, 0.3, mod.adapter_shift.shape).astype(np.float32))
    t, ch = TFLiteModel(trained_model.tflite_path, r.metadata).frames_shape
    frames = tf.constant(rng.normal(size=(5, t, ch)).astype(np.float32))
    kernel = tf.constant(r.encoder.get_layer("embedding").kernel.numpy())
    bias = tf.constant(r.encoder.get_layer("embedding").bias.numpy())
    target = tf.constant(np.eye(r.metadata.num_classes, dtype=np.float32)[[0, 1, 2, 3, 0]])
    variables = [mod.adapter_scale, mod.adapter_shift, mod.w0, mod.b0, mod.w1, mod.b1]

    def native(fr):
        x = tf.nn.relu(fr * mod.adapter_scale + mod.adapter_shift)
        emb = tf.nn.relu(tf.concat([tf.reduce_mean(x, 1), tf.reduce_max(x, 1)], -1) @ kernel + bias)
        return tf.nn.relu(emb @ mod.w0 + mod.b0) @ mod.w1 + mod.b1

    grads = []
    for logits_of in (lambda fr: mod.logits(mod.adapted_embedding(fr)), native):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(target, logits_of(frames)))
        grads.append(tape.gradient(loss, variables))
    for mine, theirs in zip(*grads, strict=True):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(grads[0][0].numpy()).max() > 0  # the adapter gets a gradient at all


def test_a_model_without_the_adapter_signatures_is_head_only_and_says_so(trained_model, head_only_export, rng):
    meta = trained_model.metadata
    old = TFLiteModel(head_only_export.tflite_path, meta)
    assert not old.has_adapter
    with pytest.raises(ModelError, match="no adapter signatures"):
        old.frames(np.zeros((meta.features.max_frames, meta.features.n_features), np.float32))
    with pytest.raises(ModelError, match="only the head"):
        old.get_adapter()
    from ai_edge_litert.interpreter import Interpreter

    assert not set(ADAPTER_SIGNATURES) & set(Interpreter(str(head_only_export.tflite_path)).get_signature_list())


@pytest.mark.skipif(not (REPO / ".venv-tflite-runtime" / "bin" / "python").exists(),
                    reason="no .venv-tflite-runtime (scripts/test.sh makes it where tflite-runtime installs)")
def test_the_adapter_runs_under_tflite_runtime(trained_model, rng):
    """tflite-runtime 2.14 (the only cp311 aarch64 wheel older Pis get) runs the adapter signatures too, and the
    same adapter steps give the same adapter as ai-edge-litert."""
    f = trained_model.metadata.features
    x = rng.normal(size=(f.max_frames, f.n_features)).astype(np.float32)
    path = trained_model.tflite_path.parent / "adapter-x.npy"
    np.save(path, x, allow_pickle=False)
    script = textwrap.dedent(f"""
        import json, numpy as np
        from edge_sdk.model import ModelMetadata, TFLiteModel
        meta = ModelMetadata.load({str(trained_model.metadata_path)!r})
        m = TFLiteModel({str(trained_model.tflite_path)!r}, meta, runtime="tflite_runtime")
        fr = m.frames(np.load({str(path)!r}))[None]
        for _ in range(3):
            m.adapter_train_step(fr, np.eye(meta.num_classes, dtype=np.float32)[:1], [1.0], learning_rate=0.1,
                                 adapter_learning_rate=0.5)
        print(json.dumps({{"runtime": m.runtime, "has_adapter": m.has_adapter,
                           "scale": m.get_adapter()["scale"].tolist()}}))
    """)
    out = subprocess.run([str(REPO / ".venv-tflite-runtime" / "bin" / "python"), "-c", script], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["runtime"] == "tflite_runtime" and got["has_adapter"]
    model = TFLiteModel(trained_model.tflite_path, trained_model.metadata)
    fr = model.frames(x)[None]
    for _ in range(3):
        model.adapter_train_step(fr, np.eye(trained_model.metadata.num_classes, dtype=np.float32)[:1], [1.0],
                                 learning_rate=0.1, adapter_learning_rate=0.5)
    scale = model.get_adapter()["scale"]
    assert np.abs(scale - 1).max() > 1e-4
    np.testing.assert_allclose(got["scale"], scale, rtol=0, atol=1e-5)
