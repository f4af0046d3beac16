"""The personal guard judges an update by what the user will see, not by the training loss.

The answers are built so that fine-tuning lowers the held-back answers' loss while it makes them shown worse
(a confidently wrong answer's large loss shrinks; marginally right answers flip). A loss-based guard keeps that
update; the accuracy guard (the default) discards it. Real TFLite model and feedback store; the global head is set
by hand so the embeddings' predictions are known.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.device import Device, TrainPolicy
from edge_sdk.errors import ParameterError

A, B = "angry", "happy"


def _device(tmp_path, trained_model, policy: TrainPolicy) -> Device:
    dev = Device(tmp_path / "dev", model_files=(trained_model.tflite_path, trained_model.metadata_path),
                 train_policy=policy)
    meta = dev.metadata
    assert list(meta.labels[:2]) == [A, B]
    emb_dim, hidden = {spec.name: spec.shape for spec in meta.head_layout}["w0"]
    head = {"w0": np.zeros((emb_dim, hidden), np.float32), "b0": np.zeros(hidden, np.float32),
            "w1": np.zeros((hidden, meta.num_classes), np.float32), "b1": np.zeros(meta.num_classes, np.float32)}
    for i in range(meta.num_classes):  # logits = relu(embedding[:C])
        head["w0"][i, i] = 1.0
        head["w1"][i, i] = 1.0
    dev.global_head = head
    dev.model.set_weights(head)
    return dev


def _answer(dev: Device, n: int, embedding: np.ndarray, answer: str) -> None:
    pid = f"p{n:03d}"  # ids sort in answer order (the store's order for equal timestamps)
    probs = dev.model.head_probs(embedding[None])[0]
    shown = dev.metadata.labels[int(np.argmax(probs))]
    dev.store.add_prediction(prediction_id=pid, model_version=0, label=shown, probs=probs, embedding=embedding,
                             features=None, latency_ms=0.0)
    dev.feedback(pid, answer)


def _embeddings(dev: Device) -> tuple[np.ndarray, np.ndarray]:
    u = np.zeros(dev.metadata.embedding_dim, np.float32)
    v = np.zeros(dev.metadata.embedding_dim, np.float32)
    u[0] = 12.0  # shown angry with p ~ 1 - 1e-5: a wrong answer here has a large loss
    v[0], v[1] = 1.0, 0.6  # shown angry with p ~ 0.42, happy next
    return u, v


# One held-back slice (every 2nd answer), ties kept, no replay set, no balancing: the construction's arithmetic.
POLICY = dict(min_examples=4, holdout_every=2, epochs=40, min_steps=0, learning_rate=0.5, replay_weight=0.0,
              guard_folds=0, tolerance=1e-4, balance_classes=False)


def _loss_falls_while_accuracy_falls(dev: Device, *, thumbs_down: bool) -> None:
    """Training answers (even positions) push both embeddings to happy; the held-back ones (odd positions) say
    v is angry (thumbs-up, three times) and u is not angry (a correction to happy, or a bare thumbs-down)."""
    u, v = _embeddings(dev)
    train = [(v, B), (u, B), (v, B), (u, B), (v, B)]
    held = [(v, "up"), (u, "down" if thumbs_down else B), (v, "up"), (u, "down" if thumbs_down else B), (v, "up")]
    for k in range(5):
        _answer(dev, 2 * k, *train[k])
        _answer(dev, 2 * k + 1, *held[k])


@pytest.mark.parametrize("thumbs_down", [False, True], ids=["corrections", "bare-thumbs-down"])
def test_loss_guard_keeps_an_update_that_shows_the_user_worse_and_the_accuracy_guard_does_not(
        tmp_path, trained_model, thumbs_down):
    loss_dev = _device(tmp_path / "loss", trained_model, TrainPolicy(guard="loss", **POLICY))
    _loss_falls_while_accuracy_falls(loss_dev, thumbs_down=thumbs_down)
    loss_report = loss_dev.personalize()
    # The construction holds: the held-back loss fell, and the update is kept by the loss guard ...
    assert loss_report.loss_after < loss_report.loss_before - 0.5
    assert loss_report.status == "kept" and loss_report.held_back == 5
    # ... although it shows the user's held-back answers worse (3 of 5 right before, 2 of 5 after).
    u, v = _embeddings(loss_dev)
    labels = loss_dev.metadata.labels
    personal = [labels[int(np.argmax(p))] for p in loss_dev.model.head_probs(np.stack([u, v]))]
    assert personal == [B, B]

    acc_dev = _device(tmp_path / "acc", trained_model, TrainPolicy(**POLICY))  # the default guard
    assert acc_dev.train_policy.guard == "accuracy"
    _loss_falls_while_accuracy_falls(acc_dev, thumbs_down=thumbs_down)
    report = acc_dev.personalize()
    assert report.status == "discarded" and not acc_dev.personalized
    assert report.score_before == pytest.approx(0.6) and report.score_after == pytest.approx(0.4)
    for name, value in acc_dev.model.get_weights().items():  # the user keeps seeing the global head
        np.testing.assert_array_equal(value, acc_dev.global_head[name])


def test_a_bare_thumbs_down_counts_as_shown_right_once_the_rejected_label_is_no_longer_chosen(tmp_path,
                                                                                           trained_model):
    """Held-back bare thumbs-down on u (shown angry): the update that stops choosing angry for u is kept."""
    dev = _device(tmp_path, trained_model, TrainPolicy(**POLICY))
    u, _ = _embeddings(dev)
    for k in range(8):
        _answer(dev, k, u, B if k % 2 == 0 else "down")
    report = dev.personalize()
    assert report.status == "kept" and dev.personalized
    assert report.score_before == 0.0 and report.score_after == 1.0
    assert dev.metadata.labels[int(np.argmax(dev.model.head_probs(u[None])[0]))] != A


def test_cross_validated_guard_judges_every_answer_and_then_fits_on_all(tmp_path, trained_model):
    """guard_folds: all answers are judged by fits on the other fold; kept, the kept head is fitted on all."""
    dev = _device(tmp_path, trained_model, TrainPolicy(**{**POLICY, "guard_folds": 2}))
    u, _ = _embeddings(dev)
    for k in range(8):
        _answer(dev, k, u, B)
    report = dev.personalize()
    assert report.status == "kept" and report.examples == 8 and report.held_back == 0
    assert report.score_before == 0.0 and report.score_after == 1.0
    assert dev.metadata.labels[int(np.argmax(dev.model.head_probs(u[None])[0]))] == B
    # The next update's answer report scores the answers out of fold (the kept head trained on all of them).
    assert dev._cv_answer_report(dev._examples()) == {"answers_scored": 8, "personal_correct": 8,
                                                      "global_correct": 0}
    _answer(dev, 8, u, B)  # another answer: the saved report no longer describes the update's answers
    assert dev._cv_answer_report(dev._examples())["answers_scored"] == 0


def test_a_discarded_fit_reports_the_personal_head_that_stays_in_use(tmp_path, trained_model):
    """A personal head is kept; a later fit is discarded: that head goes on serving (personalized stays True), so
    the answer report scores it, not the global head (review item 5)."""
    dev = _device(tmp_path, trained_model, TrainPolicy(**{**POLICY, "guard_folds": 2}))
    u, _ = _embeddings(dev)
    for k in range(8):
        _answer(dev, k, u, B)
    assert dev.personalize().status == "kept"
    _answer(dev, 8, u, B)
    dev.train_policy = TrainPolicy(**{**POLICY, "guard_folds": 2, "guard_margin": 100.0})  # nothing passes
    report = dev.personalize()
    assert report.status == "discarded" and dev.personalized
    assert dev.metadata.labels[int(np.argmax(dev.model.head_probs(u[None])[0]))] == B  # the kept head serves
    assert dev._cv_answer_report(dev._examples()) == {"answers_scored": 9, "personal_correct": 9,
                                                      "global_correct": 0}


def test_cross_validated_guard_discards_fits_that_show_the_other_answers_worse(tmp_path, trained_model):
    """The user says v is angry and happy by turns: each fold's fit gets the other fold wrong (0 of 8) where the
    global head shows half of the answers right; the update is discarded."""
    dev = _device(tmp_path, trained_model, TrainPolicy(**{**POLICY, "guard_folds": 2}))
    _, v = _embeddings(dev)
    for k in range(8):
        _answer(dev, k, v, "up" if k % 2 else B)
    report = dev.personalize()
    assert report.status == "discarded" and not dev.personalized
    assert report.score_before == 0.5 and report.score_after == 0.0


def test_cross_validated_guard_wants_a_margin_of_answers_before_it_keeps_a_fit(tmp_path, trained_model):
    """guard_margin: the fit must show guard_margin * sqrt(n) more answers right than the global head."""
    for margin, status in ((0.5, "kept"), (3.0, "discarded")):  # 5 of 5 more right: 5 >= 0.5 * sqrt(5), < 3 * sqrt(5)
        dev = _device(tmp_path / str(margin), trained_model,
                      TrainPolicy(**{**POLICY, "guard_folds": 5, "guard_margin": margin}))
        u, _ = _embeddings(dev)
        for k in range(5):
            _answer(dev, k, u, B)
        report = dev.personalize()
        assert (report.status, report.score_before, report.score_after) == (status, 0.0, 1.0), report.reason
        if status == "discarded":
            assert "sqrt" in report.reason and not dev.personalized


def test_unknown_guard_is_refused():
    with pytest.raises(ParameterError, match="guard"):
        TrainPolicy(guard="vibes")


def test_paired_guard_test_counts_only_the_answers_in_dispute(tmp_path, trained_model):
    """guard_test="paired": the margin scales with the answers on which the fit and the global head disagree.
    Five corrections (u is happy, not angry) the fit gets right and the global head wrong, fifteen thumbs-up
    (v is angry) that both show right: 5 more right of 20 is below 1.5 * sqrt(20) = 6.7, above 1.5 * sqrt(5)."""
    for test, status in (("answers", "discarded"), ("paired", "kept")):
        dev = _device(tmp_path / test, trained_model,
                      TrainPolicy(**{**POLICY, "guard_folds": 5, "guard_margin": 1.5, "guard_test": test}))
        u, v = (np.zeros(dev.metadata.embedding_dim, np.float32) for _ in range(2))
        u[0], u[dev.metadata.num_classes + 1] = 2.0, 4.0  # shown angry; a dimension of its own to learn happy from
        v[0] = 3.0  # shown angry, rightly
        for k in range(20):
            _answer(dev, k, u, B) if k % 4 == 0 else _answer(dev, k, v, "up")
        report = dev.personalize()
        assert (report.status, report.score_before, report.score_after) == (status, 0.75, 1.0), report.reason


def test_down_credit_is_what_a_no_longer_chosen_rejected_label_counts_for(tmp_path, trained_model):
    dev = _device(tmp_path, trained_model, TrainPolicy(**{**POLICY, "guard_folds": 5, "guard_margin": 0.0,
                                                          "down_credit": 0.25, "thumbs_min_answers": 0}))
    u, _ = _embeddings(dev)
    for k in range(5):
        _answer(dev, k, u, "down")
    report = dev.personalize()
    assert (report.status, report.score_before, report.score_after) == ("kept", 0.0, 0.25)


@pytest.mark.parametrize("field, value", [("guard_test", "vibes"), ("down_credit", 1.5), ("down_credit", -0.1)])
def test_bad_guard_settings_are_refused_with_the_name(field, value):
    with pytest.raises(ParameterError, match=field):
        TrainPolicy(**{field: value})


def _correct_every(dev: Device, every: int, n: int) -> None:
    """n answers: every ``every``-th a correction to B of an embedding the global head calls angry, the others a
    thumbs-up of a clearly angry one (a fit gets them all right; the global head 1 - 1/every of them)."""
    u, v = (np.zeros(dev.metadata.embedding_dim, np.float32) for _ in range(2))
    u[0], u[dev.metadata.num_classes + 1] = 2.0, 4.0
    v[0] = 3.0
    for k in range(n):
        _answer(dev, k, u, B) if k % every == 0 else _answer(dev, k, v, "up")


def test_adapt_all_from_waives_the_margin_for_every_user_with_that_many_answers(tmp_path, trained_model):
    """adapt_all_from: a user the global head serves well (7 of 10 answers right, above adapt_below) whose answers
    are corrections and thumbs-up gets the margin waived once they have that many answers, as a user it fails does;
    with fewer the margin stands. Bounds are checked with the field's name."""
    strict = {**POLICY, "guard_folds": 5, "guard_margin": 3.0, "guard_test": "paired", "adapt_below": 0.6}
    for adapt_all_from, status in ((0, "discarded"), (11, "discarded"), (10, "kept")):
        dev = _device(tmp_path / str(adapt_all_from), trained_model,
                      TrainPolicy(**strict, adapt_all_from=adapt_all_from))
        _correct_every(dev, 4, 10)
        report = dev.personalize()
        assert (report.status, report.score_before, report.score_after) == (status, 0.7, 1.0), report.reason
        assert ("every user from 10 answers" in report.guard) == (status == "kept"), report.guard
    # only users whose corrections are at least as many as their bare thumbs-down: a thumbs-up-only user (nothing
    # to gain, the fit cannot be shown better) and a mostly-thumbs-down user keep the margin
    for name, answers in (("ups", ["up"] * 10), ("downs", [B, "down", "down"] + ["up"] * 7)):
        dev = _device(tmp_path / name, trained_model, TrainPolicy(**strict, adapt_all_from=10))
        _, v = _embeddings(dev)
        for k, a in enumerate(answers):
            _answer(dev, k, v, a)
        report = dev.personalize()
        assert report.status == "discarded" and "every user" not in report.guard, (name, report.guard)
    for bad in (-1, 2.5, True):
        with pytest.raises(ParameterError, match="adapt_all_from"):
            TrainPolicy(adapt_all_from=bad)


