"""A deep-head model (``export_tflite(..., trainable_embedding=True)``: the encoder's embedding layer in the
trainable head, six arrays) through the real loop over HTTP on 127.0.0.1: two real Devices personalise and post
deltas of the six-array layout, the real aggregator (gunicorn) accepts and averages them, and the published version
installs on the devices."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from edge_sdk.device import TrainPolicy
from edge_sdk.model import ModelMetadata
from edge_sdk.wire import UpdateEnvelope


def _update(device, clips, answers, policy) -> UpdateEnvelope:
    for clip, ans in zip(clips, answers, strict=True):
        pred = device.classify_file(clip.path)
        device.feedback(pred.id, ans if ans in ("up", "down") else clip.label)
    report = device.personalize(policy)
    assert report.status == "kept", report
    seq = device.make_update(policy=policy)
    assert seq is not None
    item = next(i for i in device.store.outbox_items() if i.seq == seq)
    return UpdateEnvelope.from_bytes(item.envelope)[0]


def test_deep_head_is_personalised_federated_and_installed(trained_model, synthetic_clips, tmp_path):
    from models.export import export_tflite
    from tests.conftest import start_live_aggregator

    r = trained_model.result
    res = export_tflite(r.encoder, r.head_weights, r.metadata, tmp_path / "deep", trainable_embedding=True)
    meta = ModelMetadata.load(res.metadata_path)
    assert meta.head_layout.names == ["w0", "b0", "w1", "b1", "w2", "b2"]
    agg = start_live_aggregator(tmp_path / "srv", min_updates=2)
    try:
        assert agg.publish(SimpleNamespace(tflite_path=res.tflite_path, metadata_path=res.metadata_path)) == 1
        # personal fits would leave w0, b0 alone; federated updates train every layer all the same
        policy = TrainPolicy(min_examples=4, holdout_every=0, epochs=5, personal_layers=2)
        a = agg.enroll(tmp_path / "a", "alice", train_policy=policy, use_bundled_model=False)
        b = agg.enroll(tmp_path / "b", "bob", train_policy=policy, use_bundled_model=False)
        assert a.metadata.head_layout == meta.head_layout and a.model.metadata.embedding_dim == meta.embedding_dim
        global_head = {k: v.copy() for k, v in a.global_head.items()}
        assert sorted(global_head) == sorted(meta.head_layout.names)

        env_a = _update(a, synthetic_clips[:6], ["up", "down", "label", "up", "label", "down"], policy)
        env_b = _update(b, synthetic_clips[20:30], ["label"] * 10, policy)
        for env in (env_a, env_b):
            assert env.header.head_layout() == meta.head_layout
            assert len(env.body) == meta.head_layout.nbytes  # the delta: every array of the deep head
            assert np.abs(env.deltas()["w0"]).max() > 0  # the embedding layer was fine-tuned on the device
        assert a.flush_outbox().accepted[0]["status"] == "accepted"
        rep_b = b.flush_outbox()
        assert rep_b.accepted[0]["round_closed"] is True and rep_b.accepted[0]["published_version"] == 2

        assert a.pull_model() and b.pull_model()
        assert a.model_version == b.model_version == 2
        da, db = env_a.deltas(), env_b.deltas()
        for name, base in global_head.items():  # 6 and 10 examples; the 10 weigh as the median cap, 6
            expected = base + (6 * da[name].astype(np.float64) + 6 * db[name]) / 12
            np.testing.assert_allclose(a.global_head[name], expected, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(a.global_head[name], b.global_head[name])
        # the installed model serves the published head's arrays (re-personalised from it on stored feedback)
        a.model.set_weights(a.global_head)
        x = np.abs(np.random.default_rng(0).normal(size=(3, meta.embedding_dim))).astype(np.float32)
        probs = a.model.head_probs(x)
        assert probs.shape == (3, meta.num_classes) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert agg.status()["current_version"] == 2
    finally:
        agg.process.terminate()
        agg.process.wait(timeout=30)
