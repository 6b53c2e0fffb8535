"""make_keyed_synthetic: the truth routes by key through the Hash gate's own table, so a Hash-gated
multi-gate MoE with the true experts and the true permutation reproduces the targets exactly, and the true
permutation is the unique best one over all permutations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from routing_search import Hash, MultiGateMoE, local_search
from routing_search.data import KeyedSyntheticTruth, make_keyed_synthetic
from routing_search.losses import multitask_loss


class Column(nn.Module):
    """Tower reading task t's output of the mixed true experts, scaled like the data."""

    def __init__(self, t: int, scale: float) -> None:
        super().__init__()
        self.t, self.scale = t, scale

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        return mixture[:, self.t] / self.scale


def true_model(truth: KeyedSyntheticTruth, num_keys: int, *, share: bool) -> MultiGateMoE:
    gates = [Hash(truth.num_experts, num_keys, seed=truth.hash_seed) for _ in range(truth.num_tasks)]
    towers = [Column(t, float(truth.task_scale[t])) for t in range(truth.num_tasks)]
    return MultiGateMoE(truth.expert_modules(), gates, towers, share_permutation=share).double()


def test_shapes_keys_and_truth():
    data = make_keyed_synthetic(num_samples=500, num_keys=20, num_experts=5, input_dim=6, num_tasks=3, seed=2)
    assert data.name == "keyed_synthetic" and data.num_keys == 20 and data.num_tasks == 3
    assert (len(data.train), len(data.val), len(data.test)) == (350, 75, 75)
    for split in (data.train, data.val, data.test):
        x, key = split.inputs["x"], split.inputs["key"]
        assert x.shape == (len(split), 6) and x.dtype == torch.float32
        assert key.dtype == torch.int64 and int(key.min()) >= 0 and int(key.max()) < 20
        assert len(split.targets) == 3 and all(t.shape == (len(split),) for t in split.targets)
    truth = data.info["truth"]
    assert isinstance(truth, KeyedSyntheticTruth)
    assert truth.permutation.shape == (3, 5) and truth.shared_route
    assert all(torch.equal(row, truth.permutation[0]) for row in truth.permutation)
    assert sorted(truth.permutation[0].tolist()) == list(range(5))
    assert truth.expert_of_key.shape == (3, 20)
    assert torch.equal(truth.bucket_of_key, Hash(5, 20, seed=0).table)
    # Every bucket (and so every expert) serves some keys: the table is balanced.
    assert torch.bincount(truth.bucket_of_key, minlength=5).min() >= 4


def test_noise_free_targets_are_the_routed_true_experts():
    data = make_keyed_synthetic(num_samples=300, num_keys=16, num_experts=4, noise=0.0, seed=5, dtype=torch.float64)
    truth = data.info["truth"]
    x, key = data.train.inputs["x"], data.train.inputs["key"]
    y = torch.stack(data.train.targets, dim=1)
    assert torch.allclose(y, truth.clean_targets(x, key))
    outputs = truth.expert_outputs(x)
    experts = truth.experts_of(key)
    for b in range(5):
        for t in range(truth.num_tasks):
            assert torch.isclose(y[b, t], outputs[b, experts[b, t], t])
    # Each task's clean signal has unit variance over the whole data set.
    all_x = torch.cat([s.inputs["x"] for s in (data.train, data.val, data.test)])
    all_key = torch.cat([s.inputs["key"] for s in (data.train, data.val, data.test)])
    assert torch.allclose(truth.clean_targets(all_x, all_key).std(dim=0), torch.ones(truth.num_tasks, dtype=torch.float64))


@pytest.mark.parametrize("shared", [True, False])
def test_hash_moe_with_the_true_permutation_reproduces_the_truth(shared):
    data = make_keyed_synthetic(
        num_samples=400, num_keys=24, num_experts=4, num_tasks=2, noise=0.0, hash_seed=7, seed=3,
        shared_route=shared, dtype=torch.float64,
    )
    truth = data.info["truth"]
    model = true_model(truth, 24, share=shared)
    for t, perm in enumerate(model.permutations):
        perm.set(truth.permutation[t])
    x, key = data.test.inputs["x"], data.test.inputs["key"]
    out = model(x, key=key).outputs
    for t in range(2):
        assert torch.allclose(out[t], data.test.targets[t], atol=1e-10)


