"""Stopping a personalisation under way (``Device.personalize(cancel=...)``, SIGTERM to ``fedser-edge train`` and
``listen``) changes nothing and loses no answer; ``wipe-data`` removes every personal file fitted on the user's
answers. Real TFLite models, real feedback store, real processes and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from edge_sdk.device import Device, TrainPolicy
from edge_sdk.model import TFLiteModel
from tests.conftest import REPO
from tests.edge_sdk.test_input_affine import AFFINE_ONLY, _files, _shifted_answers


def _unchanged(dev: Device, global_head: dict) -> None:
    assert dev.input_affine is None and not dev.personalized
    for k, v in global_head.items():
        np.testing.assert_array_equal(dev.model.get_weights()[k], v)
    assert not any((dev.state_dir / name).exists() for name in ("personal.head", "personal.input"))


def test_a_cancel_set_before_the_call_changes_nothing_and_keeps_the_answers(tmp_path, trained_model, rng):
    dev = Device(tmp_path / "dev", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    global_head = dev.model.get_weights()
    _shifted_answers(dev, rng)
    stop = threading.Event()
    stop.set()
    report = dev.personalize(cancel=stop)
    assert report.status == "cancelled" and "nothing changed" in report.reason, report.to_dict()
    _unchanged(dev, global_head)
    assert len(dev.store.examples()) == 12
    again = dev.personalize()  # the same answers, no cancel: the fit happens
    assert again.status == "kept" and again.input_affine, again.to_dict()
    dev.store.close()


@pytest.mark.parametrize("signature,fit", [("input_gradient", {"input_affine_steps": 10_000}),
                                           ("train_step", {"input_affine_from": 0, "adam_steps": 10_000})])
def test_a_cancel_during_a_fit_stops_it_before_the_next_step(tmp_path, trained_model, rng, monkeypatch, signature,
                                                             fit):
    """The event is set from inside the 3rd call of the affine's gradient, or of the head's ``train`` signature
    (fits of 10,000 steps: minutes if they ran on): no further call is made, and nothing is written."""
    dev = Device(tmp_path / "dev", model_files=_files(trained_model),
                 train_policy=TrainPolicy(**{**AFFINE_ONLY, **fit}))
    global_head = dev.model.get_weights()
    _shifted_answers(dev, rng)
    stop, calls = threading.Event(), []
    real = getattr(TFLiteModel, signature)

    def counted(self, *args, **kwargs):  # the real signature, counted
        calls.append(signature)
        if len(calls) == 3:
            stop.set()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TFLiteModel, signature, counted)
    report = dev.personalize(cancel=stop)
    assert report.status == "cancelled", report.to_dict()
    assert len(calls) == 3
    _unchanged(dev, global_head)
    dev.store.close()


def test_a_cancel_leaves_a_personalised_device_exactly_as_it_was(tmp_path, trained_model, rng):
    dev = Device(tmp_path / "dev", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    _shifted_answers(dev, rng)
    assert dev.personalize().input_affine
    files = {p.name: p.read_bytes() for p in dev.state_dir.glob("personal.*")}
    digests = {k: dev.store.get(k) for k in ("personal_head_sha256", "personal_input_sha256")}
    serving, affine = dev.model.get_weights(), {k: v.copy() for k, v in dev.input_affine.items()}
    pred = dev.classify(np.zeros(dev.metadata.features.sample_rate, np.float32) + 0.01)
    dev.feedback(pred.id, dev.metadata.labels[0])  # a new answer: due
    stop = threading.Event()
    stop.set()
    assert dev.personalize(cancel=stop).status == "cancelled"
    assert {p.name: p.read_bytes() for p in dev.state_dir.glob("personal.*")} == files
    assert {k: dev.store.get(k) for k in digests} == digests
    for k, v in serving.items():
        np.testing.assert_array_equal(dev.model.get_weights()[k], v)
    for k, v in affine.items():
        np.testing.assert_array_equal(dev.input_affine[k], v)
    assert dev.personalisation_due()
    dev.store.close()


def test_a_damaged_personal_file_makes_the_answers_due(tmp_path, trained_model, rng):
    dev = Device(tmp_path / "dev", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    _shifted_answers(dev, rng)
    assert dev.personalize().status == "kept" and not dev.personalisation_due()
    dev.store.close()
    (tmp_path / "dev" / "personal.head").write_bytes(b"damaged")
    again = Device(tmp_path / "dev", model_files=_files(trained_model))
    assert [p["file"] for p in again.problems] == ["personal.head"] and not again.personalized
    assert again.personalisation_due()  # listen fits them at its first idle moment
    again.store.close()


def _answered_state(state, n: int = 40) -> None:
    """A device on the bundled model (its input affine from 20 answers) with ``n`` corrected answers."""
    dev = Device(state)
    if dev.model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    rng = np.random.default_rng(0)
    labels = dev.metadata.labels
    for i in range(n):
        t = np.arange(dev.metadata.features.sample_rate) / dev.metadata.features.sample_rate
        audio = (0.2 * np.sin(2 * np.pi * (120 + 15 * i) * t) + 0.02 * rng.normal(size=len(t))).astype(np.float32)
        pred = dev.classify(audio)
        dev.feedback(pred.id, labels[(labels.index(pred.label) + 1) % len(labels)])
    dev.store.close()


def _sigterm_while_personalising(*args: str, env: dict | None = None, meanwhile=None) -> tuple[int, str, str]:
    """Run ``fedser-edge -v ARGS``, read its stderr until a personalisation has started, call ``meanwhile(proc)``
    when given, send SIGTERM; returns the exit status, stdout and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "-v", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**(env or os.environ), "PYTHONUNBUFFERED": "1"})
    try:
        err, deadline = "", time.time() + 120
        while "personalising on" not in err:
            line = proc.stderr.readline()
            assert line and time.time() < deadline, f"no personalisation started: {err}"
            err += line
        if meanwhile is not None:
            meanwhile(proc)
        proc.send_signal(signal.SIGTERM)
        out, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, out, err + rest


