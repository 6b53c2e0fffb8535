"""Arrays and losses shared by the exact solvers: input checks, the named losses and their units.

One convention for every array front door of :mod:`routing_search.exact` (``solve_subset``,
``subset_objective``, ``solve_permutation``, ``permutation_loss``):

* ``F`` are expert outputs ``[B, n, u]`` (or ``[B, n]`` when ``u = 1``), ``y`` targets ``[B, u]`` (or
  ``[B]``); numpy arrays, torch tensors or nested sequences, all finite.
* ``loss`` is a NAME (:data:`LOSSES`):

  - ``"squared"``: the mean over examples of the mean over the ``u`` output units of ``(ŷ − y)²`` —
    exactly what :func:`routing_search.losses.mse_loss` averages over a batch;
  - ``"logistic"``: ``u = 1``, ``y ∈ {0, 1}``, the mixture is a logit:
    mean over examples of ``log(1 + e^ŷ) − y·ŷ`` — exactly
    :func:`routing_search.losses.bce_with_logits_loss` averaged over a batch.

Every ``fun``, ``bound`` and ``gap`` the solvers report is in these units.

Example:
    >>> import numpy as np
    >>> F = np.array([[[1.0, 0.0], [0.0, 2.0]]])          # one example, two experts, two outputs
    >>> y = np.array([[1.0, 1.0]])
    >>> mixture_loss(np.array([[0.5, 1.0]]), y, "squared")  # ((0.5-1)^2 + 0^2) / 2
    0.125
    >>> F3, y2 = prepare_outputs_targets(F, y); F3.shape, y2.shape
    ((1, 2, 2), (1, 2))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validation import as_finite_array, check_choice

__all__ = ["LOSSES", "prepare_outputs_targets", "check_loss_name", "mixture_loss", "mixture_losses"]

LOSSES = ("squared", "logistic")
"""The loss names every array solver accepts."""

_LOSS_HELP = (
    "the array solvers take a loss NAME, 'squared' (mean squared error, as routing_search.losses.mse_loss) "
    "or 'logistic' (binary cross-entropy on the mixture as logit, as bce_with_logits_loss); for another "
    "loss use routing_search.analysis.optimality_gap or local_search(method='exhaustive') on the model "
    "with a torch per-example loss"
)


def prepare_outputs_targets(F: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """``F`` as ``[B, n, u]`` and ``y`` as ``[B, u]`` float64 arrays after checking shapes and finiteness."""
    F = as_finite_array("F", F)
    y = as_finite_array("y", y)
    if F.ndim == 2:
        F = F[:, :, None]
    elif F.ndim != 3:
        raise ValueError(f"F must have shape [B, n, u] or [B, n] (expert outputs), got shape {F.shape}")
    B, n, u = F.shape
    if B == 0 or n == 0 or u == 0:
        raise ValueError(f"F must have B >= 1 examples, n >= 1 experts, u >= 1 outputs; got shape {F.shape}")
    if y.ndim == 1:
        y = y[:, None]
    elif y.ndim != 2:
        raise ValueError(f"y must have shape [B, u] or [B] (targets), got shape {y.shape}")
    if y.shape != (B, u):
        raise ValueError(
            f"y must have shape [B={B}, u={u}] (or [B={B}] when u=1) to match F of shape {F.shape}, "
            f"got shape {y.shape}"
        )
    return F, y


def check_loss_name(loss: Any, F: np.ndarray, y: np.ndarray) -> str:
    """Check a loss name and its data requirements (logistic: ``u = 1`` and ``y ∈ {0, 1}``)."""
    if not isinstance(loss, str):
        raise TypeError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {type(loss).__name__}: {_LOSS_HELP}")
    check_choice("loss", loss, LOSSES)
    if loss == "logistic":
        if F.shape[2] != 1:
            raise ValueError(f"loss='logistic' needs a single output (u=1); F has u={F.shape[2]}")
        if not np.all((y == 0.0) | (y == 1.0)):
            raise ValueError("loss='logistic' needs binary targets: y must contain only 0 and 1")
    return loss


def mixture_losses(pred: np.ndarray, y: np.ndarray, loss: str) -> np.ndarray:
    """Per-example losses of predictions ``pred`` ``[..., B, u]`` against ``y`` ``[B, u]``: ``[..., B]``."""
    if loss == "squared":
        return np.mean((pred - y) ** 2, axis=-1)
    z, t = pred[..., 0], y[:, 0]
    return np.logaddexp(0.0, z) - t * z


def mixture_loss(pred: np.ndarray, y: np.ndarray, loss: str) -> float:
    """The named loss of predictions ``pred`` ``[B, u]`` against ``y`` ``[B, u]`` (mean over examples)."""
    return float(np.mean(mixture_losses(pred, y, loss)))
