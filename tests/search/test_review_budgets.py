"""Regression tests from the front-door review: budgets, callbacks and non-finite objectives are honoured by
every method ('exhaustive' and the refit search included), with the shared status vocabulary."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from routing_search.gates import TopK
from routing_search.layers import MoE, make_experts
from routing_search.losses import mse_loss
from routing_search.result import STATUS_BUDGET, STATUS_CONVERGED, STATUS_NONFINITE
from routing_search.search import local_search
from routing_search.search.refit import refit_search


def _problem(n: int = 5, seed: int = 1, rows: int = 96, u: int = 2):
    torch.manual_seed(seed)
    moe = MoE(make_experts(n, 3, [8], u, generator=torch.Generator().manual_seed(seed)), TopK(num_experts=n, k=2, input_dim=3))
    with torch.no_grad():
        moe.permutations[0].index.copy_(torch.roll(torch.arange(n), 1).unsqueeze(0))
    x, y = torch.randn(rows, 3), torch.randn(rows, u)
    return moe, x, y


def test_exhaustive_max_iter_zero_makes_no_move():
    moe, x, y = _problem()
    start = moe.permutations[0].index.clone()
    res = local_search(moe, (x, y), mse_loss, "exhaustive", max_iter=0)
    assert res.status == STATUS_BUDGET and not res.success and "max_iter" in res.message
    assert res.nit == 0 and res.moves == [] and res.fun == res.fun0
    assert torch.equal(moe.permutations[0].index, start)


def test_exhaustive_calls_the_callback_and_stops_on_true():
    moe, x, y = _problem()
    seen = []
    res = local_search(moe, (x, y), mse_loss, "exhaustive", apply=False, callback=lambda r: seen.append(r.fun) or True)
    assert res.nit == 1 and seen == [res.fun] and res.fun < res.fun0
    assert res.status == STATUS_BUDGET and "callback" in res.message
    free = local_search(moe, (x, y), mse_loss, "exhaustive", apply=False, callback=lambda r: None)
    assert free.status == STATUS_CONVERGED and free.fun == res.fun


def test_exhaustive_max_evals_stops_between_blocks_with_the_best_state_seen():
    moe, x, y = _problem(n=8, rows=48, u=1)
    full = local_search(moe, (x, y), mse_loss, "exhaustive", apply=False, max_states=50_000)
    part = local_search(moe, (x, y), mse_loss, "exhaustive", apply=False, max_states=50_000, max_evals=100)
    assert full.status == STATUS_CONVERGED and full.nfev > 40_000
    assert part.status == STATUS_BUDGET and "max_evals" in part.message
    assert part.nfev < full.nfev and full.fun <= part.fun <= part.fun0
    # The returned state is the one its loss says (replaying the moves leads there).
    assert part.moves == [] or part.moves[-1].fun_after == part.fun


def test_refit_search_non_finite_held_out_loss_is_status_2_and_changes_nothing():
    moe, x, y = _problem(n=4, u=1)
    y_bad = y.clone()
    y_bad[70] = float("nan")
    before = copy.deepcopy(moe.state_dict())
    with pytest.warns(RuntimeWarning, match="not finite"):
        res = refit_search(moe, (x[:48], y[:48]), (x[48:], y_bad[48:]), mse_loss)
    assert res.status == STATUS_NONFINITE and not res.success and res.nit == 0 and res.moves == []
    assert all(torch.equal(before[k], v) for k, v in moe.state_dict().items())


def test_refit_search_refuses_non_finite_fit_rows_by_name():
    moe, x, y = _problem(n=4, u=1)
    y_bad = y.clone()
    y_bad[3] = float("nan")
    with pytest.raises(ValueError, match="fit_data"):
        refit_search(moe, (x[:48], y_bad[:48]), (x[48:], y[48:]), mse_loss)
    x_bad = x.clone()
    x_bad[3, 0] = float("inf")
    with pytest.raises(ValueError, match="fit_data"):
        refit_search(moe, (x_bad[:48], y[:48]), (x[48:], y[48:]), mse_loss)


def test_exhaustive_move_of_one_row_is_a_whole_state_jump_like_every_exhaustive_move():
    """A one-row 'exhaustive' result had a row move without extra['state'], which Move documents for every
    'exhaustive' move; replaying by kind raised KeyError."""
    moe, x, y = _problem()
    start = [p.index.numpy().copy() for p in moe.permutations]
    res = local_search(moe, (x, y), mse_loss, "exhaustive")
    assert res.nit == 1 and len(res.moves) == 1 and res.guard is None
    move = res.moves[0]
    assert (move.kind, move.slot, move.selector) == ("exhaustive", -1, -1)
    assert [np.asarray(s).tolist() for s in move.extra["state"]] == [s.tolist() for s in res.x]
    assert move.fun_before == res.fun0 and move.fun_after == res.fun
    assert not np.array_equal(start[0], res.x[0])


@pytest.mark.parametrize("tokens", [5, 6])
def test_token_shaped_layer_input_is_refused_clearly_and_token_rows_work(tokens):
    """[batch, tokens, d] input reached the cache as if the tokens were experts: an einsum RuntimeError (tokens = n)
    or 'the gate returned weights over 6 experts but the permutation has 5'."""
    moe, _, _ = _problem(n=5)
    x, y = torch.randn(16, tokens, 3), torch.randn(16, tokens, 2)
    with pytest.raises(ValueError, match="token shape"):
        local_search(moe, (x, y), lambda p, t: ((p - t) ** 2).mean(dim=(-1, -2)), "swap")
    with pytest.raises(ValueError, match="token shape"):
        refit_search(moe, (x, y), (x, y), lambda p, t: ((p - t) ** 2).mean(dim=(-1, -2)))

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe = moe

        def forward(self, x):
            return self.moe(x).output

    with pytest.raises(ValueError, match="token shape"):
        local_search(Wrapper(), (x, y), lambda p, t: ((p - t) ** 2).mean(dim=(-1, -2)), "swap")
    # The advice works: tokens as rows, a per-token loss, the same objective.
    rows = local_search(moe, (x.reshape(-1, 3), y.reshape(-1, 2)), mse_loss, "swap", apply=False)
    with torch.no_grad():
        direct = float(((moe.eval()(x).output - y) ** 2).mean())
    assert rows.fun0 == pytest.approx(direct, rel=1e-6)


def test_refit_search_apply_and_write_layers_must_be_booleans():
    """apply='no' is truthy: the model was written although the caller asked for the opposite."""
    moe, x, y = _problem(n=4, u=1)
    before = copy.deepcopy(moe.state_dict())
    for kwargs in ({"apply": "no"}, {"write_layers": 0}):
        with pytest.raises(TypeError, match=next(iter(kwargs))):
            refit_search(moe, (x[:48], y[:48]), (x[48:], y[48:]), mse_loss, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in moe.state_dict().items())


def test_codes_on_a_hardgate_says_which_harden_gives_codes():
    """harden(..., snap=False) wraps the gate in HardGate; 'codes' then said only 'harden the gate first'."""
    from routing_search.analysis import harden
    from routing_search.gates import DSelectK

    torch.manual_seed(0)
    moe = MoE(make_experts(4, 3, [8], 2), DSelectK(num_experts=4, k=2))
    wrapped, _ = harden(moe, snap=False)
    x, y = torch.randn(30, 3), torch.randn(30, 2)
    with pytest.raises(ValueError, match="snap=True"):
        local_search(wrapped, (x, y), mse_loss, "codes")
    snapped, _ = harden(moe)
    assert local_search(snapped, (x, y), mse_loss, "codes").status == STATUS_CONVERGED
