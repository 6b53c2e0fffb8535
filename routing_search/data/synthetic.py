"""Multi-task data drawn from a ground-truth mixture of experts, with the answer kept.

Each of ``num_experts`` random experts is a one-hidden-layer tanh network ``f_j(x) = v_jᵀ tanh(W_j x)``.
Task ``t`` mixes a known support of ``k`` experts with known simplex weights ``a_t``:
``z_t(x) = Σ_j a_tj f_j(x)``. Regression targets are ``z_t + noise·ε``; classification labels are
Bernoulli draws with logit ``scale·(z_t + noise·ε)``. The true per-task expert weights (``[T, n]``,
``k`` non-zeros per row) are returned, so support recovery can be scored up to relabelling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validation import check_choice, check_int, check_num_experts_k, check_positive_float

__all__ = ["SyntheticMoETruth", "SyntheticMoEData", "make_synthetic_moe"]


@dataclass
class SyntheticMoETruth:
    """The ground truth of a synthetic instance.

    Attributes:
        expert_weights: ``[num_tasks, num_experts]``; row t = task t's true mixing weights (k non-zeros).
        hidden_weights: ``[num_experts, hidden, input_dim]`` first-layer weights of the true experts.
        output_weights: ``[num_experts, hidden]`` second-layer weights of the true experts.
        task_scale: ``[num_tasks]`` divisor that gives each task's signal unit variance.
    """

    expert_weights: torch.Tensor
    hidden_weights: torch.Tensor
    output_weights: torch.Tensor
    task_scale: torch.Tensor

    @property
    def supports(self) -> list[tuple[int, ...]]:
        """Each task's true support, sorted."""
        return [tuple(int(i) for i in torch.nonzero(row).flatten()) for row in self.expert_weights]

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """True experts on ``x``: ``[batch, num_experts]``."""
        hidden = torch.tanh(torch.einsum("bd,nhd->bnh", x.to(self.hidden_weights.dtype), self.hidden_weights))
        return torch.einsum("bnh,nh->bn", hidden, self.output_weights)

    def clean_targets(self, x: torch.Tensor) -> torch.Tensor:
        """Noise-free task signals ``z`` : ``[batch, num_tasks]``."""
        return (self.expert_outputs(x) @ self.expert_weights.t()) / self.task_scale


@dataclass
class SyntheticMoEData:
    """A synthetic multi-task data set: ``x [N, d]``, ``y [N, T]`` and the truth."""

    x: torch.Tensor
    y: torch.Tensor
    task_type: str
    truth: SyntheticMoETruth

    @property
    def num_tasks(self) -> int:
        """Number of tasks T (columns of ``y``)."""
        return self.y.shape[1]

    def split(self, fractions: tuple[float, ...] = (0.7, 0.15, 0.15)) -> tuple["SyntheticMoEData", ...]:
        """Consecutive splits (the rows are already i.i.d.) with the given fractions (summing to 1); every part
        must get at least one row."""
        # written so that NaN fails ((0.5, nan) split 10 / 10 without a word: the last share is never used)
        if not abs(sum(fractions) - 1.0) <= 1e-9 or not all(f > 0 for f in fractions):
            raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
        n = self.x.shape[0]
        bounds = [0]
        for f in fractions[:-1]:
            bounds.append(bounds[-1] + int(round(f * n)))
        bounds.append(n)
        sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if min(sizes) < 1:
            raise ValueError(f"{n} rows cannot be split into non-empty parts with fractions={fractions} (sizes {sizes}); "
                             "draw more rows (num_samples) or change the fractions")
        return tuple(
            SyntheticMoEData(self.x[a:b], self.y[a:b], self.task_type, self.truth) for a, b in zip(bounds[:-1], bounds[1:])
        )


def make_synthetic_moe(
    *,
    num_samples: int = 4096,
    input_dim: int = 10,
    num_experts: int = 8,
    k: int = 2,
    num_tasks: int = 4,
    hidden: int = 16,
    noise: float = 0.1,
    task_type: str = "regression",
    logit_scale: float = 3.0,
    min_weight: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> SyntheticMoEData:
    """Draw a multi-task data set from a random ground-truth MoE (see the module docstring).

    Args:
        num_samples: rows N (at least 2: each task's signal is scaled to unit sample variance).
        input_dim: width d of x ~ N(0, I).
        num_experts: n true experts.
        k: experts per task (each task's support has exactly k experts).
        num_tasks: T, 1 to 128.
        hidden: hidden width of each true expert.
        noise: standard deviation of the additive Gaussian noise on the task signal.
        task_type: ``'regression'`` or ``'classification'`` (binary labels per task).
        logit_scale: scale of the signal turned into a logit (classification only).
        min_weight: smallest true mixing weight (keeps every support member identifiable); needs
            ``min_weight * k < 1``.
        seed: seed of the private generator (nothing global is touched).
    """
    n, checked_k = check_num_experts_k(num_experts, k)
    assert checked_k is not None  # k was given
    k = checked_k
    # At least two rows: each task's signal is scaled by its sample std, undefined (NaN) for one row.
    num_samples = check_int("num_samples", num_samples, minimum=2)
    input_dim = check_int("input_dim", input_dim, minimum=1)
    num_tasks = check_int("num_tasks", num_tasks, minimum=1, maximum=128)
    hidden = check_int("hidden", hidden, minimum=1)
    noise = check_positive_float("noise", noise, allow_zero=True)
    logit_scale = check_positive_float("logit_scale", logit_scale)
    min_weight = check_positive_float("min_weight", min_weight, allow_zero=True)
    if min_weight * k >= 1:
        raise ValueError(f"min_weight * k must be < 1, got min_weight={min_weight}, k={k}")
    check_choice("task_type", task_type, ("regression", "classification"))
    gen = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))  # int() made seeds 2.2 and 2.7 the same data

    hidden_weights = torch.randn(n, hidden, input_dim, generator=gen, dtype=torch.float64) / input_dim**0.5
    output_weights = torch.randn(n, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    expert_weights = torch.zeros(num_tasks, n, dtype=torch.float64)
    for t in range(num_tasks):
        support = torch.randperm(n, generator=gen)[:k]
        # Dirichlet(1) weights through exponentials, so that only the private generator is used.
        e = -torch.log(torch.rand(k, generator=gen, dtype=torch.float64))
        free = e / e.sum()
        expert_weights[t, support] = min_weight + (1 - min_weight * k) * free
    x = torch.randn(num_samples, input_dim, generator=gen, dtype=torch.float64)
    raw = (
        SyntheticMoETruth(expert_weights, hidden_weights, output_weights, torch.ones(num_tasks, dtype=torch.float64))
        .clean_targets(x)
    )
    # Each task's signal is scaled to unit variance so that `noise` means the same for every task.
    truth = SyntheticMoETruth(expert_weights, hidden_weights, output_weights, raw.std(dim=0).clamp_min(1e-12))
    z = truth.clean_targets(x)
    signal = z + noise * torch.randn(z.shape, generator=gen, dtype=torch.float64)
    if task_type == "regression":
        y = signal
    else:
        y = torch.bernoulli(torch.sigmoid(logit_scale * signal), generator=gen)
    return SyntheticMoEData(x=x.to(dtype), y=y.to(dtype), task_type=task_type, truth=truth)
