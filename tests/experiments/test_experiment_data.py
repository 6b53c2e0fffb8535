"""Experiment data of the generated families: every model size the config accepts loads."""

from __future__ import annotations

import pytest
import torch

from routing_search.data import make_synthetic_moe
from routing_search.experiments import load_experiment_data, make_config
from routing_search.experiments.datasets import synthetic_min_weight


@pytest.mark.parametrize("k", [2, 4, 5, 8])
def test_the_synthetic_family_loads_for_every_k_the_config_accepts(k):
    # model.k = 5..8 (accepted by ModelConfig: k <= num_experts = 8) failed with "min_weight * k must be < 1"
    config = make_config("synthetic", "cpu", model={"k": k}, data={"num_samples": 120})
    data = load_experiment_data(config, 0)
    assert all(len(s) == k for s in data.dataset.info["true_supports"])
    assert data.dataset.info["min_weight"] == synthetic_min_weight(k)
    weights = data.truth.expert_weights
    assert torch.allclose(weights.sum(dim=1), torch.ones(weights.shape[0], dtype=weights.dtype))
    assert float(weights[weights > 0].min()) >= synthetic_min_weight(k) - 1e-12
    if k <= 4:  # the data of the sizes that loaded before are unchanged (make_synthetic_moe's default min_weight)
        raw = make_synthetic_moe(num_samples=120, input_dim=config.data.input_dim, num_experts=8, k=k,
                                 num_tasks=config.data.num_tasks, seed=0)
        assert torch.equal(data.truth.expert_weights, raw.truth.expert_weights)


def test_an_escape_start_builds_for_every_k_its_config_accepts():
    from routing_search.experiments.escape import EscapeConfig, build_start

    # EscapeConfig accepts k <= num_experts - 1; k >= 5 failed in make_synthetic_moe ("min_weight * k must be < 1")
    cfg = EscapeConfig(families=("dselect_collapsed",), seeds=(0,), num_experts=8, k=5, num_tasks=2, num_samples=60, hidden=4)
    start = build_start(cfg, "dselect_collapsed", 0)
    assert start.train[1].shape == (42, 2)


def test_a_keyed_config_with_fewer_keys_than_experts_is_refused_when_built():
    # it was accepted, and the data load (after the run directory was made) said only "num_keys must be >= 8, got 4"
    with pytest.raises(ValueError, match=r"data num_keys \(4\) must be at least model num_experts \(8\)"):
        make_config("keyed", "cpu", model={"num_experts": 8}, data={"num_keys": 4})
    assert make_config("keyed", "cpu", model={"num_experts": 4}, data={"num_keys": 4}).data.num_keys == 4
