"""The answer report of an update: personal against global accuracy on the user's held-back answers.

The header fields are optional (an older SDK's header is unchanged, byte for byte) and range-checked on both
sides; the report itself is computed with the real TFLite runtime on the bundled model.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edge_sdk.errors import WireFormatError
from edge_sdk.model import ModelMetadata, TFLiteModel, bundled_model_paths
from edge_sdk.report import answer_report, scored_answers
from edge_sdk.signing import SigningKey
from edge_sdk.store import FeedbackExample
from edge_sdk.wire import ArraySpec, HeadLayout, UpdateEnvelope, UpdateHeader, canonical_json

LAYOUT = HeadLayout([ArraySpec("w0", (3, 2)), ArraySpec("b0", (2,))])


def _envelope(key, **kw):
    rng = np.random.default_rng(0)
    deltas = {"w0": rng.normal(size=(3, 2)).astype(np.float32), "b0": rng.normal(size=2).astype(np.float32)}
    return UpdateEnvelope.create(device_id="dev-1", base_version=4, layout=LAYOUT, deltas=deltas, num_examples=7,
                                 sequence=3, sign=key.sign, **kw)


def _with_header(env: UpdateEnvelope, **fields) -> bytes:
    """The envelope's bytes with header fields replaced (re-framed; the signature no longer matters here)."""
    header = json.loads(env.header.to_bytes())
    header.update(fields)
    for k in [k for k, v in fields.items() if v is None]:
        del header[k]
    raw = canonical_json(header)
    return b"FSU1" + struct.pack("<I", len(raw)) + raw + env.signature + env.body


def test_report_round_trips_and_is_signed():
    key = SigningKey.generate()
    env = _envelope(key, report={"answers_scored": 8, "personal_correct": 7, "global_correct": 5})
    back, header_bytes = UpdateEnvelope.from_bytes(env.to_bytes())
    assert (back.header.answers_scored, back.header.personal_correct, back.header.global_correct) == (8, 7, 5)
    back.verify(key.verify_key.verify, header_bytes)
    assert b'"personal_correct":7' in header_bytes  # inside the signed header


def test_header_without_report_is_the_old_format_byte_for_byte():
    key = SigningKey.generate()
    env = _envelope(key)
    header = json.loads(env.header.to_bytes())
    assert set(header) == {"device_id", "base_version", "layout", "layout_sha256", "num_examples", "sequence",
                           "created_at", "body_len", "body_sha256", "privacy", "format_version"}
    back, _ = UpdateEnvelope.from_bytes(env.to_bytes())  # an older SDK's envelope is still accepted
    assert back.header.answers_scored is None and back.update_id == env.update_id


@pytest.mark.parametrize("fields, match", [
    ({"answers_scored": 5, "personal_correct": 6, "global_correct": 1}, "personal_correct must be in"),
    ({"answers_scored": 5, "personal_correct": 1, "global_correct": -1}, "global_correct must be in"),
    ({"answers_scored": -1, "personal_correct": 0, "global_correct": 0}, "answers_scored must be in"),
    ({"answers_scored": 10**7, "personal_correct": 0, "global_correct": 0}, "answers_scored must be in"),
    ({"answers_scored": 5, "personal_correct": 2}, "all together"),
    ({"answers_scored": 5.0, "personal_correct": 2, "global_correct": 2}, "must be int"),
    ({"answers_scored": True, "personal_correct": 1, "global_correct": 1}, "must be int"),
    ({"answers_scored": "5", "personal_correct": 2, "global_correct": 2}, "must be int"),
])
def test_bad_reports_are_refused_when_parsed_and_when_made(fields, match):
    key = SigningKey.generate()
    with pytest.raises(WireFormatError, match=match):
        UpdateEnvelope.from_bytes(_with_header(_envelope(key), **fields))
    with pytest.raises(WireFormatError, match=match):
        _envelope(key, report=fields)


def test_header_dataclass_defaults_keep_old_callers_working():
    h = UpdateHeader(device_id="d", base_version=1, layout=LAYOUT.to_json(), layout_sha256=LAYOUT.sha256,
                     num_examples=1, sequence=1, created_at="2026-01-01T00:00:00Z", body_len=0,
                     body_sha256="0" * 64, privacy={})
    assert b"answers_scored" not in h.to_bytes()


def _example(i, emb, target, sign=1.0):
    return FeedbackExample(f"p{i}", emb.astype(np.float32), target, sign, "up" if sign > 0 else "down")


def test_scored_answers_are_the_held_back_ones_with_a_known_label():
    emb = np.zeros(4, np.float32)
    ex = [_example(i, emb, "a", -1.0 if i == 9 else 1.0) for i in range(12)]
    picked = scored_answers(ex, holdout_every=5)
    assert [e.prediction_id for e in picked] == ["p4"]  # p9 is held back but a thumbs-down: no known label
    assert scored_answers(ex, holdout_every=5, refit_on_all=True) == []  # personal head saw them: not scored
    assert scored_answers(ex, holdout_every=0) == []


def test_answer_report_counts_personal_and_global_on_the_real_runtime():
    tflite, meta_path = bundled_model_paths()
    model = TFLiteModel(tflite, ModelMetadata.load(meta_path))
    labels = list(model.metadata.labels)
    global_head = model.get_weights()
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(40, model.metadata.embedding_dim)).astype(np.float32)
    global_pred = np.argmax(model.head_probs(emb), axis=1)
    # Every held-back answer says the label is labels[0]; the global head's own guesses decide its count.
    examples = [_example(i, emb[i], labels[0]) for i in range(40)]
    held = [i for i in range(40) if i % 5 == 4]
    # A "personal" head that always answers labels[0]: the output bias of class 0 made huge.
    personal = {k: v.copy() for k, v in global_head.items()}
    bias = [s.name for s in model.metadata.head_layout if len(s.shape) == 1 and s.shape[0] == len(labels)][-1]
    personal[bias][0] += 1000.0
    model.set_weights(personal)
    report = answer_report(model, global_head, examples, holdout_every=5)
    assert report == {"answers_scored": 8, "personal_correct": 8,
                      "global_correct": int(np.sum(global_pred[held] == 0))}
    after = model.get_weights()
    assert all(np.array_equal(after[k], personal[k]) for k in personal)  # the head in use is left in use
    model.set_weights(global_head)  # not personalised: both counts are the global head's
    same = answer_report(model, global_head, examples, holdout_every=5)
    assert same["personal_correct"] == same["global_correct"] == report["global_correct"]
