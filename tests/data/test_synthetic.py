"""make_synthetic_moe: shapes, the true expert weights, noise level and scaling against the kept truth,
labels, determinism, splits and argument errors."""

from __future__ import annotations

import pytest
import torch

from routing_search.data import SyntheticMoEData, make_synthetic_moe


def test_shapes_and_dtypes():
    data = make_synthetic_moe(num_samples=300, input_dim=7, num_experts=6, k=3, num_tasks=5, hidden=9, seed=1)
    assert isinstance(data, SyntheticMoEData)
    assert data.x.shape == (300, 7) and data.y.shape == (300, 5)
    assert data.x.dtype == data.y.dtype == torch.float32
    assert data.num_tasks == 5 and data.task_type == "regression"
    truth = data.truth
    assert truth.expert_weights.shape == (5, 6)
    assert truth.hidden_weights.shape == (6, 9, 7)
    assert truth.output_weights.shape == (6, 9)
    assert truth.task_scale.shape == (5,)
    assert bool((truth.task_scale > 0).all())
    assert truth.expert_outputs(data.x).shape == (300, 6)
    assert truth.clean_targets(data.x).shape == (300, 5)
    assert bool(torch.isfinite(data.x).all() and torch.isfinite(data.y).all())


def test_float64_option():
    data = make_synthetic_moe(num_samples=50, num_tasks=2, seed=3, dtype=torch.float64)
    assert data.x.dtype == data.y.dtype == torch.float64
    f32 = make_synthetic_moe(num_samples=50, num_tasks=2, seed=3)
    # Same draw, only the returned dtype differs.
    torch.testing.assert_close(f32.x, data.x.float())
    torch.testing.assert_close(f32.y, data.y.float())


@pytest.mark.parametrize("n,k,min_weight", [(8, 2, 0.2), (6, 3, 0.3), (5, 1, 0.5), (4, 4, 0.0), (16, 5, 0.15)])
def test_true_expert_weights(n, k, min_weight):
    tasks = 20
    data = make_synthetic_moe(num_samples=20, num_experts=n, k=k, num_tasks=tasks, min_weight=min_weight, seed=n * 10 + k)
    w = data.truth.expert_weights
    assert w.shape == (tasks, n) and w.dtype == torch.float64
    assert bool((w >= 0).all())
    torch.testing.assert_close(w.sum(dim=1), torch.ones(tasks, dtype=torch.float64), rtol=0, atol=1e-12)
    nonzero = w != 0
    assert nonzero.sum(dim=1).tolist() == [k] * tasks
    assert bool((w[nonzero] >= min_weight - 1e-12).all())
    supports = data.truth.supports
    assert len(supports) == tasks
    for t, support in enumerate(supports):
        assert len(support) == k and list(support) == sorted(support)
        assert set(support) == set(torch.nonzero(w[t]).flatten().tolist())


def test_noise_level_and_unit_signal():
    noise = 0.3
    data = make_synthetic_moe(num_samples=20000, num_experts=6, k=2, num_tasks=4, noise=noise, seed=5)
    clean = data.truth.clean_targets(data.x)
    assert clean.dtype == torch.float64
    # Each task's clean signal has unit (sample) std on the drawn data.
    torch.testing.assert_close(clean.std(dim=0), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-4)
    residual = data.y.double() - clean
    std = residual.std(dim=0)
    assert bool(((std - noise).abs() < 0.02).all()), std
    assert bool((residual.mean(dim=0).abs() < 0.02).all())
    # The clean signal is the truth's mixture of its experts, scaled per task.
    raw = data.truth.expert_outputs(data.x) @ data.truth.expert_weights.t()
    torch.testing.assert_close(clean, raw / data.truth.task_scale)


def test_zero_noise_targets_are_the_clean_signal():
    exact = make_synthetic_moe(num_samples=500, num_tasks=3, noise=0.0, seed=7, dtype=torch.float64)
    assert torch.equal(exact.y, exact.truth.clean_targets(exact.x))
    rounded = make_synthetic_moe(num_samples=500, num_tasks=3, noise=0.0, seed=7)  # float32 outputs
    assert float((rounded.y.double() - rounded.truth.clean_targets(rounded.x)).abs().max()) < 1e-5


def test_classification_labels():
    data = make_synthetic_moe(num_samples=20000, num_tasks=3, task_type="classification", seed=2)
    assert data.task_type == "classification"
    assert set(data.y.unique().tolist()) <= {0.0, 1.0}
    rate = data.y.mean(dim=0)
    assert bool(((rate - 0.5).abs() < 0.05).all()), rate
    # Labels follow the signal: positives have a larger clean signal on average.
    clean = data.truth.clean_targets(data.x)
    for t in range(3):
        positives = data.y[:, t] == 1
        assert float(clean[positives, t].mean()) > float(clean[~positives, t].mean()) + 0.5


