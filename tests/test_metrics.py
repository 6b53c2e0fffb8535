"""Tests for routing_search.metrics: support recovery (matching direction, P vs R), counts, collapse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routing_search.metrics import (
    detect_collapse,
    expert_usage,
    experts_per_example,
    experts_per_task,
    match_experts,
    support_recovery,
)

CYCLE = np.array([1, 2, 0, 3])  # learned a ↔ true CYCLE[a]: a 3-cycle on {0, 1, 2}, not an involution


def _sparse_truth(seed: int, T: int = 8, n: int = 4, k: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    W = np.zeros((T, n))
    for t in range(T):
        W[t, rng.choice(n, k, replace=False)] = rng.dirichlet(np.ones(k))
    return W


def test_truth_against_itself_is_perfect() -> None:
    truth = _sparse_truth(0)
    rec = support_recovery(truth, truth)
    np.testing.assert_array_equal(rec.precision, 1.0)
    np.testing.assert_array_equal(rec.recall, 1.0)
    np.testing.assert_array_equal(rec.f1, 1.0)
    np.testing.assert_array_equal(rec.weight_error, 0.0)
    assert rec.mean_precision == rec.mean_recall == rec.mean_f1 == 1.0 and rec.mean_weight_error == 0.0
    np.testing.assert_array_equal(rec.matching, np.arange(4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariant_to_relabelling_learned_columns(seed: int) -> None:
    truth = _sparse_truth(seed)
    rng = np.random.default_rng(seed)
    learned = np.clip(truth + 0.05 * rng.random(truth.shape) * (truth > 0), 0, None)
    learned[0, np.argmin(learned[0])] = 0.1  # one false positive
    base = support_recovery(learned, truth)
    relabelled = learned[:, CYCLE]  # learned column a now holds old column CYCLE[a]
    rec = support_recovery(relabelled, truth)
    for field in ("precision", "recall", "f1", "weight_error"):
        np.testing.assert_allclose(getattr(rec, field), getattr(base, field), atol=1e-15)
    # perfectly relabelled truth: the matching found is exactly the relabelling, and recovery is perfect
    perfect = support_recovery(truth[:, CYCLE], truth)
    np.testing.assert_array_equal(perfect.matching, CYCLE)
    assert perfect.mean_f1 == 1.0 and perfect.mean_weight_error == 0.0


def test_hand_built_example_catches_swaps_and_inverse_permutation() -> None:
    truth = np.array([[0.4, 0.4, 0.0, 0.2]])  # true support {0, 1, 3}: size 3
    learned = np.array([[0.0, 0.7, 0.3, 0.0]])  # learned experts {1, 2}: size 2
    # learned 1 is true CYCLE[1] = 2, learned 2 is true CYCLE[2] = 0 → aligned support {0, 2}, hit {0}
    rec = support_recovery(learned, truth, matching=CYCLE)
    assert rec.precision[0] == pytest.approx(1 / 2)  # |{0}| / |{0, 2}|
    assert rec.recall[0] == pytest.approx(1 / 3)  # |{0}| / |{0, 1, 3}|
    assert rec.f1[0] == pytest.approx(0.4)
    # aligned weights [0.3, 0, 0.7, 0] vs [0.4, 0.4, 0, 0.2]
    assert rec.weight_error[0] == pytest.approx(0.1 + 0.4 + 0.7 + 0.2)
    # The mistakes this guards against give different numbers:
    inverse = np.argsort(CYCLE)
    wrong = support_recovery(learned, truth, matching=inverse)  # inverse permutation applied
    assert (wrong.precision[0], wrong.recall[0]) != (rec.precision[0], rec.recall[0])
    assert (rec.recall[0], rec.precision[0]) != (rec.precision[0], rec.recall[0])  # a swap is visible


def test_simple_half_half_example() -> None:
    truth = np.array([[0.5, 0.0, 0.5]])
    learned = np.array([[0.6, 0.4, 0.0]])
    rec = support_recovery(learned, truth, matching=np.arange(3))
    assert rec.precision[0] == 0.5 and rec.recall[0] == 0.5 and rec.f1[0] == 0.5


def test_unequal_numbers_of_experts() -> None:
    truth = _sparse_truth(4, T=6, n=3)
    learned = np.concatenate([truth[:, [2, 0, 1]], np.zeros((6, 1))], axis=1)
    learned[0, 3] = 0.2  # an extra learned expert with no true counterpart
    rec = support_recovery(learned, truth)
    assert rec.matching.tolist() == [2, 0, 1, -1]
    assert rec.precision[0] == pytest.approx(2 / 3) and rec.recall[0] == 1.0
    assert rec.weight_error[0] == pytest.approx(0.2)
    np.testing.assert_array_equal(rec.precision[1:], 1.0)
    fewer = support_recovery(truth[:, :2], truth, matching=np.array([0, 1]))
    assert np.all(fewer.precision == 1.0) and np.all(fewer.recall <= 1.0)


def test_threshold_and_empty_support_conventions() -> None:
    truth = np.array([[0.9, 0.1, 0.0]])
    learned = np.array([[0.95, 0.05, 0.0]])
    assert support_recovery(learned, truth, matching=np.arange(3)).precision[0] == 1.0
    rec = support_recovery(learned, truth, threshold=0.08, matching=np.arange(3))
    assert rec.precision[0] == 1.0 and rec.recall[0] == 0.5
    empty = support_recovery(np.zeros((1, 3)), truth, matching=np.arange(3))
    assert empty.precision[0] == 1.0 and empty.recall[0] == 0.0 and empty.f1[0] == 0.0


def test_match_experts_direction() -> None:
    truth = _sparse_truth(6)
    np.testing.assert_array_equal(match_experts(truth[:, CYCLE], truth), CYCLE)


def test_counts_usage_and_torch_inputs() -> None:
    W = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(experts_per_example(W), [2, 1, 3, 1])
    np.testing.assert_array_equal(experts_per_example(torch.tensor(W)), [2, 1, 3, 1])
    np.testing.assert_array_equal(experts_per_example(W, threshold=0.25), [2, 1, 2, 1])
    np.testing.assert_array_equal(experts_per_task(W), [2, 1, 3, 1])
    per_example = np.stack([W[:2], W[2:]])  # [T=2, B=2, n=3]
    np.testing.assert_array_equal(experts_per_task(per_example), [2, 3])
    soft, hard = expert_usage(W)
    np.testing.assert_allclose(soft, [0.675, 0.2, 0.125])
    np.testing.assert_allclose(hard, [1.0, 0.5, 0.25])
    rec = support_recovery(torch.tensor(W), torch.tensor(W))
    assert rec.mean_f1 == 1.0


def test_detect_collapse() -> None:
    collapsed = np.tile([0.97, 0.01, 0.01, 0.01], (10, 1))
    c = detect_collapse(collapsed)
    assert c.collapsed and c.dominant_expert == 0 and c.max_share == pytest.approx(0.97)
    assert "expert 0" in c.reason
    healthy = np.random.default_rng(0).dirichlet(np.ones(4), size=200)
    h = detect_collapse(healthy)
    assert not h.collapsed and h.effective_experts > 3.5 and h.reason == "not collapsed"
    one_hot = np.zeros((6, 4))
    one_hot[:, 2] = 1.0
    o = detect_collapse(torch.tensor(one_hot))
    assert o.collapsed and o.effective_experts == pytest.approx(1.0)
    assert o.dead_experts.tolist() == [0, 1, 3]


def test_errors_name_the_argument() -> None:
    truth = _sparse_truth(0)
    with pytest.raises(ValueError, match="learned must have shape"):
        support_recovery(truth[0], truth)
    with pytest.raises(ValueError, match="truth must have as many tasks"):
        support_recovery(truth, truth[:3])
    bad = truth.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="truth contains 1 NaN/inf"):
        support_recovery(truth, bad)
    with pytest.raises(ValueError, match="matching must be an integer array of length"):
        support_recovery(truth, truth, matching=[0, 1])
    with pytest.raises(ValueError, match="matching must map learned experts to distinct"):
        support_recovery(truth, truth, matching=[0, 0, 1, 2])
    with pytest.raises(ValueError, match="threshold must be"):
        support_recovery(truth, truth, threshold=-1.0)
    with pytest.raises(ValueError, match="weights must have shape"):
        experts_per_example(np.ones(3))
    with pytest.raises(ValueError, match="task_weights must have shape"):
        experts_per_task(np.ones(3))
    with pytest.raises(ValueError, match="threshold must be a share"):
        detect_collapse(truth, threshold=1.5)
    with pytest.raises(TypeError, match="learned must be a numeric array"):
        support_recovery("abc", truth)


def test_detect_collapse_refuses_non_numbers_with_a_clear_error():
    # Regression: threshold="0.5" passed the range check (float("0.5")) and then failed comparing a
    # float with a str; min_effective_experts=inf called every routing collapsed.
    with pytest.raises(TypeError, match="threshold must be a number"):
        detect_collapse(np.eye(3), threshold="0.5")
    with pytest.raises(TypeError, match="min_effective_experts must be a number"):
        detect_collapse(np.eye(3), min_effective_experts=None)
    with pytest.raises(ValueError, match="min_effective_experts must be a finite number >= 1"):
        detect_collapse(np.eye(3), min_effective_experts=float("inf"))
    assert detect_collapse(np.eye(3), threshold=np.float32(0.5)).collapsed is False


def test_bfloat16_weights_are_accepted():
    # Regression: weights from a bfloat16 model failed in numpy conversion ("unsupported ScalarType BFloat16").
    w = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.bfloat16)
    assert experts_per_example(w).tolist() == [2, 1]
    assert support_recovery(w, w.float().numpy()).mean_f1 == 1.0
    assert detect_collapse(w).dominant_expert == 0
    torch.testing.assert_close(expert_usage(w).soft, torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64))
