"""Lookahead evaluation: judge the best few moves by what a short stretch of training makes of them.

A move onto an untrained expert looks bad with the experts frozen, even when it is the move that
training would turn into the best model. Here the swaps are first ranked by the refit-aware score of
:mod:`routing_search.search.refit`; then the ``candidates`` best of them, and the unchanged model,
are each copied, trained for ``steps`` Adam steps on the *same* training batches and from the same torch
seed (common random numbers: the same rows and the same dropout / routing-noise draws), and scored on held-out rows. The best candidate is applied (its permutation only; the
copies' training is discarded) when its lookahead score beats the unchanged model's lookahead score
by more than ``tol`` — so the comparison is like for like.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult
from torch import nn

from .._validation import check_int, check_positive_float, check_rng, warn_non_finite_start
from ..batches import as_batch, call_model, eval_mode, num_rows, take_rows, unwrap_prediction
from ..result import STATUS_CONVERGED, STATUS_NONFINITE, make_result
from .objective import LossFn, find_routing_layer
from .refit import RefitMove, RefitObjective

__all__ = ["lookahead_search", "lookahead_score"]


def _rows(data: Any) -> int:
    """Rows of ``data`` in any form ``as_batch`` takes (one batch, a list of batches, a DataLoader, a Dataset)."""
    return num_rows(as_batch(data, name="train_data"))


def lookahead_score(
    model: nn.Module, train_data: Any, score_data: Any, loss: LossFn, batches: list[torch.Tensor], *, lr: float,
    seed: int | None = None,
) -> float:
    """Held-out loss of a copy of ``model`` after Adam steps on the given row ``batches`` of ``train_data``.

    ``seed``: run the lookahead under a fork of torch's generators seeded with it (the global state is left as
    it was), so that the random draws of training (dropout, noisy gating) are the same for every lookahead
    with the same seed; ``None``: torch's global generator as it is.
    """
    if seed is None:
        return _lookahead_score(model, train_data, score_data, loss, batches, lr=lr)
    seed = check_int("seed", seed, minimum=0)
    # torch.manual_seed seeds every CUDA device too: fork them all (when CUDA is in use) to leave them as they were.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _lookahead_score(model, train_data, score_data, loss, batches, lr=lr)


def _lookahead_score(
    model: nn.Module, train_data: Any, score_data: Any, loss: LossFn, batches: list[torch.Tensor], *, lr: float
) -> float:
    clone = copy.deepcopy(model)
    clone.train()
    optimizer = torch.optim.Adam(clone.parameters(), lr=lr)
    inputs, targets = as_batch(train_data, name="train_data")
    for index in batches:
        optimizer.zero_grad(set_to_none=True)
        out = call_model(clone, take_rows(inputs, index))
        value = loss(unwrap_prediction(out), take_rows(targets, index))
        value = value.mean() if value.dim() > 0 else value
        aux = getattr(out, "loss", None)
        if isinstance(aux, torch.Tensor):
            value = value + aux
        value.backward()
        optimizer.step()
    with torch.no_grad(), eval_mode(clone):
        s_inputs, s_targets = as_batch(score_data, name="score_data")
        return float(loss(unwrap_prediction(call_model(clone, s_inputs)), s_targets).detach().to(torch.float64).mean())


def lookahead_search(
    model: nn.Module,
    train_data: Any,
    score_data: Any,
    loss: LossFn,
    *,
    candidates: int = 4,
    steps: int = 20,
    batch_size: int = 64,
    lr: float = 1e-2,
    ridge: float = 1e-3,
    tol: float = 0.0,
    rng: Any = None,
    apply: bool = True,
) -> OptimizeResult:
    """One lookahead-judged swap (see the module docstring).

    Args:
        model: the ``MoE`` / ``MultiGateMoE`` layer (the refit ranking needs it called directly, with
            identity towers and experts ending in an ``nn.Linear``).
        train_data: ``(inputs, targets)`` training rows (the refits and the lookahead steps use them).
        score_data: ``(inputs, targets)`` held-out rows every lookahead is scored on.
        loss: per-example loss.
        candidates: how many refit-ranked swaps get a lookahead.
        steps: Adam steps of every lookahead (the same batches for every candidate).
        batch_size: rows per lookahead step.
        lr: Adam learning rate of the lookahead.
        ridge: ridge of the refit ranking.
        tol: the chosen swap must beat the unchanged model's lookahead score by more than this.
        rng: seed or ``numpy.random.Generator`` of the lookahead batches and of the torch seed every lookahead
            trains from (torch's global generator is left as it was).
        apply: write the chosen permutation into the model.

    Returns:
        ``OptimizeResult``: ``x`` (permutation arrays), ``fun`` / ``fun0`` (lookahead score of the
        chosen / unchanged state), ``nit`` (0 or 1), ``nfev`` (refit evaluations plus lookaheads), ``moves``
        (a :class:`~routing_search.search.refit.RefitMove` with the two swapped ``slots`` and the ``experts``
        they exchange), ``status`` (0; 2 when the unchanged model's lookahead score is NaN/inf: a
        ``RuntimeWarning``, nothing searched, the model unchanged).
    """
    candidates = check_int("candidates", candidates, minimum=1)
    steps = check_int("steps", steps, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    lr = check_positive_float("lr", lr)
    tol = check_positive_float("tol", tol, allow_zero=True)
    generator = check_rng(rng, name="rng")
    if not isinstance(apply, bool):
        raise TypeError(f"apply must be True or False, got {apply!r}")
    layer, nested = find_routing_layer(model)
    if nested:
        raise ValueError("lookahead search needs the MoE / MultiGateMoE layer itself as the model")
    obj = RefitObjective(layer, train_data, score_data, loss, ridge=ridge)
    ranked = [(obj.score_move(new, experts)[0], p, s, a, c, new, experts) for p, s, a, c, new, experts in obj.swaps()]
    ranked.sort(key=lambda item: (math.isnan(item[0]), item[0]))  # a NaN refit score ranks last, not anywhere
    total = _rows(train_data)
    batches = [torch.as_tensor(generator.choice(total, size=min(batch_size, total), replace=False)) for _ in range(steps)]
    # Common random numbers for the training draws too (dropout, noisy gating): every lookahead runs from the same
    # torch seed, so a candidate and the unchanged model differ by the move, not by their noise.
    seed = int(generator.integers(2**63 - 1))
    base = lookahead_score(layer, train_data, score_data, loss, batches, lr=lr, seed=seed)
    if not math.isfinite(base):
        warn_non_finite_start("lookahead_search: the unchanged model's lookahead score", base,
                              "the data, the targets, the loss and lr")
        return make_result(
            x=[np.asarray(s) for s in obj.state], fun=base, nit=0, nfev=obj.nfev + 1, status=STATUS_NONFINITE,
            message="non-finite lookahead score of the unchanged model: nothing searched", fun0=base, moves=[],
            method="lookahead",
        )
    best: tuple[float, int, int, int, int, list[torch.Tensor], list[int]] | None = None
    originals = [slot.get() for slot in obj.slots]
    for _, p, s, a, c, new, experts in ranked[:candidates]:
        for slot, index in zip(obj.slots, new):
            slot.set(index)
        value = lookahead_score(layer, train_data, score_data, loss, batches, lr=lr, seed=seed)
        # A NaN/inf lookahead (a candidate whose training diverged) is not a candidate; a first NaN kept as the
        # best would compare False with every later score, which were then never chosen.
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, p, s, a, c, new, experts)
    for slot, original in zip(obj.slots, originals):
        slot.set(original)
    moves: list[RefitMove] = []
    fun = base
    state: list[torch.Tensor] = obj.state
    if best is not None and best[0] < base - tol:
        value, p, s, a, c, new, experts = best
        # The swapped slots and the two experts they exchange (a set difference of the rows was always empty).
        moves.append(RefitMove("lookahead-swap", p, s, obj.state[p][s].tolist(), new[p][s].tolist(), base, value,
                               list(experts), [a, c]))
        fun, state = value, new
        if apply:
            for slot, index in zip(obj.slots, new):
                slot.set(index)
    return make_result(
        x=[np.asarray(s) for s in state], fun=fun, nit=len(moves), nfev=obj.nfev + 1 + min(candidates, len(ranked)),
        status=STATUS_CONVERGED, message="lookahead judged the best refit-ranked swaps", fun0=base, moves=moves,
        method="lookahead",
    )
