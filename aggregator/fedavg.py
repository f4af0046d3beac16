"""Aggregation as pure functions over flat arrays and example counts: no Flask, no database, no I/O.

This is the one aggregation path: :func:`aggregation_weights` turns the updates' self-reported example
counts (and staleness) into weights, :func:`aggregate` combines the update vectors (clipping each one
first, when asked) by a weighted mean, a coordinate-wise median or a trimmed mean, and
:class:`ServerOptimizer` takes the server's step with the result. ``aggregator.rounds`` streams the
round's update bodies from the database through these functions; the tests pin them on hand-computed
arrays.

A device reports its own number of examples, and it is the FedAvg weight: unchecked, one device that
claims 10**15 examples *is* the round. :func:`aggregation_weights` caps each count, absolutely
(``max_examples``) and relative to the round (``median_multiple`` times the round's median count), before
the staleness discount.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["AGGREGATION_METHODS", "Aggregate", "aggregation_weights", "clip_vector", "weighted_mean",
           "coordinate_median", "trimmed_mean", "trim_count", "aggregate", "l2_norm", "unflatten",
           "ServerOptimizer", "SERVER_OPTIMIZERS", "DEFAULT_SERVER_LR"]

Arrays = Mapping[str, np.ndarray]
AGGREGATION_METHODS = ("fedavg", "median", "trimmed_mean")


def l2_norm(arrays: Arrays) -> float:
    """L2 norm of all the arrays together (float64)."""
    return float(np.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays.values())))


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """One flat vector back into named arrays, in ``shapes`` order."""
    out, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) if shape else 1
        out[name] = vector[offset: offset + size].reshape(shape).astype(np.float32)
        offset += size
    if offset != vector.size:
        raise ValueError(f"vector has {vector.size} values, the shapes need {offset}")
    return out


def aggregation_weights(num_examples: Sequence[int], staleness: Sequence[int] | None = None, *,
                        max_examples: float = 0.0, median_multiple: float = 0.0,
                        staleness_exponent: float = 0.5) -> tuple[np.ndarray, int]:
    """The FedAvg weight of each update, and how many counts were capped.

    ``w_k = min(n_k, max_examples, median_multiple * median(n)) / (1 + s_k) ** staleness_exponent``
    where a cap of 0 is off and ``median(n)`` is the lower median of the round's counts (with two
    updates, the smaller one: a second device cannot raise the cap by inflating its own count).
    """
    n = np.asarray(num_examples, np.float64)
    if n.ndim != 1 or not n.size:
        raise ValueError("no example counts to weigh")
    if (n <= 0).any():
        raise ValueError(f"example counts must be positive, got {n.min()}")
    s = np.zeros_like(n) if staleness is None else np.asarray(staleness, np.float64)
    if s.shape != n.shape:
        raise ValueError(f"{s.size} staleness values for {n.size} counts")
    if (s < 0).any():
        raise ValueError(f"staleness must be >= 0, got {s.min()}")
    cap = np.inf
    if max_examples > 0:
        cap = float(max_examples)
    if median_multiple > 0:
        lower_median = float(np.sort(n)[(n.size - 1) // 2])
        cap = min(cap, median_multiple * lower_median)
    capped = int(np.count_nonzero(n > cap))
    return np.minimum(n, cap) / (1.0 + s) ** staleness_exponent, capped


def clip_vector(vector: np.ndarray, max_norm: float) -> np.ndarray:
    """``vector`` scaled down to L2 norm ``max_norm`` when larger (``max_norm <= 0``: unchanged)."""
    if max_norm <= 0:
        return vector
    v64 = np.asarray(vector, np.float64)
    norm = float(np.sqrt(np.dot(v64, v64)))
    if norm <= max_norm:
        return vector
    return (v64 * (max_norm / norm)).astype(np.float32)


def weighted_mean(vectors: Iterable[np.ndarray], weights: Sequence[float], size: int) -> np.ndarray:
    """``sum(w_k * v_k) / sum(w_k)``, accumulated in float64, one vector in memory at a time."""
    acc, tmp = np.zeros(size, np.float64), np.empty(size, np.float64)
    weights = [float(w) for w in weights]
    count = 0
    for vec, w in zip(vectors, weights, strict=False):
        if w <= 0:
            raise ValueError(f"weight must be positive, got {w}")
        if vec.shape != (size,):
            raise ValueError(f"vector has shape {vec.shape}, expected ({size},)")
        np.multiply(vec, w, out=tmp)
        acc += tmp
        count += 1
    if count != len(weights) or not count:
        raise ValueError(f"{count} vectors for {len(weights)} weights")
    return (acc / sum(weights)).astype(np.float32)


def trim_count(n: int, trim_fraction: float) -> int:
    """Values cut from *each* end by the trimmed mean of ``n`` values.

    ``floor(trim_fraction * n)``, but at least one when ``trim_fraction > 0`` and ``n >= 3``: an admin who
    chose a trimmed mean gets one even in a round of fewer than ``1 / trim_fraction`` updates. With one or
    two updates nothing can be cut (the round records ``trimmed_per_end: 0`` and the server logs it).
    """
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    k = int(np.floor(trim_fraction * n))
    if trim_fraction > 0 and n >= 3:
        k = max(k, 1)
    return k


def coordinate_median(rows: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of ``[N, P]`` (Yin et al. 2018); example counts are ignored."""
    return np.median(np.asarray(rows, np.float64), axis=0).astype(np.float32)


