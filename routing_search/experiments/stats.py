"""Statistics for reports: mean ± standard error, paired per-seed comparisons, expected best of N trials.

Paired comparison of arm A against a control B on one metric (one value per seed for each arm):

* per seed, the relative improvement ``r = ±(a − b) / |b|`` (sign so that positive is better);
  "better by ≥ 1 % on w/n seeds" counts ``r ≥ 0.01`` (``threshold``), and "worse" counts, by
  ``worse_rule``, ``r ≤ −0.01`` (``'at_least'``: at least 1 % worse; the experiment reports) or
  ``r < −0.01`` (``'more_than'``: more than 1 % worse; the escape study, whose "never worse than SGD
  alone" allows a seed exactly 1 % worse). A tie is neither better nor worse, also with
  ``threshold=0``; values within ``tie_rtol`` (relative, default 1e-6) of each other are a tie, in the
  counts and in both tests: a float32 model computed in another order (a dense gate trained under a
  permutation) differs from the same model by rounding only, which is no evidence either way. This is
  the one place these counts are made;
* the median of ``a / b`` over the seeds;
* the mean ± standard error of the paired difference ``a − b``;
* two-sided p-values: the sign test (``scipy.stats.binomtest`` on the non-zero differences) and the
  Wilcoxon signed-rank test (``scipy.stats.wilcoxon`` on the differences; None with fewer than two
  non-zero differences).

Tuning budgets (COMET+'s protocol). From ``T`` trials with selection scores ``s`` (validation) and
reported values ``v`` (test), the best of ``N`` trials is the trial with the best ``s`` among ``N``
drawn from the ``T``. With the trials sorted by ``s`` from worst to best (ranks ``1..T``), trial ``i`` is
the best of the ``N`` with probability

* without replacement: ``C(i−1, N−1) / C(T, N)`` (it is drawn, and the other ``N−1`` come from the
  ``i−1`` worse ones);
* with replacement: ``(i/T)^N − ((i−1)/T)^N``;

so ``E[v of the best of N] = Σ_i P_i · v_i``, and the probability that the best of ``N`` reaches a target
is ``Σ_i P_i`` over the trials whose reported value reaches it. When the selection score is the reported
value itself this is ``1 − C(T−m, N)/C(T, N)`` (without replacement) or ``1 − (1 − m/T)^N`` (with
replacement), ``m`` the number of trials that reach the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import special, stats  # type: ignore[import-untyped]

from .._validation import check_choice

__all__ = [
    "TIE_RTOL",
    "WORSE_RULES",
    "mean_se",
    "paired_comparison",
    "best_of_n_weights",
    "expected_best_of_n",
    "reach_probability",
    "trials_needed",
]


TIE_RTOL = 1e-6
"""Relative difference below which two values of a paired comparison are a tie (float32 rounding of a metric)."""

WORSE_RULES = ("at_least", "more_than")
"""How :func:`paired_comparison` counts a seed as worse: by at least ``threshold``, or by more than it."""


def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """``{'mean', 'se', 'n', 'values'}``; se = sample standard deviation / √n (None for one value).

    >>> mean_se([1.0, 2.0, 3.0])["se"]
    0.5773502691896258
    """
    arr = np.asarray(values, dtype=float)
    n = int(arr.size)
    if n == 0:
        return {"mean": None, "se": None, "n": 0, "values": []}
    se = float(arr.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return {"mean": float(arr.mean()), "se": se, "n": n, "values": [float(v) for v in arr]}


def paired_comparison(a: Sequence[float], b: Sequence[float], *, higher_is_better: bool, threshold: float = 0.01,
                      worse_rule: str = "at_least", tie_rtol: float = TIE_RTOL) -> dict[str, Any]:
    """Compare ``a`` with the control ``b``, seed by seed (see the module docstring).

    Args:
        a, b: one value per seed of the arm and of the control (equal lengths, paired by position).
        higher_is_better: the metric's direction.
        threshold: relative margin ``t`` (0.01 = 1 %): a seed is better when ``r >= t``.
        worse_rule: ``'at_least'`` (default): a seed is worse when ``r <= -t``; ``'more_than'``: only
            when ``r < -t`` (see :data:`WORSE_RULES`).
        tie_rtol: ``|a − b| <= tie_rtol · max(|a|, |b|)`` is a tie (:data:`TIE_RTOL`; 0: only equal values).

    Returns ``{'n', 'excluded', 'better', 'worse', 'threshold', 'worse_rule', 'median_ratio', 'diff',
    'sign_p', 'wilcoxon_p'}`` (``median_ratio``: median of ``a / b`` over the seeds with ``b != 0``;
    ``diff``: a :func:`mean_se` entry of ``a − b``). A seed whose ``a`` or ``b`` is NaN/inf (an undefined
    metric, e.g. a ROC AUC with one class present) cannot be compared: it is left out of every count and
    test, ``n`` counts the seeds compared and ``excluded`` the seeds left out.

    >>> r = paired_comparison([1.0, 2.0, 3.0], [1.1, 2.1, 2.0], higher_is_better=False)
    >>> r["better"], r["worse"], r["n"]
    (2, 1, 3)
    >>> [paired_comparison([3.0, 5.0], [4.0, 4.0], higher_is_better=False, threshold=0.25, worse_rule=rule)["worse"]
    ...  for rule in WORSE_RULES]  # 5 is exactly 25 % worse than 4
    [1, 0]
    >>> r = paired_comparison([0.39744771, 0.32672685], [0.39744770, 0.32672684], higher_is_better=False, threshold=0)
    >>> r["better"], r["worse"], r["sign_p"]  # rounding-level differences are ties
    (0, 0, 1.0)
    """
    check_choice("worse_rule", worse_rule, WORSE_RULES)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < math.inf:
        raise ValueError(f"threshold must be a finite number >= 0 (0.01 = 1 %), got {threshold!r}")
    if isinstance(tie_rtol, bool) or not isinstance(tie_rtol, (int, float)) or not 0 <= tie_rtol < 1:
        raise ValueError(f"tie_rtol must be a number in [0, 1) (1e-6 = a millionth), got {tie_rtol!r}")
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_comparison needs two equal-length 1-D sequences, got shapes {x.shape} and {y.shape}")
    finite = np.isfinite(x) & np.isfinite(y)
    excluded = int((~finite).sum())
    x, y = x[finite], y[finite]
    sign = 1.0 if higher_is_better else -1.0
    diff = x - y
    # differences at the level of rounding are ties: in the counts and in both tests
    compared = np.where(np.abs(diff) <= tie_rtol * np.maximum(np.abs(x), np.abs(y)), 0.0, diff)
    scale = np.abs(y)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(scale > 0, sign * compared / scale, np.sign(sign * compared) * np.inf)
        ratio = np.where(y != 0, x / y, np.nan)
    nonzero = compared[compared != 0]
    if nonzero.size:
        sign_p = float(stats.binomtest(int((sign * nonzero > 0).sum()), int(nonzero.size), 0.5).pvalue)
    else:
        sign_p = 1.0
    wilcoxon_p = None
    if nonzero.size >= 2:
        wilcoxon_p = float(stats.wilcoxon(compared, zero_method="wilcox").pvalue)
    finite_ratio = ratio[np.isfinite(ratio)]
    return {
        "n": int(x.size),
        "excluded": excluded,
        # a tie (r == 0) is neither better nor worse, also at threshold 0 (where r >= 0 and r <= -0 both hold)
        "better": int(((rel >= threshold) & (rel > 0)).sum()),
        "worse": int((((rel <= -threshold) & (rel < 0)) if worse_rule == "at_least" else (rel < -threshold)).sum()),
        "threshold": threshold,
        "worse_rule": worse_rule,
        "median_ratio": float(np.median(finite_ratio)) if finite_ratio.size else None,
        "diff": mean_se(diff.tolist()),
        "sign_p": sign_p,
        "wilcoxon_p": wilcoxon_p,
    }


def _order(scores: Sequence[float], higher_is_better: bool) -> np.ndarray:
    s = np.asarray(scores, dtype=float)
    if s.ndim != 1 or s.size == 0:
        raise ValueError("scores must be a non-empty 1-D sequence")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    # worst first (ties by trial index; the callers average over each group of ties, see _tie_mean)
    key = s if higher_is_better else -s
    return np.lexsort((np.arange(s.size), key))


def _ranked_values(values: Sequence[float], order: np.ndarray) -> np.ndarray:
    """``values`` in the order of the ranked scores; one value per score (else a silent truncation)."""
    v = np.asarray(values, dtype=float)
    if v.shape != order.shape:
        raise ValueError(f"values must be a 1-D sequence with one entry per score ({order.size}), got shape {v.shape}")
    return v[order]


def _tie_groups(scores: Sequence[float], order: np.ndarray) -> np.ndarray:
    """For the ranked trials, the index of each one's group of equal scores (0, 0, 1, 2, 2, ...)."""
    ranked = np.asarray(scores, dtype=float)[order]
    return np.concatenate([[0], np.cumsum(ranked[1:] != ranked[:-1])])


