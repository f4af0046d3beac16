"""The whole loop over real HTTP on 127.0.0.1: enroll, feedback, fine-tune, sign, post, FedAvg, pull, verify.

The aggregator runs as its own process (gunicorn, 2 workers), on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import requests

from edge_sdk.device import Device, TrainPolicy
from edge_sdk.errors import ServerError, SignatureError
from edge_sdk.manifest import SignedManifest
from edge_sdk.signing import SigningKey
from edge_sdk.wire import UpdateEnvelope


def _give_feedback(device: Device, clips, answers: list[str]) -> None:
    for clip, ans in zip(clips, answers, strict=False):
        pred = device.classify_file(clip.path)
        device.feedback(pred.id, ans if ans in ("up", "down") else clip.label)


def _personalised_update(device: Device, clips, answers) -> UpdateEnvelope:
    _give_feedback(device, clips, answers)
    policy = TrainPolicy(min_examples=4, holdout_every=0, epochs=5)
    report = device.personalize(policy)
    assert report.status == "kept", report
    seq = device.make_update(policy=policy)
    assert seq is not None
    item = next(i for i in device.store.outbox_items() if i.seq == seq)
    envelope, _ = UpdateEnvelope.from_bytes(item.envelope)
    return envelope


def _current_manifest(device: Device) -> tuple[dict, bytes]:
    raw, _ = device.client.get_manifest()  # a signed device request
    return json.loads(raw)["manifest"], raw


def test_two_devices_round_closes_and_both_pull_the_weighted_mean(live_aggregator, trained_model, synthetic_clips,
                                                                    tmp_path):
    agg = live_aggregator
    assert agg.publish(trained_model) == 1
    no_guard = TrainPolicy(min_examples=4, holdout_every=0, epochs=5)
    a = agg.enroll(tmp_path / "a", "alice", train_policy=no_guard)
    b = agg.enroll(tmp_path / "b", "bob", train_policy=no_guard)
    assert a.model_version == b.model_version == 1
    global_head = {k: v.copy() for k, v in a.global_head.items()}

    env_a = _personalised_update(a, synthetic_clips[:6], ["up", "down", "label", "up", "label", "down"])
    env_b = _personalised_update(b, synthetic_clips[20:30], ["label"] * 10)
    assert env_a.header.num_examples == 6 and env_b.header.num_examples == 10

    rep_a = a.flush_outbox()
    assert [r["status"] for r in rep_a.accepted] == ["accepted"] and not rep_a.accepted[0].get("round_closed")
    rep_b = b.flush_outbox()
    assert rep_b.accepted[0]["round_closed"] is True
    assert rep_b.accepted[0]["published_version"] == 2

    assert a.pull_model() and b.pull_model()
    assert a.model_version == b.model_version == 2
    # The published head equals the example-weighted mean, computed here independently: 6 and 10 examples, the
    # 10 weighed as the round's (lower) median count, 6 (MAX_EXAMPLES_WEIGHT_OVER_MEDIAN's default, 1).
    da, db = env_a.deltas(), env_b.deltas()
    for name, base in global_head.items():
        expected = base + (6 * da[name].astype(np.float64) + 6 * db[name]) / 12
        np.testing.assert_allclose(a.global_head[name], expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(a.global_head[name], b.global_head[name])
    # What the devices installed is exactly what the server signed and serves.
    manifest, raw = _current_manifest(a)
    assert manifest["version"] == 2 and manifest["parent_version"] == 1 and manifest["round_id"] == 1
    head_bytes = a.client.get_blob(manifest["head"]["url"])
    assert hashlib.sha256(head_bytes).hexdigest() == manifest["head"]["sha256"]
    SignedManifest.from_bytes(raw, a.server_key.verify)
    # After the pull, both re-personalised from the new head on their stored feedback.
    assert a.personalized and b.personalized
    # A restarted device loads the same verified state from disk.
    b2 = Device(tmp_path / "b")
    assert b2.model_version == 2 and b2.personalized
    np.testing.assert_array_equal(b2.model.get_weights()["w1"], b.model.get_weights()["w1"])
    status = agg.status()
    assert status["current_version"] == 2 and status["rounds_closed"] == 1 and status["refusals"] == {}


def test_tampered_and_unenrolled_updates_are_refused_and_change_nothing(live_aggregator, trained_model,
                                                                        synthetic_clips, tmp_path):
    agg = live_aggregator
    agg.publish(trained_model)
    dev = agg.enroll(tmp_path / "dev")
    envelope = _personalised_update(dev, synthetic_clips[:6], ["label"] * 6)
    good = envelope.to_bytes()
    manifest_before, _ = _current_manifest(dev)

    tampered = bytearray(good)
    tampered[-5] ^= 0x01  # one flipped byte in the body
    r = agg.post_update(bytes(tampered))
    assert r.status_code == 400 and r.json()["error"] == "malformed"
    assert "sha256" in r.json()["detail"]

    # The same header and body, signed by a key the server never enrolled.
    stranger = SigningKey.generate()
    forged = UpdateEnvelope.create(device_id=dev.device_id, base_version=1, layout=dev.metadata.head_layout,
                                   deltas=envelope.deltas(), num_examples=6, sequence=99, sign=stranger.sign)
    r = agg.post_update(forged.to_bytes())
    assert r.status_code == 401 and r.json()["error"] == "bad_signature"

    # A device id nobody enrolled.
    unknown = UpdateEnvelope.create(device_id="dev-nobody", base_version=1, layout=dev.metadata.head_layout,
                                    deltas=envelope.deltas(), num_examples=6, sequence=1, sign=stranger.sign)
    r = agg.post_update(unknown.to_bytes())
    assert r.status_code == 401 and r.json()["error"] == "unknown_device"

    # Neither changed anything: same manifest, nothing in the round, three refusals audited.
    r = agg.post_admin("/rounds/close", json={"min_updates": 1})
    assert r.status_code == 409
    manifest_after, _ = _current_manifest(dev)
    assert manifest_after == manifest_before
    assert agg.status()["refusals"] == {"malformed": 1, "bad_signature": 1, "unknown_device": 1, "not_closed": 1}

    # The genuine update still goes through, and a retried post of it counts once.
    first = agg.post_update(good)
    again = agg.post_update(good)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["update_id"] == first.json()["update_id"] and again.json()["duplicate"] is True
    assert agg.status()["open_round"]["updates"] == 1


def test_offline_device_keeps_its_update_and_posts_it_later(trained_model, synthetic_clips, tmp_path):
    from tests.conftest import start_live_aggregator

    agg = start_live_aggregator(tmp_path / "srv", min_updates=1, workers=0)
    try:
        agg.publish(trained_model)
        dev = agg.enroll(tmp_path / "dev")
        _personalised_update(dev, synthetic_clips[:6], ["label"] * 6)
    finally:
        agg.process.terminate()
        agg.process.wait(timeout=30)
    now = [1000.0]
    dev.clock = lambda: now[0]
    report = dev.flush_outbox()
    assert report.accepted == [] and report.still_pending == 1 and "cannot reach" in report.error
    # Back online (same instance, new process, new port): after the backoff, the same update goes through.
    agg = start_live_aggregator(tmp_path / "srv", min_updates=1, workers=0)
    try:
        dev = Device(tmp_path / "dev", clock=lambda: now[0])  # a reboot in between
        dev.identity["server_url"] = agg.base_url
        assert dev.flush_outbox().still_pending == 1  # not due yet: backoff holds it
        now[0] += 10_000
        report = dev.flush_outbox()
        assert report.still_pending == 0 and report.accepted[0]["round_closed"] is True
        assert dev.pull_model() and dev.model_version == 2
    finally:
        agg.process.terminate()
        agg.process.wait(timeout=30)


def test_device_refuses_a_manifest_the_pinned_key_did_not_sign(live_aggregator, trained_model, tmp_path):
    agg = live_aggregator
    agg.publish(trained_model)
    dev = agg.enroll(tmp_path / "dev")
    _, raw = _current_manifest(dev)
    doc = json.loads(raw)
    doc["manifest"]["metrics"] = {"uar": 0.99}  # altered after signing
    with pytest.raises(SignatureError):
        dev._install_manifest(json.dumps(doc).encode())
    impostor = SigningKey.generate()
    with pytest.raises(SignatureError):
        SignedManifest.from_bytes(raw, impostor.verify_key.verify)
    assert dev.model_version == 1


def test_enrollment_tokens_are_one_time(live_aggregator, tmp_path):
    agg = live_aggregator
    token = agg.post_admin("/enrollment-tokens", json={}).json()["token"]
    Device(tmp_path / "one").enroll(agg.base_url, token)
    with pytest.raises(ServerError) as exc:
        Device(tmp_path / "two").enroll(agg.base_url, token)
    assert exc.value.status == 403 and exc.value.reason == "token_used"
    r = requests.post(f"{agg.base_url}/api/v1/admin/enrollment-tokens", timeout=10)
    assert r.status_code == 401


def test_published_delta_of_the_round_is_stored_as_little_endian_bytes(live_aggregator, trained_model, tmp_path):
    """The served head blobs, read as raw little-endian float32 in the layout's order (not through unpack_arrays):
    version 1 is the uploaded model's own head, version 2 is it plus the example-weighted mean of the round (with
    the default caps, 3 and 5 examples weigh 3 and 3: no update outweighs the round's lower median count)."""
    from edge_sdk.model import TFLiteModel
    from tests.conftest import signed_update

    agg = live_aggregator
    agg.publish(trained_model)
    a, b = agg.enroll(tmp_path / "a"), agg.enroll(tmp_path / "b")
    layout = a.metadata.head_layout

    def served_head(version: int) -> dict[str, np.ndarray]:
        raw, _ = a.client.get_manifest()
        manifest = json.loads(raw)["manifest"]
        assert manifest["version"] == version
        blob = a.client.get_blob(manifest["head"]["url"])
        assert hashlib.sha256(blob).hexdigest() == manifest["head"]["sha256"]
        flat = np.frombuffer(blob, dtype="<f4")  # little-endian, whatever this machine's order
        sizes = [int(np.prod(s.shape)) for s in layout]
        assert flat.size == sum(sizes)
        parts = np.split(flat, np.cumsum(sizes)[:-1])
        return {s.name: p.reshape(s.shape) for s, p in zip(layout, parts, strict=True)}

    v1 = served_head(1)
    bundled = TFLiteModel(trained_model.tflite_path, trained_model.metadata).get_weights()
    for name, arr in bundled.items():
        np.testing.assert_array_equal(v1[name], arr)
    env_a = signed_update(a.device_id, a.key, layout, sequence=1, num_examples=3)
    env_b = signed_update(b.device_id, b.key, layout, sequence=1, num_examples=5)
    assert agg.post_update(env_a.to_bytes()).status_code == 202
    assert agg.post_update(env_b.to_bytes()).json()["published_version"] == 2
    v2 = served_head(2)
    da, db = env_a.deltas(), env_b.deltas()
    for name in v1:
        expected = v1[name].astype(np.float64) + (3 * da[name].astype(np.float64) + 3 * db[name]) / 6
        np.testing.assert_allclose(v2[name], expected, rtol=1e-6, atol=1e-7)
        assert not np.array_equal(v2[name], v1[name])