def test_adapt_below_keeps_fits_for_users_the_global_head_fails_unless_they_show_worse(tmp_path, trained_model):
    """adapt_below: with the global head showing fewer than that share of the answers right, a fit is kept unless
    cross-validation shows the answers worse by the margin (here a margin no fit could clear: 3 * sqrt(10))."""
    strict = {**POLICY, "guard_folds": 5, "guard_margin": 3.0, "guard_test": "paired"}
    for adapt_below, status in ((0.0, "discarded"), (0.6, "kept")):
        dev = _device(tmp_path / str(adapt_below), trained_model, TrainPolicy(**strict, adapt_below=adapt_below))
        _correct_every(dev, 2, 10)
        report = dev.personalize()
        assert (report.status, report.score_before, report.score_after) == (status, 0.5, 1.0), report.reason
        # trust_corrections (the default) for the user the global head fails: the margin waived, the fit kept
        assert ("corrections trusted" in report.guard) == (adapt_below == 0.6)
    # ... but a fit that shows the answers worse is still discarded (v is angry and happy by turns: 0.5 -> 0.0),
    # also when the corrections are trusted (trust_corrections waives the margin, not the shown-worse check)
    for trust, status in ((False, "discarded"), (True, "discarded")):
        dev = _device(tmp_path / f"worse-{trust}", trained_model,
                      TrainPolicy(**{**POLICY, "guard_folds": 2}, adapt_below=0.6, adapt_below_answers=8,
                                  trust_corrections=trust))
        _, v = _embeddings(dev)
        for k in range(8):
            _answer(dev, k, v, "up" if k % 2 else B)
        report = dev.personalize()
        assert (report.status, report.score_before, report.score_after) == (status, 0.5, 0.0)
        assert "below 0.6" in report.guard and ("corrections trusted" in report.guard) == trust
        assert report.reason == "cross-validated answers got worse (accuracy)" and not dev.personalized
    # trust_keeps_worse: the trusted fit is kept all the same (an untrusted one is not)
    for trust, status in ((False, "discarded"), (True, "kept")):
        dev = _device(tmp_path / f"keeps-{trust}", trained_model,
                      TrainPolicy(**{**POLICY, "guard_folds": 2}, adapt_below=0.6, adapt_below_answers=8,
                                  trust_corrections=trust, trust_keeps_worse=True))
        _, v = _embeddings(dev)
        for k in range(8):
            _answer(dev, k, v, "up" if k % 2 else B)
        report = dev.personalize()
        assert (report.status, report.score_before, report.score_after) == (status, 0.5, 0.0)
        assert dev.personalized == trust