def test_true_permutation_is_the_unique_best_hash_permutation():
    data = make_keyed_synthetic(num_samples=600, num_keys=32, num_experts=4, num_tasks=2, noise=0.3, hash_seed=1, seed=11,
                                dtype=torch.float64)
    truth = data.info["truth"]
    model = true_model(truth, 32, share=True)
    x, key = data.train.inputs["x"], data.train.inputs["key"]
    y = torch.stack(data.train.targets, dim=1)
    losses = {}
    with torch.no_grad():
        for perm in itertools.permutations(range(4)):
            model.permutations[0].set(list(perm))
            pred = torch.stack(model(x, key=key).outputs, dim=1)
            losses[perm] = float(((pred - y) ** 2).mean())
    best = min(losses, key=losses.get)
    assert list(best) == truth.permutation[0].tolist()
    assert sorted(losses.values())[1] > losses[best] + 0.1  # the optimum is clearly separated
    assert truth.permutation[0].tolist() != list(range(4))  # identity is not already the truth here


def test_per_task_routes_differ_and_binary_labels():
    data = make_keyed_synthetic(num_samples=300, num_tasks=4, num_experts=6, num_keys=30, shared_route=False,
                                task_type="binary", seed=0)
    perm = data.info["truth"].permutation
    assert len({tuple(row.tolist()) for row in perm}) > 1
    assert all(sorted(row.tolist()) == list(range(6)) for row in perm)
    assert [t.kind for t in data.tasks] == ["binary"] * 4
    labels = torch.cat(data.train.targets)
    assert set(labels.unique().tolist()) == {0.0, 1.0}


def test_seeds():
    a = make_keyed_synthetic(num_samples=100, seed=4, hash_seed=2)
    b = make_keyed_synthetic(num_samples=100, seed=4, hash_seed=2)
    c = make_keyed_synthetic(num_samples=100, seed=5, hash_seed=2)
    d = make_keyed_synthetic(num_samples=100, seed=4, hash_seed=3)
    assert torch.equal(a.train.inputs["x"], b.train.inputs["x"]) and torch.equal(a.train.targets[0], b.train.targets[0])
    assert not torch.equal(a.train.inputs["x"], c.train.inputs["x"])
    ta, td = a.info["truth"], d.info["truth"]
    assert torch.equal(a.train.inputs["key"], d.train.inputs["key"])  # hash_seed changes the table only
    assert torch.equal(ta.permutation, td.permutation)
    assert not torch.equal(ta.bucket_of_key, td.bucket_of_key)


def test_argument_errors():
    with pytest.raises(ValueError, match="num_keys"):
        make_keyed_synthetic(num_keys=3, num_experts=4)
    with pytest.raises(ValueError, match="task_type"):
        make_keyed_synthetic(task_type="classification")
    with pytest.raises(ValueError, match="fractions"):
        make_keyed_synthetic(fractions=(0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="num_experts"):
        make_keyed_synthetic(num_experts=1)
    with pytest.raises(TypeError, match="shared_route"):
        make_keyed_synthetic(shared_route=1)
    with pytest.raises(ValueError, match="too small"):
        make_keyed_synthetic(num_samples=3, fractions=(0.9, 0.05, 0.05))


def test_swap_search_recovers_the_true_permutation_from_a_random_start():
    """With the true experts frozen, the package's swap descent on a Hash MoE finds the data's route."""
    data = make_keyed_synthetic(num_samples=600, num_keys=36, num_experts=6, num_tasks=2, noise=0.3, hash_seed=4,
                                seed=21, dtype=torch.float64)
    truth = data.info["truth"]
    model = true_model(truth, 36, share=True)
    start = np.random.default_rng(0).permutation(6)
    model.permutations[0].set(start)
    assert start.tolist() != truth.permutation[0].tolist()
    result = local_search(model, data.train.as_pair(), multitask_loss(["mse", "mse"]), "swap")
    assert model.permutations[0].get()[0].tolist() == truth.permutation[0].tolist()
    assert result.fun < 0.25 < result.fun0  # down to the noise floor 2 · 0.3² = 0.18
