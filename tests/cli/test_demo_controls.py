"""The demo's control arm and its paired verdict."""

from __future__ import annotations

import numpy as np

from routing_search.cli.demo import (
    COLLAPSE_ARMS,
    RANDOM_ARM,
    DemoConfig,
    _build,
    _collapse_gate,
    paired_against_control,
    permute_randomly,
    verdict,
)


def test_the_control_permutes_every_row_and_never_leaves_the_identity() -> None:
    cfg = DemoConfig(num_tasks=3)
    model = _build(cfg, _collapse_gate(RANDOM_ARM, cfg), seed=0)
    assert all(m.is_identity for m in model.permutations)
    permute_randomly(model, np.random.default_rng(0))
    for module in model.permutations:
        rows = module.get()
        assert rows.shape == (cfg.k, cfg.num_experts)
        for row in rows:
            assert sorted(row.tolist()) == list(range(cfg.num_experts)) and row.tolist() != list(range(cfg.num_experts))
    again = _build(cfg, _collapse_gate(RANDOM_ARM, cfg), seed=0)
    permute_randomly(again, np.random.default_rng(0))
    assert all(np.array_equal(a.get(), b.get()) for a, b in zip(model.permutations, again.permutations))


def test_paired_wins_losses_and_the_verdict_in_words() -> None:
    losses = {
        "first-order only": [2.0, 2.0, 2.0, 2.0, 2.0],
        RANDOM_ARM: [1.0, 1.0, 1.0, 1.0, 1.0],
        "first-order + local search": [1.0, 0.995, 1.02, 0.5, 1.0],
        "first-order + refit search": [0.9, 0.9, 0.98, 0.95, 0.85],
        "learned Sinkhorn (COMET+)": [1.0, 1.0, 1.0, 1.0, 1.0],
    }
    assert set(losses) == set(COLLAPSE_ARMS)
    per_method = {name: [{"test_loss": v} for v in values] for name, values in losses.items()}
    c = paired_against_control(per_method)
    assert RANDOM_ARM not in c
    assert c["first-order only"] == {"wins": 0, "losses": 5, "seeds": 5, "median_ratio": 2.0}
    assert (c["first-order + local search"]["wins"], c["first-order + local search"]["losses"]) == (1, 1)
    assert (c["first-order + refit search"]["wins"], c["first-order + refit search"]["losses"]) == (5, 0)
    text = verdict(c, seeds=5)
    assert "first-order + refit search: >= 1 % lower test MSE than the control on 5/5 seed(s), higher on 0" in text
    assert text.count("does not beat the control") == 3 and text.count("beats the control.") == 1
    assert "--seeds 10" in verdict(c, seeds=3)
