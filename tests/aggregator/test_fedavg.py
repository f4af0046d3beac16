"""Aggregation on hand-computed arrays."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.fedavg import (
    ServerOptimizer,
    WeightedMean,
    apply_delta,
    clip_by_norm,
    coordinate_median,
    flatten,
    l2_norm,
    robust_aggregate,
    staleness_weight,
    trimmed_mean,
    weighted_average,
)


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


def test_clip_by_norm_by_hand():
    d = {"w": np.array([3.0, 4.0]), "b": np.array([0.0])}  # norm 5
    clipped, scale = clip_by_norm(d, 1.0)
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8])
    assert scale == pytest.approx(0.2)
    same, scale = clip_by_norm(d, 10.0)
    np.testing.assert_array_equal(same["w"], [3.0, 4.0])
    assert scale == 1.0


def test_median_and_trimmed_mean_by_hand():
    rows = np.array([[1.0, 10.0], [2.0, -50.0], [3.0, 20.0], [100.0, 30.0], [4.0, 40.0]])
    np.testing.assert_array_equal(coordinate_median(rows), [3.0, 20.0])
    # trim 1 of 5 on each side: column 0 keeps 2, 3, 4 -> 3; column 1 keeps 10, 20, 30 -> 20
    np.testing.assert_array_equal(trimmed_mean(rows, 0.2), [3.0, 20.0])
    np.testing.assert_allclose(trimmed_mean(rows, 0.0), rows.mean(axis=0))
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(rows, 0.5)


def test_robust_aggregate_in_blocks_equals_the_in_memory_result(rng):
    shapes = {"w": (3, 4), "b": (4,)}
    deltas = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(7)]
    deltas[2] = {k: v * 1000 for k, v in deltas[2].items()}  # an attacker
    calls = []

    def source():
        calls.append(1)
        return iter(deltas)

    stacked = np.stack([flatten(d, list(shapes)) for d in deltas])
    for method, ref in (("median", coordinate_median(stacked)), ("trimmed_mean", trimmed_mean(stacked, 0.2))):
        calls.clear()
        out = robust_aggregate(source, shapes, method=method, trim_fraction=0.2, memory_bytes=4 * 7 * 5)
        np.testing.assert_allclose(flatten(out, list(shapes)), ref, rtol=1e-6)
        assert len(calls) == 1 + 4  # one count pass, then 16 coordinates in blocks of 5
        assert np.abs(out["w"]).max() < 10  # the scaled delta does not drag the result


def test_server_optimizers_by_hand():
    w = {"x": np.array([1.0, -1.0])}
    d = {"x": np.array([0.5, 0.0])}
    sgd, state = ServerOptimizer("sgd", lr=0.5).step(w, d)
    np.testing.assert_allclose(sgd["x"], [1.25, -1.0])
    assert state == {}
    mom = ServerOptimizer("fedavgm", lr=1.0, momentum=0.9)
    w1, s1 = mom.step(w, d)
    w2, s2 = mom.step(w1, d, s1)
    np.testing.assert_allclose(s2["m.x"], [0.5 * 0.9 + 0.5, 0.0])  # m = 0.9 m + delta
    np.testing.assert_allclose(w2["x"], [1.0 + 0.5 + 0.95, -1.0])
    adam = ServerOptimizer("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    wa, sa = adam.step(w, d)
    m = 0.1 * 0.5
    v = 0.99 * 1e-6 + 0.01 * 0.25
    np.testing.assert_allclose(sa["m.x"], [m, 0.0], rtol=1e-6)
    np.testing.assert_allclose(sa["v.x"], [v, 0.99 * 1e-6], rtol=1e-5)
    np.testing.assert_allclose(wa["x"], [1.0 + 0.1 * m / (np.sqrt(v) + 1e-3), -1.0], rtol=1e-5)
    yogi = ServerOptimizer("fedyogi", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    _, sy = yogi.step(w, d)
    # v0 = tau^2 < delta^2 = 0.25, so sign(v - d^2) = -1: v = v0 + 0.01 * 0.25 (Yogi's additive update)
    np.testing.assert_allclose(sy["v.x"], [1e-6 + 0.01 * 0.25, 1e-6], rtol=1e-5)
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer("fedprox")


def test_staleness_weight():
    assert staleness_weight(8, 0) == 8
    assert staleness_weight(8, 3) == pytest.approx(4.0)  # 8 / sqrt(4)
    with pytest.raises(ValueError):
        staleness_weight(8, -1)
