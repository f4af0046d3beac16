"""The ``input_grad`` signature of a CNN export (the gradient of the loss with respect to the model's inputs, for the
device's per-user input affine): builtin ops only, equal to TensorFlow's own gradient through the Keras model, and
:func:`models.export.reexport_tflite` giving older files (without it) the signature with the same predictions."""

from __future__ import annotations

import json
import subprocess
import textwrap

import numpy as np
import pytest

from edge_sdk.errors import ModelError
from edge_sdk.model import INPUT_SIGNATURES, TFLiteModel
from tests.conftest import REPO


def _batch(meta, rng, n):
    x = np.zeros((n, meta.features.max_frames, meta.features.n_features), np.float32)
    for j in range(n):  # utterances of different lengths, zero padding after them (as the SDK's features are)
        k = int(rng.integers(meta.features.max_frames // 2, meta.features.max_frames + 1))
        x[j, :k] = rng.normal(size=(k, meta.features.n_features))
    targets = np.eye(meta.num_classes, dtype=np.float32)[rng.integers(0, meta.num_classes, n)]
    sign = np.where(rng.random(n) < 0.7, 1.0, -1.0).astype(np.float32)
    return x, targets, sign


def _keras_loss_and_grad(result, x, targets, sign, weight):
    """The feedback loss (cross-entropy, or the complementary loss for sign -1) through the Keras encoder and head
    and its gradient with respect to ``x``, by TensorFlow's own gradients."""
    import tensorflow as tf

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        logp = tf.nn.log_softmax(result.head(result.encoder(xt, training=False), training=False))
        ce = -tf.reduce_sum(targets * logp, axis=1)
        comp = -tf.math.log(1.0 - tf.reduce_sum(targets * tf.exp(logp), axis=1) + 1e-6)
        per = tf.where(sign > 0, ce, comp)
        loss = tf.reduce_sum(per * weight) / (tf.reduce_sum(weight) + 1e-8)
    return float(loss), tape.gradient(loss, xt).numpy()


def test_input_grad_is_builtin_and_equals_tensorflows_gradient(trained_model, rng):
    from models.export import check_builtin_ops

    check_builtin_ops(trained_model.tflite_path.read_bytes())
    meta = trained_model.metadata
    model = TFLiteModel(trained_model.tflite_path, meta)
    assert model.has_input_grad
    n = meta.train_batch_size + 3  # two static batches, combined by their weights
    x, targets, sign = _batch(meta, rng, n)
    weight = rng.uniform(0.5, 2.0, n).astype(np.float32)
    grad, loss, probs = model.input_gradient(x, targets, sign, weight)
    ref_loss, ref_grad = _keras_loss_and_grad(trained_model.result, x, targets, sign, weight)
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    # ties of max pooling in the zero padding are split differently (both are gradients of the same function):
    # compare on speech frames
    speech = np.any(x != 0, axis=2)
    scale = np.abs(ref_grad[speech]).max()
    assert np.abs(grad[speech] - ref_grad[speech]).max() / scale < 1e-3
    assert np.abs(grad[~speech]).max() / scale < 1.0  # finite, of the same order
    for j in range(n):
        np.testing.assert_allclose(probs[j], model.infer(x[j])[0], rtol=0, atol=1e-5)


def test_input_gradient_combines_batches_as_the_mean_of_single_rows(trained_model, rng):
    meta = trained_model.metadata
    model = TFLiteModel(trained_model.tflite_path, meta)
    n = meta.train_batch_size + 2
    x, targets, sign = _batch(meta, rng, n)
    grad, loss, _ = model.input_gradient(x, targets, sign)
    singles = [model.input_gradient(x[j:j + 1], targets[j:j + 1], sign[j:j + 1]) for j in range(n)]
    np.testing.assert_allclose(grad, np.concatenate([g for g, _, _ in singles]) / n, rtol=0,
                               atol=1e-5 * np.abs(grad).max())
    assert loss == pytest.approx(np.mean([lo for _, lo, _ in singles]), rel=1e-5)
    with pytest.raises(Exception, match="features must have shape"):
        model.input_gradient(x[:, :-1], targets, sign)


@pytest.fixture(scope="module")
def older_export(trained_model, tmp_path_factory):
    """The trained model exported as files before input_grad were (adapter, no input_grad)."""
    from models.export import export_tflite

    r = trained_model.result
    return export_tflite(r.encoder, r.head_weights, r.metadata, tmp_path_factory.mktemp("older"), input_grad=False)


def test_reexport_gives_an_older_file_input_grad_with_the_same_predictions(older_export, tmp_path, rng):
    from models.export import reexport_tflite

    meta = older_export.metadata
    old = TFLiteModel(older_export.tflite_path, meta)
    assert old.has_adapter and not old.has_input_grad
    out = reexport_tflite(older_export.tflite_path, None, tmp_path, name="again")
    new = TFLiteModel(out.tflite_path, out.metadata)
    assert new.has_input_grad and INPUT_SIGNATURES[0] in new._runners
    for _ in range(4):
        x = _batch(meta, rng, 1)[0][0]
        (p0, e0), (p1, e1) = old.infer(x), new.infer(x)
        np.testing.assert_allclose(p1, p0, rtol=0, atol=1e-5)
        np.testing.assert_allclose(e1, e0, rtol=0, atol=1e-4 * max(1.0, np.abs(e0).max()))
    for k, v in old.get_weights().items():
        np.testing.assert_array_equal(new.get_weights()[k], v)
    written = json.loads(out.metadata_path.read_text())
    before = json.loads(older_export.metadata_path.read_text())
    assert written["extra"]["reexported_from"] == before["extra"]["tflite_sha256"]
    assert written["extra"]["tflite_sha256"] == out.sha256 != before["extra"]["tflite_sha256"]
    drop = ("tflite_sha256", "reexported_from")
    assert {k: v for k, v in written["extra"].items() if k not in drop} == \
        {k: v for k, v in before["extra"].items() if k not in drop}  # the replay set and the rest kept
    assert {k: v for k, v in written.items() if k != "extra"} == {k: v for k, v in before.items() if k != "extra"}


def test_reexport_refuses_what_it_cannot_rebuild(older_export, tmp_path):
    from models.export import reexport_tflite

    with pytest.raises(ModelError, match="no such file"):
        reexport_tflite(tmp_path / "missing.tflite", None, tmp_path)
    meta = json.loads(older_export.metadata_path.read_text())
    meta["extra"]["architecture"]["name"] = "dnn"
    (tmp_path / "m.tflite").write_bytes(older_export.tflite_path.read_bytes())
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="only a cnn encoder"):
        reexport_tflite(tmp_path / "m.tflite", None, tmp_path / "out")
    meta["extra"]["architecture"]["name"] = "cnn"
    meta["extra"]["tflite_sha256"] = "0" * 64  # the metadata of another file
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="describes another file"):
        reexport_tflite(tmp_path / "m.tflite", None, tmp_path / "out")
    del meta["extra"]["tflite_sha256"]
    del meta["extra"]["architecture"]
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="names no architecture"):
        reexport_tflite(tmp_path / "m.tflite", None, tmp_path / "out")