def _thumbs_down_crowd(dev: Device) -> tuple[np.ndarray, np.ndarray]:
    """Eight bare thumbs-down on u (shown angry, wrongly) and two thumbs-up on v (shown angry, rightly), u and v
    alike (two utterances the head cannot tell apart): moving u away from angry moves v too."""
    u = np.zeros(dev.metadata.embedding_dim, np.float32)
    u[0], u[1] = 1.0, 0.5
    v = u.copy()
    for k in range(10):
        _answer(dev, k, v, "up") if k % 5 == 4 else _answer(dev, k, u, "down")
    return u, v


def test_a_thumbs_down_only_update_never_flips_a_confirmed_answer(tmp_path, trained_model):
    """Bare thumbs-down and thumbs-up, no correction: with thumbs_flips 0 a fit that shows a thumbs-up answer
    otherwise (out of fold or after the fit on all) is discarded; without the rule (-1, the behaviour before) the
    guard kept this one, which shows both confirmed answers otherwise."""
    base = {**POLICY, "guard_folds": 5, "adapt_below": 0.6, "adapt_below_answers": 10, "down_credit": 0.33,
            "thumbs_min_answers": 10}  # the crowd is 10 answers
    old = _device(tmp_path / "old", trained_model, TrainPolicy(**base, thumbs_flips=-1))
    _, v = _thumbs_down_crowd(old)
    assert old.personalize().status == "kept"
    assert old.metadata.labels[int(np.argmax(old.model.head_probs(v[None])[0]))] != A  # a confirmed answer flipped
    new = _device(tmp_path / "new", trained_model, TrainPolicy(**base, thumbs_flips=0))
    _, v = _thumbs_down_crowd(new)
    report = new.personalize()
    assert report.status == "discarded" and not new.personalized and "thumbs only" in report.guard
    assert report.confirmed_flipped == 2
    # ... also when the margin would pass it (the flip rule alone)
    flips = _device(tmp_path / "flips", trained_model, TrainPolicy(**{**base, "guard_margin": -1.0}, thumbs_flips=0))
    _thumbs_down_crowd(flips)
    report = flips.personalize()
    assert report.status == "discarded" and "2 confirmed answers shown otherwise" in report.reason
    assert new.metadata.labels[int(np.argmax(new.model.head_probs(v[None])[0]))] == A


