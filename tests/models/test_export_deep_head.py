"""``export_tflite(..., trainable_embedding=True)``: the encoder's embedding layer in the trainable head.

The cut moves to the pooled vector; the head is three layers (``w0, b0`` the embedding layer, ``w1, b1`` the
hidden layer, ``w2, b2`` the logits). Builtin ops only, the same function as the default export, and a ``train``
step that is plain SGD of the three-layer head on the feedback loss.
"""

from __future__ import annotations

import json
import subprocess
import textwrap

import numpy as np
import pytest

from edge_sdk.errors import ModelError
from edge_sdk.model import ModelMetadata, TFLiteModel
from tests.conftest import REPO

TFLITE_RUNTIME_PY = REPO / ".venv-tflite-runtime" / "bin" / "python"


@pytest.fixture(scope="module")
def deep(trained_model, tmp_path_factory):
    from models.export import export_tflite

    r = trained_model.result
    f = r.metadata.features
    rng = np.random.default_rng(7)
    replay_x = rng.normal(size=(6, f.max_frames, f.n_features)).astype(np.float32)
    replay_y = np.array([0, 1, 2, 3, 0, 1])
    return export_tflite(r.encoder, r.head_weights, r.metadata, tmp_path_factory.mktemp("deep"),
                         trainable_embedding=True, replay_inputs=(replay_x, replay_y)), (replay_x, replay_y)


def _numpy_sgd_step(w: dict, emb, targets, sign, weight, lr):
    """One SGD step of the head w0..wN (ReLU on all but the last) on the feedback loss, in float64."""
    n = len(w) // 2
    hs = [emb.astype(np.float64)]
    for i in range(n - 1):
        hs.append(np.maximum(hs[-1] @ w[f"w{i}"] + w[f"b{i}"], 0.0))
    z = hs[-1] @ w[f"w{n - 1}"] + w[f"b{n - 1}"]
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    pt = (p * targets).sum(axis=1, keepdims=True)
    pos = 0.5 * (1.0 + sign)[:, None]
    dz = pos * (p - targets) + (1.0 - pos) * pt * (targets - p) / (1.0 - pt + 1e-6)
    dz = dz * weight[:, None] / (weight.sum() + 1e-8)
    out, d = dict(w), dz
    for i in reversed(range(n)):
        out[f"w{i}"] = w[f"w{i}"] - lr * hs[i].T @ d
        out[f"b{i}"] = w[f"b{i}"] - lr * d.sum(0)
        if i:
            d = (d @ w[f"w{i}"].T) * (hs[i] > 0)
    return out


def test_deep_head_has_builtin_ops_only_and_the_six_array_layout(trained_model, deep):
    from models.export import check_builtin_ops, deep_cut

    res, _ = deep
    ops = check_builtin_ops(res.tflite_path.read_bytes())
    assert "ASSIGN_VARIABLE" in ops and not any(op.startswith("Flex") for op in ops)
    meta = ModelMetadata.load(res.metadata_path)
    r = trained_model.result
    pooled = int(deep_cut(r.encoder).output.shape[-1])
    emb, hidden = r.metadata.embedding_dim, r.head_weights["w0"].shape[1]
    assert meta.embedding_dim == pooled == 2 * r.encoder.get_layer("conv1").filters  # mean and max of the last block
    assert meta.head_layout.to_json() == [["w0", [pooled, emb], "float32"], ["b0", [emb], "float32"],
                                          ["w1", [emb, hidden], "float32"], ["b1", [hidden], "float32"],
                                          ["w2", [hidden, 4], "float32"], ["b2", [4], "float32"]]
    assert meta.extra["trainable_embedding"] is True
    model = TFLiteModel(res.tflite_path, meta)
    w = model.get_weights()
    np.testing.assert_array_equal(w["w0"], r.encoder.get_layer("embedding").kernel.numpy())
    np.testing.assert_array_equal(w["w2"], r.head_weights["w1"])
    # the default file is untouched by the option: four arrays, the embedding as before
    assert trained_model.metadata.head_layout.names == ["w0", "b0", "w1", "b1"]


