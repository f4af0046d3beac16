"""The exported .tflite against TensorFlow, on both stock runtimes, and the builtin-ops gate."""

from __future__ import annotations

import json
import subprocess
import tempfile
import textwrap

import numpy as np
import pytest

from edge_sdk.errors import ModelError
from edge_sdk.model import TFLiteModel
from tests.conftest import REPO

TFLITE_RUNTIME_PY = REPO / ".venv-tflite-runtime" / "bin" / "python"


@pytest.fixture(scope="module")
def tf_module(trained_model):
    from models.export import build_trainable_module

    r = trained_model.result
    return build_trainable_module(r.encoder, r.head_weights, r.metadata)


def test_signatures_use_builtin_ops_only(trained_model):
    from models.export import check_builtin_ops

    ops = check_builtin_ops(trained_model.tflite_path.read_bytes())
    assert "CONV_2D" in ops or "CONV_1D" in ops or "DEPTHWISE_CONV_2D" in ops
    assert "ASSIGN_VARIABLE" in ops and "READ_VARIABLE" in ops


def test_infer_matches_tensorflow(trained_model, tf_module, rng):
    model = TFLiteModel(trained_model.tflite_path, trained_model.metadata)
    f = trained_model.metadata.features
    for _ in range(3):
        x = rng.normal(size=(f.max_frames, f.n_features)).astype(np.float32)
        probs, emb = model.infer(x)
        ref = tf_module.infer(x[None])
        np.testing.assert_allclose(emb, ref["embedding"].numpy()[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(probs, ref["probs"].numpy()[0], rtol=0, atol=1e-5)


def test_train_steps_match_tensorflow(trained_model, rng):
    from models.export import build_trainable_module

    r = trained_model.result
    tf_mod = build_trainable_module(r.encoder, r.head_weights, r.metadata)  # fresh variables
    model = TFLiteModel(trained_model.tflite_path, trained_model.metadata)
    b, e, c = r.metadata.train_batch_size, r.metadata.embedding_dim, r.metadata.num_classes
    emb = rng.normal(size=(b, e)).astype(np.float32)
    targets = np.eye(c, dtype=np.float32)[rng.integers(0, c, b)]
    sign = np.where(rng.random(b) < 0.5, 1.0, -1.0).astype(np.float32)
    weight = np.ones(b, np.float32)
    weight[-2:] = 0.0  # padding rows
    for _ in range(4):
        lite_loss = model.train_step(emb, targets, sign, weight, learning_rate=0.1)
        tf_loss = float(tf_mod.train(emb, targets, weight, sign, np.float32([0.1]))["loss"])
        assert lite_loss == pytest.approx(tf_loss, abs=1e-5)
    lite_w = model.get_weights()
    for name in ("w0", "b0", "w1", "b1"):
        np.testing.assert_allclose(lite_w[name], getattr(tf_mod, name).numpy(), rtol=0, atol=1e-5)


def test_thumbs_down_lowers_the_wrong_class(trained_model, rng):
    model = TFLiteModel(trained_model.tflite_path, trained_model.metadata)
    emb = np.abs(rng.normal(size=(4, trained_model.metadata.embedding_dim))).astype(np.float32)
    wrong = np.eye(trained_model.metadata.num_classes, dtype=np.float32)[[0, 0, 0, 0]]
    before = model.head_probs(emb)[:, 0]
    for _ in range(20):
        model.train_step(emb, wrong, -np.ones(4), learning_rate=0.1)
    assert np.all(model.head_probs(emb)[:, 0] < before)


def test_set_and_get_weights_round_trip(trained_model, rng):
    model = TFLiteModel(trained_model.tflite_path, trained_model.metadata)
    new = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in model.get_weights().items()}
    model.set_weights(new)
    for k, v in model.get_weights().items():
        np.testing.assert_array_equal(v, new[k])


def test_gate_rejects_a_model_that_needs_flex_ops():
    import tensorflow as tf

    from models.export import check_builtin_ops

    class PlainRelu(tf.Module):  # tf.nn.relu's gradient is the Flex op ReluGrad
        def __init__(self):
            self.w = tf.Variable(np.ones((4, 3), np.float32))

        @tf.function(input_signature=[tf.TensorSpec([2, 4], tf.float32)])
        def train(self, x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.nn.relu(tf.matmul(x, self.w)))
            self.w.assign_sub(0.1 * tape.gradient(loss, [self.w])[0])
            return {"loss": loss}

    module = PlainRelu()
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures={"train": module.train.get_concrete_function()})
        conv = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["train"])
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
        conv.experimental_enable_resource_variables = True
        flatbuffer = conv.convert()
    with pytest.raises(ModelError, match="FlexReluGrad"):
        check_builtin_ops(flatbuffer)


@pytest.mark.skipif(not TFLITE_RUNTIME_PY.exists(),
                    reason="no .venv-tflite-runtime (scripts/test.sh makes it where tflite-runtime installs)")
