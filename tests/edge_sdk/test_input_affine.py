"""The per-user input-feature affine (TrainPolicy.input_affine_from): fitted through the model's input_grad
signature, judged by the cross-validated guard beside the head's fit, persisted with its sha256, applied to what
the device shows while the store keeps the features as they are, range-checked when read back, dropped when a head
fit wins. Real TFLite model (a small CNN) and feedback store."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.device import (
    INPUT_AFFINE_LIMITS,
    Device,
    TrainPolicy,
    apply_input_affine,
    check_input_affine,
    input_affine_layout,
)
from edge_sdk.errors import ParameterError
from edge_sdk.wire import pack_arrays

# The head's fit can never pass (margin beyond all answers, no waiver), so the affine is kept exactly when it shows
# more answers right out of fold than the global head.
AFFINE_ONLY = dict(min_examples=4, guard_folds=3, guard_margin=10.0, adapt_below=0.0, adapt_all_from=0,
                   trust_corrections=False, replay_weight=0.0, input_affine_from=4, input_affine_steps=60,
                   input_affine_learning_rate=0.1)


def _files(trained_model):
    return trained_model.tflite_path, trained_model.metadata_path


def _shifted_answers(dev: Device, rng, n: int = 12) -> tuple[str, list[np.ndarray]]:
    """``n`` utterances (zero padding after each) all corrected to the label the global model gives least."""
    meta = dev.metadata
    t, f = meta.features.max_frames, meta.features.n_features
    xs = []
    for _ in range(n):
        x = np.zeros((t, f), np.float32)
        k = int(rng.integers(t // 2, t + 1))
        x[:k] = rng.normal(size=(k, f))
        xs.append(x)
    chosen = [int(np.argmax(dev.model.infer(x)[0])) for x in xs]
    label = meta.labels[int(np.argmin(np.bincount(chosen, minlength=meta.num_classes)))]
    for j, x in enumerate(xs):
        probs, emb = dev.model.infer(x)
        pid = f"p{j:03d}"
        dev.store.add_prediction(prediction_id=pid, model_version=0, label=meta.labels[int(np.argmax(probs))],
                                 probs=probs, embedding=emb, features=x, latency_ms=0.0)
        dev.feedback(pid, label)
    return label, xs


def test_apply_input_affine_moves_speech_frames_only():
    x = np.zeros((5, 3), np.float32)
    x[:3] = [[1, 2, 3], [0, 1, 0], [-1, 0, 2]]
    affine = {"gain": np.array([0.5, 0.0, -0.5], np.float32), "offset": np.array([1, 2, 3], np.float32)}
    out = apply_input_affine(x, affine)
    np.testing.assert_allclose(out[:3], x[:3] * [1.5, 1.0, 0.5] + [1, 2, 3])
    np.testing.assert_array_equal(out[3:], 0.0)  # padding stays zero
    zero = {"gain": np.zeros(3, np.float32), "offset": np.zeros(3, np.float32)}
    np.testing.assert_array_equal(apply_input_affine(x, zero), x)


def test_check_input_affine_refuses_out_of_range_or_non_finite_values():
    ok = {"gain": np.zeros(4), "offset": np.full(4, INPUT_AFFINE_LIMITS["offset"])}
    assert check_input_affine(ok)["offset"].dtype == np.float32
    for bad, name in (({"gain": np.full(4, 1.5), "offset": np.zeros(4)}, "gain"),
                      ({"gain": np.zeros(4), "offset": np.array([0, 0, np.nan, 0])}, "offset"),
                      ({"gain": np.zeros(4)}, "offset")):
        with pytest.raises(ParameterError, match=name):
            check_input_affine(bad)
    with pytest.raises(ParameterError, match="one value per feature band"):
        check_input_affine({"gain": np.zeros(4), "offset": np.zeros(3)})


@pytest.mark.parametrize("field,value", [("input_affine_from", -1), ("input_affine_from", True),
                                         ("input_affine_steps", 0), ("input_affine_steps", 10_001),
                                         ("input_affine_max_rows", 0), ("input_affine_learning_rate", 0.0),
                                         ("input_affine_learning_rate", float("nan"))])
def test_policy_refuses_bad_input_affine_settings(field, value):
    with pytest.raises(ParameterError, match=field):
        TrainPolicy(**{field: value})


def test_an_input_affine_is_kept_applied_persisted_and_reloaded(tmp_path, trained_model, rng):
    dev = Device(tmp_path / "dev", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    global_head = dev.model.get_weights()
    label, xs = _shifted_answers(dev, rng)
    report = dev.personalize()
    assert report.status == "kept" and report.input_affine, report.to_dict()
    assert report.input_affine_score > report.score_before
    assert "input affine" in report.guard
    affine = dev.input_affine
    assert affine is not None and np.abs(affine["offset"]).max() > 1e-3
    for k, v in global_head.items():  # the head in use stays the global one
        np.testing.assert_array_equal(dev.model.get_weights()[k], v)
    assert (tmp_path / "dev" / "personal.input").exists()
    assert dev.status()["input_affine"] and dev.status()["personalized"]
    # classify: the prediction comes from the moved features; the store keeps the features and embedding as they are
    audio = (0.1 * rng.normal(size=dev.metadata.features.sample_rate)).astype(np.float32)
    pred = dev.classify(audio)
    feats = dev.store.features_of([pred.id])[pred.id].reshape(dev.model.input_shape[1:])
    probs_raw, emb_raw = dev.model.infer(feats)
    moved = dev.model.infer(apply_input_affine(feats, affine))[0]
    np.testing.assert_allclose([pred.probs[lab] for lab in dev.metadata.labels], moved, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pred.embedding, emb_raw, rtol=0, atol=1e-6)
    assert not np.allclose(moved, probs_raw, atol=1e-4)  # the affine does move what the user is shown
    dev.store.close()
    again = Device(tmp_path / "dev", model_files=_files(trained_model))
    assert again.input_affine is not None and not again.problems
    np.testing.assert_array_equal(again.input_affine["gain"], affine["gain"])
    again.store.close()


def test_a_damaged_or_out_of_range_input_affine_file_is_moved_aside(tmp_path, trained_model, rng):
    dev = Device(tmp_path / "dev", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    _shifted_answers(dev, rng)
    assert dev.personalize().input_affine
    bands = dev.metadata.features.n_features
    dev.store.close()
    path = tmp_path / "dev" / "personal.input"
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\1")
    again = Device(tmp_path / "dev", model_files=_files(trained_model))
    assert [p["file"] for p in again.problems] == ["personal.input"] and again.input_affine is None
    assert again.personalized  # the personal head still serves
    assert list((tmp_path / "dev").glob("personal.input.corrupt-*"))
    # a file whose sha256 matches but whose values are out of range (written by something else than the SDK)
    import hashlib

    data = pack_arrays(input_affine_layout(bands), {"gain": np.full(bands, 5.0, np.float32),
                                                    "offset": np.zeros(bands, np.float32)})
    path.write_bytes(data)
    again.store.set("personal_input_sha256", hashlib.sha256(data).hexdigest())
    again.store.close()
    third = Device(tmp_path / "dev", model_files=_files(trained_model))
    assert [p["file"] for p in third.problems] == ["personal.input"] and third.input_affine is None
    assert "gain" in third.problems[0]["problem"]
    third.store.close()


def test_a_head_fit_that_wins_later_drops_the_input_affine(tmp_path, trained_model, rng):
    dev = Device(tmp_path / "dev", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    _shifted_answers(dev, rng)
    assert dev.personalize().input_affine
    # the head's fit is always kept (no guard), no affine tried
    report = dev.personalize(TrainPolicy(holdout_every=0, min_examples=4, replay_weight=0.0))
    assert report.status == "kept" and not report.input_affine
    assert dev.input_affine is None and not (tmp_path / "dev" / "personal.input").exists()
    dev.store.close()
    again = Device(tmp_path / "dev", model_files=_files(trained_model))
    assert again.input_affine is None and not again.problems
    again.store.close()


def test_no_affine_without_the_signature_features_or_enough_corrections(tmp_path, trained_model, rng):
    from models.export import export_tflite

    r = trained_model.result
    older = export_tflite(r.encoder, r.head_weights, r.metadata, tmp_path / "older", input_grad=False)
    dev = Device(tmp_path / "old", model_files=(older.tflite_path, older.metadata_path),
                 train_policy=TrainPolicy(**AFFINE_ONLY))
    assert not dev.model.has_input_grad
    _shifted_answers(dev, rng)
    report = dev.personalize()
    assert report.input_affine_score is None and not report.input_affine
    dev.store.close()
    # too few answers for input_affine_from
    dev = Device(tmp_path / "few", model_files=_files(trained_model),
                 train_policy=TrainPolicy(**{**AFFINE_ONLY, "input_affine_from": 13}))
    _shifted_answers(dev, rng)
    assert dev.personalize().input_affine_score is None
    dev.store.close()


def test_a_fit_on_more_answers_than_max_rows_draws_them_per_step(tmp_path, trained_model, rng):
    """With input_affine_max_rows below the answers, each step takes a seeded draw: the fit still moves the features
    toward the answers (its loss falls) and is the same for the same seed."""
    dev = Device(tmp_path / "dev", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    _shifted_answers(dev, rng, n=14)
    model = dev.model
    feats = dev._input_features(model, dev._examples())
    _, targets, sign = dev._arrays(dev._examples())
    policy = TrainPolicy(**{**AFFINE_ONLY, "input_affine_max_rows": 5})
    sizes = []
    real = type(model).input_gradient

    def counting(self, features, *args, **kwargs):
        sizes.append(len(features))
        return real(self, features, *args, **kwargs)

    type(model).input_gradient = counting
    try:
        a = dev._fit_input_affine(model, feats, targets, sign, policy)
        b = dev._fit_input_affine(model, feats, targets, sign, policy)
    finally:
        type(model).input_gradient = real
    assert sizes and max(sizes) == 5  # every step a draw of 5 of the 14 answers
    np.testing.assert_array_equal(a["offset"], b["offset"])
    loss0 = model.input_gradient(feats, targets, sign)[1]
    loss1 = model.input_gradient(apply_input_affine(feats, a), targets, sign)[1]
    assert loss1 < loss0
    dev.store.close()


def test_with_the_adapter_policy_the_kept_affine_serves_with_the_identity_adapter(tmp_path, trained_model, rng):
    """The adapter candidate trains the trainer's adapter fold by fold; an affine that wins was cross-validated with
    the identity adapter, so that is what must be stored and served with it."""
    policy = TrainPolicy(**{**AFFINE_ONLY, "adapter": True, "adapter_margin": -1.0, "adapter_learning_rate": 0.5})
    dev = Device(tmp_path / "dev", model_files=_files(trained_model), train_policy=policy)
    _shifted_answers(dev, rng)
    report = dev.personalize()
    assert report.input_affine and report.loss_after is None and "adapter" not in report.guard
    np.testing.assert_array_equal(dev.model.get_adapter()["scale"], 1.0)
    np.testing.assert_array_equal(dev.model.get_adapter()["shift"], 0.0)
    dev.store.close()
    again = Device(tmp_path / "dev", model_files=_files(trained_model))
    np.testing.assert_array_equal(again.model.get_adapter()["scale"], 1.0)
    assert again.input_affine is not None
    again.store.close()


def test_no_affine_for_answers_without_features_or_mostly_bare_thumbs_down(tmp_path, trained_model, rng):
    dev = Device(tmp_path / "nofeat", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    _shifted_answers(dev, rng)
    with dev.store._lock:  # the features of one answer lost (an older SDK stored none)
        dev.store._conn.execute("UPDATE predictions SET features = NULL WHERE id = 'p000'")
    assert dev.personalize().input_affine_score is None
    dev.store.close()
    dev = Device(tmp_path / "downs", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    label, _ = _shifted_answers(dev, rng)
    for j in range(7):  # 7 of the 12 corrections become bare thumbs-down: more rejections than corrections
        dev.feedback(f"p{j:03d}", "down")
    assert [e.kind for e in dev._examples()].count("down") == 7
    assert dev.personalize().input_affine_score is None
    # the same answers with their corrections back: the affine is tried
    for j in range(7):
        dev.feedback(f"p{j:03d}", label)
    assert dev.personalize().input_affine_score is not None
    dev.store.close()


def test_input_affine_thumbs_tries_the_affine_for_bare_thumbs_down_and_keeps_confirmed_answers(
        tmp_path, trained_model, rng, caplog):
    """With ``input_affine_thumbs`` a user of bare thumbs-down (and thumbs-up) answers gets the affine tried; it is
    kept only when no confirmed answer is shown otherwise, out of fold and after the fit on all answers."""
    policy = TrainPolicy(**{**AFFINE_ONLY, "thumbs_min_answers": 0, "input_affine_thumbs": True})

    def thumbs_user(name, ups, train_policy=policy):
        dev = Device(tmp_path / name, model_files=_files(trained_model), train_policy=train_policy)
        _shifted_answers(dev, np.random.default_rng(5))
        for j in range(12):  # a bare thumbs-down of what the model said, the first ``ups`` confirmed instead
            dev.feedback(f"p{j:03d}", "up" if j < ups else "down")
        return dev

    dev = thumbs_user("downs", ups=0)  # nothing confirmed to lose: kept when it moves away from the rejections
    report = dev.personalize()
    assert report.status == "kept" and report.input_affine and report.input_affine_score > report.score_before, \
        report.to_dict()
    assert "input affine" in report.guard and dev.input_affine is not None
    dev.store.close()
    dev = thumbs_user("ups", ups=2)  # it scores better out of fold, but shows confirmed answers otherwise
    with caplog.at_level("INFO", logger="edge_sdk"):
        report = dev.personalize()
    assert report.input_affine_score > report.score_before, report.to_dict()
    assert any("input affine not kept" in r.getMessage() and "confirmed" in r.getMessage() for r in caplog.records)
    assert not report.input_affine and dev.input_affine is None
    dev.store.close()
    dev = thumbs_user("off", ups=0, train_policy=TrainPolicy(**{**AFFINE_ONLY, "thumbs_min_answers": 0}))
    assert dev.personalize().input_affine_score is None  # without the option: never tried
    dev.store.close()


def test_a_discarded_fit_reports_what_the_kept_affine_shows(tmp_path, trained_model, rng):
    import json

    from edge_sdk.device import labels_with_input_affine

    dev = Device(tmp_path / "dev", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    label, xs = _shifted_answers(dev, rng)
    assert dev.personalize().input_affine
    affine = dev.input_affine
    report = dev.personalize(TrainPolicy(**{**AFFINE_ONLY, "input_affine_from": 0}))  # no fit can pass
    assert report.status == "discarded" and dev.input_affine is affine  # the affine in use stays
    shown = labels_with_input_affine(dev.model, np.stack(xs), affine)
    saved = json.loads(dev.store.get("personal_cv_report"))
    assert saved["personal_correct"] == int(np.sum(shown == dev.metadata.labels.index(label)))
    dev.store.close()


def test_a_crash_while_writing_a_new_affine_leaves_the_one_before(tmp_path, trained_model, rng):
    dev = Device(tmp_path / "dev", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    _shifted_answers(dev, rng)
    assert dev.personalize().input_affine
    before = dev.input_affine
    # the store already names the next affine's digest, the file is still the one before (killed in between)
    dev.store.set("personal_input_sha256_prev", dev.store.get("personal_input_sha256"))
    dev.store.set("personal_input_sha256", "0" * 64)
    dev.store.close()
    again = Device(tmp_path / "dev", model_files=_files(trained_model))
    assert not again.problems and again.input_affine is not None
    np.testing.assert_array_equal(again.input_affine["offset"], before["offset"])
    # a new model version: the personal head and its affine are not used with it
    again.store.set("personal_base_version", "7")
    again.store.close()
    third = Device(tmp_path / "dev", model_files=_files(trained_model))
    assert third.input_affine is None and not third.personalized
    third.store.close()


def test_the_models_metadata_turns_the_affine_on_unless_the_policy_says_otherwise(tmp_path, trained_model, rng):
    import shutil
    from dataclasses import replace

    from edge_sdk.config import load_config
    from edge_sdk.errors import ModelError
    from edge_sdk.model import ModelMetadata

    meta = ModelMetadata.load(trained_model.metadata_path)
    assert meta.input_affine_from is None and TrainPolicy().affine_from(meta) == 0
    on = replace(meta, input_affine_from=4)
    assert ModelMetadata.from_dict(on.to_dict()).input_affine_from == 4
    assert TrainPolicy().affine_from(on) == 4 and TrainPolicy(input_affine_from=0).affine_from(on) == 0
    for bad in (-1, True, 2.5, "20"):
        with pytest.raises(ModelError, match="input_affine_from"):
            ModelMetadata.from_dict({**meta.to_dict(), "input_affine_from": bad})
    shutil.copy(trained_model.tflite_path, tmp_path / "m.tflite")
    on.save(tmp_path / "m.json")
    policy = {k: v for k, v in AFFINE_ONLY.items() if k != "input_affine_from"}
    dev = Device(tmp_path / "dev", model_files=(tmp_path / "m.tflite", tmp_path / "m.json"),
                 train_policy=TrainPolicy(**policy))
    _shifted_answers(dev, rng)
    assert dev.personalize().input_affine_score is not None  # on through the metadata
    assert dev.personalize(TrainPolicy(**policy, input_affine_from=0)).input_affine_score is None
    dev.store.close()
    cfg = load_config(environ={"FEDSER_EDGE_TRAINING_INPUT_AFFINE_FROM": "0"})
    assert cfg.training.input_affine_from == 0 and isinstance(cfg.training.input_affine_from, int)
    assert load_config(environ={}).training.input_affine_from is None


def test_the_bundled_model_has_input_grad_and_turns_the_affine_on_from_20_answers(tmp_path):
    dev = Device(tmp_path / "dev")
    assert dev.model_source == "bundled" and dev.model.has_input_grad and dev.model.has_adapter
    assert dev.metadata.input_affine_from == 20 and TrainPolicy().affine_from(dev.metadata) == 20
    dev.store.close()


def test_a_failing_affine_fit_leaves_the_heads_decision(tmp_path, trained_model, rng, monkeypatch):
    """A non-finite gradient in the cross-validation, or in the final fit, is logged and the personalisation goes on
    with the head's decision instead of failing (listen would otherwise exit and restart on the same answers)."""
    from edge_sdk.errors import ModelError
    from edge_sdk.model import TFLiteModel

    keep_head = {**AFFINE_ONLY, "guard_margin": -10.0}  # the head's fit is kept whatever it shows
    dev = Device(tmp_path / "cv", model_files=_files(trained_model), train_policy=TrainPolicy(**keep_head))
    _shifted_answers(dev, rng)

    def broken(self, *args, **kwargs):
        raise ModelError("input_grad produced a non-finite loss or gradient")

    with monkeypatch.context() as m:
        m.setattr(TFLiteModel, "input_gradient", broken)
        report = dev.personalize()
    assert report.status == "kept" and report.input_affine_score is None and not report.input_affine
    dev.store.close()
    dev = Device(tmp_path / "final", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    _shifted_answers(dev, rng)
    calls = []
    real = Device._fit_input_affine

    def fails_last(self, *args, **kwargs):  # the folds' fits work, the fit on all answers does not
        calls.append(1)
        if len(calls) > 3:
            raise ModelError("input_grad produced a non-finite loss or gradient")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Device, "_fit_input_affine", fails_last)
    report = dev.personalize()
    assert len(calls) == 4 and report.input_affine_score is not None and not report.input_affine
    assert report.status == "discarded" and dev.input_affine is None  # AFFINE_ONLY: the head cannot pass
    dev.store.close()


def test_the_config_option_reads_toml_and_is_range_checked(tmp_path):
    from edge_sdk.config import load_config

    (tmp_path / "edge.toml").write_text("[training]\ninput_affine_from = 20\n")
    cfg = load_config(tmp_path / "edge.toml", environ={})
    assert cfg.training.input_affine_from == 20
    with pytest.raises(ParameterError, match="training.input_affine_from"):
        load_config(environ={"FEDSER_EDGE_TRAINING_INPUT_AFFINE_FROM": "-3"})
    with pytest.raises(ParameterError, match="training.input_affine_from"):
        load_config(environ={"FEDSER_EDGE_TRAINING_INPUT_AFFINE_FROM": "20.5"})
    with pytest.raises(ParameterError, match="0..100000"):
        load_config(environ={"FEDSER_EDGE_TRAINING_INPUT_AFFINE_FROM": "100001"})
    with pytest.raises(ParameterError, match="input_affine_from"):
        TrainPolicy(input_affine_from=100_001)
    with pytest.raises(ParameterError, match="input_affine_thumbs"):
        TrainPolicy(input_affine_thumbs="yes")