def trimmed_mean(rows: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Coordinate-wise mean after dropping the :func:`trim_count` largest and smallest values."""
    v = np.sort(np.asarray(rows, np.float64), axis=0)
    k = trim_count(v.shape[0], trim_fraction)
    return v[k: v.shape[0] - k].mean(axis=0).astype(np.float32)


@dataclass
class Aggregate:
    """The result of :func:`aggregate`: the combined delta and what the admin should know about it."""

    delta: np.ndarray
    num_updates: int
    clipped: int = 0  # updates scaled down to clip_norm
    trimmed_per_end: int | None = None  # trimmed_mean only
    notes: list[str] = field(default_factory=list)


def aggregate(source: Callable[[], Iterable[np.ndarray]], weights: Sequence[float], size: int, *,
              method: str = "fedavg", clip_norm: float = 0.0, trim_fraction: float = 0.1,
              memory_bytes: int = 64 << 20) -> Aggregate:
    """Combine the update vectors that ``source()`` yields (flat float32, ``size`` values each).

    ``weights[k]`` is the weight of the k-th vector (:func:`aggregation_weights`); the median and the
    trimmed mean ignore it. Each vector is clipped to ``clip_norm`` first (0: off). ``source`` may be
    called more than once: the robust methods split the coordinates into blocks so that ``N x block``
    float32 values fit in ``memory_bytes`` and stream every vector again per block.
    """
    if method not in AGGREGATION_METHODS:
        raise ValueError(f"unknown aggregation method {method!r}; choose one of {AGGREGATION_METHODS}")
    count = len(weights)
    if not count:
        raise ValueError("no updates to aggregate")
    clipped = 0

    def vectors():
        nonlocal clipped
        clipped = 0
        for vec in source():
            out = clip_vector(vec, clip_norm)
            clipped += out is not vec
            yield out

    if method == "fedavg":
        return Aggregate(weighted_mean(vectors(), weights, size), count, clipped)
    block = max(1, min(size, memory_bytes // (4 * count)))
    out = np.empty(size, np.float32)
    for lo in range(0, size, block):
        hi = min(size, lo + block)
        rows = np.stack([np.asarray(v, np.float32)[lo:hi] for v in vectors()])
        if rows.shape[0] != count:
            raise ValueError(f"{rows.shape[0]} vectors for {count} weights")
        out[lo:hi] = coordinate_median(rows) if method == "median" else trimmed_mean(rows, trim_fraction)
    result = Aggregate(out, count, clipped)
    if method == "trimmed_mean":
        result.trimmed_per_end = trim_count(count, trim_fraction)
        if result.trimmed_per_end == 0:
            result.notes.append(f"trimmed mean of {count} updates cuts nothing: this round is a plain mean")
    return result


SERVER_OPTIMIZERS = ("sgd", "fedavgm", "fedadam", "fedyogi")
# The server learning rate when none is configured. FedAvg (sgd) and FedAvgM apply the mean delta as it is;
# the adaptive optimizers normalise each coordinate's step to about lr (m / sqrt(v) is about +-1 at first),
# so lr = 1 would move every weight by about 1 in the first round. Reddi et al. 2021 tune the adaptive
# optimizers' server lr on a log grid and report small values (around 10**-2 for most tasks) as the best;
# 0.01 is also what this project's federated suite uses for FedAdam.
DEFAULT_SERVER_LR = {"sgd": 1.0, "fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}


@dataclass(frozen=True)
class ServerOptimizer:
    """The server's step with the round's aggregate delta as pseudo-gradient (Reddi et al. 2021, Algorithm 2).

    ``sgd`` is plain FedAvg (``w + lr * delta``); ``fedavgm`` adds server momentum (Hsu et al. 2019,
    ``m = momentum * m + delta``); ``fedadam`` and ``fedyogi`` keep first and second moments (``m``, ``v``)
    with ``v`` starting at ``tau**2``. The state travels between rounds as arrays ``m.<name>`` and
    ``v.<name>``. ``lr=None`` takes :data:`DEFAULT_SERVER_LR` of the kind.
    """

    kind: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.kind!r}; choose one of {SERVER_OPTIMIZERS}")
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_SERVER_LR[self.kind])
        if not self.lr > 0 or not self.tau > 0:
            raise ValueError("server lr and tau must be positive")

    def step(self, weights: Arrays, delta: Arrays, state: Arrays | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(new weights, new state); ``state`` None or empty starts from zero moments."""
        state = dict(state or {})
        new_w, new_s = {}, {}
        for name, w in weights.items():
            w = np.asarray(w, np.float64)
            d = np.asarray(delta[name], np.float64)
            if self.kind == "sgd":
                step = d
            elif self.kind == "fedavgm":
                m = self.momentum * np.asarray(state.get(f"m.{name}", np.zeros_like(d)), np.float64) + d
                new_s[f"m.{name}"] = m
                step = m
            else:
                m = np.asarray(state.get(f"m.{name}", np.zeros_like(d)), np.float64)
                v = np.asarray(state.get(f"v.{name}", np.full_like(d, self.tau**2)), np.float64)
                m = self.beta1 * m + (1 - self.beta1) * d
                d2 = d * d
                v = self.beta2 * v + (1 - self.beta2) * d2 if self.kind == "fedadam" else \
                    v - (1 - self.beta2) * d2 * np.sign(v - d2)
                new_s[f"m.{name}"], new_s[f"v.{name}"] = m, v
                step = m / (np.sqrt(v) + self.tau)
            new_w[name] = (w + self.lr * step).astype(np.float32)
        return new_w, {k: v.astype(np.float32) for k, v in new_s.items()}
