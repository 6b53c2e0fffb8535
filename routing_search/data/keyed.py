"""Keyed synthetic data: each example carries an integer key, and the ground truth routes by the key.

The truth is a Hash-routed mixture of experts whose routing table is known:

* key → bucket: the same balanced random table that :class:`~routing_search.Hash` builds,
  ``bucket = balanced_hash_table(num_keys, num_experts, hash_seed)[key]`` (so
  ``Hash(num_experts, num_keys, seed=hash_seed).table`` is exactly the data's bucket map);
* bucket → true expert: a random permutation per task, ``expert = permutation[t, bucket]``, in the
  package's permutation convention (``index[i]`` is the expert that receives gate weight ``i``). With
  ``shared_route=True`` every task uses the same permutation (the case of
  ``MultiGateMoE(share_permutation=True)``);
* target of task t: ``y_t = f_{expert}(x)[t] / scale_t + noise·ε`` (regression) or a Bernoulli label with
  logit ``logit_scale·(that signal)`` (binary), where ``f_j(x) = V_j tanh(W_j x)`` maps ``x ∈ R^d`` to one
  value per task and ``scale_t`` gives each task's clean signal unit variance.

``x ~ N(0, I)`` is independent of the key, so only the key tells which expert produced a target. A
multi-gate MoE with ``Hash(num_experts, num_keys, seed=hash_seed)`` gates, the true experts as its experts
and ``Permutation.set(truth.permutation[t])`` reproduces the clean targets exactly; every other
permutation moves at least one bucket to a wrong expert. That is the known optimum a permutation search
on a Hash gate should recover.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._validation import check_choice, check_int, check_num_experts_k, check_positive_float
from ..gates.hash import balanced_hash_table
from .splits import Split, TaskDataset, TaskSpec

__all__ = ["KeyedSyntheticTruth", "TrueExpert", "make_keyed_synthetic"]


class TrueExpert(nn.Module):
    """One true expert ``x ↦ V tanh(W x)`` (``[batch, d] → [batch, num_tasks]``), fixed weights as buffers."""

    hidden_weight: torch.Tensor
    output_weight: torch.Tensor

    def __init__(self, hidden_weight: torch.Tensor, output_weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("hidden_weight", hidden_weight.clone())
        self.register_buffer("output_weight", output_weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, num_tasks]`` outputs (before the per-task scaling)."""
        return torch.tanh(x.to(self.hidden_weight.dtype) @ self.hidden_weight.t()) @ self.output_weight.t()


@dataclass
class KeyedSyntheticTruth:
    """The ground truth of :func:`make_keyed_synthetic`.

    Attributes:
        bucket_of_key: ``[num_keys]`` int64, the Hash table (``Hash(n, num_keys, seed=hash_seed).table``).
        permutation: ``[num_tasks, n]`` int64; ``permutation[t, b]`` is task t's true expert for bucket b
            (rows are equal when the route is shared). Set it with ``Permutation.set``.
        hidden_weights: ``[n, hidden, d]`` first-layer weights of the true experts.
        output_weights: ``[n, num_tasks, hidden]`` second-layer weights (one output per task).
        task_scale: ``[num_tasks]`` divisor that gives each task's clean signal unit variance.
        hash_seed: seed of the Hash table.
        shared_route: whether all tasks share one bucket → expert permutation.
    """

    bucket_of_key: torch.Tensor
    permutation: torch.Tensor
    hidden_weights: torch.Tensor
    output_weights: torch.Tensor
    task_scale: torch.Tensor
    hash_seed: int
    shared_route: bool

    @property
    def num_experts(self) -> int:
        """Number of true experts n."""
        return int(self.permutation.shape[1])

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return int(self.permutation.shape[0])

    @property
    def expert_of_key(self) -> torch.Tensor:
        """``[num_tasks, num_keys]``: task t's true expert for each key (``permutation[t, bucket_of_key]``)."""
        return self.permutation[:, self.bucket_of_key]

    def experts_of(self, key: torch.Tensor) -> torch.Tensor:
        """True expert of every example and task: ``[batch, num_tasks]`` int64."""
        return self.expert_of_key[:, key.long()].t()

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every true expert on ``x``, scaled per task: ``[batch, n, num_tasks]``."""
        hidden = torch.tanh(torch.einsum("bd,nhd->bnh", x.to(self.hidden_weights.dtype), self.hidden_weights))
        return torch.einsum("bnh,nth->bnt", hidden, self.output_weights) / self.task_scale

    def clean_targets(self, x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Noise-free task signals ``[batch, num_tasks]``: task t reads expert ``experts_of(key)[:, t]``."""
        outputs = self.expert_outputs(x)
        chosen = self.experts_of(key)
        return torch.gather(outputs, 1, chosen.unsqueeze(1)).squeeze(1)

    def expert_modules(self) -> list[TrueExpert]:
        """The true experts as modules (``[batch, d] → [batch, num_tasks]``, unscaled), in expert order.

        Divide their outputs by ``task_scale`` (e.g. in the towers) to get the clean targets.
        """
        return [TrueExpert(self.hidden_weights[j], self.output_weights[j]) for j in range(self.num_experts)]