def test_sigterm_cancels_fedser_edge_train_and_loses_nothing(tmp_path):
    state = tmp_path / "dev"
    _answered_state(state)
    rc, out, err = _sigterm_while_personalising("--state", str(state), "train")
    assert rc == 130, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["status"] == "cancelled" and report["examples"] == 0
    assert not (state / "personal.head").exists() and not (state / "personal.input").exists()
    dev = Device(state)
    assert len(dev.store.examples()) == 40 and not dev.personalized
    dev.store.close()


def test_sigterm_cancels_a_personalisation_in_listen_which_then_stops(tmp_path, synthetic_clips):
    state = tmp_path / "dev"
    _answered_state(state)
    config = tmp_path / "edge.toml"
    config.write_text("[training]\nmin_new_feedback = 1\nidle_seconds = 0\n")
    rc, out, err = _sigterm_while_personalising("--state", str(state), "--config", str(config), "listen",
                                                "--feedback", "none", "--file", str(synthetic_clips[0].path),
                                                "--seconds", "300")
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    trained = [line["trained"] for line in lines if "trained" in line]
    assert [t["status"] for t in trained] == ["cancelled"], out
    assert "listen_stats" in lines[-1]
    dev = Device(state)
    assert dev.store.get("trained_feedback") in (None, "0") and not dev.personalized  # fitted at the next start
    assert dev.personalisation_due()
    dev.store.close()