def test_runs_under_tflite_runtime(trained_model, rng):
    f = trained_model.metadata.features
    x = rng.normal(size=(f.max_frames, f.n_features)).astype(np.float32)
    np.save(trained_model.tflite_path.parent / "x.npy", x, allow_pickle=False)
    script = textwrap.dedent(f"""
        import json, numpy as np
        from edge_sdk.model import ModelMetadata, TFLiteModel
        meta = ModelMetadata.load({str(trained_model.metadata_path)!r})
        m = TFLiteModel({str(trained_model.tflite_path)!r}, meta, runtime="tflite_runtime")
        probs, emb = m.infer(np.load({str(trained_model.tflite_path.parent / "x.npy")!r}))
        loss = m.train_step(emb[None], np.eye(meta.num_classes, dtype=np.float32)[:1], [1.0], learning_rate=0.1)
        print(json.dumps({{"runtime": m.runtime, "probs": probs.tolist(), "loss": loss}}))
    """)
    out = subprocess.run([str(TFLITE_RUNTIME_PY), "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["runtime"] == "tflite_runtime" and got["loss"] > 0
    probs, _ = TFLiteModel(trained_model.tflite_path, trained_model.metadata).infer(x)
    np.testing.assert_allclose(got["probs"], probs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["dnn", "cnn", "lstm", "afcn"])
def test_every_architecture_exports_and_matches_tensorflow(name, tmp_path, rng):
    """For each of the four encoders: builtin ops only, infer and train steps equal TensorFlow's within 1e-5."""
    from edge_sdk.features import FeatureConfig, Normalization
    from edge_sdk.model import ModelMetadata
    from models.architectures import build_encoder, build_head, preset
    from models.export import build_trainable_module, export_tflite, head_layout

    small = {"dnn": {"channels": (32, 32)}, "cnn": {"channels": (16, 32)},
             "lstm": {"channels": (16,), "lstm_units": (24,)}, "afcn": {"channels": (8, 12, 16, 20)}}[name]
    cfg = preset(name, embedding_dim=24, head_units=12, **small)
    feats = FeatureConfig(max_frames=90)
    encoder, head = build_encoder(cfg, feats.max_frames, feats.n_features), build_head(cfg, 4)
    hidden, logits = head.get_layer("head_hidden"), head.get_layer("head_logits")
    weights = {"w0": hidden.kernel.numpy(), "b0": hidden.bias.numpy(), "w1": logits.kernel.numpy(),
               "b1": logits.bias.numpy()}
    meta = ModelMetadata(labels=("angry", "happy", "neutral", "sad"), features=feats,
                         normalization=Normalization(np.zeros(40, np.float32), np.ones(40, np.float32)),
                         head_layout=head_layout(24, 12, 4), embedding_dim=24, train_batch_size=4, architecture=name)
    exported = export_tflite(encoder, weights, meta, tmp_path)
    tf_mod = build_trainable_module(encoder, weights, meta)
    model = TFLiteModel(exported.tflite_path, meta)
    for _ in range(2):
        x = rng.normal(size=(feats.max_frames, feats.n_features)).astype(np.float32)
        probs, emb = model.infer(x)
        ref = tf_mod.infer(x[None])
        np.testing.assert_allclose(emb, ref["embedding"].numpy()[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(probs, ref["probs"].numpy()[0], rtol=0, atol=1e-5)
        # the Keras encoder itself (what training evaluated) agrees too
        np.testing.assert_allclose(emb, encoder(x[None], training=False).numpy()[0], rtol=0, atol=1e-4)
    emb = rng.normal(size=(4, 24)).astype(np.float32)
    targets = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]]
    sign = np.array([1, -1, 1, -1], np.float32)
    for _ in range(3):
        lite = model.train_step(emb, targets, sign, np.ones(4, np.float32), learning_rate=0.05)
        ref_loss = float(tf_mod.train(emb, targets, np.ones(4, np.float32), sign, np.float32([0.05]))["loss"])
        assert lite == pytest.approx(ref_loss, abs=1e-5)
    for k, v in model.get_weights().items():
        np.testing.assert_allclose(v, getattr(tf_mod, k).numpy(), rtol=0, atol=1e-5)


def test_replay_set_is_the_exported_encoders_embeddings_of_training_clips(trained_model, synthetic_clips, tmp_path):
    """The model ships a few training embeddings per class; they are what its own encoder makes of them."""
    from edge_sdk.model import ModelMetadata
    from models.features import compute_features

    meta = trained_model.result.metadata
    emb, labels = meta.replay_set()
    assert emb.shape == (len(labels), meta.embedding_dim) and emb.dtype == np.float32
    assert set(labels.tolist()) == set(range(meta.num_classes))
    on_disk = ModelMetadata.load(trained_model.metadata_path).replay_set()  # the file carries the same set
    np.testing.assert_array_equal(on_disk[0], emb)
    np.testing.assert_array_equal(on_disk[1], labels)
    # each replay embedding is a training clip's embedding under the exported (frozen) encoder, with its label
    train_speakers = set(trained_model.result.report["split"]["train_speakers"])
    clips = [c for c in synthetic_clips if c.speaker in train_speakers]
    fs = compute_features(clips, meta.features, cache_dir=tmp_path)
    model = TFLiteModel(trained_model.tflite_path, meta)
    train_emb = np.stack([model.infer(x)[1] for x in fs.model_inputs(meta.features, meta.normalization)])
    train_y = fs.labels(meta.labels)
    for e, y in zip(emb, labels, strict=True):
        nearest = int(np.argmin(np.abs(train_emb - e).max(axis=1)))
        assert np.abs(train_emb[nearest] - e).max() < 1e-3 and train_y[nearest] == y


def test_malformed_replay_set_is_refused_with_the_reason(trained_model):
    from edge_sdk.model import ModelMetadata

    meta = trained_model.result.metadata
    data = meta.to_dict()
    replay = data["extra"]["replay"]
    data["extra"] = {**data["extra"], "replay": {**replay, "labels": replay["labels"][:-1]}}
    with pytest.raises(ModelError, match="expected .* x embedding_dim"):
        ModelMetadata.from_dict(data).replay_set()
    data["extra"]["replay"] = {"embeddings": "not base64!", "labels": [0]}
    with pytest.raises(ModelError, match="extra.replay is malformed"):
        ModelMetadata.from_dict(data).replay_set()
    data["extra"]["replay"] = ModelMetadata.replay_extra(np.zeros((1, meta.embedding_dim)), np.array([99]))
    with pytest.raises(ModelError, match="class index outside"):
        ModelMetadata.from_dict(data).replay_set()
    data["extra"].pop("replay")
    assert ModelMetadata.from_dict(data).replay_set() is None


@pytest.mark.parametrize("name", ["cnn", "dnn"])
def test_masked_pooling_exports_and_ignores_padding(name, tmp_path, rng):
    """masked_pooling: builtin ops only, TFLite equals TensorFlow, and the embedding of an utterance does not
    change with the amount of zero padding after it (with plain pooling it does)."""
    from edge_sdk.features import FeatureConfig, Normalization, fit_frames
    from edge_sdk.model import ModelMetadata
    from models.architectures import build_encoder, build_head, preset
    from models.export import build_trainable_module, export_tflite, head_layout

    feats = FeatureConfig(max_frames=120)
    utt = rng.normal(size=(50, feats.n_features)).astype(np.float32)
    short, long_ = fit_frames(utt, 120), fit_frames(np.concatenate([utt, utt]), 120)
    for masked in (False, True):
        cfg = preset(name, embedding_dim=24, head_units=12, channels=(16, 32), masked_pooling=masked, dropout=0.0)
        encoder, head = build_encoder(cfg, feats.max_frames, feats.n_features), build_head(cfg, 4)
        # the same utterance padded to 120 frames, and followed by silence-free content then cut: compare the
        # embedding of `utt` padded with 70 zero rows to that of `utt` padded inside a 100-row window
        padded_more = fit_frames(utt[:40], 120)
        emb_a = encoder(short[None], training=False).numpy()[0]
        if not masked:
            assert not np.allclose(emb_a, encoder(padded_more[None], training=False).numpy()[0], atol=1e-4)
            continue
        # masked: the embedding depends on the frames, not on how much padding follows them
        framed = fit_frames(utt, 100)
        ref = build_encoder(cfg, 100, feats.n_features)
        ref.set_weights(encoder.get_weights())
        np.testing.assert_allclose(emb_a, ref(framed[None], training=False).numpy()[0], rtol=0, atol=1e-4)
        hidden, logits = head.get_layer("head_hidden"), head.get_layer("head_logits")
        weights = {"w0": hidden.kernel.numpy(), "b0": hidden.bias.numpy(), "w1": logits.kernel.numpy(),
                   "b1": logits.bias.numpy()}
        meta = ModelMetadata(labels=("angry", "happy", "neutral", "sad"), features=feats,
                             normalization=Normalization(np.zeros(40, np.float32), np.ones(40, np.float32)),
                             head_layout=head_layout(24, 12, 4), embedding_dim=24, train_batch_size=4,
                             architecture=name)
        exported = export_tflite(encoder, weights, meta, tmp_path)
        tf_mod = build_trainable_module(encoder, weights, meta)
        model = TFLiteModel(exported.tflite_path, meta)
        for x in (short, long_):
            probs, emb = model.infer(x)
            np.testing.assert_allclose(emb, tf_mod.infer(x[None])["embedding"].numpy()[0], rtol=0, atol=1e-5)
            np.testing.assert_allclose(emb, encoder(x[None], training=False).numpy()[0], rtol=0, atol=1e-4)