def test_same_function_as_the_default_export_and_the_pooled_vector_as_embedding(trained_model, deep, rng):
    from models.export import deep_cut

    res, _ = deep
    r = trained_model.result
    shallow = TFLiteModel(trained_model.tflite_path, trained_model.metadata)
    model = TFLiteModel(res.tflite_path, ModelMetadata.load(res.metadata_path))
    cut = deep_cut(r.encoder)
    f = r.metadata.features
    for _ in range(3):
        x = rng.normal(size=(f.max_frames, f.n_features)).astype(np.float32)
        probs, emb = model.infer(x)
        np.testing.assert_allclose(probs, shallow.infer(x)[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(emb, cut(x[None], training=False).numpy()[0], rtol=0, atol=1e-5)
    if model.has_adapter:  # adapted_embedding now ends at the pooled vector; the adapter is identity at export
        frames = model.frames(x)
        aprobs, aemb = model.adapted(frames[None])
        np.testing.assert_allclose(aemb[0], emb, rtol=0, atol=1e-5)
        np.testing.assert_allclose(aprobs[0], probs, rtol=0, atol=1e-5)


def test_replay_set_follows_the_cut(trained_model, deep):
    from models.export import deep_cut

    res, (x, y) = deep
    emb, labels = ModelMetadata.load(res.metadata_path).replay_set()
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_allclose(emb, deep_cut(trained_model.result.encoder).predict(x, verbose=0), rtol=0, atol=1e-5)


def test_deep_export_carries_the_federated_sgd_rate_and_a_given_rate_wins(trained_model, deep, tmp_path):
    """Deep-head updates federate at 0.01 (docs/results/federated-recovery/deep-head/report.md): the file says so;
    a plain export says nothing (devices keep their default); a rate given to the export is written either way."""
    from models.export import DEEP_HEAD_DEVICE_LEARNING_RATE, export_tflite

    res, _ = deep
    assert DEEP_HEAD_DEVICE_LEARNING_RATE == 0.01
    assert res.metadata.device_learning_rate == 0.01
    assert json.loads(res.metadata_path.read_text())["device_learning_rate"] == 0.01
    assert ModelMetadata.load(res.metadata_path).device_learning_rate == 0.01
    assert trained_model.result.metadata.device_learning_rate is None
    assert "device_learning_rate" not in json.loads(trained_model.metadata_path.read_text())
    r = trained_model.result
    given = export_tflite(r.encoder, r.head_weights, r.metadata, tmp_path, adapter=False, device_learning_rate=0.02)
    assert ModelMetadata.load(given.metadata_path).device_learning_rate == 0.02
    with pytest.raises(ModelError, match="device_learning_rate"):
        export_tflite(r.encoder, r.head_weights, r.metadata, tmp_path / "bad", trainable_embedding=True,
                      device_learning_rate=2.0)


def test_fedser_train_parses_device_learning_rate():
    from models.cli import build_parser

    base = ["train", "--out", "x", "--corpus", "manifest", "--data", "clips.csv"]
    assert build_parser().parse_args(base).device_learning_rate is None
    assert build_parser().parse_args(base + ["--device-learning-rate", "0.02"]).device_learning_rate == 0.02


def test_train_step_is_numpy_sgd_of_the_three_layer_head(deep, rng):
    res, _ = deep
    meta = ModelMetadata.load(res.metadata_path)
    model = TFLiteModel(res.tflite_path, meta)
    b, e, c = meta.train_batch_size, meta.embedding_dim, meta.num_classes
    w = {k: v.astype(np.float64) for k, v in model.get_weights().items()}
    assert len(w) == 6
    emb = np.abs(rng.normal(size=(b, e))).astype(np.float32)  # pooled vectors of ReLU outputs: >= 0
    targets = np.eye(c, dtype=np.float32)[rng.integers(0, c, b)]
    sign = np.where(rng.random(b) < 0.5, 1.0, -1.0).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, b).astype(np.float32)
    weight[-2:] = 0.0  # padding rows
    for _ in range(3):
        model.train_step(emb, targets, sign, weight, learning_rate=0.1)
        w = _numpy_sgd_step(w, emb, targets, sign, weight, 0.1)
        got = model.get_weights()
        for name in w:
            np.testing.assert_allclose(got[name], w[name], rtol=0, atol=1e-5, err_msg=name)
    # and it moved every layer, the embedding layer included
    start = TFLiteModel(res.tflite_path, meta).get_weights()
    assert all(np.abs(got[k] - start[k]).max() > 0 for k in ("w0", "b0", "w1", "w2"))


def test_set_and_get_weights_round_trip_six_arrays(deep, rng):
    res, _ = deep
    model = TFLiteModel(res.tflite_path, ModelMetadata.load(res.metadata_path))
    new = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in model.get_weights().items()}
    model.set_weights(new)
    for k, v in model.get_weights().items():
        np.testing.assert_array_equal(v, new[k])


