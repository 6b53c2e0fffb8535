"""The demo's control arm and its paired verdict."""

from __future__ import annotations

from routing_search.cli.demo import (
    COLLAPSE_ARMS,
    RANDOM_ARM,
    paired_against_control,
    verdict,
)


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


def test_study_says_in_words_how_search_compares_with_both_controls() -> None:
    from routing_search.cli.study import ARMS, StudyRow, interpret

    def row(arm: str, loss: float, gap: float = 0.1) -> StudyRow:
        return StudyRow("TopK", arm, loss, gap, 0.0, 0.0, 0.0, 0.0, 2.0, 1.0, 0.0, 0.0)

    rows = [row(ARMS[0], 1.0), row(ARMS[1], 0.8), row(ARMS[2], 0.9, gap=0.0)]
    (line,) = [x for x in interpret(rows) if x.startswith("- TopK")]
    assert "better than first-order training by 10.0 %" in line
    assert "worse than the random control by 12.5 %" in line
    assert "ends at the best permutation" in line
    rows = [row(ARMS[0], 1.0), row(ARMS[1], 1.005), row(ARMS[2], 1.0)]
    (line,) = [x for x in interpret(rows) if x.startswith("- TopK")]
    assert "within 1 % of first-order training" in line and "within 1 % of the random control" in line


def test_paired_against_control_rejects_arms_with_other_seed_counts() -> None:
    # the per-seed pairing used zip, which silently dropped the seeds one list lacked
    import pytest

    per_method = {RANDOM_ARM: [{"test_loss": 1.0}] * 3, "first-order only": [{"test_loss": 2.0}] * 2}
    with pytest.raises(ValueError, match="equal-length"):
        paired_against_control(per_method)