def test_thumbs_rule_leaves_corrections_to_the_guard(tmp_path, trained_model):
    """With a correction among the answers the update is not thumbs-down only: the guard alone decides."""
    dev = _device(tmp_path, trained_model, TrainPolicy(**{**POLICY, "guard_folds": 5, "thumbs_flips": 0}))
    u, _ = _embeddings(dev)
    for k in range(6):
        _answer(dev, k, u, B if k % 2 == 0 else "down")
    report = dev.personalize()
    assert report.status == "kept" and "thumbs only" not in report.guard


def test_a_thumbs_down_only_fit_waits_for_enough_answers(tmp_path, trained_model):
    """Bare thumbs-down and thumbs-up only: below thumbs_min_answers (20 by default; 10 here) no fit is tried and
    the head in use stays; from 10 answers, or with the rule off (0), the guard judges the fit as before. A
    correction among the answers lifts the wait."""
    assert TrainPolicy().thumbs_min_answers == 20
    base = {**POLICY, "guard_folds": 5, "guard_margin": -1.0, "thumbs_flips": -1, "thumbs_min_answers": 10}
    dev = _device(tmp_path / "wait", trained_model, TrainPolicy(**base))
    u, v = _embeddings(dev)
    for k in range(9):
        _answer(dev, k, v, "up") if k % 3 == 2 else _answer(dev, k, u, "down")
    report = dev.personalize()
    assert report.status == "skipped" and "thumbs_min_answers" in report.reason and report.examples == 9
    assert not dev.personalized
    _answer(dev, 9, u, "down")
    assert dev.personalize().status == "kept"  # 10 answers: judged (a negative margin keeps it)
    off = _device(tmp_path / "off", trained_model, TrainPolicy(**{**base, "thumbs_min_answers": 0}))
    for k in range(6):
        _answer(off, k, v, "up") if k % 3 == 2 else _answer(off, k, u, "down")
    assert off.personalize().status == "kept"
    corrected = _device(tmp_path / "corrected", trained_model, TrainPolicy(**base))
    for k in range(6):
        _answer(corrected, k, u, B if k == 0 else "down")
    assert corrected.personalize().status == "kept"
    with pytest.raises(ParameterError, match="thumbs_min_answers"):
        TrainPolicy(thumbs_min_answers=-1)