def test_update_is_the_fit_on_all_feedback_even_when_the_personal_guard_discards_it(live_aggregator, trained_model,
                                                                                    synthetic_clips, tmp_path):
    """The guard decides what this user sees; the federation still gets the device's client update."""
    agg = live_aggregator
    agg.publish(trained_model)
    refuse_all = TrainPolicy(min_examples=4, holdout_every=2, epochs=5, tolerance=-1e9)  # every fit "got worse"
    dev = agg.enroll(tmp_path / "dev", train_policy=refuse_all)
    _give_feedback(dev, synthetic_clips[:8], ["label"] * 8)
    assert dev.personalize().status == "discarded" and not dev.personalized
    in_use = dev.model.get_weights()
    seq = dev.make_update()
    assert seq is not None
    envelope, _ = UpdateEnvelope.from_bytes(next(i for i in dev.store.outbox_items() if i.seq == seq).envelope)
    assert envelope.header.num_examples == 8  # all answers, the held-back ones too
    for name, value in dev.model.get_weights().items():  # what the user sees is untouched
        np.testing.assert_array_equal(value, in_use[name])
        np.testing.assert_array_equal(value, dev.global_head[name])
    # the delta is exactly a fit from the global head on all eight answers, with the federated optimizer (SGD:
    # the policy's optimizer is the personal head's)
    dev.model.set_weights(dev.global_head)
    dev._fit(dev.model, dev._examples(), dataclasses.replace(refuse_all, optimizer="sgd", adapter=False))
    fitted = dev.model.get_weights()
    for name, delta in envelope.deltas().items():
        assert np.abs(delta).max() > 0
        np.testing.assert_allclose(dev.global_head[name] + delta, fitted[name], atol=1e-6)
    assert dev.make_update() is None  # one update per version
    assert dev.flush_outbox().accepted