def test_reexport_cli_writes_elsewhere_only(older_export, tmp_path):
    from models.cli import main

    assert main(["reexport", "--model", str(older_export.tflite_path), "--out", str(tmp_path),
                 "--input-affine-from", "20"]) == 0
    assert TFLiteModel(tmp_path / "model.tflite", older_export.metadata).has_input_grad
    from edge_sdk.model import ModelMetadata

    assert ModelMetadata.load(tmp_path / "model.json").input_affine_from == 20
    with pytest.raises(SystemExit, match="overwrite"):
        main(["reexport", "--model", str(older_export.tflite_path), "--out", str(older_export.tflite_path.parent)])


@pytest.mark.skipif(not (REPO / ".venv-tflite-runtime" / "bin" / "python").exists(),
                    reason="no .venv-tflite-runtime (scripts/test.sh makes it where tflite-runtime installs)")
def test_input_grad_runs_under_tflite_runtime(trained_model, rng):
    """tflite-runtime 2.14 (the only cp311 aarch64 wheel older Pis get) runs input_grad (TRANSPOSE_CONV among its
    operators) and gives ai-edge-litert's gradient."""
    meta = trained_model.metadata
    x, targets, sign = _batch(meta, rng, 3)
    path = trained_model.tflite_path.parent / "input-grad-x.npz"
    np.savez(path, x=x, targets=targets, sign=sign)
    script = textwrap.dedent(f"""
        import json, numpy as np
        from edge_sdk.model import ModelMetadata, TFLiteModel
        meta = ModelMetadata.load({str(trained_model.metadata_path)!r})
        m = TFLiteModel({str(trained_model.tflite_path)!r}, meta, runtime="tflite_runtime")
        d = np.load({str(path)!r})
        grad, loss, _ = m.input_gradient(d["x"], d["targets"], d["sign"])
        print(json.dumps({{"runtime": m.runtime, "loss": loss, "grad": grad.ravel()[::97].tolist()}}))
    """)
    out = subprocess.run([str(REPO / ".venv-tflite-runtime" / "bin" / "python"), "-c", script], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    grad, loss, _ = TFLiteModel(trained_model.tflite_path, meta).input_gradient(x, targets, sign)
    assert got["runtime"] == "tflite_runtime" and got["loss"] == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(got["grad"], grad.ravel()[::97], rtol=0, atol=1e-5 * max(1.0, np.abs(grad).max()))