def test_a_thumbs_down_only_fit_wants_a_share_of_thumbs_up(tmp_path, trained_model):
    """thumbs_min_up_share (off by default): bare thumbs-down and thumbs-up only, a fit is tried only when at least
    that share of the answers are thumbs-up; at the share it is judged as before; corrections are not affected."""
    assert TrainPolicy().thumbs_min_up_share == 0.0
    base = {**POLICY, "guard_folds": 5, "guard_margin": -1.0, "thumbs_flips": -1, "thumbs_min_answers": 0,
            "thumbs_min_up_share": 0.4}
    dev = _device(tmp_path / "few", trained_model, TrainPolicy(**base))
    u, v = _embeddings(dev)
    for k in range(10):  # 3 thumbs-up of 10
        _answer(dev, k, v, "up") if k % 3 == 2 else _answer(dev, k, u, "down")
    report = dev.personalize()
    assert report.status == "skipped" and report.examples == 10
    assert "3 thumbs-up of 10 answers" in report.reason and "thumbs_min_up_share" in report.reason
    assert not dev.personalized
    _answer(dev, 10, v, "up")  # 4 of 11 is still short of 0.4
    assert dev.personalize().status == "skipped"
    _answer(dev, 11, v, "up")  # 5 of 12: judged (a negative margin keeps it)
    assert dev.personalize().status == "kept"
    exact = _device(tmp_path / "exact", trained_model, TrainPolicy(**{**base, "thumbs_min_up_share": 0.28}))
    for k in range(25):  # 7 of 25 is exactly 0.28 (7 < 0.28 * 25 in floating point)
        _answer(exact, k, v, "up") if k < 7 else _answer(exact, k, u, "down")
    assert exact.personalize().status == "kept"
    corrected = _device(tmp_path / "corrected", trained_model, TrainPolicy(**base))
    for k in range(6):
        _answer(corrected, k, u, B if k == 0 else "down")
    assert corrected.personalize().status == "kept"
    for bad in (-0.1, 1.5, True, "0.4", float("nan")):
        with pytest.raises(ParameterError, match="thumbs_min_up_share"):
            TrainPolicy(thumbs_min_up_share=bad)


