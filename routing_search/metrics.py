"""Metrics on routing weights: support recovery against a ground truth, expert counts, usage, collapse.

Inputs may be numpy arrays or torch tensors (converted with ``.detach().cpu().numpy()``); all outputs
are numpy / Python numbers.

Support recovery convention. ``learned`` [T, n_learned] and ``truth`` [T, n_true] hold one row of
expert weights per task. Learned experts carry arbitrary labels, so they are first matched to true
experts: ``matching[a] = b`` means *learned expert a is true expert b* (−1: matched to none). The
learned row is then relabelled into true-expert space by scattering, ``aligned[:, matching[a]] =
learned[:, a]`` — equivalently gathering with the inverse map — and compared with the true row:

* precision = |learned support ∩ true support| / |learned support| (how much of what was picked is right),
* recall    = |learned support ∩ true support| / |true support|    (how much of the truth was found),
* F1 = 2PR / (P + R) (0 when P + R = 0), weight error = L1 distance between the aligned and true rows
  (mass on an unmatched learned expert counts fully as error and as a false positive).

By convention precision = 1 for an empty learned support and recall = 1 for an empty true support.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ._validation import as_finite_array
from .layers.moe import ExpertUsage
from .layers.moe import expert_usage as usage_of_weights

__all__ = [
    "SupportRecovery",
    "Collapse",
    "support_recovery",
    "match_experts",
    "match_experts_by_outputs",
    "experts_per_example",
    "experts_per_task",
    "expert_usage",
    "detect_collapse",
]


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _to_numpy(name: str, value: Any, *, ndim: tuple[int, ...], shape_doc: str) -> np.ndarray:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype not in _NUMPY_FLOATS:
        value = value.detach().float()  # bfloat16 / float8 have no numpy dtype (an obscure TypeError otherwise)
    return as_finite_array(name, value, ndim=ndim, shape_doc=shape_doc)


def _check_number(name: str, value: Any) -> float:
    """``value`` as a float; a string, a bool or anything else that is not a real number is refused."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None


def _check_threshold(threshold: Any) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise TypeError(f"threshold must be a number >= 0, got {threshold!r}") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    return t


