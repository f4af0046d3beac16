"""Aggregation as pure functions over arrays and example counts: no Flask, no database, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["WeightedMean", "weighted_average", "apply_delta", "l2_norm"]

Arrays = Mapping[str, np.ndarray]


class WeightedMean:
    """Streaming example-weighted mean of deltas: memory does not grow with the number of updates.

    ``mean = sum(n_k * delta_k) / sum(n_k)``, accumulated in float64.
    """

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self.total_weight = 0
        self.count = 0

    def add(self, delta: Arrays, num_examples: int) -> None:
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


def l2_norm(arrays: Arrays) -> float:
    return float(np.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays.values())))