def test_a_trusted_fit_is_the_plain_fine_tune_unless_balanced(tmp_path, trained_model):
    """A user the global head fails, with corrections: the kept head is the plain fine-tune of the answers (no
    replay, no class balancing: the same Adam fit as a policy that asks for exactly that, to the bit); with
    trust_balance_classes the fit is class-balanced and differs (the answers' classes are 7 happy to 3 angry)."""
    def answered(name: str, policy: TrainPolicy) -> Device:
        dev = _device(tmp_path / name, trained_model, policy)
        u, v = _embeddings(dev)
        for k in range(10):  # shown angry every time; 7 corrections to happy, 3 thumbs-up
            _answer(dev, k, u if k % 3 else v, B if k % 3 else "up")
        return dev

    trusted = answered("trusted", TrainPolicy(guard_folds=5, guard_margin=0.5, seed=1))
    report = trusted.personalize()
    assert report.status == "kept" and "corrections trusted" in report.guard and "unbalanced" in report.guard
    plain = answered("plain", TrainPolicy(holdout_every=0, balance_classes=False, replay_weight=0.0, seed=1))
    assert plain.personalize().status == "kept"
    balanced = answered("balanced", TrainPolicy(guard_folds=5, guard_margin=0.5, seed=1, trust_balance_classes=True))
    assert balanced.personalize().status == "kept"
    got, ref, bal = trusted.model.get_weights(), plain.model.get_weights(), balanced.model.get_weights()
    for k in got:
        np.testing.assert_array_equal(got[k], ref[k])
    assert max(float(np.abs(bal[k] - got[k]).max()) for k in got) > 1e-4