@dataclass
class SupportRecovery:
    """Per-task support-recovery scores (arrays of length T), their means, and the matching used.

    ``matching[a]`` is the true expert that learned expert ``a`` was matched to (−1: none).
    """

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    weight_error: np.ndarray
    mean_precision: float
    mean_recall: float
    mean_f1: float
    mean_weight_error: float
    matching: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of all fields."""
        return asdict(self)


def match_experts(learned: Any, truth: Any) -> np.ndarray:
    """Match learned expert columns to true expert columns by their usage profiles across tasks.

    Hungarian matching (``scipy.optimize.linear_sum_assignment``) minimising the total L1 distance
    between column ``learned[:, a]`` and column ``truth[:, b]``. Returns ``matching`` of length n_learned,
    ``matching[a] = b`` (−1 for learned experts left over when n_learned > n_true). Needs enough tasks for
    the profiles to tell experts apart; otherwise pass a matching computed elsewhere (e.g. from the
    similarity of expert outputs) to :func:`support_recovery`.

    Example:
        Learned experts are the true ones relabelled (learned 0 is true 2, learned 1 is true 0, ...):

        >>> truth = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.3, 0.0, 0.7]])
        >>> match_experts(truth[:, [2, 0, 1, 3]], truth).tolist()
        [2, 0, 1, 3]
    """
    L = _to_numpy("learned", learned, ndim=(2,), shape_doc="[tasks, n_learned]")
    S = _to_numpy("truth", truth, ndim=(2,), shape_doc="[tasks, n_true]")
    if L.shape[0] != S.shape[0]:
        raise ValueError(f"truth must have as many tasks (rows) as learned: {S.shape[0]} != {L.shape[0]}")
    cost = np.abs(L[:, :, None] - S[:, None, :]).sum(axis=0)  # [n_learned, n_true]
    rows, cols = linear_sum_assignment(cost)
    matching = np.full(L.shape[1], -1, dtype=np.intp)
    matching[rows] = cols
    return matching


def match_experts_by_outputs(learned_outputs: Any, true_outputs: Any) -> np.ndarray:
    """Match learned experts to true experts by the similarity of their outputs on the same inputs.

    ``learned_outputs`` ``[N, n_learned]`` and ``true_outputs`` ``[N, n_true]`` are scalar expert outputs
    on N shared inputs. Hungarian matching maximises the total absolute Pearson correlation (the sign
    and scale of an expert's output can be absorbed by a mixture weight or a tower). Returns
    ``matching[a] = b`` as :func:`match_experts` does (−1 for leftover learned experts).

    Example:
        Learned outputs are true ones reordered, rescaled and shifted:

        >>> x = np.linspace(-1, 1, 50)
        >>> true_out = np.stack([x, x ** 2, np.sin(3 * x)], axis=1)
        >>> learned_out = np.stack([np.sin(3 * x), -2 * x, x ** 2 + 1], axis=1)
        >>> match_experts_by_outputs(learned_out, true_out).tolist()
        [2, 0, 1]
    """
    L = _to_numpy("learned_outputs", learned_outputs, ndim=(2,), shape_doc="[examples, n_learned]")
    S = _to_numpy("true_outputs", true_outputs, ndim=(2,), shape_doc="[examples, n_true]")
    if L.shape[0] != S.shape[0]:
        raise ValueError(f"true_outputs must have as many examples (rows) as learned_outputs: {S.shape[0]} != {L.shape[0]}")
    if L.shape[0] < 2:
        raise ValueError("learned_outputs needs at least 2 examples to measure correlation")
    Lc = L - L.mean(axis=0)
    Sc = S - S.mean(axis=0)
    norms = np.linalg.norm(Lc, axis=0)[:, None] * np.linalg.norm(Sc, axis=0)[None, :]
    corr = np.abs(Lc.T @ Sc) / np.where(norms > 0, norms, 1.0)
    rows, cols = linear_sum_assignment(-corr)
    matching = np.full(L.shape[1], -1, dtype=np.intp)
    matching[rows] = cols
    return matching


def _check_matching(matching: Any, n_learned: int, n_true: int) -> np.ndarray:
    if hasattr(matching, "detach") and hasattr(matching, "cpu"):
        matching = matching.detach().cpu().numpy()
    arr = np.asarray(matching)
    if arr.shape != (n_learned,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"matching must be an integer array of length n_learned={n_learned} "
            f"(matching[a] = true expert of learned expert a, or -1), got {matching!r}"
        )
    arr = arr.astype(np.intp)
    used = arr[arr >= 0]
    if np.any(arr < -1) or np.any(arr >= n_true) or used.size != np.unique(used).size:
        raise ValueError(
            f"matching must map learned experts to distinct true experts in 0..{n_true - 1} (or -1); "
            f"got {arr.tolist()}"
        )
    return arr


def support_recovery(
    learned: Any, truth: Any, *, threshold: float = 0.0, matching: Any = None
) -> SupportRecovery:
    """Precision / recall / F1 of the learned expert supports against the true ones, per task.

    Args:
        learned: [T, n_learned] learned weights, one row per task.
        truth: [T, n_true] true weights, one row per task.
        threshold: an expert is in a row's support when its |weight| > threshold (default: nonzero).
        matching: optional learned→true map (``matching[a] = b``, −1 for none), e.g. from expert-output
            similarity; by default :func:`match_experts` (Hungarian on usage profiles).

    Returns:
        :class:`SupportRecovery` (see the module docstring for the exact definitions).

    Example:
        A relabelled copy of the truth is recovered perfectly; picking expert 3 instead of expert 1
        for task 0 halves that task's precision and recall and costs an L1 weight error of 1:

        >>> truth = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.3, 0.0, 0.7]])
        >>> learned = truth[:, [2, 0, 1, 3]]
        >>> support_recovery(learned, truth).mean_f1
        1.0
        >>> learned[0] = [0.0, 0.5, 0.0, 0.5]
        >>> r = support_recovery(learned, truth, matching=[2, 0, 1, 3])
        >>> r.precision.tolist(), r.recall.tolist(), r.weight_error.tolist()
        ([0.5, 1.0, 1.0], [0.5, 1.0, 1.0], [1.0, 0.0, 0.0])
    """
    L = _to_numpy("learned", learned, ndim=(2,), shape_doc="[tasks, n_learned]")
    S = _to_numpy("truth", truth, ndim=(2,), shape_doc="[tasks, n_true]")
    if L.shape[0] != S.shape[0]:
        raise ValueError(f"truth must have as many tasks (rows) as learned: {S.shape[0]} != {L.shape[0]}")
    thr = _check_threshold(threshold)
    n_learned, n_true = L.shape[1], S.shape[1]
    match = match_experts(L, S) if matching is None else _check_matching(matching, n_learned, n_true)

    matched = match >= 0
    aligned = np.zeros_like(S)
    aligned[:, match[matched]] = L[:, matched]  # scatter: learned column a lands on true column matching[a]
    unmatched_mass = np.abs(L[:, ~matched]).sum(axis=1)
    unmatched_picked = (np.abs(L[:, ~matched]) > thr).sum(axis=1)

    in_learned = np.abs(aligned) > thr
    in_true = np.abs(S) > thr
    hits = (in_learned & in_true).sum(axis=1)
    n_learned_support = in_learned.sum(axis=1) + unmatched_picked
    n_true_support = in_true.sum(axis=1)
    precision = np.where(n_learned_support > 0, hits / np.maximum(n_learned_support, 1), 1.0)
    recall = np.where(n_true_support > 0, hits / np.maximum(n_true_support, 1), 1.0)
    denom = precision + recall
    f1 = np.where(denom > 0, 2.0 * precision * recall / np.where(denom > 0, denom, 1.0), 0.0)
    weight_error = np.abs(aligned - S).sum(axis=1) + unmatched_mass
    return SupportRecovery(
        precision=precision,
        recall=recall,
        f1=f1,
        weight_error=weight_error,
        mean_precision=float(precision.mean()),
        mean_recall=float(recall.mean()),
        mean_f1=float(f1.mean()),
        mean_weight_error=float(weight_error.mean()),
        matching=match,
    )


def experts_per_example(weights: Any, *, threshold: float = 0.0) -> np.ndarray:
    """Number of experts with |weight| > threshold in each row of ``weights`` [B, n] → int array [B].

    Example:
        >>> experts_per_example([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0]]).tolist()
        [2, 1]
    """
    W = _to_numpy("weights", weights, ndim=(2,), shape_doc="[batch, n_experts]")
    return (np.abs(W) > _check_threshold(threshold)).sum(axis=1)


def experts_per_task(task_weights: Any, *, threshold: float = 0.0) -> np.ndarray:
    """Number of experts each task uses → int array [T].

    ``task_weights`` is [T, n] (one static weight row per task: count its nonzeros) or [T, B, n]
    (per-example weights of each task: count the experts used by at least one of its examples).

    Example:
        >>> experts_per_task([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]).tolist()        # static rows
        [2, 1]
        >>> per_example = [[[1, 0, 0], [0, 1, 0]], [[0, 0, 1], [0, 0, 1]]]        # [T=2, B=2, n=3]
        >>> experts_per_task(per_example).tolist()
        [2, 1]
    """
    W = _to_numpy(
        "task_weights", task_weights, ndim=(2, 3), shape_doc="[tasks, n_experts] or [tasks, batch, n_experts]"
    )
    used = np.abs(W) > _check_threshold(threshold)
    if used.ndim == 3:
        used = used.any(axis=1)
    return used.sum(axis=1)


def expert_usage(weights: Any, *, threshold: float = 0.0) -> ExpertUsage:
    """Usage of each expert over the rows of ``weights`` [B, n] (or [..., n]) as an :class:`ExpertUsage`.

    soft[j] = mean weight of expert j; hard[j] = fraction of rows where |weight_j| > threshold. The
    same type (float64 tensors) as :func:`routing_search.layers.expert_usage`; it unpacks as
    ``soft, hard = expert_usage(W)`` (``.numpy()`` gives arrays).
    """
    W = _to_numpy("weights", weights, ndim=(2, 3), shape_doc="[batch, n_experts] (or [..., n_experts])")
    return usage_of_weights(torch.from_numpy(W), threshold=_check_threshold(threshold))


@dataclass
class Collapse:
    """Outcome of :func:`detect_collapse`.

    ``effective_experts`` = exp(entropy of the normalised soft usage) ∈ [1, n]; ``max_share`` = largest
    share of the total soft usage; ``dead_experts`` = experts never selected (hard usage 0).
    """

    collapsed: bool
    effective_experts: float
    max_share: float
    dominant_expert: int
    dead_experts: np.ndarray
    reason: str


def detect_collapse(weights: Any, *, threshold: float = 0.9, min_effective_experts: float = 1.5) -> Collapse:
    """Decide whether routing collapsed onto (almost) one expert.

    Collapsed when one expert takes more than ``threshold`` of the total soft usage, or when the effective
    number of experts exp(H(p)) (p = soft usage normalised to sum 1) is below ``min_effective_experts``.

    Example:
        >>> c = detect_collapse([[0.97, 0.01, 0.02], [0.95, 0.05, 0.0]])
        >>> c.collapsed, c.dominant_expert, round(c.max_share, 2)
        (True, 0, 0.96)
        >>> c = detect_collapse(np.eye(3))                                  # one expert per row, evenly
        >>> c.collapsed, round(c.effective_experts, 6), c.dead_experts.tolist()
        (False, 3.0, [])
    """
    W = _to_numpy("weights", weights, ndim=(2, 3), shape_doc="[batch, n_experts] (or [..., n_experts])")
    share, floor = _check_number("threshold", threshold), _check_number("min_effective_experts", min_effective_experts)
    if not 0.0 < share <= 1.0:
        raise ValueError(f"threshold must be a share in (0, 1], got {threshold!r}")
    if not (math.isfinite(floor) and floor >= 1.0):
        raise ValueError(f"min_effective_experts must be a finite number >= 1, got {min_effective_experts!r}")
    threshold, min_effective_experts = share, floor
    soft, hard = (t.numpy() for t in expert_usage(W))
    mass = np.abs(soft)
    total = mass.sum()
    if total <= 0:
        raise ValueError("weights carry no mass (all zero); cannot measure collapse")
    p = mass / total
    nz = p[p > 0]
    effective = float(np.exp(-(nz * np.log(nz)).sum()))
    dominant = int(np.argmax(p))
    max_share = float(p[dominant])
    reasons = []
    if max_share > threshold:
        reasons.append(f"expert {dominant} takes {max_share:.3f} > {threshold} of the mass")
    if effective < min_effective_experts:
        reasons.append(f"effective number of experts {effective:.3f} < {min_effective_experts}")
    return Collapse(
        collapsed=bool(reasons),
        effective_experts=effective,
        max_share=max_share,
        dominant_expert=dominant,
        dead_experts=np.flatnonzero(hard == 0),
        reason="; ".join(reasons) if reasons else "not collapsed",
    )