def test_device_uses_a_given_model_file_until_the_aggregator_provides_one(live_aggregator, trained_model,
                                                                          synthetic_clips, tmp_path):
    files = (trained_model.tflite_path, trained_model.metadata_path)
    dev = Device(tmp_path / "dev", model_files=files)
    assert dev.model_source == "file" and dev.model_version == 0
    pred = dev.classify_file(synthetic_clips[0].path)
    assert pred.embedding is not None and pred.embedding.shape == (dev.metadata.embedding_dim,)
    np.testing.assert_allclose(dev.model.head_probs(pred.embedding[None])[0],
                               [pred.probs[lab] for lab in dev.metadata.labels], atol=1e-6)
    agg = live_aggregator
    agg.publish(trained_model)
    enrolled = agg.enroll(tmp_path / "enrolled")
    again = Device(enrolled.state_dir, model_files=files)  # the server's model wins once there is one
    assert again.model_source == "server" and again.model_version == 1


def test_replay_keeps_a_one_class_user_from_erasing_the_other_classes(trained_model, synthetic_clips, tmp_path):
    """A user who only ever answers one class: without replay the head learns "always that class"; the model's
    replay set keeps the other classes (measured on the replay set itself, all four classes)."""
    files = (trained_model.tflite_path, trained_model.metadata_path)
    scores = {}
    for weight in (0.0, 1.0):
        policy = TrainPolicy(min_examples=4, holdout_every=0, epochs=30, learning_rate=0.2, replay_weight=weight)
        dev = Device(tmp_path / f"dev-{weight}", model_files=files, train_policy=policy)
        only = dev.metadata.labels[0]
        for clip in synthetic_clips[:12]:
            dev.feedback(dev.classify_file(clip.path).id, only)
        assert dev.personalize().status == "kept"
        emb, labels = dev.metadata.replay_set()
        pred = np.argmax(dev.model.head_probs(emb), axis=1)
        scores[weight] = (float(np.mean(pred == labels)), float(np.mean(pred == 0)))
    (acc_without, share0_without), (acc_with, share0_with) = scores[0.0], scores[1.0]
    assert share0_without > 0.9  # collapsed onto the one class the user answered
    assert acc_with > acc_without + 0.2 and share0_with < 0.75


