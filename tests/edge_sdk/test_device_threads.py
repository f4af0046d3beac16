"""Training and inference on one device at the same time (issue 11, item 8).

`listen` classifies on its own thread while the main thread personalises (or makes a federated update). Every
prediction must come from the weights it is labelled with: the global head when ``personalized`` is False,
the kept personal head when True, never from a head half way through training. Real threads, the real
runtime, the bundled model.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_sdk.device import Device, TrainPolicy
from edge_sdk.model import ModelMetadata, TFLiteModel, bundled_model_paths

pytestmark = pytest.mark.skipif(bundled_model_paths() is None, reason="no bundled model in this checkout")


def _clips(sample_rate: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(1.5 * sample_rate), dtype=np.float32) / sample_rate
    return [(0.2 * np.sin(2 * np.pi * (120 + 35 * i) * t * (1 + 0.1 * np.sin(3 * t)))
             + 0.02 * rng.normal(size=t.size)).astype(np.float32) for i in range(n)]


def _classify_while(device: Device, audio: np.ndarray, work) -> list:
    """Predictions made on another thread, back to back, for as long as ``work()`` runs on this one."""
    predictions, done, started = [], threading.Event(), threading.Event()
    errors = []

    def loop():
        try:
            while not done.is_set():
                predictions.append(device.classify(audio))
                started.set()
        except Exception as exc:  # surfaced below
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=loop)
    thread.start()
    started.wait(60)
    try:
        result = work()
    finally:
        done.set()
        thread.join(60)
    assert not errors, errors
    return predictions, result


def _probs(pred, labels) -> np.ndarray:
    return np.array([pred.probs[lab] for lab in labels])


def test_predictions_during_training_come_from_the_weights_they_are_labelled_with(tmp_path):
    tflite, meta_path = bundled_model_paths()
    meta = ModelMetadata.load(meta_path)
    # Many epochs: training lasts long enough for dozens of predictions to land in the middle of it.
    # (SGD: epochs and learning_rate are its settings; trust_corrections off: it would keep this user's fits)
    discard_all = TrainPolicy(min_examples=4, holdout_every=2, epochs=150, tolerance=-1e9, learning_rate=0.1,
                              optimizer="sgd", trust_corrections=False)
    device = Device(tmp_path / "dev", train_policy=discard_all)
    clips = _clips(meta.features.sample_rate, 10)
    for i, audio in enumerate(clips):
        device.feedback(device.classify(audio).id, meta.labels[i % 2])
    reference = TFLiteModel(tflite, meta)  # an independent interpreter: the head each label names
    global_head = reference.get_weights()

    # 1) Training whose result the guard discards: the weights in use never change, so every prediction made
    #    meanwhile must be the global head's, labelled not personalised.
    predictions, report = _classify_while(device, clips[0], device.personalize)
    assert report.status == "discarded" and not device.personalized
    assert len(predictions) >= 3
    for pred in predictions:
        assert not pred.personalized
        np.testing.assert_allclose(_probs(pred, meta.labels), reference.head_probs(pred.embedding[None])[0],
                                   atol=1e-5, err_msg="a prediction came from weights in training")

    # 2) Training that is kept: predictions before the swap are the global head's (not personalised), after it
    #    the personal head's (personalised); none from anything in between.
    keep = TrainPolicy(min_examples=4, holdout_every=0, epochs=150, learning_rate=0.1, optimizer="sgd")
    predictions, report = _classify_while(device, clips[1], lambda: device.personalize(keep))
    assert report.status == "kept" and device.personalized
    personal_head = device.model.get_weights()
    assert any(not np.allclose(personal_head[k], global_head[k]) for k in global_head)
    seen = set()
    for pred in predictions:
        reference.set_weights(personal_head if pred.personalized else global_head)
        np.testing.assert_allclose(_probs(pred, meta.labels), reference.head_probs(pred.embedding[None])[0],
                                   atol=1e-5, err_msg=f"labelled personalized={pred.personalized}, but made "
                                                      "from other weights")
        seen.add(pred.personalized)
    assert False in seen  # most of the window was spent training, with the global head in use
