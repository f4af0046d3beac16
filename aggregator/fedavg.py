"""Aggregation as pure functions over arrays and example counts: no Flask, no database, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["WeightedMean", "FlatWeightedMean", "weighted_average", "apply_delta", "l2_norm", "clip_by_norm",
           "coordinate_median", "trimmed_mean", "robust_aggregate", "robust_aggregate_flat", "ServerOptimizer",
           "SERVER_OPTIMIZERS", "flatten", "unflatten", "staleness_weight"]

Arrays = Mapping[str, np.ndarray]


class WeightedMean:
    """Streaming example-weighted mean of deltas: memory does not grow with the number of updates.

    ``mean = sum(n_k * delta_k) / sum(n_k)``, accumulated in float64.
    """

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self.total_weight = 0
        self.count = 0

    def add(self, delta: Arrays, num_examples: float) -> None:
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        if self._sum and set(delta) != set(self._sum):
            raise ValueError(f"delta arrays {sorted(delta)} differ from earlier ones {sorted(self._sum)}")
        for name, arr in delta.items():
            contrib = np.asarray(arr, np.float64) * num_examples
            if name in self._sum:
                if self._sum[name].shape != contrib.shape:
                    raise ValueError(f"delta {name!r} has shape {contrib.shape}, expected {self._sum[name].shape}")
                self._sum[name] += contrib
            else:
                self._sum[name] = contrib
        self.total_weight += num_examples
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        if not self.count:
            raise ValueError("no deltas to average")
        return {n: (s / self.total_weight).astype(np.float32) for n, s in self._sum.items()}


def weighted_average(results: Iterable[tuple[Arrays, int]]) -> dict[str, np.ndarray]:
    """FedAvg: example-weighted mean of ``(delta, num_examples)`` pairs."""
    acc = WeightedMean()
    for delta, n in results:
        acc.add(delta, n)
    return acc.result()


def apply_delta(weights: Arrays, delta: Arrays, *, server_lr: float = 1.0) -> dict[str, np.ndarray]:
    """``weights + server_lr * delta`` for every array."""
    return {n: (np.asarray(w, np.float32) + server_lr * np.asarray(delta[n], np.float32)).astype(np.float32)
            for n, w in weights.items()}


def staleness_weight(num_examples: int, staleness: int, exponent: float = 0.5) -> float:
    """``num_examples / (1 + staleness) ** exponent``: an update against an older base counts less."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return num_examples / (1.0 + staleness) ** exponent


def l2_norm(arrays: Arrays) -> float:
    return float(np.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays.values())))


def flatten(arrays: Arrays, names: Sequence[str]) -> np.ndarray:
    """The arrays in ``names`` order as one float32 vector."""
    return np.concatenate([np.asarray(arrays[n], np.float32).ravel() for n in names])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) if shape else 1
        out[name] = vector[offset: offset + size].reshape(shape).astype(np.float32)
        offset += size
    if offset != vector.size:
        raise ValueError(f"vector has {vector.size} values, the shapes need {offset}")
    return out


def clip_by_norm(delta: Arrays, max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """``delta`` scaled down to L2 norm ``max_norm`` when larger; returns (clipped, scale applied)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = l2_norm(delta)
    scale = 1.0 if norm <= max_norm else max_norm / norm
    return {n: (np.asarray(a, np.float32) * scale).astype(np.float32) for n, a in delta.items()}, scale


def coordinate_median(vectors: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of ``[N, P]`` (Yin et al. 2018); example counts are ignored."""
    return np.median(np.asarray(vectors, np.float64), axis=0).astype(np.float32)


def trimmed_mean(vectors: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Coordinate-wise mean after dropping the ``floor(trim_fraction * N)`` largest and smallest values."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    v = np.sort(np.asarray(vectors, np.float64), axis=0)
    k = int(np.floor(trim_fraction * v.shape[0]))
    return v[k: v.shape[0] - k].mean(axis=0).astype(np.float32)


def robust_aggregate(source: Callable[[], Iterable[Arrays]], shapes: Mapping[str, tuple[int, ...]], *,
                     method: str, trim_fraction: float = 0.1, memory_bytes: int = 64 << 20) -> dict[str, np.ndarray]:
    """Coordinate-wise median or trimmed mean over the deltas that ``source()`` yields, in bounded memory.

    The coordinates are split into blocks so that ``N x block`` float32 values
    fit in ``memory_bytes``; ``source`` is called once per block (each call
    streams every delta again), so memory does not grow with ``N x P``.
    """
    names = list(shapes)
    total = sum(int(np.prod(s)) if s else 1 for s in shapes.values())
    out = robust_aggregate_flat(lambda: (flatten(d, names) for d in source()), total, method=method,
                                trim_fraction=trim_fraction, memory_bytes=memory_bytes)
    return unflatten(out, shapes)


def robust_aggregate_flat(source: Callable[[], Iterable[np.ndarray]], total: int, *, method: str,
                          trim_fraction: float = 0.1, memory_bytes: int = 64 << 20) -> np.ndarray:
    """:func:`robust_aggregate` over flat float32 vectors of length ``total``."""
    if method not in ("median", "trimmed_mean"):
        raise ValueError(f"unknown robust method {method!r}")
    count = sum(1 for _ in source())
    if not count:
        raise ValueError("no deltas to aggregate")
    block = max(1, min(total, memory_bytes // (4 * count)))
    out = np.empty(total, np.float32)
    for lo in range(0, total, block):
        hi = min(total, lo + block)
        rows = np.stack([np.asarray(v, np.float32)[lo:hi] for v in source()])
        out[lo:hi] = coordinate_median(rows) if method == "median" else trimmed_mean(rows, trim_fraction)
    return out


class FlatWeightedMean:
    """Streaming weighted mean of flat vectors, accumulated in float64; memory is one vector."""

    def __init__(self, size: int) -> None:
        self._sum = np.zeros(size, np.float64)
        self._tmp = np.empty(size, np.float64)
        self.total_weight = 0.0
        self.count = 0

    def add(self, vector: np.ndarray, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if vector.shape != self._sum.shape:
            raise ValueError(f"vector has shape {vector.shape}, expected {self._sum.shape}")
        np.multiply(vector, weight, out=self._tmp)
        self._sum += self._tmp
        self.total_weight += weight
        self.count += 1

    def result(self) -> np.ndarray:
        if not self.count:
            raise ValueError("no vectors to average")
        return (self._sum / self.total_weight).astype(np.float32)


SERVER_OPTIMIZERS = ("sgd", "fedavgm", "fedadam", "fedyogi")


@dataclass(frozen=True)
class ServerOptimizer:
    """The server's step with the round's aggregate delta as pseudo-gradient (Reddi et al. 2021).

    ``sgd`` is plain FedAvg (``w + lr * delta``); ``fedavgm`` adds server
    momentum (Hsu et al. 2019, ``m = momentum * m + delta``); ``fedadam`` and
    ``fedyogi`` keep first and second moments (``m``, ``v``) with ``v``
    starting at ``tau**2``. The state travels between rounds as arrays
    ``m.<name>`` and ``v.<name>``.
    """

    kind: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.kind!r}; choose one of {SERVER_OPTIMIZERS}")
        if self.lr <= 0 or self.tau <= 0:
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