def test_after_the_gate_refuses_a_round_the_next_round_publishes(trained_model, synthetic_clips, tmp_path,
                                                                 database_url):
    """A refused round used to stall the fleet: a new round opened on the same version and no device sent again.

    Device A is the real SDK (feedback, sync); device B posts hand-made envelopes signed with its key: first one
    that inverts the output layer (the gate must refuse the round), then a harmless one. A answers more and syncs
    again on the same version, and that round closes and publishes. An update made on a version that has just
    been replaced still counts (STALENESS_LIMIT's default is 1).
    """
    from tests.conftest import signed_update, start_live_aggregator

    speakers = sorted({c.speaker for c in synthetic_clips})
    val_csv = tmp_path / "validation.csv"
    val_csv.write_text("path,speaker,label\n" + "".join(f"{c.path},{c.speaker},{c.label}\n" for c in synthetic_clips
                                                        if c.speaker == speakers[-1]))
    env = {"FEDSER_VALIDATION_MANIFEST": str(val_csv), "FEDSER_VALIDATION_MARGIN": "0.05",
           "FEDSER_MAX_UPDATE_L2_NORM": "1e9"}
    agg = start_live_aggregator(tmp_path, min_updates=2, database_url=database_url, env=env)
    try:
        assert agg.publish(trained_model) == 1
        policy = TrainPolicy(min_examples=4, holdout_every=0, epochs=5)
        a = agg.enroll(tmp_path / "a", "alice", train_policy=policy)
        b_key = SigningKey.generate()
        token = agg.post_admin("/enrollment-tokens", json={}).json()["token"]
        b = requests.post(f"{agg.base_url}/api/v1/devices/enroll", timeout=30,
                          json={"token": token, "public_key": b_key.verify_key.to_b64()}).json()["device_id"]
        layout = a.metadata.head_layout
        train_clips = [c for c in synthetic_clips if c.speaker not in speakers[-2:]]

        _give_feedback(a, train_clips[:6], ["label"] * 6)
        report = a.sync()
        assert [r["status"] for r in report.accepted] == ["accepted"], report
        last = layout.names[-2:]  # the output layer's kernel and bias: -4 x them turns every prediction around
        harm = {n: (-4.0 * a.global_head[n] if n in last else np.zeros(s.shape)).astype(np.float32)
                for n, s in zip(layout.names, layout, strict=True)}
        bad = UpdateEnvelope.create(device_id=b, base_version=1, layout=layout, deltas=harm, num_examples=6,
                                    sequence=1, sign=b_key.sign)
        r = agg.post_update(bad.to_bytes())
        assert r.status_code == 202 and "validation UAR would drop" in r.json()["round_rejected"], r.text
        status = agg.status()
        assert status["current_version"] == 1 and status["rounds"][1]["status"] == "rejected"
        assert status["open_round"]["base_version"] == 1 and status["open_round"]["updates"] == 0

        # the next round on the same version: A has more answers and sends again; B sends a harmless update
        _give_feedback(a, train_clips[6:10], ["label"] * 4)
        report = a.sync()
        assert [r["status"] for r in report.accepted] == ["accepted"], report
        assert agg.status()["open_round"]["updates"] == 1
        r = agg.post_update(signed_update(b, b_key, layout, sequence=2, base_version=1, scale=1e-6).to_bytes())
        assert r.status_code == 202 and r.json().get("published_version") == 2, r.text
        assert "round_rejected" not in r.json()
        assert a.sync().model_version == 2

        # made on version 1 while version 2 was being published: one version behind, accepted and down-weighted
        late = signed_update(b, b_key, layout, sequence=3, base_version=1, scale=1e-6)
        r = agg.post_update(late.to_bytes())
        assert r.status_code == 202, r.text
    finally:
        agg.process.terminate()
        agg.process.wait(timeout=30)