def test_encoders_without_a_relu_embedding_are_refused(tmp_path):
    from edge_sdk.features import FeatureConfig, Normalization
    from models.architectures import build_encoder, build_head, preset
    from models.export import export_tflite, head_layout

    cfg = preset("afcn", channels=(8, 8), kernels=(5, 3), strides=(2, 1), embedding_dim=8, head_units=4)
    f = FeatureConfig(max_frames=40)
    enc, head = build_encoder(cfg, f.max_frames, f.n_features), build_head(cfg, 4)
    hw = {"w0": head.get_layer("head_hidden").kernel.numpy(), "b0": head.get_layer("head_hidden").bias.numpy(),
          "w1": head.get_layer("head_logits").kernel.numpy(), "b1": head.get_layer("head_logits").bias.numpy()}
    meta = ModelMetadata(labels=("a", "b", "c", "d"), features=f,
                         normalization=Normalization(np.zeros(f.n_features), np.ones(f.n_features)),
                         head_layout=head_layout(8, 4, 4), embedding_dim=8, train_batch_size=4, architecture="afcn")
    with pytest.raises(ModelError, match="ReLU embedding"):
        export_tflite(enc, hw, meta, tmp_path, trainable_embedding=True)


@pytest.mark.skipif(not TFLITE_RUNTIME_PY.exists(),
                    reason="no .venv-tflite-runtime (scripts/test.sh makes it where tflite-runtime installs)")
