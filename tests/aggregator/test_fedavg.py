"""The one aggregation path (aggregator.fedavg, what aggregator.rounds runs) on hand-computed arrays."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator import DEFAULTS
from aggregator.fedavg import (
    DEFAULT_SERVER_LR,
    ServerOptimizer,
    aggregate,
    aggregation_weights,
    clip_vector,
    l2_norm,
    trim_count,
    unflatten,
)


def _source(rows):
    calls = []

    def source():
        calls.append(1)
        return (np.asarray(r, np.float32) for r in rows)

    return source, calls


def test_fedavg_is_the_example_weighted_mean_by_hand():
    source, _ = _source([[1.0, 2.0, 0.0], [3.0, -2.0, 4.0]])
    out = aggregate(source, [1.0, 3.0], 3)
    # (1*1 + 3*3)/4 = 2.5, (1*2 + 3*-2)/4 = -1, (0 + 3*4)/4 = 3
    np.testing.assert_array_equal(out.delta, [2.5, -1.0, 3.0])
    assert out.delta.dtype == np.float32 and out.num_updates == 2 and out.clipped == 0


def test_weights_cap_self_reported_counts_by_hand():
    # counts 4, 6, 10**6: lower median 6; cap = min(1000, 2 * 6) = 12 -> weights 4, 6, 12
    w, capped = aggregation_weights([4, 6, 10**6], max_examples=1000, median_multiple=2.0)
    np.testing.assert_array_equal(w, [4.0, 6.0, 12.0])
    assert capped == 1
    # two updates: the lower median is the smaller count, so the other cannot raise the cap by inflating
    w, capped = aggregation_weights([5, 10**6], max_examples=1000, median_multiple=2.0)
    np.testing.assert_array_equal(w, [5.0, 10.0])
    # the absolute cap alone; 0 turns a cap off
    w, capped = aggregation_weights([5, 3000, 7000], max_examples=1000, median_multiple=0.0)
    np.testing.assert_array_equal(w, [5.0, 1000.0, 1000.0])
    assert capped == 2
    w, capped = aggregation_weights([5, 10**6], max_examples=0.0, median_multiple=0.0)
    np.testing.assert_array_equal(w, [5.0, 1e6])
    assert capped == 0
    # staleness after the cap: 8 examples capped at 2 * 2 = 4, one version behind: 4 / sqrt(2)
    w, _ = aggregation_weights([8, 2], [1, 0], max_examples=1000, median_multiple=2.0, staleness_exponent=0.5)
    np.testing.assert_allclose(w, [4 / np.sqrt(2), 2.0])
    with pytest.raises(ValueError, match="staleness"):
        aggregation_weights([8], [-1])
    with pytest.raises(ValueError, match="positive"):
        aggregation_weights([0, 3])


def test_an_inflated_count_does_not_decide_the_round():
    honest = [[0.1, 0.1]] * 9
    attacker = [[-90.0, 0.0]]
    rows = honest + attacker
    uncapped, _ = aggregation_weights([5] * 9 + [10**15], max_examples=0, median_multiple=0)
    capped, _ = aggregation_weights([5] * 9 + [10**15], max_examples=DEFAULTS["MAX_EXAMPLES_WEIGHT"],
                                    median_multiple=DEFAULTS["MAX_EXAMPLES_WEIGHT_OVER_MEDIAN"])  # server defaults
    follows = aggregate(_source(rows)[0], uncapped, 2).delta
    held = aggregate(_source(rows)[0], capped, 2).delta
    np.testing.assert_allclose(follows, [-90.0, 0.0], atol=1e-4)  # the attacker is the round
    # capped at 1 x the median count, 5: (9 * 5 * 0.1 - 5 * 90) / 50 and (9 * 5 * 0.1) / 50
    assert DEFAULTS["MAX_EXAMPLES_WEIGHT_OVER_MEDIAN"] == 1.0
    np.testing.assert_allclose(held, [(4.5 - 450) / 50, 4.5 / 50], rtol=1e-6)


def test_clipping_by_hand_and_inside_the_mean():
    np.testing.assert_allclose(clip_vector(np.array([3.0, 4.0, 0.0], np.float32), 1.0), [0.6, 0.8, 0.0])
    v = np.array([3.0, 4.0], np.float32)
    assert clip_vector(v, 10.0) is v and clip_vector(v, 0.0) is v
    source, _ = _source([[3.0, 4.0], [0.1, 0.0]])  # the first has norm 5: scaled to norm 1 -> [0.6, 0.8]
    out = aggregate(source, [1.0, 1.0], 2, clip_norm=1.0)
    np.testing.assert_allclose(out.delta, [(0.6 + 0.1) / 2, 0.4], rtol=1e-6)
    assert out.clipped == 1
    assert l2_norm({"a": np.array([3.0]), "b": np.array([4.0])}) == 5.0


def test_median_and_trimmed_mean_by_hand():
    rows = [[1.0, 10.0], [2.0, -50.0], [3.0, 20.0], [100.0, 30.0], [4.0, 40.0]]
    med = aggregate(_source(rows)[0], [1.0] * 5, 2, method="median")
    np.testing.assert_array_equal(med.delta, [3.0, 20.0])
    # trim 1 of 5 on each side: column 0 keeps 2, 3, 4 -> 3; column 1 keeps 10, 20, 30 -> 20
    tm = aggregate(_source(rows)[0], [1.0] * 5, 2, method="trimmed_mean", trim_fraction=0.2)
    np.testing.assert_array_equal(tm.delta, [3.0, 20.0])
    assert tm.trimmed_per_end == 1 and not tm.notes
    # weights do not move the median
    np.testing.assert_array_equal(aggregate(_source(rows)[0], [1, 1, 1, 1e9, 1], 2, method="median").delta,
                                  [3.0, 20.0])


def test_trimmed_mean_trims_at_least_one_per_end_and_says_when_it_cannot():
    # TRIM_FRACTION 0.1 with 5 updates: floor(0.5) = 0 would be a plain mean; one is cut from each end instead
    assert trim_count(5, 0.1) == 1 and trim_count(30, 0.1) == 3 and trim_count(5, 0.0) == 0
    rows = [[1.0], [2.0], [3.0], [4.0], [1000.0]]
    out = aggregate(_source(rows)[0], [1.0] * 5, 1, method="trimmed_mean", trim_fraction=0.1)
    np.testing.assert_array_equal(out.delta, [3.0])  # (2 + 3 + 4) / 3
    two = aggregate(_source([[1.0], [1000.0]])[0], [1.0, 1.0], 1, method="trimmed_mean", trim_fraction=0.1)
    np.testing.assert_array_equal(two.delta, [500.5])
    assert two.trimmed_per_end == 0 and "plain mean" in two.notes[0]
    with pytest.raises(ValueError, match="trim_fraction"):
        trim_count(5, 0.5)


def test_robust_methods_in_blocks_equal_the_in_memory_result(rng):
    rows = rng.normal(size=(7, 16)).astype(np.float32)
    rows[2] *= 1000  # an attacker
    for method, ref in (("median", np.median(rows.astype(np.float64), axis=0)),
                        ("trimmed_mean", np.sort(rows.astype(np.float64), axis=0)[1:6].mean(axis=0))):
        source, calls = _source(rows)
        out = aggregate(source, [1.0] * 7, 16, method=method, trim_fraction=0.2, memory_bytes=4 * 7 * 5)
        np.testing.assert_allclose(out.delta, ref, rtol=1e-6)
        assert len(calls) == 4  # 16 coordinates in blocks of 5: the updates are streamed once per block
        assert np.abs(out.delta).max() < 10  # the scaled delta does not drag the result


def test_mismatched_or_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="no updates"):
        aggregate(_source([])[0], [], 2)
    with pytest.raises(ValueError, match="shape"):
        aggregate(_source([[1.0, 2.0, 3.0]])[0], [1.0], 2)
    with pytest.raises(ValueError, match="1 vectors for 2 weights"):
        aggregate(_source([[1.0, 2.0]])[0], [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(_source([[1.0, 2.0]])[0], [1.0], 2, method="krum")
    with pytest.raises(ValueError, match="values"):
        unflatten(np.zeros(5, np.float32), {"w": (2, 2)})
    np.testing.assert_array_equal(unflatten(np.arange(6, dtype=np.float32), {"w": (2, 2), "b": (2,)})["b"], [4, 5])


def test_sgd_and_fedavgm_by_hand():
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


# Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2, two rounds worked by hand with
# x0 = [1, -1], delta1 = [0.5, 0], delta2 = [-0.5, 0.2], beta1 0.9, beta2 0.99, tau 1e-3, eta 0.1,
# m_{-1} = 0, v_{-1} = tau^2 = 1e-6:
#   m_t = beta1 m_{t-1} + (1 - beta1) delta_t
#   FedAdam: v_t = beta2 v_{t-1} + (1 - beta2) delta_t^2
#   FedYogi: v_t = v_{t-1} - (1 - beta2) delta_t^2 sign(v_{t-1} - delta_t^2)
#   x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)
# Round 1: m1 = [0.05, 0].  FedAdam v1 = 0.99e-6 + 0.01 * 0.25 = [0.00250099, 0.00000099];
#   x1[0] = 1 + 0.1 * 0.05 / (0.0500099 + 0.001) = 1.09802019.  FedYogi v1 = 1e-6 + 0.0025 = [0.002501, 1e-6]
#   (v0 < delta^2: sign -1, Yogi adds), x1[0] = 1 + 0.1 * 0.05 / (0.0500100 + 0.001) = 1.09801999.
# Round 2: m2 = 0.9 * [0.05, 0] + 0.1 * [-0.5, 0.2] = [-0.005, 0.02].
#   FedAdam v2 = 0.99 v1 + 0.01 * [0.25, 0.04] = [0.0049759801, 0.0004009801];
#   x2 = x1 + 0.1 * m2 / (sqrt(v2) + tau) = [1.09103115, -0.90487283].
#   FedYogi: v1 < delta2^2 in both coordinates, so v2 = v1 + 0.01 * [0.25, 0.04] = [0.005001, 0.000401];
#   x2 = [1.09104822, -0.90487508].
REDDI_BY_HAND = {
    "fedadam": ([1.09802019, -1.0], [0.00250099, 9.9e-7], [1.09103115, -0.90487283], [0.0049759801, 0.0004009801]),
    "fedyogi": ([1.09801999, -1.0], [0.002501, 1e-6], [1.09104822, -0.90487508], [0.005001, 0.000401]),
}


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_adaptive_server_optimizers_follow_reddi_algorithm_2_by_hand(kind):
    x1_hand, v1_hand, x2_hand, v2_hand = REDDI_BY_HAND[kind]
    opt = ServerOptimizer(kind, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x1, s1 = opt.step({"x": np.array([1.0, -1.0])}, {"x": np.array([0.5, 0.0])})
    np.testing.assert_allclose(s1["m.x"], [0.05, 0.0], rtol=1e-6)
    np.testing.assert_allclose(s1["v.x"], v1_hand, rtol=1e-5)
    np.testing.assert_allclose(x1["x"], x1_hand, rtol=1e-6)
    x2, s2 = opt.step(x1, {"x": np.array([-0.5, 0.2])}, s1)
    np.testing.assert_allclose(s2["m.x"], [-0.005, 0.02], rtol=1e-5)
    np.testing.assert_allclose(s2["v.x"], v2_hand, rtol=1e-5)
    np.testing.assert_allclose(x2["x"], x2_hand, rtol=1e-6)


def test_server_learning_rate_defaults():
    # FedAdam/FedYogi normalise each coordinate's step to about lr: with lr 1 the first round would move every
    # weight by about 1 (m1 / sqrt(v1) = 0.1 d / sqrt(0.01 d^2) = 1)
    assert ServerOptimizer("fedadam").lr == ServerOptimizer("fedyogi").lr == 0.01
    assert ServerOptimizer("sgd").lr == ServerOptimizer("fedavgm").lr == 1.0 == DEFAULT_SERVER_LR["sgd"]
    x1, _ = ServerOptimizer("fedadam").step({"x": np.zeros(3)}, {"x": np.array([0.3, -2.0, 0.01])})
    assert np.abs(x1["x"]).max() < 0.011
    assert ServerOptimizer("fedadam", lr=0.5).lr == 0.5
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer("fedprox")
    with pytest.raises(ValueError, match="positive"):
        ServerOptimizer("sgd", lr=0.0)
