"""Unsupervised correction of the class prior from a user's own unlabelled predictions (numpy only).

A model trained on balanced clips expects each emotion equally often; a user may not be like that, and a model
meeting a new population is often biased toward some classes. Three estimators, each returning a bias to add to
the model's log-probabilities (``shape [classes]``):

- :func:`uniform_bias`: the biases that make the mean corrected probabilities over the user's clips equal. Right
  only when the user really is balanced (it erases a true imbalance).
- :func:`em_prior` / :func:`em_bias`: Saerens, Latinne & Decaestecker (2002): EM re-estimates the user's class
  prior from the posteriors; the bias is ``log(estimated prior) - log(training prior)``.
- :func:`shrink`: any bias times ``n / (n + n0)``, so a device that has heard few clips barely moves.

Not in the device's prediction path: measured through it (tools/prior_study.py, docs/results/prior-correction),
none of these is safe for a user whose emotions are not balanced. The uniform correction lifts balanced test
users (the figures quoted for it) and costs users who are mostly neutral or mostly sad accuracy; EM, which
would keep a true imbalance, trusts posteriors that are not calibrated on a new user and amplifies the model's
own bias, costing balanced and imbalanced users alike.
"""

from __future__ import annotations

import numpy as np

from edge_sdk.errors import ParameterError

__all__ = ["uniform_bias", "em_prior", "em_bias", "shrink", "corrected", "estimate", "METHODS"]

METHODS = ("off", "uniform", "em")
_FLOOR = 1e-3  # smallest prior (and probability) an estimate may give a class: log stays finite


def _probs(posteriors: np.ndarray) -> np.ndarray:
    p = np.asarray(posteriors, np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ParameterError(f"posteriors must be [clips, classes >= 2], got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ParameterError("posteriors must be finite and non-negative")
    p = np.maximum(p, 1e-12)
    return p / p.sum(axis=1, keepdims=True)


def corrected(posteriors: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Probabilities ``softmax(log p + bias)`` for ``posteriors [clips, classes]`` (or one ``[classes]`` row)."""
    p = np.asarray(posteriors, np.float64)
    z = np.log(np.maximum(p, 1e-12)) + np.asarray(bias, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def uniform_bias(posteriors: np.ndarray, *, iterations: int = 50) -> np.ndarray:
    """Biases that make the mean corrected probabilities over ``posteriors [clips, classes]`` equal."""
    p = _probs(posteriors)
    bias = np.zeros(p.shape[1])
    for _ in range(iterations):
        bias -= np.log(np.maximum(corrected(p, bias).mean(axis=0), 1e-12) * p.shape[1])
    return bias - bias.mean()


def em_prior(posteriors: np.ndarray, train_prior: np.ndarray | None = None, *, iterations: int = 100,
             tol: float = 1e-6) -> np.ndarray:
    """The user's class prior re-estimated by EM from ``posteriors [clips, classes]`` made under ``train_prior``
    (uniform when None). Each class keeps at least ``1e-3``."""
    p = _probs(posteriors)
    k = p.shape[1]
    pt = np.full(k, 1.0 / k) if train_prior is None else np.asarray(train_prior, np.float64)
    if pt.shape != (k,) or np.any(pt <= 0):
        raise ParameterError(f"train_prior must be {k} positive numbers, got {train_prior!r}")
    pt = pt / pt.sum()
    prior = pt.copy()
    for _ in range(iterations):
        new = corrected(p, np.log(prior) - np.log(pt)).mean(axis=0)
        new = np.maximum(new, _FLOOR)
        new /= new.sum()
        done = np.abs(new - prior).max() < tol
        prior = new
        if done:
            break
    return prior


def em_bias(posteriors: np.ndarray, train_prior: np.ndarray | None = None, **kwargs) -> np.ndarray:
    """``log(em_prior) - log(train_prior)``."""
    p = _probs(posteriors)
    k = p.shape[1]
    pt = np.full(k, 1.0 / k) if train_prior is None else np.asarray(train_prior, np.float64) / np.sum(train_prior)
    return np.log(em_prior(p, pt, **kwargs)) - np.log(pt)


def shrink(bias: np.ndarray, n: int, n0: float) -> np.ndarray:
    """``bias * n / (n + n0)``: little evidence, little correction."""
    if n0 < 0:
        raise ParameterError(f"n0 must be >= 0, got {n0!r}")
    return np.asarray(bias, np.float64) * (n / (n + n0) if n + n0 > 0 else 0.0)


def estimate(posteriors: np.ndarray, method: str, *, n0: float = 0.0, min_clips: int = 1) -> np.ndarray:
    """The bias of ``method`` ("off", "uniform", "em") from ``posteriors``, shrunk with ``n0``; zeros with fewer
    than ``min_clips`` clips."""
    if method not in METHODS:
        raise ParameterError(f"prior correction method must be one of {METHODS}, got {method!r}")
    p = np.asarray(posteriors, np.float64)
    if method == "off" or p.ndim != 2 or len(p) < max(1, min_clips):
        return np.zeros(p.shape[-1] if p.ndim else 0)
    bias = uniform_bias(p) if method == "uniform" else em_bias(p)
    return shrink(bias, len(p), n0)
