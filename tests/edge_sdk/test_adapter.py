"""The device trains the model's adapter with the head when its policy asks and the model has the signatures:
kept, persisted and reloaded, judged by the cross-validated guard; older models and answers without features
fall back to the head. Real TFLite model (a small CNN) and feedback store."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.device import Device, TrainPolicy

# No guard (every fit kept) or a guard that keeps anything: these tests look at what is trained and where it goes.
KEEP = dict(min_examples=4, min_steps=20, replay_weight=0.0, adapter=True, adapter_learning_rate=0.5)


def _answers(dev: Device, rng, n: int = 12, *, features: bool = True) -> None:
    meta = dev.metadata
    shape = (meta.features.max_frames, meta.features.n_features)
    for k in range(n):
        label = meta.labels[k % 2]
        x = (rng.normal(size=shape) + (2.0 if k % 2 else -2.0)).astype(np.float32)
        probs, emb = dev.model.infer(x)
        pid = f"p{k:03d}"
        dev.store.add_prediction(prediction_id=pid, model_version=0, label=meta.labels[int(np.argmax(probs))],
                                 probs=probs, embedding=emb, features=x if features else None, latency_ms=0.0)
        dev.feedback(pid, label)


def _files(trained_model):
    return trained_model.tflite_path, trained_model.metadata_path


def test_an_adapter_fit_is_kept_persisted_and_reloaded(tmp_path, trained_model, rng):
    dev = Device(tmp_path / "dev", model_files=_files(trained_model),
                 train_policy=TrainPolicy(holdout_every=0, **KEEP))
    _answers(dev, rng)
    report = dev.personalize()
    assert report.status == "kept"
    adapter = dev.model.get_adapter()
    assert np.abs(adapter["scale"] - 1).max() > 1e-3  # the serving interpreter got the trained adapter
    assert (tmp_path / "dev" / "personal.adapter").exists()
    x = rng.normal(size=dev.model.input_shape[1:]).astype(np.float32)
    probs = dev.model.infer(x)[0]
    dev.store.close()
    again = Device(tmp_path / "dev", model_files=_files(trained_model))
    np.testing.assert_allclose(again.model.get_adapter()["scale"], adapter["scale"], rtol=0, atol=0)
    np.testing.assert_allclose(again.model.infer(x)[0], probs, rtol=0, atol=1e-6)
    again.store.close()


def test_a_damaged_adapter_file_is_moved_aside_and_the_identity_serves(tmp_path, trained_model, rng):
    dev = Device(tmp_path / "dev", model_files=_files(trained_model),
                 train_policy=TrainPolicy(holdout_every=0, **KEEP))
    _answers(dev, rng)
    dev.personalize()
    dev.store.close()
    path = tmp_path / "dev" / "personal.adapter"
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    again = Device(tmp_path / "dev", model_files=_files(trained_model))
    assert [p["file"] for p in again.problems] == ["personal.adapter"]
    np.testing.assert_array_equal(again.model.get_adapter()["scale"], 1.0)
    assert again.personalized  # the personal head still serves
    again.store.close()


def test_the_cross_validated_guard_judges_the_adapter_as_one_more_candidate(tmp_path, trained_model, rng):
    # adapter_margin -1: the adapter candidate wins whatever its score; guard_margin -10: the fit is kept
    dev = Device(tmp_path / "dev", model_files=_files(trained_model),
                 train_policy=TrainPolicy(guard_folds=3, guard_margin=-10.0, adapter_margin=-1.0, **KEEP))
    _answers(dev, rng)
    report = dev.personalize()
    assert report.status == "kept" and "head and adapter" in report.guard
    # adapter_margin 2 (more than all answers): the adapter can never win; the head-only fit is kept, identity
    dev2 = Device(tmp_path / "dev2", model_files=_files(trained_model),
                  train_policy=TrainPolicy(guard_folds=3, guard_margin=-10.0, adapter_margin=2.0, **KEEP))
    _answers(dev2, rng)
    report = dev2.personalize()
    assert report.status == "kept" and "adapter" not in report.guard
    np.testing.assert_array_equal(dev2.model.get_adapter()["scale"], 1.0)
    dev.store.close()
    dev2.store.close()


def test_answers_without_features_fall_back_to_the_head(tmp_path, trained_model, rng):
    dev = Device(tmp_path / "dev", model_files=_files(trained_model),
                 train_policy=TrainPolicy(guard_folds=3, guard_margin=-10.0, adapter_margin=-1.0, **KEEP))
    _answers(dev, rng, features=False)
    report = dev.personalize()
    assert report.status == "kept" and "adapter" not in report.guard
    np.testing.assert_array_equal(dev.model.get_adapter()["scale"], 1.0)
    dev.store.close()


@pytest.fixture(scope="module")
def head_only_files(trained_model, tmp_path_factory):
    from models.export import export_tflite

    r = trained_model.result
    out = export_tflite(r.encoder, r.head_weights, r.metadata, tmp_path_factory.mktemp("old"), adapter=False)
    return out.tflite_path, out.metadata_path


def test_a_model_without_the_adapter_signatures_personalises_the_head_only(tmp_path, head_only_files, rng):
    dev = Device(tmp_path / "dev", model_files=head_only_files,
                 train_policy=TrainPolicy(guard_folds=3, guard_margin=-10.0, adapter_margin=-1.0, **KEEP))
    assert not dev.model.has_adapter
    _answers(dev, rng)
    report = dev.personalize()
    assert report.status == "kept" and "adapter" not in report.guard
    assert not (tmp_path / "dev" / "personal.adapter").exists()
    dev.store.close()
