"""Regression tests from a review of the search internals (each failed before its fix): the swap scan's
ordering of NaN candidates, user move operators that change their argument or yield nothing new, ..."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routing_search.gates import TopK
from routing_search.layers import MoE, make_experts
from routing_search.search import RoutingObjective, local_search

D = 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(seed: int, n: int = 6, k: int = 1, out: int = 1) -> MoE:
    torch.manual_seed(seed)
    gate = TopK(n, k, input_dim=D)
    with torch.no_grad():
        g = _gen(seed)
        for p in gate.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    return MoE(make_experts(n, D, [6], out, generator=_gen(seed)), gate).double()


def mse_rows(pred, y):
    return ((pred - y) ** 2).sum(dim=1)


def log_loss(pred, y):
    """NaN on rows whose prediction is below -1 (a log of a mixture that some permutations make negative)."""
    return (torch.log(pred[:, 0] + 1.0) - y[:, 0]) ** 2


def _log_problem():
    layer = _layer(8)
    x = torch.randn(30, D, generator=_gen(9), dtype=torch.float64)
    y = torch.randn(30, 1, generator=_gen(10), dtype=torch.float64)
    return layer, x, y


def test_swap_descent_is_not_stopped_by_nan_candidates():
    # Some swaps give NaN (a row's log of a negative mixture), others improve. The scan sorted the candidates
    # with NaN keys, which compare False with everything, so a NaN could come first; the descent stops at the
    # first value that does not improve and reported 'local optimum' (status 0) at the start.
    layer, x, y = _log_problem()
    obj = RoutingObjective(layer, (x, y), log_loss)
    values = obj.swap_values(0, 0).numpy()[np.triu_indices(obj.n, 1)]
    assert np.isfinite(obj.fun) and np.isnan(values).any() and np.nanmin(values) < obj.fun - 0.5
    result = local_search(layer, (x, y), log_loss, "swap", apply=False)
    assert result.status == 0 and result.nit >= 1
    # The end is a local optimum of the swaps whose loss is a number.
    end = RoutingObjective(layer, (x, y), log_loss)
    end.set_state(result.x)
    assert end.fun == pytest.approx(result.fun, rel=1e-12)
    at_end = end.swap_values(0, 0).numpy()[np.triu_indices(end.n, 1)]
    assert not (at_end[np.isfinite(at_end)] < result.fun - 1e-12).any()


def test_callable_move_that_changes_its_argument_in_place_does_not_change_the_state():
    # The operator got a numpy view of the objective's state: swapping in place changed the permutation
    # without re-evaluating it, so fun, x, the moves and the model written disagreed.
    layer = _layer(1, n=5, k=2, out=2)
    layer.permutation.set(np.random.default_rng(1).permutation(5))
    start = layer.permutation.get()
    x = torch.randn(40, D, generator=_gen(2), dtype=torch.float64)
    y = torch.randn(40, 2, generator=_gen(3), dtype=torch.float64)

    def neighbours_in_place(row, rng):
        out = []
        for a in range(len(row) - 1):
            row[a], row[a + 1] = row[a + 1], row[a]  # never swapped back
            out.append(row.copy())
        return out

    result = local_search(layer, (x, y), mse_rows, neighbours_in_place, strategy="first")
    state = start.copy()
    for move in result.moves:
        assert state[move.selector].tolist() == move.before
        state[move.selector] = move.after
    assert np.array_equal(state, result.x[0]) and np.array_equal(layer.permutation.get(), result.x[0])
    layer.eval()
    with torch.no_grad():
        assert float(mse_rows(layer(x).output, y).mean()) == pytest.approx(result.fun, rel=1e-12)


@pytest.mark.parametrize("strategy", ["best", "first"])
def test_callable_move_without_new_rows_is_a_local_optimum(strategy):
    # With strategy='best' the candidate block size was len(pool) = 0: 'range() arg 3 must not be zero'.
    layer = _layer(1, n=4, k=2, out=2)
    x, y = torch.randn(20, D, generator=_gen(2), dtype=torch.float64), torch.randn(20, 2, generator=_gen(3), dtype=torch.float64)
    result = local_search(layer, (x, y), mse_rows, lambda row, rng: [row.copy()], strategy=strategy)
    assert result.status == 0 and result.nit == 0 and result.fun == result.fun0


@pytest.mark.parametrize("method", ["swap", "insertion", "rotation"])
@pytest.mark.parametrize("strategy", ["best", "first"])
def test_max_evals_reached_by_the_scan_that_finds_no_improving_move_is_a_local_optimum(method, strategy):
    # max_evals = the evaluations an unbounded search makes: the last scan of the whole neighbourhood reaches
    # the budget and finds nothing. That is a local optimum; it was reported as status 1 'max_evals reached'.
    layer = _layer(1, n=5, k=2, out=2)
    layer.permutation.set(np.random.default_rng(1).permutation(5))
    x = torch.randn(40, D, generator=_gen(2), dtype=torch.float64)
    y = torch.randn(40, 2, generator=_gen(3), dtype=torch.float64)
    free = local_search(layer, (x, y), mse_rows, method, strategy=strategy, apply=False)
    assert free.status == 0 and free.nit >= 1
    capped = local_search(layer, (x, y), mse_rows, method, strategy=strategy, apply=False, max_evals=free.nfev)
    assert (capped.status, capped.success, capped.message) == (0, True, free.message)
    assert capped.nfev == free.nfev and capped.fun == free.fun and np.array_equal(capped.x[0], free.x[0])
    # One evaluation less is still a budget stop (the budget is checked between blocks: before the last scan).
    if method == "swap":
        early = local_search(layer, (x, y), mse_rows, method, strategy=strategy, apply=False, max_evals=free.nfev - 10)
        assert early.status == 1 and "max_evals" in early.message


def test_lookahead_skips_a_candidate_whose_lookahead_is_nan():
    # The first refit-ranked candidate's lookahead is NaN (log of a negative mixture on a score row); it was kept
    # as the best, every later score compared False with it, and the search reported no move (status 0) although
    # a later candidate beat the unchanged model's score.
    from routing_search.search.lookahead import lookahead_search

    layer = _layer(57, n=5)
    x = torch.randn(60, D, generator=_gen(58), dtype=torch.float64)
    y = torch.randn(60, 1, generator=_gen(59), dtype=torch.float64) * 0.3
    result = lookahead_search(layer, (x[:40], y[:40]), (x[40:], y[40:]), log_loss, candidates=4, steps=3, lr=1e-3, rng=0, apply=False)
    assert np.isfinite(result.fun0) and result.status == 0
    assert result.nit == 1 and np.isfinite(result.fun) and result.fun < result.fun0 - 0.2


def test_a_state_of_the_wrong_shape_is_refused_not_reshaped():
    # A DSelect-k layer has a [2, 3] permutation module; its transpose [3, 2] has the same number of values and
    # was reshaped into other rows ([[0, 1, 2], [0, 1, 2]] for the intended [[0, 2, 1], [1, 0, 2]]).
    from routing_search.gates import DSelectK

    torch.manual_seed(0)
    layer = MoE(make_experts(3, D, [6], 2, generator=_gen(1)), DSelectK(3, 2, input_dim=D)).double()
    x, y = torch.randn(20, D, generator=_gen(2), dtype=torch.float64), torch.randn(20, 2, generator=_gen(3), dtype=torch.float64)
    obj = RoutingObjective(layer, (x, y), mse_rows)
    intended = np.array([[0, 2, 1], [1, 0, 2]])
    for bad in (intended.T, intended.reshape(-1)):
        with pytest.raises(ValueError, match=r"state\[0\] must have shape \[2, 3\]"):
            obj.value_of([bad])
        with pytest.raises(ValueError, match=r"state\[0\] must have shape \[2, 3\]"):
            obj.set_state([bad])
    assert obj.value_of([intended]) == obj.value_of([torch.as_tensor(intended)])
    # A one-row module still takes a single row [n].
    single = RoutingObjective(_layer(1, n=3, k=1, out=2), (x, y), mse_rows)
    assert single.value_of([np.array([2, 0, 1])]) == single.value_of([np.array([[2, 0, 1]])])


@pytest.mark.parametrize("row", [(0, 0, 1, 2), (0, 1, 2, 7), (3, 2, 1)])
def test_evaluate_refuses_a_candidate_row_that_is_not_a_permutation(row):
    # The per-example (row-restricted) path read the row as it was: (0, 0, 1, 2) gave a number (expert 0
    # twice, expert 3 never), out-of-range experts an IndexError naming nothing.
    from routing_search.search import Candidate

    layer = _layer(1, n=4, k=2, out=2)
    x, y = torch.randn(20, D, generator=_gen(2), dtype=torch.float64), torch.randn(20, 2, generator=_gen(3), dtype=torch.float64)
    for loss in (mse_rows, lambda p, t: mse_rows(p, t).mean()):
        obj = RoutingObjective(layer, (x, y), loss)
        with pytest.raises(ValueError, match="candidate row"):
            obj.evaluate([Candidate(0, 0, (1, 0, 2, 3)), Candidate(0, 0, row)])


def test_lookahead_compares_like_for_like_under_training_noise():
    # With a noisy gate every lookahead drew its routing noise from torch's global generator, so the unchanged
    # model scored twice with the same batches gave two values (1.87 and 1.93 here) and a candidate's score
    # differed from the base by noise as well as by the move. Now every lookahead trains from one seed.
    from routing_search.search.lookahead import lookahead_score, lookahead_search

    torch.manual_seed(0)
    layer = MoE(make_experts(4, D, [6], 2, generator=_gen(1)), TopK(4, 2, input_dim=D, noisy=True)).double()
    x, y = torch.randn(80, D, generator=_gen(2), dtype=torch.float64), torch.randn(80, 2, generator=_gen(3), dtype=torch.float64)
    train, held = (x[:40], y[:40]), (x[40:], y[40:])
    batches = [torch.arange(i * 8, i * 8 + 16) % 40 for i in range(10)]
    before = torch.random.get_rng_state()
    scores = [lookahead_score(layer, train, held, mse_rows, batches, lr=1e-2, seed=7) for _ in range(2)]
    assert scores[0] == scores[1] and torch.equal(torch.random.get_rng_state(), before)
    # The unchanged model's score (fun0) is the same whatever torch's global generator did before the call.
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(lookahead_search(layer, train, held, mse_rows, candidates=2, steps=5, rng=3, apply=False))
    assert runs[0].fun0 == runs[1].fun0 and runs[0].fun == runs[1].fun
    assert [m.after for m in runs[0].moves] == [m.after for m in runs[1].moves]


def test_an_option_the_method_would_ignore_is_refused() -> None:
    """Regression: screen (swap descent only) and strategy (descents only) were accepted by every method and
    silently ignored by insertion / rotation / exhaustive / codes."""
    from routing_search.search import SearchOptions, option_names

    assert "screen" in option_names("swap") and "screen" not in option_names("insertion")
    assert "strategy" in option_names("rotation") and "strategy" not in option_names("exhaustive")
    with pytest.raises(TypeError, match="screen"):
        SearchOptions.for_method("insertion", screen=2)
    with pytest.raises(TypeError, match="strategy"):
        SearchOptions.for_method("exhaustive", strategy="first")
    with pytest.raises(TypeError, match="screen is used by the swap descent only"):
        SearchOptions(screen=2, neighbourhood="insertion")
    with pytest.raises(TypeError, match="not used by method='codes'"):
        SearchOptions(strategy="first").check_method("codes")
    assert SearchOptions.for_method("ils", screen=3, strategy="first").screen == 3
