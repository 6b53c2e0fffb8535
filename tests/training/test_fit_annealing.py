"""``fit`` fits a selector gate's BudgetAnnealing to its own budget, and leaves explicit choices alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from routing_search import MoE
from routing_search.data import make_synthetic_moe
from routing_search.gates import COMET, DSelectK, GammaAnnealing
from routing_search.gates.annealed import BudgetAnnealing
from routing_search.training import fit, mse_loss

# Runs that end soft on purpose (the controls) warn so; that warning is not what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore:training ended with non-binary selector gate")


@pytest.fixture(scope="module")
def task():
    data = make_synthetic_moe(num_samples=150, input_dim=5, num_experts=4, k=2, num_tasks=1, seed=1)
    train, val = data.split((2 / 3, 1 / 3))  # 100 training rows: 10 batches of 10 per epoch
    return (train.x, train.y), (val.x, val.y)


def build(anneal, *, gate_cls=DSelectK, seed: int = 0, gamma=1.0) -> MoE:
    torch.manual_seed(seed)
    return MoE([nn.Linear(5, 1) for _ in range(4)], gate_cls(4, 2, anneal=anneal, gamma=gamma))


def train(model: MoE, task, **kwargs):
    (x, y), val = task
    options = dict(val_data=val, epochs=10, batch_size=10, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), progress=False)
    options.update(kwargs)
    return fit(model, (x, y), mse_loss, **options)


@pytest.mark.parametrize("gate_cls", [DSelectK, COMET])
def test_a_100_step_run_ends_binary_with_the_budget_annealing(task, gate_cls):
    result = train(build(BudgetAnnealing(), gate_cls=gate_cls), task)
    gate = result.model.gate
    assert gate.is_binary() and int(gate.calls) == 100
    assert result.gamma_annealing == {
        "gate": {"status": "fitted", "total_steps": 100, "start": 0, "begin": 50, "end": 80, "final_ratio": 2e-3}
    }
    assert gate.fitted_annealing == GammaAnnealing(begin=50, end=80, final_ratio=2e-3)
    assert gate.gamma == pytest.approx(2e-3)
    # The call-count annealing of the same values as before_fit leaves the same short run soft.
    fixed = train(build(GammaAnnealing(), gate_cls=gate_cls), task)
    assert not fixed.model.gate.is_binary() and fixed.model.gate.gamma == 1.0


def test_max_steps_is_the_budget_when_smaller(task):
    result = train(build(BudgetAnnealing(begin=0.2, end=0.6)), task, max_steps=40)
    assert result.gamma_annealing["gate"]["total_steps"] == 40
    assert (result.gamma_annealing["gate"]["begin"], result.gamma_annealing["gate"]["end"]) == (8, 24)
    assert result.model.gate.is_binary()


@pytest.mark.parametrize(
    "anneal, gamma, reason",
    [
        (GammaAnnealing(begin=30, end=60), 1.0, "explicit GammaAnnealing"),
        (None, 1.0, "no annealing"),
        (GammaAnnealing(), lambda calls: 1.0 / (1 + calls), "callable gamma"),
    ],
)
def test_an_explicit_choice_is_left_alone(task, anneal, gamma, reason):
    model = build(anneal, gamma=gamma)
    schedule_before = model.gate.gamma_schedule
    result = train(model, task)
    gate = result.model.gate
    assert gate.anneal is (None if callable(gamma) else anneal) and gate.fitted_annealing is None
    assert gate.gamma_schedule is schedule_before
    assert result.gamma_annealing["gate"]["status"] == "kept" and reason in result.gamma_annealing["gate"]["reason"]


def test_fitted_once_a_second_fit_keeps_the_first_schedule(task):
    model = build(BudgetAnnealing())
    first = train(model, task, epochs=4)
    assert first.gamma_annealing["gate"]["end"] == 32
    second = train(model, task, epochs=10)
    assert second.gamma_annealing["gate"] == {"status": "kept", "reason": "already fitted to a budget",
                                              "begin": 20, "end": 32, "final_ratio": 2e-3}
    assert model.gate.fitted_annealing == GammaAnnealing(begin=20, end=32, final_ratio=2e-3)


def test_a_gate_already_annealing_under_before_fit_is_not_refitted(task):
    model = build(BudgetAnnealing(before_fit=GammaAnnealing(begin=2, end=50)))
    model.train()
    for _ in range(10):  # a hand-written loop: gamma already falls
        model(task[0][0][:4])
    gamma_before = model.gate.gamma
    assert gamma_before < 1.0
    result = train(model, task, epochs=1)
    assert result.gamma_annealing["gate"]["status"] == "kept"
    assert "already started to fall" in result.gamma_annealing["gate"]["reason"]
    assert model.gate.fitted_annealing is None


def test_a_gate_trained_before_fit_is_fitted_from_its_current_call(task):
    model = build(BudgetAnnealing())
    model.train()
    for _ in range(7):
        model(task[0][0][:4])
    result = train(model, task)
    record = result.gamma_annealing["gate"]
    assert (record["start"], record["begin"], record["end"]) == (7, 57, 87)
    assert model.gate.is_binary()


def test_resume_is_bit_exact_and_keeps_the_original_schedule(task, tmp_path):
    full = train(build(BudgetAnnealing()), task, checkpoint_dir=tmp_path / "full")

    def stop_after_epoch_3(event):
        return event.epoch == 3

    part = train(build(BudgetAnnealing()), task, checkpoint_dir=tmp_path / "part", callbacks=[stop_after_epoch_3])
    assert part.epochs_run == 4 and part.gamma_annealing == full.gamma_annealing
    resumed = train(build(BudgetAnnealing(), seed=5), task, checkpoint_dir=tmp_path / "part", resume=True)
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert full.history.step_loss == resumed.history.step_loss
    assert resumed.gamma_annealing == full.gamma_annealing

    # A run planned for 4 epochs and resumed for 10 keeps its 4-epoch schedule (nothing refitted silently).
    short = train(build(BudgetAnnealing()), task, epochs=4, checkpoint_dir=tmp_path / "short")
    longer = train(build(BudgetAnnealing()), task, checkpoint_dir=tmp_path / "short", resume=True)
    assert longer.gamma_annealing == short.gamma_annealing
    assert longer.model.gate.fitted_annealing == GammaAnnealing(begin=20, end=32, final_ratio=2e-3)


def test_resume_from_a_checkpoint_without_a_record_keeps_before_fit(task, tmp_path):
    path = tmp_path / "old"
    train(build(GammaAnnealing()), task, epochs=2, checkpoint_dir=path)  # a run whose gate had no BudgetAnnealing
    resumed = train(build(BudgetAnnealing()), task, epochs=3, checkpoint_dir=path, resume=True)
    assert resumed.gamma_annealing["gate"]["status"] == "kept"
    assert resumed.model.gate.fitted_annealing is None


def test_budget_annealing_rejects_bad_fractions_and_gates_reject_other_types():
    with pytest.raises(ValueError, match="begin < end"):
        BudgetAnnealing(begin=0.8, end=0.5)
    with pytest.raises(TypeError, match="before_fit"):
        BudgetAnnealing(before_fit=(500, 800))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BudgetAnnealing or None"):
        DSelectK(4, 2, anneal=(0.5, 0.8))  # type: ignore[arg-type]
    gate = DSelectK(4, 2, anneal=GammaAnnealing())
    with pytest.raises(ValueError, match="only a gate built with a BudgetAnnealing"):
        gate.restore_annealing(GammaAnnealing())


def test_set_annealing_with_a_budget_annealing_is_fitted_again():
    gate = DSelectK(4, 2, anneal=BudgetAnnealing())
    assert gate.fit_annealing(10)["status"] == "fitted" and not gate.annealing_pending
    gate.set_annealing(BudgetAnnealing(begin=0.1, end=0.2))
    assert gate.annealing_pending and gate.fitted_annealing is None
    assert gate.fit_annealing(10)["begin"] == 1


def test_a_one_step_budget_is_accepted_and_explicit_annealings_are_not_validated_against_it(task):
    # Regression: fit with max_steps=1 raised "total_steps must be >= 2" even for gates it leaves alone.
    kept = train(build(GammaAnnealing()), task, max_steps=1)
    assert kept.gamma_annealing["gate"]["status"] == "kept"
    fitted = train(build(BudgetAnnealing()), task, max_steps=1)
    assert fitted.gamma_annealing["gate"]["status"] == "fitted" and fitted.model.gate.gamma == 1.0
