"""The prior-correction estimators (edge_sdk/prior.py) on synthetic posteriors with a known truth."""

import numpy as np
import pytest

from edge_sdk.errors import ParameterError
from edge_sdk.prior import corrected, em_bias, em_prior, estimate, shrink, uniform_bias


def _stream(rng, mix, n=2000, k=4, sep=2.0):
    """Labels drawn with class mix ``mix`` and the exact posteriors of a model trained on balanced classes
    (unit Gaussians at sep * one-hot means): calibrated under the uniform training prior."""
    y = rng.choice(k, size=n, p=mix)
    x = rng.normal(size=(n, k)) + sep * np.eye(k)[y]
    logits = sep * x  # log N(x; sep*e_c, I) up to a term shared by every class
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True), y


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_em_recovers_an_imbalanced_prior_and_uniform_erases_it(rng):
    mix = np.array([0.1, 0.1, 0.6, 0.2])  # mostly "neutral", as an everyday user
    p, y = _stream(rng, mix)
    est = em_prior(p)
    assert np.abs(est - mix).max() < 0.04, est
    assert np.allclose(corrected(p, em_bias(p)).mean(axis=0), est, atol=1e-3)
    # The uniform correction makes the mean corrected probabilities equal whatever the user is like...
    assert np.allclose(corrected(p, uniform_bias(p)).mean(axis=0), 0.25, atol=1e-3)
    # ...which costs this user accuracy, where the EM estimate (calibrated posteriors) gains it.
    acc = {name: np.mean(np.argmax(np.log(p) + b, axis=1) == y)
           for name, b in (("none", 0.0), ("uniform", uniform_bias(p)), ("em", em_bias(p)))}
    assert acc["uniform"] < acc["none"] - 0.03 < acc["em"] - 0.03, acc


def test_on_a_balanced_user_em_stays_near_uniform_and_uniform_undoes_a_model_bias(rng):
    p, y = _stream(rng, np.full(4, 0.25))
    assert np.abs(em_prior(p) - 0.25).max() < 0.03
    biased = corrected(p, np.array([0.0, 0.0, -1.5, 0.0]))  # a model that under-calls class 2 on this user
    before = np.mean(np.argmax(biased, axis=1) == y)
    after = np.mean(np.argmax(np.log(biased) + uniform_bias(biased), axis=1) == y)
    assert after > before + 0.03
    # EM takes the bias for the user's prior and keeps it (the failure measured on new users)
    assert em_prior(biased)[2] < 0.15


def test_shrink_and_estimate(rng):
    p, _ = _stream(rng, np.array([0.1, 0.1, 0.6, 0.2]), n=30)
    full = estimate(p, "uniform")
    assert np.allclose(estimate(p, "uniform", n0=30), full / 2)
    assert np.allclose(shrink(full, 0, 20), 0)
    assert np.allclose(estimate(p, "off"), 0) and estimate(p, "off").shape == (4,)
    assert np.allclose(estimate(p[:5], "em", min_clips=10), 0)
    assert np.all(np.isfinite(estimate(p[:1], "em")))  # one clip: an extreme prior, floored, still finite


@pytest.mark.parametrize("bad", [np.ones(4), np.full((3, 1), 1.0), np.array([[0.5, np.nan], [0.5, 0.5]]),
                                 np.array([[1.5, -0.5], [0.5, 0.5]])])
def test_bad_posteriors_are_refused(bad):
    with pytest.raises(ParameterError):
        uniform_bias(bad)
    with pytest.raises(ParameterError):
        em_prior(bad)


def test_bad_options_are_refused(rng):
    p, _ = _stream(rng, np.full(4, 0.25), n=10)
    with pytest.raises(ParameterError, match="method"):
        estimate(p, "median")
    with pytest.raises(ParameterError, match="train_prior"):
        em_prior(p, np.array([0.5, 0.5]))
    with pytest.raises(ParameterError, match="n0"):
        shrink(np.zeros(4), 10, -1)
