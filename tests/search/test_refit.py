"""Refit-aware search: exact scores, the closed form, the acceptance rule and its scope errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from routing_search import MoE, MultiGateMoE, TopK, make_experts
from routing_search.gates import DSelectK
from routing_search.losses import mse_loss, multitask_loss
from routing_search.search.codes import set_selector_slot
from routing_search.search.refit import RefitObjective, last_linear_layers, refit_search


def _collapsed_multigate(seed: int = 0, n: int = 4, tasks: int = 3) -> tuple[MultiGateMoE, tuple, tuple]:
    """Static DSelect-k task gates all saturated on expert 0; targets need different experts per task."""
    torch.manual_seed(seed)
    gates = [DSelectK(n, 1) for _ in range(tasks)]
    for g in gates:
        set_selector_slot(g, 0, 0)
    model = MultiGateMoE(make_experts(n, 3, [8], 1), gates)
    x = torch.randn(400, 3)
    y = torch.stack([torch.sin(x[:, 0] * (t + 1)) + x[:, t % 3] for t in range(tasks)], dim=1)
    return model, (x[:200], y[:200]), (x[200:], y[200:])


def _model_loss(model: nn.Module, data: tuple, loss) -> float:
    model.eval()
    with torch.no_grad():
        out = model(data[0])
        pred = out.outputs if hasattr(out, "outputs") else out.output
        return float(loss(pred, data[1]).double().mean())


def test_objective_value_is_the_models_loss() -> None:
    model, fit_data, score_data = _collapsed_multigate()
    loss = multitask_loss(["mse"] * 3)
    obj = RefitObjective(model, fit_data, score_data, loss)
    assert obj.fun == pytest.approx(_model_loss(model, score_data, loss), rel=1e-6)


def test_refit_without_ridge_is_least_squares() -> None:
    torch.manual_seed(1)
    moe = MoE(make_experts(3, 2, [5], 1), TopK(3, 1, input_dim=2))
    x = torch.randn(300, 2)
    y = (x[:, :1] ** 2).double()
    obj = RefitObjective(moe, (x, y), (x, y), mse_loss, ridge=0.0)
    theta = obj.refit(obj.state, [0, 1, 2])
    # Reference: weighted features of all experts against y, by numpy least squares.
    w = obj.weights(obj.fit_part, obj.state)[0].numpy()
    feats = obj.fit_part.features.numpy()
    design = (w[:, :, None] * feats).reshape(300, -1)
    reference = np.linalg.lstsq(design, y.numpy(), rcond=None)[0]
    ours = torch.cat([theta[e] for e in range(3)]).numpy()
    assert np.allclose(design @ ours, design @ reference, atol=1e-6)


def test_huge_ridge_keeps_the_current_layers() -> None:
    model, fit_data, score_data = _collapsed_multigate()
    obj = RefitObjective(model, fit_data, score_data, multitask_loss(["mse"] * 3), ridge=1e9)
    theta = obj.refit(obj.state, [0, 1])
    assert torch.allclose(theta[0], obj.theta[0], atol=1e-6)
    assert torch.allclose(theta[1], obj.theta[1], atol=1e-6)


def test_refit_search_wakes_dead_experts_and_its_result_is_exact() -> None:
    model, fit_data, score_data = _collapsed_multigate()
    loss = multitask_loss(["mse"] * 3)
    result = refit_search(model, fit_data, score_data, loss)
    assert result.nit >= 1 and result.fun < result.fun0
    # What was written into the model scores exactly what the search reported.
    assert _model_loss(model, score_data, loss) == pytest.approx(result.fun, rel=1e-5)
    used = {int(p.index[0, 0]) for p in model.permutations}
    assert len(used) > 1  # tasks no longer share expert 0 only
    for move in result.moves:
        assert move.fun_after < move.fun_before


def test_no_apply_leaves_the_model_unchanged() -> None:
    model, fit_data, score_data = _collapsed_multigate(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refit_search(model, fit_data, score_data, multitask_loss(["mse"] * 3), apply=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_max_iter_zero_is_a_budget_stop() -> None:
    model, fit_data, score_data = _collapsed_multigate()
    result = refit_search(model, fit_data, score_data, multitask_loss(["mse"] * 3), max_iter=0)
    assert result.nit == 0 and result.status == 1 and not result.success and result.fun == result.fun0


def test_scope_errors_name_the_problem() -> None:
    model, fit_data, score_data = _collapsed_multigate()
    loss = multitask_loss(["mse"] * 3)
    towers = MultiGateMoE(make_experts(4, 3, [8], 1), [DSelectK(4, 1) for _ in range(3)], towers=[nn.Linear(1, 1) for _ in range(3)])
    with pytest.raises(ValueError, match="identity towers"):
        RefitObjective(towers, fit_data, score_data, loss)
    relu_out = MultiGateMoE([nn.Sequential(nn.Linear(3, 1), nn.ReLU()) for _ in range(4)], [DSelectK(4, 1) for _ in range(3)])
    with pytest.raises(ValueError, match="last nn.Linear"):
        RefitObjective(relu_out, fit_data, score_data, loss)
    with pytest.raises(ValueError, match="none"):
        last_linear_layers([nn.ReLU()])
    wrapped = nn.Sequential(model)
    with pytest.raises(ValueError, match="itself"):
        RefitObjective(wrapped, fit_data, score_data, loss)
    with pytest.raises(ValueError, match="ridge"):
        RefitObjective(model, fit_data, score_data, loss, ridge=-1.0)


def test_refit_options_are_refit_searchs_keywords() -> None:
    from routing_search.search.refit import RefitOptions

    opts = RefitOptions(ridge=0.01, max_iter=2, tol=0.0, write_layers=False)
    a, fit_a, score_a = _collapsed_multigate()
    b, _, _ = _collapsed_multigate()
    loss = multitask_loss(["mse"] * 3)
    ra = refit_search(a, fit_a, score_a, loss, **opts.kwargs())
    rb = refit_search(b, fit_a, score_a, loss, ridge=0.01, max_iter=2, write_layers=False)
    assert ra.nit == rb.nit == 2 and ra.fun == rb.fun
    # write_layers=False: only the permutations change, the last layers stay as they were
    fresh, _, _ = _collapsed_multigate()
    for la, lf in zip(last_linear_layers(list(a.experts)), last_linear_layers(list(fresh.experts))):
        assert torch.equal(la.weight, lf.weight)
    with pytest.raises(TypeError, match="RefitOptions got unknown option"):
        RefitOptions.from_dict({"ridge": 1.0, "lr": 0.1})
    with pytest.raises(TypeError, match="write_layers must be True or False"):
        RefitOptions(write_layers="no")  # type: ignore[arg-type]


def test_a_guard_refuses_refit_moves_and_the_search_tries_the_next_best() -> None:
    from routing_search.search import MetricGuard

    loss = multitask_loss(["mse"] * 3)

    def task_error(t: int):
        return lambda preds, y: float(((preds[t].squeeze(1) - y[:, t]) ** 2).mean())

    free_model, fit_data, score_data = _collapsed_multigate()
    free = refit_search(free_model, fit_data, score_data, loss)
    # Task 2's error may fall by at most 0.5: some of the moves the loss wants are refused.
    guard = MetricGuard(task_error(2), greater_is_better=True, tolerance=0.5, name="kept")
    model, _, _ = _collapsed_multigate()
    guarded = refit_search(model, fit_data, score_data, loss, guard=guard)
    assert guarded.guard_rejections >= 1 and guarded.nit >= 1 and guarded.fun < guarded.fun0
    assert [m.after for m in guarded.moves] != [m.after for m in free.moves]
    report = guarded.guard["kept"]
    assert report["start"] - report["end"] <= 0.5 + 1e-12
    # What was written is what the guard judged: the model's own task-2 error is the reported end value.
    model.eval()
    with torch.no_grad():
        assert task_error(2)(model(score_data[0]).outputs, score_data[1]) == pytest.approx(report["end"], rel=1e-6)
    # guard_start: the reference of an earlier stage; a reference no move can keep refuses every move.
    strict = refit_search(_collapsed_multigate()[0], fit_data, score_data, loss, guard=guard, guard_start=[1e9])
    assert strict.nit == 0 and strict.guard_rejections >= 1
    with pytest.raises(ValueError, match="guard_start is used only with guard"):
        refit_search(_collapsed_multigate()[0], fit_data, score_data, loss, guard_start=[0.0])
    with pytest.raises(ValueError, match="one value per guard"):
        refit_search(_collapsed_multigate()[0], fit_data, score_data, loss, guard=guard, guard_start=[0.0, 1.0])



def test_refit_guard_start_that_is_not_a_list_of_finite_floats_is_refused_by_name() -> None:
    # Regression: a bare float gave "'float' object is not iterable", naming no argument.
    from routing_search.search import MetricGuard

    loss = multitask_loss(["mse"] * 3)
    guard = MetricGuard(lambda p, y: float(((p[0].squeeze(1) - y[:, 0]) ** 2).mean()), name="task0")
    model, fit_data, score_data = _collapsed_multigate()
    with pytest.raises(TypeError, match="guard_start must be a list of floats"):
        refit_search(model, fit_data, score_data, loss, guard=guard, guard_start=0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="guard_start must be a list of floats"):
        refit_search(model, fit_data, score_data, loss, guard=guard, guard_start=["high"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"\['task0'\] are not finite at the start of the refit search"):
        refit_search(model, fit_data, score_data, loss, guard=guard, guard_start=[float("nan")])

def test_score_moves_equals_one_move_at_a_time() -> None:
    model, fit_data, score_data = _collapsed_multigate(seed=3)
    obj = RefitObjective(model, fit_data, score_data, multitask_loss(["mse"] * 3))
    swaps = obj.swaps()
    batched = obj.score_moves([(new, experts) for *_, new, experts in swaps])
    for (*_, new, experts), (value, theta) in zip(swaps, batched):
        alone = obj.value(new, obj.refit(new, experts))
        assert value == pytest.approx(alone, rel=1e-12)
        ref = obj.refit(new, experts)
        assert all(torch.allclose(theta[e], ref[e], rtol=0, atol=1e-12) for e in experts)
