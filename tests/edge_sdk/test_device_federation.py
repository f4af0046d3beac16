"""The device's side of federation that keeps going (issue 11, items 3 and 4), against a real aggregator.

- A round the validation gate refuses is followed by a round that gets updates: a device sends again on the
  same version once its user has answered more.
- A device that syncs late pulls the new version first, so its answers go to the open round instead of being
  refused as stale and dropped; an update it had already made on the old version is remade on the new one.
- A genuinely signed older manifest, replayed by a proxy, is refused and the device stays on its version.
- A server restored from a backup signs other content under the version a device installed: the device re-installs
  that version (warning, status record, personal state and updates made on the old head reset); the same content
  again is a no-op, and an older version or the replaced content replayed is still refused.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
import soundfile as sf

from edge_sdk.device import Device, ManifestDowngradeError, TrainPolicy, manifest_digest
from edge_sdk.errors import FedserError
from edge_sdk.model import bundled_model_paths
from edge_sdk.wire import UpdateEnvelope
from tests.conftest import start_live_aggregator
from tests.edge_sdk.conftest import ModelFiles, clip
from tools.demo import start_aggregator

pytestmark = pytest.mark.skipif(bundled_model_paths() is None, reason="no bundled model in this checkout")

POLICY = TrainPolicy(min_examples=4, holdout_every=0, epochs=3)
LABELS = ("angry", "happy", "neutral", "sad")


def _answer(device: Device, n: int, seed: int) -> None:
    for i in range(n):
        pred = device.classify(clip(seed + i))
        device.feedback(pred.id, LABELS[(seed + i) % 4])


def _base_version(device: Device, seq: int) -> int:
    item = next(i for i in device.store.outbox_items() if i.seq == seq)
    return UpdateEnvelope.from_bytes(item.envelope)[0].header.base_version


def _num_examples(device: Device, seq: int) -> int:
    item = next(i for i in device.store.outbox_items() if i.seq == seq)
    return UpdateEnvelope.from_bytes(item.envelope)[0].header.num_examples


@pytest.fixture
def aggregator(tmp_path):
    started = []

    def start(**kwargs):
        agg = start_live_aggregator(tmp_path / f"srv{len(started)}", workers=0, **kwargs)
        started.append(agg)
        assert agg.publish(ModelFiles(*bundled_model_paths())) == 1
        return agg

    yield start
    for agg in started:
        agg.process.terminate()
        agg.process.wait(timeout=30)


@pytest.mark.parametrize("staleness_limit", ["0", "1"])
def test_late_devices_answers_go_to_the_current_round_not_refused_as_stale(aggregator, tmp_path, staleness_limit):
    agg = aggregator(min_updates=2, env={"FEDSER_STALENESS_LIMIT": staleness_limit})
    a, b, c, d = (agg.enroll(tmp_path / n, n, train_policy=POLICY) for n in "abcd")
    for i, dev in enumerate((a, b, c, d)):
        _answer(dev, 5, seed=10 * i)
    premade = c.make_update()  # c made its update on version 1, then was offline while the round closed
    assert premade is not None and _base_version(c, premade) == 1

    assert a.sync().accepted
    closing = b.sync().accepted
    assert closing and closing[0]["round_closed"] and closing[0]["published_version"] == 2

    if staleness_limit == "0":  # posted before pulling (what sync used to do): refused, and marked to be remade
        posted = c.flush_outbox()
        assert posted.rejected == [{"seq": premade, "reason": "stale_base", "remake": True}], posted
    late = c.sync()
    assert c.model_version == 2
    assert late.rejected == [] and len(late.accepted) == 1 and late.accepted[0]["round_id"] == 2, late
    seq = late.accepted[0]["seq"]
    assert _base_version(c, seq) == 2 and _num_examples(c, seq) == 5  # every answer, on the new base
    if staleness_limit == "1":  # never posted: superseded by the update on the new base, which holds its answers
        item = next(i for i in c.store.outbox_items() if i.seq == premade)
        assert item.state == "rejected"

    later = d.sync()  # never made one: it pulls version 2 first and sends on it
    assert later.rejected == [] and len(later.accepted) == 1
    assert _base_version(d, later.accepted[0]["seq"]) == 2 and later.accepted[0]["round_closed"]
    assert agg.status()["current_version"] == 3
    assert d.model_version == 3 and later.model_updated  # its update closed the round: it took the result


def test_after_a_refused_round_devices_send_again_on_the_same_version(aggregator, tmp_path):
    clips = tmp_path / "validation"
    clips.mkdir()
    rows = ["path,speaker,label"]
    for i in range(8):
        sf.write(clips / f"{i}.wav", clip(100 + i), 16000)
        rows.append(f"{i}.wav,val{i % 2},{LABELS[i % 4]}")
    (clips / "validation.csv").write_text("\n".join(rows) + "\n")
    # A margin of -10 refuses every candidate: each round is refused by the gate and a new one opens on version 1.
    agg = aggregator(min_updates=2, env={"FEDSER_VALIDATION_MANIFEST": str(clips / "validation.csv"),
                                         "FEDSER_VALIDATION_MARGIN": "-10"})
    a, b = (agg.enroll(tmp_path / n, n, train_policy=POLICY) for n in "ab")
    _answer(a, 5, seed=0)
    _answer(b, 5, seed=20)
    assert a.sync().accepted[0]["round_id"] == 1
    refused = b.sync().accepted[0]
    assert refused["round_closed"] and refused.get("round_rejected"), refused
    assert a.model_version == b.model_version == 1

    again = a.sync()  # nothing new to say: no second update from the same answers
    assert again.enqueued_seq is None and again.accepted == []

    _answer(a, 3, seed=40)
    _answer(b, 3, seed=60)
    first, second = a.sync(), b.sync()
    assert [r["round_id"] for r in first.accepted] == [2], first  # the round opened after the refusal
    assert [r["round_id"] for r in second.accepted] == [2] and second.accepted[0]["round_closed"], second
    assert _num_examples(a, first.accepted[0]["seq"]) == 8  # all of its answers, the earlier ones too


def test_answers_refused_as_already_contributed_are_sent_again_later_not_at_every_sync(aggregator, tmp_path):
    agg = aggregator(min_updates=2)
    now = [1_000_000.0]
    a, b = (agg.enroll(tmp_path / n, n, train_policy=POLICY, clock=lambda: now[0]) for n in "ab")
    _answer(a, 5, seed=0)
    assert [r["round_id"] for r in a.sync().accepted] == [1]
    _answer(a, 2, seed=30)  # more answers while round 1, which has a's update, is still open
    refused = a.sync()
    assert [r["reason"] for r in refused.rejected] == ["already_contributed"] and refused.enqueued_seq is not None
    assert a.sync().enqueued_seq is None  # not remade at every sync ...
    _answer(a, 1, seed=35)
    waiting = a.sync()  # ... nor when a new answer came meanwhile (the round still holds a's update)
    assert waiting.enqueued_seq is None and waiting.rejected == [], waiting
    now[0] += 3601
    again = a.sync()  # ... but after an hour (the round may have been refused and another opened)
    assert again.enqueued_seq is not None and [r["reason"] for r in again.rejected] == ["already_contributed"]
    _answer(b, 5, seed=50)
    assert b.sync().accepted[0]["published_version"] == 2
    late = a.sync()  # version 2: all eight answers, none lost
    assert [r["round_id"] for r in late.accepted] == [2] and _num_examples(a, late.accepted[0]["seq"]) == 8


def test_predictions_while_making_an_update_come_from_the_weights_in_use(aggregator, tmp_path):
    """sync -> make_update trains (from the global head) while listen's thread classifies (issue 11, item 8)."""
    from edge_sdk.model import ModelMetadata, TFLiteModel
    from tests.edge_sdk.test_device_threads import _classify_while

    agg = aggregator(min_updates=50)
    dev = agg.enroll(tmp_path / "dev", train_policy=POLICY)
    _answer(dev, 6, seed=0)
    tflite, meta = bundled_model_paths()
    reference = TFLiteModel(tflite, ModelMetadata.load(meta))
    reference.set_weights(dev.model.get_weights())  # the global head: this device is not personalised
    long_fit = TrainPolicy(min_examples=4, holdout_every=0, epochs=200, learning_rate=0.1)
    predictions, seq = _classify_while(dev, clip(3), lambda: dev.make_update(policy=long_fit))
    assert seq is not None and len(predictions) >= 3
    for pred in predictions:
        assert not pred.personalized and pred.model_version == 1
        np.testing.assert_allclose([pred.probs[lab] for lab in LABELS],
                                   reference.head_probs(pred.embedding[None])[0], atol=1e-5)