def test_determinism():
    kwargs = dict(num_samples=200, num_tasks=3, seed=11)
    a, b = make_synthetic_moe(**kwargs), make_synthetic_moe(**kwargs)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert torch.equal(a.truth.expert_weights, b.truth.expert_weights)
    assert torch.equal(a.truth.hidden_weights, b.truth.hidden_weights)
    assert torch.equal(a.truth.output_weights, b.truth.output_weights)
    c = make_synthetic_moe(num_samples=200, num_tasks=3, seed=12)
    assert not torch.equal(a.x, c.x) and not torch.equal(a.y, c.y)
    assert not torch.equal(a.truth.hidden_weights, c.truth.hidden_weights)
    # The global RNG is neither used nor disturbed.
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    make_synthetic_moe(num_samples=50, seed=1)
    assert torch.equal(torch.rand(3), before)


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.6, 0.2, 0.2), (0.5, 0.5), (0.25, 0.25, 0.25, 0.25)])
def test_split(fractions):
    n = 1000
    data = make_synthetic_moe(num_samples=n, num_tasks=2, seed=4)
    parts = data.split(fractions)
    assert len(parts) == len(fractions)
    sizes = [p.x.shape[0] for p in parts]
    assert sum(sizes) == n
    for size, f in zip(sizes, fractions):
        assert abs(size - f * n) <= 1
    # Consecutive, disjoint, covering: concatenating the parts gives back the data in order.
    assert torch.equal(torch.cat([p.x for p in parts]), data.x)
    assert torch.equal(torch.cat([p.y for p in parts]), data.y)
    for p in parts:
        assert p.x.shape[0] == p.y.shape[0]
        assert p.truth is data.truth and p.task_type == data.task_type


def test_split_default_and_errors():
    data = make_synthetic_moe(num_samples=200, num_tasks=1, seed=0)
    assert [p.x.shape[0] for p in data.split()] == [140, 30, 30]
    for bad in [(0.5, 0.4), (0.7, 0.4, -0.1), (1.0, 0.0)]:
        with pytest.raises(ValueError, match="fractions"):
            data.split(bad)


def test_num_tasks_range():
    data = make_synthetic_moe(num_samples=8, num_experts=4, k=2, num_tasks=128, hidden=4, seed=0)
    assert data.y.shape == (8, 128) and data.truth.expert_weights.shape == (128, 4)
    assert bool(torch.isfinite(data.y).all())
    with pytest.raises(ValueError, match="num_tasks"):
        make_synthetic_moe(num_samples=8, num_tasks=129)
    with pytest.raises(ValueError, match="num_tasks"):
        make_synthetic_moe(num_samples=8, num_tasks=0)


def test_argument_errors():
    with pytest.raises(ValueError, match=r"k must be in \[1, num_experts=4\]"):
        make_synthetic_moe(num_experts=4, k=5)
    with pytest.raises(ValueError, match="min_weight"):
        make_synthetic_moe(num_experts=8, k=4, min_weight=0.25)
    with pytest.raises(ValueError, match="min_weight"):
        make_synthetic_moe(num_experts=8, k=2, min_weight=0.6)
    with pytest.raises(ValueError, match="task_type"):
        make_synthetic_moe(task_type="ranking")
    with pytest.raises(ValueError, match="noise"):
        make_synthetic_moe(noise=-0.1)
    with pytest.raises(ValueError, match="num_experts"):
        make_synthetic_moe(num_experts=1, k=1)
    with pytest.raises(TypeError, match="num_samples"):
        make_synthetic_moe(num_samples=10.5)
    # One row has no sample std to scale the signals by (it used to give NaN targets).
    with pytest.raises(ValueError, match="num_samples"):
        make_synthetic_moe(num_samples=1)
    two = make_synthetic_moe(num_samples=2, num_tasks=2, seed=0)
    assert bool(torch.isfinite(two.y).all())


def test_split_refuses_an_empty_part():
    # Regression: 5 rows split (0.7, 0.15, 0.15) gave a test part of 0 rows without a word.
    with pytest.raises(ValueError, match=r"5 rows cannot be split into non-empty parts .* \(sizes \[4, 1, 0\]\)"):
        make_synthetic_moe(num_samples=5, seed=0).split()
    with pytest.raises(ValueError, match=r"sizes \[0, 0, 2\]"):
        make_synthetic_moe(num_samples=2, seed=0).split((0.25, 0.25, 0.5))
    assert [p.x.shape[0] for p in make_synthetic_moe(num_samples=7, seed=0).split()] == [5, 1, 1]


@pytest.mark.parametrize("fractions", [(0.5, float("nan")), (float("nan"), 0.5, 0.5), (0.5, 0.5, float("inf"))])
def test_a_nan_or_infinite_split_fraction_is_refused(fractions):
    # (0.5, nan) split 10 / 10 rows without a word (the last share is never used to cut); (nan, ...) failed in int()
    data = make_synthetic_moe(num_samples=20, seed=0)
    with pytest.raises(ValueError, match="fractions must be positive and sum to 1"):
        data.split(fractions)


@pytest.mark.parametrize("seed", [2.7, "3", -1, True])
def test_a_seed_that_is_not_a_non_negative_integer_is_refused(seed):
    # int(seed) made 2.2 and 2.7 the same data set and read "3" as 3
    with pytest.raises((TypeError, ValueError), match="seed must be"):
        make_synthetic_moe(num_samples=10, seed=seed)