def test_a_wipe_from_the_page_stops_listens_personalisation_and_listen_goes_on(tmp_path, synthetic_clips):
    """The page's user deletes their data while ``listen --feedback web`` fits their 40 answers: the fit stops
    ("skipped", not "cancelled", on which listen would stop), the page keeps answering, and listen ends only when
    told to (SIGTERM), with nothing of the user's left."""
    import requests

    from tools.demo import free_port

    state, port = tmp_path / "dev", free_port()
    _answered_state(state)
    config = tmp_path / "edge.toml"
    config.write_text("[training]\nmin_new_feedback = 1\nidle_seconds = 0\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FEDSER_EDGE_")},
           "FEDSER_EDGE_WEB_PORT": str(port)}

    def wipe_from_the_page(proc):
        wiped = requests.post(f"http://127.0.0.1:{port}/api/wipe", json={"confirm": "wipe"}, timeout=60)
        assert wiped.status_code == 200 and wiped.json()["wiped"]["predictions"] >= 40, wiped.text
        time.sleep(1.0)
        assert proc.poll() is None  # listen goes on
        state_now = requests.get(f"http://127.0.0.1:{port}/api/state", timeout=10).json()
        assert state_now["data"]["answers"] == 0 and not state_now["personalized"]

    rc, out, err = _sigterm_while_personalising("--state", str(state), "--config", str(config), "listen",
                                                "--feedback", "web", "--file", str(synthetic_clips[0].path),
                                                "--seconds", "300", env=env, meanwhile=wipe_from_the_page)
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    trained = [line["trained"] for line in lines if "trained" in line]
    assert [t["status"] for t in trained] == ["skipped"] and "being deleted" in trained[0]["reason"], out
    assert "listen_stats" in lines[-1]
    dev = Device(state)
    assert dev.store.counts()["feedback"] == 0 and not dev.personalized
    assert dev.store.get("trained_feedback") == "0" and not dev.personalisation_due()
    dev.store.close()