def _tie_mean(ranked: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each ranked value replaced by the mean over its group of equal scores: when the best of the draws is
    tied, each tied trial is the one picked with equal probability (by symmetry), whatever their indices."""
    sums = np.bincount(groups, weights=ranked)
    return (sums / np.bincount(groups))[groups]


def best_of_n_weights(num_trials: int, n: int, *, replace: bool = False) -> np.ndarray:
    """``P_i`` (i = 1..T, worst to best) that the i-th ranked trial is the best of ``n`` draws.

    >>> [round(float(w), 6) for w in best_of_n_weights(3, 2)]
    [0.0, 0.333333, 0.666667]
    """
    if num_trials < 1 or n < 1 or (not replace and n > num_trials):
        raise ValueError(f"need 1 <= n <= num_trials without replacement, got n={n}, num_trials={num_trials}")
    i = np.arange(1, num_trials + 1, dtype=float)
    if replace:
        return (i / num_trials) ** n - ((i - 1) / num_trials) ** n
    log_total = special.gammaln(num_trials + 1) - special.gammaln(n + 1) - special.gammaln(num_trials - n + 1)
    weights = np.zeros(num_trials)
    ok = i - 1 >= n - 1
    k = i[ok] - 1
    log_c = special.gammaln(k + 1) - special.gammaln(n) - special.gammaln(k - (n - 1) + 1)
    weights[ok] = np.exp(log_c - log_total)
    return weights


def expected_best_of_n(scores: Sequence[float], values: Sequence[float] | None, n: int, *, higher_is_better: bool, replace: bool = False) -> float:
    """Expected reported value of the best-scoring trial among ``n`` drawn from the trials.

    ``values`` defaults to the scores themselves. When the best score drawn is tied, each trial with it is the
    one picked with equal probability (their values are averaged), so the result does not depend on the
    order of the trials.

    >>> expected_best_of_n([1.0, 1.0], [0.0, 10.0], 2, higher_is_better=True)  # a tie: either trial, 5 on average
    5.0

    >>> expected_best_of_n([0.1, 0.3, 0.2], None, 3, higher_is_better=True)
    0.3
    """
    order = _order(scores, higher_is_better)
    v = _tie_mean(_ranked_values(scores if values is None else values, order), _tie_groups(scores, order))
    return float(np.dot(best_of_n_weights(len(order), n, replace=replace), v))


def reach_probability(scores: Sequence[float], values: Sequence[float], target: float, n: int, *, higher_is_better: bool, replace: bool = False) -> float:
    """Probability that the best-scoring of ``n`` trials has a reported value that reaches ``target``.

    Exact over the draws: summing ``P_i`` over the ranked trials whose value reaches the target.
    """
    order = _order(scores, higher_is_better)
    v = _ranked_values(values, order)
    reaches = _tie_mean((v >= target if higher_is_better else v <= target).astype(float), _tie_groups(scores, order))
    return float(np.dot(best_of_n_weights(len(order), n, replace=replace), reaches))


def trials_needed(scores: Sequence[float], values: Sequence[float], target: float, *, probability: float, higher_is_better: bool, replace: bool = True, max_trials: int = 100_000) -> int | None:
    """Smallest ``N`` with ``reach_probability(N) >= probability``; None when no ``N`` gets there.

    The probability is not monotone in ``N`` when the scores and the values disagree (if the best-scoring
    trial misses the target, more draws make it likelier to be picked), so every ``N`` is checked: up to
    the number of trials ``T`` without replacement; with replacement up to the ``N`` beyond which the
    best-scoring trials alone decide (``((T−m)/T)^N``, ``m`` of them tied, below the distance of their share
    that reaches the target from ``probability``), and at most ``max_trials``. Trials tied on the score are
    equally likely to be the one picked (see :func:`expected_best_of_n`).

    >>> trials_needed([1, 2, 3, 4], [1, 1, 1, 0], 1, probability=0.7, higher_is_better=True)
    1
    """
    if not 0 < probability < 1:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    order = _order(scores, higher_is_better)
    v = _ranked_values(values, order)
    groups = _tie_groups(scores, order)
    reaches = _tie_mean((v >= target if higher_is_better else v <= target).astype(float), groups)
    t = len(order)
    if replace:
        # Beyond `upper` draws the best-scoring group (m tied trials, reaching with probability r) decides the side
        # of `probability`: |reach(N) - r| <= ((T - m) / T)^N, below |r - probability| from there on.
        m = int(np.sum(groups == groups[-1]))
        c, margin = (t - m) / t, abs(float(reaches[-1]) - probability)
        if c == 0:
            upper = 1
        elif margin <= 1e-12:
            upper = max_trials
        else:
            upper = max(1, math.floor(math.log(margin) / math.log(c)) + 1)
        n = np.arange(1, min(upper + 1, max_trials) + 1, dtype=float)
        i = np.arange(1, t + 1, dtype=float)[:, None] / t
        reach = reaches @ (i ** n - (i - 1 / t) ** n)
    else:
        reach = np.asarray([np.dot(best_of_n_weights(t, m), reaches) for m in range(1, t + 1)])
    hits = np.flatnonzero(reach >= probability - 1e-12)  # exact sums such as 9 × 0.1 land a rounding error below
    return int(hits[0]) + 1 if hits.size else None