def test_deep_head_runs_and_trains_under_tflite_runtime(deep, rng):
    res, _ = deep
    meta = ModelMetadata.load(res.metadata_path)
    f = meta.features
    x = rng.normal(size=(f.max_frames, f.n_features)).astype(np.float32)
    np.save(res.tflite_path.parent / "x.npy", x, allow_pickle=False)
    script = textwrap.dedent(f"""
        import json, numpy as np
        from edge_sdk.model import ModelMetadata, TFLiteModel
        meta = ModelMetadata.load({str(res.metadata_path)!r})
        m = TFLiteModel({str(res.tflite_path)!r}, meta, runtime="tflite_runtime")
        probs, emb = m.infer(np.load({str(res.tflite_path.parent / "x.npy")!r}))
        before = m.get_weights()["w0"].copy()
        loss = m.train_step(emb[None], np.eye(meta.num_classes, dtype=np.float32)[:1], [1.0], learning_rate=0.5)
        moved = float(np.abs(m.get_weights()["w0"] - before).max())
        print(json.dumps({{"runtime": m.runtime, "probs": probs.tolist(), "loss": loss, "moved": moved}}))
    """)
    out = subprocess.run([str(TFLITE_RUNTIME_PY), "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["runtime"] == "tflite_runtime" and got["loss"] > 0 and got["moved"] > 0
    probs, _ = TFLiteModel(res.tflite_path, meta).infer(x)
    np.testing.assert_allclose(got["probs"], probs, rtol=0, atol=1e-5)


def test_fedser_train_trainable_embedding_writes_a_deep_head_with_its_replay_set(synthetic_clips, tmp_path):
    """``fedser-train train --trainable-embedding``: the file's head is six arrays, metadata's embedding_dim is the
    pooled vector's and the replay set (training clips' pooled vectors) is what the file's ``infer`` computes."""
    import sys

    from models.features import compute_features

    speakers = sorted({c.speaker for c in synthetic_clips})
    parts = {speakers[-1]: "test", speakers[-2]: "val"}
    csv = tmp_path / "clips.csv"
    csv.write_text("path,speaker,label,split\n" + "".join(
        f"{c.path},{c.speaker},{c.label},{parts.get(c.speaker, 'train')}\n" for c in synthetic_clips))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "models.cli", "train", "--out", str(out), "--corpus", "manifest",
                        "--data", str(csv), "--architecture", "dnn", "--epochs", "1", "--max-frames", "120",
                        "--cache", str(tmp_path / "cache"), "--trainable-embedding", "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = ModelMetadata.load(out / "model.json")
    assert meta.head_layout.names == ["w0", "b0", "w1", "b1", "w2", "b2"] and meta.extra["trainable_embedding"]
    assert meta.device_learning_rate == 0.01  # --trainable-embedding's default
    assert meta.head_layout[0].shape == (meta.embedding_dim, meta.head_layout[2].shape[0])
    model = TFLiteModel(out / "model.tflite", meta)
    emb, labels = meta.replay_set()
    assert emb.shape[1] == meta.embedding_dim and len(labels) > 0
    # the replay rows are pooled vectors of training clips: each equals the file's infer embedding of some clip
    train = [c for c in synthetic_clips if c.speaker not in parts]
    fs = compute_features(train, meta.features, cache_dir=tmp_path / "cache")
    x = fs.model_inputs(meta.features, fs.normalization())
    pooled = np.stack([model.infer(v)[1] for v in x])
    nearest = np.abs(emb[:, None, :] - pooled[None]).max(axis=2).min(axis=1)
    assert nearest.max() < 1e-4
    r = subprocess.run([sys.executable, "-m", "models.cli", "train", "--out", str(tmp_path / "bad"), "--corpus",
                        "manifest", "--data", str(csv), "--architecture", "lstm", "--epochs", "1",
                        "--trainable-embedding", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "trainable_embedding needs a cnn or dnn" in r.stderr


def test_a_deep_head_export_has_input_grad_and_reexports_with_the_same_predictions(deep, tmp_path, rng):
    """The deep head's input gradient runs through the encoder's embedding layer as a head variable; the rebuild
    reads that layer from the head (w0, b0), not from a frozen constant."""
    from models.export import reexport_tflite

    export, _ = deep
    model = TFLiteModel(export.tflite_path, export.metadata)
    assert model.has_input_grad
    again = reexport_tflite(export.tflite_path, None, tmp_path)
    new = TFLiteModel(again.tflite_path, again.metadata)
    f = export.metadata.features
    for _ in range(3):
        x = rng.normal(size=(f.max_frames, f.n_features)).astype(np.float32)
        np.testing.assert_allclose(new.infer(x)[0], model.infer(x)[0], rtol=0, atol=1e-5)
    x = rng.normal(size=(3, f.max_frames, f.n_features)).astype(np.float32)
    targets = np.eye(export.metadata.num_classes, dtype=np.float32)[[0, 1, 2]]
    g0, l0, _ = model.input_gradient(x, targets, np.ones(3, np.float32))
    g1, l1, _ = new.input_gradient(x, targets, np.ones(3, np.float32))
    assert l1 == pytest.approx(l0, rel=1e-4)
    np.testing.assert_allclose(g1, g0, rtol=0, atol=1e-4 * np.abs(g0).max())
    assert again.metadata.replay_set() is not None