def make_keyed_synthetic(
    *,
    num_samples: int = 4096,
    num_keys: int = 64,
    num_experts: int = 4,
    input_dim: int = 8,
    num_tasks: int = 2,
    hidden: int = 16,
    noise: float = 0.1,
    task_type: str = "regression",
    logit_scale: float = 3.0,
    shared_route: bool = True,
    hash_seed: int = 0,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    dtype: torch.dtype = torch.float32,
) -> TaskDataset:
    """Draw a keyed multi-task data set whose truth routes by key (see the module docstring).

    Args:
        num_samples: rows N (split consecutively by ``fractions``; rows are i.i.d.).
        num_keys: distinct keys; keys are drawn uniformly from ``[0, num_keys)``. At least ``num_experts``,
            so that every bucket holds a key.
        num_experts: n true experts (= Hash buckets).
        input_dim: width d of ``x ~ N(0, I)``.
        num_tasks: tasks T (1 to 128).
        hidden: hidden width of each true expert.
        noise: standard deviation of the Gaussian noise added to each (unit-variance) task signal.
        task_type: ``'regression'`` or ``'binary'``.
        logit_scale: scale of the signal turned into a logit (binary only).
        shared_route: one bucket → expert permutation for all tasks (True) or one per task (False).
        hash_seed: seed of the key → bucket table; build the model's gates as
            ``Hash(num_experts, num_keys, seed=hash_seed)``.
        seed: seed of everything else (experts, permutations, keys, inputs, noise); the private
            generator touches no global state.
        fractions: train / validation / test shares (positive, summing to 1).
        dtype: dtype of ``x`` and the targets.

    Returns:
        A :class:`TaskDataset` named ``'keyed_synthetic'`` with ``inputs = {'x': [N, d], 'key': [N] int64}``,
        one target ``[N]`` per task, ``num_keys`` and ``info['truth']`` (a :class:`KeyedSyntheticTruth`).

    >>> from routing_search.gates import Hash
    >>> data = make_keyed_synthetic(num_samples=200, num_keys=12, num_experts=4, hash_seed=3, seed=1)
    >>> truth = data.info["truth"]
    >>> bool(torch.equal(Hash(4, 12, seed=3).table, truth.bucket_of_key))
    True
    >>> x, key = data.train.inputs["x"], data.train.inputs["key"]
    >>> truth.clean_targets(x, key).shape, data.num_keys
    (torch.Size([140, 2]), 12)
    """
    n, _ = check_num_experts_k(num_experts)
    num_samples = check_int("num_samples", num_samples, minimum=3)
    num_keys = check_int("num_keys", num_keys, minimum=n)
    input_dim = check_int("input_dim", input_dim, minimum=1)
    num_tasks = check_int("num_tasks", num_tasks, minimum=1, maximum=128)
    hidden = check_int("hidden", hidden, minimum=1)
    noise = check_positive_float("noise", noise, allow_zero=True)
    logit_scale = check_positive_float("logit_scale", logit_scale)
    check_choice("task_type", task_type, ("regression", "binary"))
    hash_seed = check_int("hash_seed", hash_seed, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    if not isinstance(shared_route, bool):
        raise TypeError(f"shared_route must be True or False, got {shared_route!r}")
    if len(fractions) != 3 or any(not f > 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers (train, val, test) summing to 1, got {fractions}")
    gen = torch.Generator().manual_seed(seed)

    table = balanced_hash_table(num_keys, n, hash_seed)
    if shared_route:
        permutation = torch.randperm(n, generator=gen).repeat(num_tasks, 1)
    else:
        permutation = torch.stack([torch.randperm(n, generator=gen) for _ in range(num_tasks)])
    hidden_weights = torch.randn(n, hidden, input_dim, generator=gen, dtype=torch.float64) / input_dim**0.5
    output_weights = torch.randn(n, num_tasks, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    key = torch.randint(0, num_keys, (num_samples,), generator=gen)
    x = torch.randn(num_samples, input_dim, generator=gen, dtype=torch.float64)
    unscaled = KeyedSyntheticTruth(
        table, permutation, hidden_weights, output_weights, torch.ones(num_tasks, dtype=torch.float64), hash_seed, shared_route
    )
    scale = unscaled.clean_targets(x, key).std(dim=0).clamp_min(1e-12)
    truth = KeyedSyntheticTruth(table, permutation, hidden_weights, output_weights, scale, hash_seed, shared_route)
    signal = truth.clean_targets(x, key) + noise * torch.randn(num_samples, num_tasks, generator=gen, dtype=torch.float64)
    y = signal if task_type == "regression" else torch.bernoulli(torch.sigmoid(logit_scale * signal), generator=gen)

    n_train = int(round(fractions[0] * num_samples))
    n_val = int(round(fractions[1] * num_samples))
    bounds = [0, n_train, n_train + n_val, num_samples]
    if any(b - a < 1 for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"num_samples={num_samples} is too small for non-empty splits with fractions={fractions}")
    x_out, y_out = x.to(dtype), y.to(dtype)
    splits = [
        Split({"x": x_out[a:b], "key": key[a:b]}, [y_out[a:b, t].contiguous() for t in range(num_tasks)])
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    kind = "regression" if task_type == "regression" else "binary"
    return TaskDataset(
        name="keyed_synthetic",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        tasks=[TaskSpec(f"task{t}", kind) for t in range(num_tasks)],
        num_keys=num_keys,
        info={
            "truth": truth,
            "seed": seed,
            "hash_seed": hash_seed,
            "noise": noise,
            "task_type": task_type,
            "split_sizes": {"train": bounds[1], "val": bounds[2] - bounds[1], "test": num_samples - bounds[2]},
        },
    )