class _ReplayProxy:
    """Forwards everything to the aggregator except the manifest, for which it replays ``manifest`` (bytes)."""

    def __init__(self, upstream: str, manifest: bytes) -> None:
        self.replayed = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, method: str) -> None:
                if method == "GET" and self.path.split("?")[0] == "/api/v1/manifest":
                    outer.replayed += 1
                    status, body, headers = 200, manifest, {"Content-Type": "application/json", "ETag": '"v1"'}
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    r = requests.request(method, upstream + self.path, data=self.rfile.read(length) or None,
                                         headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
                                         timeout=30)
                    status, body = r.status_code, r.content
                    headers = {k: v for k, v in r.headers.items()
                               if k.lower() in ("content-type", "etag", "cache-control")}
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                self._forward("GET")

            def do_POST(self):  # noqa: N802
                self._forward("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_replayed_older_signed_manifest_is_refused(aggregator, tmp_path):
    agg = aggregator(min_updates=50)
    dev = agg.enroll(tmp_path / "dev", train_policy=POLICY)
    old_manifest, _ = dev.client.get_manifest()  # version 1, genuinely signed by the server
    assert agg.publish(ModelFiles(*bundled_model_paths())) == 2
    assert dev.pull_model() and dev.model_version == 2

    proxy = _ReplayProxy(agg.base_url, old_manifest)
    try:
        dev.set_server_url(proxy.url)
        with pytest.raises(ManifestDowngradeError, match="older than version 2"):
            dev.pull_model()
        report = dev.sync()
        assert proxy.replayed == 2 and "older than version 2" in report.error
        assert dev.model_version == 2 and report.model_version == 2
        dev.store.close()
        restarted = Device(tmp_path / "dev", train_policy=POLICY)  # and it stays on 2 after a restart
        assert restarted.model_version == 2 and restarted.problems == []
        with pytest.raises(ManifestDowngradeError):
            restarted.pull_model()
        assert restarted.model_version == 2
        assert Device(tmp_path / "dev").model_version == 2
    finally:
        proxy.close()


def test_the_downgrade_watermark_belongs_to_the_server_key(aggregator, tmp_path):
    """Version 2 installed from one server; the device is enrolled again (identity.json removed, the store kept)
    with a reinstalled aggregator (a new key, at version 1): its manifest is installed, not refused as a
    downgrade (review item 8)."""
    first = aggregator(min_updates=50)
    dev = first.enroll(tmp_path / "dev", train_policy=POLICY)
    assert first.publish(ModelFiles(*bundled_model_paths())) == 2
    assert dev.pull_model() and dev.model_version == 2
    dev.store.close()
    (tmp_path / "dev" / "identity.json").unlink()
    reinstalled = aggregator(min_updates=50)  # a new instance: a new key, version 1
    again = reinstalled.enroll(tmp_path / "dev", train_policy=POLICY)
    assert again.enrolled and again.model_version == 1 and again.manifest is not None


def test_an_enroll_whose_model_cannot_be_installed_says_so_and_sync_completes_it(aggregator, tmp_path):
    """The model cannot be installed at enrollment (here: models/ is a file, so nothing can be written there). The
    server has registered the device's key (enrolling it again is refused), so the device keeps its identity and
    the error says that `sync` installs the model, which it then does."""
    agg = aggregator(min_updates=50)
    state = tmp_path / "dev"
    state.mkdir()
    (state / "models").write_text("not a folder")
    with pytest.raises(FedserError, match="enrolled as .*fedser-edge sync. installs it"):
        agg.enroll(state, train_policy=POLICY)
    assert (state / "identity.json").exists()
    (state / "models").unlink()
    dev = Device(state, train_policy=POLICY)
    assert dev.enrolled and dev.manifest is None
    dev.sync()
    assert dev.model_version == 1 and dev.model_source == "server"


def _restart(agg, *, min_updates: int, backup_to=None, restore_from=None) -> None:
    """Stop the aggregator (so its SQLite files are consistent), optionally copy its instance folder away or replace
    it with a copy made earlier (a restored backup), and start it again on the same address."""
    agg.process.terminate()
    agg.process.wait(timeout=30)
    if backup_to is not None:
        shutil.copytree(agg.instance, backup_to)
    if restore_from is not None:
        shutil.rmtree(agg.instance)
        shutil.copytree(restore_from, agg.instance)
    agg.process = start_aggregator(agg.instance, int(agg.base_url.rsplit(":", 1)[1]), min_updates=min_updates,
                                   workers=0)


def test_other_content_signed_under_the_installed_version_is_reinstalled(aggregator, tmp_path, caplog):
    """The server is restored from a backup taken at version 1 after it published version 2 from a round; the
    admin publishes again, and the server signs a different version 2. A device that installed the first one
    re-installs version 2 instead of keeping the old head forever (its updates would be averaged into a head it
    never trained on: an update names only the version number)."""
    agg = aggregator(min_updates=1)
    dev = agg.enroll(tmp_path / "dev", train_policy=POLICY)
    v1_manifest, _ = dev.client.get_manifest()
    _restart(agg, min_updates=1, backup_to=tmp_path / "backup")  # version 1, the device enrolled
    _answer(dev, 5, seed=0)
    assert dev.sync().accepted[0]["published_version"] == 2 and dev.model_version == 2
    old, old_bytes, old_head = dev.manifest, dev.client.get_manifest()[0], dev.global_head
    assert dev.personalized and dev.store.get("personal_base_version") == "2"
    old_personal = (tmp_path / "dev" / "personal.head").read_bytes()
    _answer(dev, 2, seed=40)
    made_on_old = dev.make_update()  # pending, on the old head of version 2
    assert made_on_old is not None and _base_version(dev, made_on_old) == 2
    probe = clip(7)
    before = dev.classify(probe).probs

    _restart(agg, min_updates=50, restore_from=tmp_path / "backup")
    assert agg.publish(ModelFiles(*bundled_model_paths())) == 2  # another version 2: the bundled head again
    with caplog.at_level(logging.WARNING, logger="edge_sdk"):
        assert dev.pull_model() is True
    new = dev.manifest
    assert dev.model_version == 2 and dev.store.pending() == []  # nothing made on the old head is left to post
    assert new.head.sha256 != old.head.sha256
    digests = (manifest_digest(old), manifest_digest(new))
    assert any(digests[0] in r.getMessage() and digests[1] in r.getMessage() for r in caplog.records)
    assert [(r["version"], r["old_manifest_sha256"], r["new_manifest_sha256"])
            for r in dev.status()["manifest_replacements"]] == [(2, *digests)]
    # serving the new head: the global head is the server's, the personal head was made again from it
    served = (tmp_path / "dev" / "models" / f"{new.head.sha256}.head").read_bytes()
    assert hashlib.sha256(served).hexdigest() == new.head.sha256
    assert any(not np.array_equal(old_head[n], dev.global_head[n]) for n in old_head)
    assert (tmp_path / "dev" / "personal.head").read_bytes() != old_personal
    assert dev.classify(probe).probs != before
    # the update made on the old head was withdrawn, and its answers go to the new round on the new head
    withdrawn = next(i for i in dev.store.outbox_items() if i.seq == made_on_old)
    assert withdrawn.state == "rejected" and withdrawn.attempts == 1
    report = dev.sync()
    assert not report.model_updated and not report.error and report.rejected == []
    assert [(r["seq"] != made_on_old, r["round_id"]) for r in report.accepted] == [(True, 2)], report
    assert _num_examples(dev, report.accepted[0]["seq"]) == 7
    dev.store.close()
    dev = Device(tmp_path / "dev", train_policy=POLICY)  # and after a restart
    assert dev.model_version == 2 and manifest_digest(dev.manifest) == digests[1] and dev.problems == []

    again = dev.sync()  # the same version with the same content: nothing to do
    assert not again.model_updated and not again.error and len(dev.manifest_replacements()) == 1
    current, _ = dev.client.get_manifest()
    for replayed, refused in ((current, None), (old_bytes, "is the content the server replaced"),
                              (v1_manifest, "older than version 2")):
        proxy = _ReplayProxy(agg.base_url, replayed)
        try:
            dev.set_server_url(proxy.url)
            if refused is None:
                assert dev.pull_model() is False
            else:  # neither an older version nor the replaced content of this one comes back
                with pytest.raises(ManifestDowngradeError, match=refused):
                    dev.pull_model()
            assert dev.model_version == 2 and manifest_digest(dev.manifest) == digests[1]
            assert len(dev.manifest_replacements()) == 1
        finally:
            dev.set_server_url(agg.base_url)
            proxy.close()


def test_a_cancelled_personalisation_after_a_new_model_leaves_it_due(aggregator, tmp_path):
    """sync(cancel=...) reaches the personalisation a new version brings: cancelled, the device serves the new
    global head and says the answers are due; the next personalisation fits them on the new version."""
    agg = aggregator(min_updates=1)
    dev, other = (agg.enroll(tmp_path / n, train_policy=POLICY) for n in ("dev", "other"))
    _answer(dev, 5, seed=0)
    dev.personalize()
    assert dev.personalized and not dev.personalisation_due()
    _answer(other, 5, seed=20)
    assert other.sync().accepted[0]["published_version"] == 2  # another device's update closes the round
    stop = threading.Event()
    stop.set()
    report = dev.sync(cancel=stop)  # version 2 pulled, its personalisation cancelled; nothing posted meanwhile
    assert dev.model_version == 2 and report.model_updated and report.accepted == [] and report.error == "cancelled"
    assert not dev.personalized and dev.personalisation_due()
    assert dev.store.pending() == []  # the update waits for the next sync
    assert dev.personalize().status == "kept" and not dev.personalisation_due()
    assert dev.store.get("personal_base_version") == "2"


def test_a_cancel_during_an_updates_fit_makes_nothing_and_the_next_sync_makes_it(aggregator, tmp_path, monkeypatch):
    """make_update(cancel=...) looks at the event before every training step: set from inside the fit's 2nd
    step (as listen's SIGTERM handler sets it), nothing reaches the outbox and last_update is unchanged; the
    next sync makes and posts the update from the same answers."""
    from edge_sdk.model import TFLiteModel

    agg = aggregator(min_updates=2)
    dev = agg.enroll(tmp_path / "dev", train_policy=POLICY)
    _answer(dev, 5, seed=0)
    stop, calls = threading.Event(), []
    real_train = TFLiteModel.train_step

    def counted(self, *args, **kwargs):  # the real signature, counted
        calls.append(1)
        if len(calls) == 2:
            stop.set()
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(TFLiteModel, "train_step", counted)
    assert dev.make_update(cancel=stop) is None
    assert 2 <= len(calls) <= 3 and not dev.making_update  # stopped at the step after the one that set it
    assert list(dev.store.outbox_items()) == [] and dev.store.get("last_update") in (None, "null")
    report = dev.sync(cancel=stop)  # still set: the sync returns before making or posting anything
    assert report.error == "cancelled" and report.enqueued_seq is None and list(dev.store.outbox_items()) == []
    stop.clear()
    report = dev.sync()
    assert report.enqueued_seq is not None and [a["seq"] for a in report.accepted] == [report.enqueued_seq]


def test_a_wipe_while_an_update_is_made_drops_it(aggregator, tmp_path):
    """The page's wipe runs inside listen, beside a sync: an update whose answers are deleted while it is being
    made (here: between its fit and its signing, where the differential-privacy noise is drawn) is dropped, never
    queued, so it is never sent."""
    from edge_sdk.device import PrivacyPolicy

    agg = aggregator(min_updates=2)
    dev = agg.enroll(tmp_path / "dev", train_policy=POLICY)
    _answer(dev, 5, seed=0)
    drawing, go, result = threading.Event(), threading.Event(), []

    class PausedNoise:  # the update's own noise source, paused once the fit is done
        def normal(self, loc, scale, size):
            drawing.set()
            go.wait(30)
            return np.random.default_rng(0).normal(loc, scale, size)

    maker = threading.Thread(target=lambda: result.append(dev.make_update(
        PrivacyPolicy(clip_norm=1.0, noise_multiplier=0.5), rng=PausedNoise())))
    maker.start()
    assert drawing.wait(60)
    removed = dev.wipe_data()  # the fit is over: nothing to wait for
    go.set()
    maker.join(60)
    assert removed["predictions"] == 5 and removed["pending_updates"] == 0
    assert result == [None] and list(dev.store.outbox_items()) == []
    assert dev.sync().accepted == []  # nothing left to send


def test_a_wipe_waits_for_an_update_being_posted_which_then_counts_as_sent(aggregator, tmp_path, monkeypatch):
    from edge_sdk.client import ServerClient

    agg = aggregator(min_updates=2)
    dev = agg.enroll(tmp_path / "dev", train_policy=POLICY)
    _answer(dev, 5, seed=0)
    seq = dev.make_update()
    posting, go, wiped, flushed = threading.Event(), threading.Event(), [], []
    real_post = ServerClient.post_update

    def slow_post(self, envelope):  # the real post over HTTP, after the test lets it go
        posting.set()
        go.wait(30)
        return real_post(self, envelope)

    monkeypatch.setattr(ServerClient, "post_update", slow_post)
    poster = threading.Thread(target=lambda: flushed.append(dev.flush_outbox()))
    poster.start()
    assert posting.wait(60)
    wiper = threading.Thread(target=lambda: wiped.append(dev.wipe_data()))
    wiper.start()
    wiper.join(0.5)
    assert wiper.is_alive()  # waiting for the post under way
    go.set()
    poster.join(60)
    wiper.join(60)
    assert [a["seq"] for a in flushed[0].accepted] == [seq]
    assert wiped[0]["pending_updates"] == 0 and wiped[0]["predictions"] == 5  # it was sent, not deleted unsent
    (item,) = dev.store.outbox_items()
    assert item.state == "accepted" and item.envelope == b""  # what was sent is recorded; its deltas are gone
