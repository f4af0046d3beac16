"""Aggregation on hand-computed arrays."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.fedavg import WeightedMean, apply_delta, l2_norm, weighted_average


def test_weighted_average_by_hand():
    a = {"w": np.array([1.0, 2.0]), "b": np.array([0.0])}
    b = {"w": np.array([3.0, -2.0]), "b": np.array([4.0])}
    out = weighted_average([(a, 1), (b, 3)])
    # w: (1*1 + 3*3)/4 = 2.5, (2*1 + -2*3)/4 = -1 ; b: (0 + 12)/4 = 3
    np.testing.assert_array_equal(out["w"], [2.5, -1.0])
    np.testing.assert_array_equal(out["b"], [3.0])
    assert out["w"].dtype == np.float32


def test_streaming_equals_batch(rng):
    deltas = [({"w": rng.normal(size=(4, 3))}, int(n)) for n in rng.integers(1, 50, size=20)]
    acc = WeightedMean()
    for d, n in deltas:
        acc.add(d, n)
    expected = sum(d["w"] * n for d, n in deltas) / sum(n for _, n in deltas)
    np.testing.assert_allclose(acc.result()["w"], expected, rtol=1e-6)
    assert acc.count == 20


def test_mismatched_or_empty_inputs_are_errors():
    acc = WeightedMean()
    with pytest.raises(ValueError, match="no deltas"):
        acc.result()
    acc.add({"w": np.zeros(2)}, 1)
    with pytest.raises(ValueError, match="differ"):
        acc.add({"v": np.zeros(2)}, 1)
    with pytest.raises(ValueError, match="shape"):
        acc.add({"w": np.zeros(3)}, 1)
    with pytest.raises(ValueError, match="positive"):
        acc.add({"w": np.zeros(2)}, 0)


def test_apply_delta_and_norm():
    out = apply_delta({"w": np.array([1.0, 1.0])}, {"w": np.array([2.0, -4.0])}, server_lr=0.5)
    np.testing.assert_array_equal(out["w"], [2.0, -1.0])
    assert l2_norm({"a": np.array([3.0]), "b": np.array([4.0])}) == 5.0
