"""Answers stored under one base and trained on under another: the new base's encoder embeds them anew.

Real TFLite files: the session's trained model (4-array head, 32-d embedding) and its deep-head export
(``trainable_embedding``: the cut at the pooled vector, 64-d, 6-array head; the ``deep_files`` fixture of
tests/edge_sdk/conftest.py). Answers come from real classifications (features stored).
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.device import Device, TrainPolicy
from edge_sdk.model import ModelMetadata, TFLiteModel
from tests.edge_sdk.conftest import clip

POLICY = TrainPolicy(min_examples=5, guard_folds=2, adam_steps=5)


def _answered(state, trained_model, n: int = 12) -> Device:
    dev = Device(state, model_files=(trained_model.tflite_path, trained_model.metadata_path), train_policy=POLICY)
    labels = dev.metadata.labels
    for i in range(n):
        pred = dev.classify(clip(i))
        dev.feedback(pred.id, labels[i % len(labels)])
    return dev


@pytest.mark.parametrize("recorded", [True, False], ids=["base-recorded", "older-sdk-rows"])
def test_answers_from_another_encoder_are_embedded_anew_before_a_fit(tmp_path, trained_model, deep_files, recorded):
    """The head model's answers (32-d embeddings), then the deep export on the same state folder: personalise
    trains on the deep encoder's 64-d embeddings of the stored features (it raised a ParameterError on the
    embeddings' shape before), and stores them with the new base (once per base)."""
    old = _answered(tmp_path / "dev", trained_model)
    assert old.personalize().status in ("kept", "discarded")
    if not recorded:  # rows written by an SDK that did not record the base
        with old.store._lock:
            old.store._conn.execute("UPDATE predictions SET base = NULL")
    old.store.close()
    dev = Device(tmp_path / "dev", model_files=deep_files, train_policy=POLICY)
    assert dev.metadata.embedding_dim != old.metadata.embedding_dim
    report = dev.personalize()
    assert report.examples == 12 and report.answers_dropped == {}, report.to_dict()
    examples = dev.store.examples()
    assert {e.base for e in examples} == {dev.base_sha256}
    reference = TFLiteModel(deep_files[0], ModelMetadata.load(deep_files[1]))
    feats = dev.store.features_of([e.prediction_id for e in examples])
    for e in examples:
        want = reference.infer(feats[e.prediction_id].reshape(reference.input_shape[1:]))[1]
        np.testing.assert_allclose(e.embedding, want, rtol=1e-5, atol=1e-6)


def test_answers_of_another_base_without_features_are_left_out_and_counted(tmp_path, trained_model, deep_files):
    """Answers stored under the head model without features cannot be embedded by the deep encoder: left out of
    the fit, counted in the report by reason; the others train (no error)."""
    old = _answered(tmp_path / "dev", trained_model)
    with old.store._lock:
        old.store._conn.execute("UPDATE predictions SET features = NULL WHERE rowid % 3 = 0")
        gone = old.store._conn.execute("SELECT COUNT(*) FROM predictions WHERE features IS NULL").fetchone()[0]
    old.store.close()
    assert 0 < gone < 12 - 5
    dev = Device(tmp_path / "dev", model_files=deep_files, train_policy=POLICY)
    report = dev.personalize()
    assert report.answers_dropped == {"no stored features to embed anew": gone}
    assert report.examples == 12 - gone and report.status in ("kept", "discarded")


def test_the_same_base_keeps_the_stored_embeddings(tmp_path, trained_model):
    """No new base: nothing is embedded anew (the embeddings stored at classification are trained on)."""
    dev = _answered(tmp_path / "dev", trained_model, n=6)
    before = {e.prediction_id: e.embedding for e in dev.store.examples()}
    dev.personalize()
    after = dev.store.examples()
    assert all(np.array_equal(before[e.prediction_id], e.embedding) for e in after)
    assert {e.base for e in after} == {dev.base_sha256}


def test_a_pull_that_brings_a_new_base_repersonalises_on_the_new_encoder(tmp_path, trained_model, deep_files):
    """Against a real aggregator: version 1 the head model, 12 answers, version 2 the deep export; the pull
    installs it and re-personalises on the deep encoder's embeddings (it raised before, reached from pull_model);
    the update made after it carries the 6-array head."""
    from tests.conftest import start_live_aggregator
    from tests.edge_sdk.conftest import ModelFiles

    agg = start_live_aggregator(tmp_path / "srv", min_updates=50, workers=0)
    try:
        assert agg.publish(ModelFiles(trained_model.tflite_path, trained_model.metadata_path)) == 1
        dev = agg.enroll(tmp_path / "dev", train_policy=POLICY)
        labels = dev.metadata.labels
        for i in range(12):
            dev.feedback(dev.classify(clip(i)).id, labels[i % len(labels)])
        assert agg.publish(ModelFiles(*deep_files)) == 2
        assert dev.pull_model() is True and dev.model_version == 2
        examples = dev.store.examples()
        assert {e.embedding.size for e in examples} == {dev.metadata.embedding_dim} == {64}
        assert {e.base for e in examples} == {dev.manifest.base.sha256}
        assert dev.make_update() is not None
    finally:
        agg.process.terminate()
        agg.process.wait(timeout=30)
