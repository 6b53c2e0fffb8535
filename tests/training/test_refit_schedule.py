"""fit's refit schedule (SearchSchedule(refit=RefitOptions(...))), the searcher protocol, and their resume."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from routing_search import MultiGateMoE, make_experts
from routing_search.gates import DSelectK
from routing_search.losses import multitask_loss
from routing_search.search import local_search
from routing_search.search.codes import set_selector_slot
from routing_search.search.refit import RefitOptions, refit_search
from routing_search.training import LocalSearcher, SearchSchedule, fit
from routing_search.training.schedule import refit_rows
from routing_search.training.searcher import Searcher, generator_state, set_generator_state

LOSS = multitask_loss(["mse"] * 3)


def _collapsed(seed: int = 0) -> MultiGateMoE:
    """Static DSelect-k task gates all saturated on expert 0: only a search can wake the other experts."""
    torch.manual_seed(seed)
    gates = [DSelectK(4, 1) for _ in range(3)]
    for g in gates:
        set_selector_slot(g, 0, 0)
    return MultiGateMoE(make_experts(4, 3, [6], 1, generator=torch.Generator().manual_seed(seed)), gates)


def _data(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, generator=g)
    y = torch.stack([torch.sin(x[:, 0] * (t + 1)) + x[:, t] for t in range(3)], dim=1)
    return x, y


TRAIN, VAL = _data(160, 1), _data(60, 2)
KW: dict[str, Any] = dict(val_data=VAL, batch_size=40, progress=False, gate_loss_weight=0.0,
                          optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))


def _schedule(**kw: Any) -> SearchSchedule:
    return SearchSchedule(every_steps=4, fit_rows=100, at_start=True, refit=RefitOptions(max_iter=3), **kw)


def test_refit_schedule_equals_swap_then_refit_search_by_hand() -> None:
    """One search before training through fit == local_search('swap') then refit_search on the same rows."""
    auto = _collapsed()
    result = fit(auto, TRAIN, LOSS, epochs=1, max_steps=1, search=_schedule(), **KW)
    by_hand = _collapsed()
    local_search(by_hand, VAL, LOSS, "swap", rng=0)
    second = refit_search(by_hand, refit_rows(TRAIN, 100, 0), VAL, LOSS, max_iter=3)
    assert second.nit >= 1  # the refit woke an expert: the comparison is not vacuous
    first = result.history.searches[0]
    assert (first["epoch"], first["step"]) == (0, 0)
    assert [m["after"] for m in first["moves"]][-second.nit:] == [m.after for m in second.moves]
    # the search before training is the by-hand one; replay the single Adam step on the by-hand model
    fit(by_hand, TRAIN, LOSS, epochs=1, max_steps=1, **KW)
    for (name, a), b in zip(auto.state_dict().items(), by_hand.state_dict().values()):
        assert torch.equal(a, b), name


def test_refit_rows_are_a_fixed_seeded_training_subset_distinct_from_the_held_out_one() -> None:
    x, _ = refit_rows(TRAIN, 100, 3)
    again, _ = refit_rows(TRAIN, 100, 3)
    assert x.shape[0] == 100 and torch.equal(x, again)
    g = torch.Generator().manual_seed(5)  # seed + 2; the held-out subset uses seed + 1
    assert torch.equal(x, TRAIN[0][torch.randperm(160, generator=g)[:100].sort().values])
    assert refit_rows(TRAIN, None, 3)[0].shape[0] == 160


def test_refit_schedule_beats_frozen_search_from_a_collapsed_start() -> None:
    plain = fit(_collapsed(), TRAIN, LOSS, epochs=2, search=SearchSchedule(every_steps=4, at_start=True), **KW)
    refit = fit(_collapsed(), TRAIN, LOSS, epochs=2, search=_schedule(), **KW)
    assert all(m["kind"] != "refit-swap" for s in plain.history.searches for m in s["moves"])
    assert sum(m["kind"] == "refit-swap" for s in refit.history.searches for m in s["moves"]) >= 1
    assert refit.history.val_loss[-1] < plain.history.val_loss[-1]


def test_resume_with_the_refit_schedule_is_exact(tmp_path) -> None:
    full = fit(_collapsed(), TRAIN, LOSS, epochs=3, search=_schedule(), **KW)
    fit(_collapsed(), TRAIN, LOSS, epochs=1, search=_schedule(), checkpoint_dir=tmp_path, **KW)
    resumed_model = _collapsed()
    resumed = fit(resumed_model, TRAIN, LOSS, epochs=3, search=_schedule(), checkpoint_dir=tmp_path, resume=True, **KW)
    assert resumed.history.val_loss == full.history.val_loss
    assert [s["moves"] for s in resumed.history.searches] == [s["moves"] for s in full.history.searches]
    assert len([s for s in resumed.history.searches if s["step"] == 0]) == 1  # the start search is not repeated
    for (name, a), b in zip(full.model.state_dict().items(), resumed_model.state_dict().values()):
        # The gates' fitted gamma annealing (module extra state) legitimately differs: the first run
        # planned 1 epoch, and a resumed run keeps its original schedule (test_fit_annealing).
        assert name.endswith("_extra_state") or torch.equal(a, b), name


def test_refit_options_are_typed_and_checked() -> None:
    with pytest.raises(TypeError, match="unknown option.*'steps'.*max_iter, ridge, tol, write_layers"):
        RefitOptions.from_dict({"steps": 2})
    with pytest.raises(TypeError, match="SearchSchedule.refit must be None or a RefitOptions"):
        SearchSchedule(refit={"ridge": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RefitOptions.ridge"):
        RefitOptions(ridge=-1.0)
    with pytest.raises(ValueError, match="fit_rows"):
        SearchSchedule(refit=RefitOptions(), fit_rows=0)
    with pytest.raises(ValueError, match="must not hold.*refit"):
        SearchSchedule(options={"refit": True})
    with pytest.raises(TypeError, match="at_start must be True or False"):
        SearchSchedule(at_start=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="refit needs fit_data"):
        LocalSearcher(_collapsed(), LOSS, refit=RefitOptions())
    with pytest.raises(ValueError, match="fit_data is used only with refit"):
        LocalSearcher(_collapsed(), LOSS, fit_data=TRAIN)
    assert SearchSchedule(refit=RefitOptions(ridge=0.5)).refit == RefitOptions.from_dict({"ridge": 0.5})


def test_refit_schedule_refuses_a_model_it_cannot_refit_before_training() -> None:
    wrapped = torch.nn.Sequential(_collapsed())
    with pytest.raises(ValueError, match="MoE / MultiGateMoE layer itself"):
        fit(wrapped, TRAIN, LOSS, epochs=1, search=_schedule(), **KW)




def test_refit_schedule_under_a_process_group_equals_one_process(group_of_one) -> None:
    # Regression: the refit schedule was refused under a process group (its ridge solves used each rank's rows);
    # the normal equations are now all-reduced, so a group (here of one rank) equals a single process.
    grouped, alone = _collapsed(), _collapsed()
    a = fit(grouped, TRAIN, LOSS, epochs=1, search=_schedule(), **KW)
    b = fit(alone, TRAIN, LOSS, epochs=1, search=_schedule(), process_group=False, **KW)
    assert [s["moves"] for s in a.history.searches] == [s["moves"] for s in b.history.searches]
    assert any(s["accepted"] for s in a.history.searches)
    for (name, p), q in zip(grouped.named_parameters(), alone.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), name


class _EveryOther:
    """A minimal searcher that is not a LocalSearcher: the frozen swap search on even steps."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.rng = torch.Generator()  # unused; the state below is numpy's
        import numpy as np

        self.np_rng = np.random.default_rng(0)
        self.log: list[dict[str, Any]] = []

    def due(self, step: int) -> bool:
        return step % 2 == 0

    def step(self, step: int, data: Any) -> Any:
        if not self.due(step):
            return None
        result = local_search(self.model, data, LOSS, "swap", rng=self.np_rng)
        self.log.append({"step": step})
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"log": list(self.log), "rng": generator_state(self.np_rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log = list(state["log"])
        self.np_rng = set_generator_state(self.np_rng, state["rng"])


def test_fit_takes_any_searcher_with_the_protocol(tmp_path) -> None:
    model = _collapsed(1)
    searcher = _EveryOther(model)
    assert isinstance(searcher, Searcher)
    result = fit(model, TRAIN, LOSS, epochs=2, search=searcher, checkpoint_dir=tmp_path, **KW)
    assert [s["step"] for s in result.history.searches] == [2, 4, 6, 8]
    assert all(s["seconds"] >= 0 for s in result.history.searches)  # measured by fit: the log has no seconds
    with pytest.raises(ValueError, match="different model"):
        fit(_collapsed(1), TRAIN, LOSS, epochs=1, search=_EveryOther(_collapsed(2)), **KW)
    with pytest.raises(TypeError, match="lacks step, state_dict, load_state_dict, log"):
        fit(_collapsed(1), TRAIN, LOSS, epochs=1, search=type("Half", (), {"due": lambda self, s: True})(), **KW)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refit_schedule_on_cuda_matches_cpu() -> None:
    cpu = fit(_collapsed(), TRAIN, LOSS, epochs=1, search=_schedule(), device="cpu", **KW)
    gpu = fit(_collapsed(), TRAIN, LOSS, epochs=1, search=_schedule(), device="cuda", **KW)
    assert [s["moves"] for s in gpu.history.searches][0] == [s["moves"] for s in cpu.history.searches][0]
    assert gpu.history.val_loss[-1] == pytest.approx(cpu.history.val_loss[-1], rel=1e-3)


def test_a_guard_is_applied_by_the_refit_stage() -> None:
    # Regression: guard= was not applied by the refit stage (then refused with refit); now every refit move
    # must pass the guards too, judged against the first stage's start.
    from routing_search.search import MetricGuard

    def opposed(preds: Any, targets: Any) -> float:  # higher when the loss is higher: refuses every improving move
        return float(LOSS(preds, targets).mean())

    free = LocalSearcher(_collapsed(), LOSS, refit=RefitOptions(max_iter=3), fit_data=TRAIN, rng=0)(VAL)
    assert free.stages["refit"].nit >= 1
    model = _collapsed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guarded = LocalSearcher(model, LOSS, refit=RefitOptions(max_iter=3), fit_data=TRAIN, rng=0, guard=MetricGuard(opposed))(VAL)
    assert guarded.nit == 0 and guarded.stages["refit"].guard_rejections >= 1
    assert guarded.guard_rejections >= guarded.stages["refit"].guard_rejections
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was written
    # A guard that every move passes changes nothing.
    same = LocalSearcher(_collapsed(), LOSS, refit=RefitOptions(max_iter=3), fit_data=TRAIN, rng=0,
                         guard=MetricGuard(lambda p, t: 0.0, name="constant"))(VAL)
    assert [m.after for m in same.moves] == [m.after for m in free.moves] and same.fun == free.fun


def test_history_counts_the_moves_a_guard_refused() -> None:
    from routing_search.search import MetricGuard

    def opposed(preds: Any, targets: Any) -> float:  # higher when the loss is higher: refuses every improving move
        return float(LOSS(preds, targets).mean())

    from routing_search.gates import TopK

    def model() -> MultiGateMoE:  # per-example Top-1 routers: the epoch-end search finds improving swaps
        torch.manual_seed(0)
        return MultiGateMoE(make_experts(4, 3, [6], 1, generator=torch.Generator().manual_seed(0)), [TopK(4, 1, 3) for _ in range(3)])

    guarded = fit(model(), TRAIN, LOSS, epochs=1, search=SearchSchedule(every_epochs=1, options={"guard": MetricGuard(opposed)}), **KW)
    free = fit(model(), TRAIN, LOSS, epochs=1, search=SearchSchedule(every_epochs=1), **KW)
    (g,), (f,) = guarded.history.searches, free.history.searches
    assert f["accepted"] > 0 and f["guard_rejections"] == 0
    assert g["accepted"] == 0 and g["guard_rejections"] > 0


def test_rounds_bounds_the_search_before_training_too() -> None:
    # Regression: rounds=0 with at_start=True still searched once before training ("at most this many
    # searches in the whole run"); the start search counts as one of the rounds.
    none = fit(_collapsed(), TRAIN, LOSS, epochs=1, search=SearchSchedule(every_steps=2, rounds=0, at_start=True), **KW)
    assert none.history.searches == []
    one = fit(_collapsed(), TRAIN, LOSS, epochs=1, search=SearchSchedule(every_steps=2, rounds=1, at_start=True), **KW)
    assert [(s["epoch"], s["step"]) for s in one.history.searches] == [(0, 0)]


def test_a_budget_stop_of_the_search_stage_is_the_combined_results_status() -> None:
    """Regression: the combined result took the refit stage's status only, so a first stage stopped by
    max_iter followed by a converged refit reported status 0 / success."""
    result = LocalSearcher(_collapsed(), LOSS, refit=RefitOptions(max_iter=50), fit_data=TRAIN, rng=0, max_iter=1)(VAL)
    assert result.stages["search"].status == 1 and result.stages["refit"].status == 0
    assert result.status == 1 and not result.success
    assert "search stage: max_iter reached" in result.message
    both_done = LocalSearcher(_collapsed(), LOSS, refit=RefitOptions(max_iter=50), fit_data=TRAIN, rng=0)(VAL)
    assert both_done.stages["search"].status == 0 and both_done.status == both_done.stages["refit"].status