def test_personalisation_due_until_the_answers_are_fitted_on_the_model_in_use(tmp_path, trained_model, rng):
    dev = Device(tmp_path / "dev", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    assert not dev.personalisation_due()  # no answers
    _shifted_answers(dev, rng)
    assert dev.personalisation_due()
    stop = threading.Event()
    stop.set()
    assert dev.personalize(cancel=stop).status == "cancelled" and dev.personalisation_due()
    assert dev.personalize().status == "kept" and not dev.personalisation_due()
    pred = dev.classify(np.zeros(dev.metadata.features.sample_rate, np.float32) + 0.01)
    dev.feedback(pred.id, "up")  # a new answer
    assert dev.personalisation_due()
    dev.store.close()


def test_listen_fits_answers_due_at_start_with_no_new_answer(tmp_path, synthetic_clips):
    """Answers counted as trained (as after a sync whose new model's personalisation was cancelled) but never
    personalised on the model in use are fitted at the first idle moment, with no new answer."""
    state = tmp_path / "dev"
    _answered_state(state, n=6)  # below the bundled model's input_affine_from: a head fit, fast
    dev = Device(state)
    dev.store.set("trained_feedback", "6")
    dev.store.close()
    config = tmp_path / "edge.toml"
    config.write_text("[training]\nmin_new_feedback = 4\nidle_seconds = 0\n")
    proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "--state", str(state), "--config", str(config),
                             "listen", "--feedback", "none", "--file", str(synthetic_clips[0].path), "--seconds",
                             "60"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, deadline = "", time.time() + 60
        while '{"trained"' not in out:  # the fit, at the first idle moment; then systemd's stop
            line = proc.stdout.readline()
            assert line and time.time() < deadline, f"no personalisation: {out}"
            out += line
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    out += rest
    trained = [json.loads(line)["trained"] for line in out.splitlines() if line.startswith('{"trained"')]
    assert len(trained) == 1 and trained[0]["status"] in ("kept", "discarded"), out
    dev = Device(state)
    assert not dev.personalisation_due()
    dev.store.close()


def test_wipe_data_removes_the_personal_files_and_serves_the_global_head(tmp_path, trained_model, rng):
    dev = Device(tmp_path / "dev", model_files=_files(trained_model), train_policy=TrainPolicy(**AFFINE_ONLY))
    global_head = dev.model.get_weights()
    _shifted_answers(dev, rng)
    assert dev.personalize().input_affine
    (dev.state_dir / "personal.head.corrupt-1").write_bytes(b"old")  # a copy moved aside earlier
    assert (dev.state_dir / "personal.input").exists()
    dev.store.set("trained_feedback", "12")
    seq = dev.store.next_sequence()
    dev.store.enqueue(seq, 0, b"a delta fitted on the answers")
    dev.store.mark_done(seq, "accepted", {"ok": True})
    dev.store.set("last_update", json.dumps({"seq": seq, "base_version": 0, "answers": "f" * 64, "retry_at": 5.0}))
    removed = dev.wipe_data()
    assert removed["predictions"] == 12
    # the fingerprint of the deleted answers goes; when this device may send again on that base stays
    assert json.loads(dev.store.get("last_update")) == {"seq": seq, "base_version": 0, "retry_at": 5.0}
    assert dev.store.get("trained_feedback") == "0" and not dev.personalisation_due()
    assert [(i.seq, i.state, bytes(i.envelope)) for i in dev.store.outbox_items()] == [(seq, "accepted", b"")]
    assert {"personal.head", "personal.input", "personal.head.corrupt-1"} <= set(removed["personal_files"])
    assert not list(dev.state_dir.glob("personal.*"))
    _unchanged(dev, global_head)
    assert dev.store.get("personal_input_sha256") == ""
    dev.store.close()
    again = Device(tmp_path / "dev", model_files=_files(trained_model))
    assert again.input_affine is None and not again.personalized and not again.problems
    again.store.close()


def test_a_trainer_on_more_threads_fits_the_same_and_bad_counts_are_refused(tmp_path, trained_model, rng):
    """``train_threads`` (config ``training.threads``) gives the trainer interpreter its own thread count: the same
    personalisation, a different speed (tools.bench_edge --train-threads 1,2 measures it)."""
    from edge_sdk.config import load_config
    from edge_sdk.errors import ParameterError

    fits = []
    for threads in (1, 2):
        dev = Device(tmp_path / f"t{threads}", model_files=_files(trained_model), train_threads=threads,
                     train_policy=TrainPolicy(**AFFINE_ONLY))
        assert dev.train_threads == threads and dev.num_threads == 1
        _shifted_answers(dev, np.random.default_rng(3))
        report = dev.personalize()
        fits.append((report.status, report.input_affine, dev.input_affine))
        dev.store.close()
    assert fits[0][:2] == fits[1][:2] == ("kept", True)
    for k in ("gain", "offset"):
        np.testing.assert_allclose(fits[0][2][k], fits[1][2][k], atol=1e-4)
    for bad in (0, -2, 65, True, 1.5):
        with pytest.raises(ParameterError, match="train_threads"):
            Device(tmp_path / "bad", model_files=_files(trained_model), train_threads=bad)
    auto = Device(tmp_path / "auto", model_files=_files(trained_model), num_threads=np.int64(2), train_threads=-1)
    assert (auto.num_threads, auto.train_threads) == (2, -1)  # -1: the runtime's choice
    auto.store.close()
    assert load_config(environ={"FEDSER_EDGE_TRAINING_THREADS": "3"}).training.threads == 3
    with pytest.raises(ParameterError, match="training.threads"):
        load_config(environ={"FEDSER_EDGE_TRAINING_THREADS": "0"})


def test_a_wipe_stops_a_personalisation_under_way_instead_of_waiting_for_it(tmp_path, trained_model, rng,
                                                                           monkeypatch):
    """The page's user deletes their data while the device fits their answers (10,000 steps: minutes if it ran on):
    the fit stops at its next step, keeps nothing, and the wipe goes through at once."""
    dev = Device(tmp_path / "dev", model_files=_files(trained_model),
                 train_policy=TrainPolicy(**{**AFFINE_ONLY, "input_affine_steps": 10_000}))
    global_head = dev.model.get_weights()
    _shifted_answers(dev, rng)
    calls, wiped = [], {}
    real = TFLiteModel.input_gradient

    def counted(self, *args, **kwargs):  # the real signature, counted; the 3rd call starts the wipe
        calls.append(1)
        if len(calls) == 3:
            threading.Thread(target=lambda: wiped.update(dev.wipe_data()), daemon=True).start()
            deadline = time.monotonic() + 10
            while not dev._wipes_waiting and time.monotonic() < deadline:
                time.sleep(0.01)
        if len(calls) > 50:
            raise AssertionError("the fit went on while a wipe waited for it")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TFLiteModel, "input_gradient", counted)
    report = dev.personalize()
    # not "cancelled" (listen stops on that: its caller asked): "skipped", and listen goes on
    assert report.status == "skipped" and "being deleted" in report.reason, report.to_dict()
    assert len(calls) <= 4
    deadline = time.monotonic() + 30
    while not wiped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert wiped["predictions"] == 12 and dev.store.examples() == []
    _unchanged(dev, global_head)
    assert dev.personalize().status != "cancelled"  # a later personalisation is not stopped (nothing to fit now)
    dev.store.close()