def test_a_thumbs_only_fit_takes_its_own_adam_rate_and_steps(tmp_path, trained_model):
    """Bare thumbs-down and thumbs-up only: the fit runs at thumbs_adam_learning_rate for thumbs_adam_steps (the
    same head, to the bit, as a policy whose adam_* are those values); with a correction among the answers they are
    not used (the same head as without them)."""
    base = {"holdout_every": 0, "thumbs_min_answers": 0, "seed": 3}

    def fitted(name: str, policy: TrainPolicy, correction: bool) -> dict:
        dev = _device(tmp_path / name, trained_model, policy)
        u, v = _embeddings(dev)
        for k in range(8):
            _answer(dev, k, v, "up") if k % 4 == 3 else _answer(dev, k, u, B if correction and k == 0 else "down")
        assert dev.personalize().status == "kept"
        return dev.model.get_weights()

    gentle = {"thumbs_adam_learning_rate": 0.003, "thumbs_adam_steps": 40}
    for correction in (False, True):
        got = fitted(f"gentle-{correction}", TrainPolicy(**base, **gentle), correction)
        same_as = {"adam_learning_rate": 0.003, "adam_steps": 40} if not correction else {}
        ref = fitted(f"ref-{correction}", TrainPolicy(**base, **same_as), correction)
        default = fitted(f"default-{correction}", TrainPolicy(**base), correction)
        for k in got:
            np.testing.assert_array_equal(got[k], ref[k])
        moved = max(float(np.abs(default[k] - got[k]).max()) for k in got)
        assert (moved > 1e-4) if not correction else moved == 0.0
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ParameterError, match="thumbs_adam"):
            TrainPolicy(thumbs_adam_learning_rate=bad)
        with pytest.raises(ParameterError, match="thumbs_adam"):
            TrainPolicy(thumbs_adam_steps=bad)
    with pytest.raises(ParameterError, match="thumbs_adam_steps"):
        TrainPolicy(thumbs_adam_steps=2.5)
    assert TrainPolicy(thumbs_adam_steps=np.int64(40)).thumbs_adam_steps == 40


def test_the_thumbs_only_rate_reaches_the_cross_validated_fits(tmp_path, trained_model):
    """The shipped path (5-fold cross-validation): the thumbs-only Adam rate changes what the guard sees and what
    it keeps (a rate of 1e-9 leaves every fold's fit the global head, so nothing is shown better)."""
    def report(name: str, **over):
        dev = _device(tmp_path / name, trained_model, TrainPolicy(thumbs_min_answers=0, seed=2, **over))
        u, v = _embeddings(dev)
        for k in range(10):
            _answer(dev, k, v, "up") if k % 5 == 4 else _answer(dev, k, u, "down")
        return dev.personalize()

    still = report("still", thumbs_adam_learning_rate=1e-9, guard_margin=-1.0, thumbs_flips=-1)
    moving = report("moving", guard_margin=-1.0, thumbs_flips=-1)
    assert "5-fold" in still.guard and still.score_after == still.score_before == 0.2
    assert moving.score_after != still.score_after
