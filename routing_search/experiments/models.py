"""Per-dataset models for the experiments: a multi-gate MoE with one gate and one tower per task.

* synthetic / keyed: MLP experts on ``x`` (output width 1), identity towers.
* movielens: user and movie embeddings, concatenated, feed shared MLP experts (Dense, ReLU, dropout);
  one gate per task; towers Dense → 1. The MoE layer sits inside :class:`EmbeddingMoE`.
* multi-mnist / multi-fashion: CNN experts (two convolutions, a dense layer) on the 36×36 image; the
  model takes the image flattened to ``[N, 1296]`` (gates see the flat pixels; the experts unflatten),
  so the :class:`~routing_search.MultiGateMoE` is the model itself; towers map to 10 classes.

Every builder draws the initialisation from ``torch.manual_seed(seed)`` in a fixed order, so the same
seed gives the same weights for every arm; the ``sinkhorn`` arm's learned permutation is drawn from its
own generator afterwards and leaves the rest unchanged.

DSelect-k and COMET gates anneal their smooth-step scale γ over the run: given the run's number of
optimiser steps (``total_steps``, see :func:`training_steps`), every such gate gets
``GammaAnnealing.for_budget(total_steps)`` (γ constant for the first half of the steps, annealed to
0.2 % of its start between 50 % and 80 %), so that its codes end binary even in a short preset run (the
gates' default annealing begins at call 500, after the end of a ~100-step run).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._validation import check_int
from ..gates import COMET, DSelectK, GammaAnnealing, GumbelSoftmax, Hash, Softmax, TopK
from ..layers import MLP, MultiGateMoE, MultiGateOutput
from ..search import SinkhornPermutation
from .config import ExperimentConfig, ModelConfig

__all__ = ["build_model", "make_gate", "EmbeddingMoE", "cnn_expert", "moe_layer", "training_steps", "IMAGE_SIDE"]

IMAGE_SIDE = 36


def training_steps(config: ExperimentConfig, train_rows: int) -> int:
    """Optimiser steps of one run: ``epochs × ceil(train_rows / batch_size)`` (the last batch of an epoch
    may be smaller).

    >>> from routing_search.experiments import make_config
    >>> training_steps(make_config("multi-mnist", "cpu"), 2000)
    96
    """
    batch = config.train.batch_size
    return config.train.epochs * max(1, -(-int(train_rows) // batch))


def make_gate(name: str, model: ModelConfig, *, input_dim: int, num_keys: int | None, seed: int,
              total_steps: int | None = None) -> nn.Module:
    """One gate called ``name`` (see :data:`~routing_search.experiments.config.GATES`) over ``model.num_experts``.

    ``total_steps``: the run's optimiser steps; a DSelect-k / COMET gate then anneals γ over that budget
    (``gate.set_annealing(GammaAnnealing.for_budget(total_steps))``); None keeps the gate's default, and so
    does a run of a single step (nothing to anneal over).
    """
    gate = _make_gate(name, model, input_dim=input_dim, num_keys=num_keys, seed=seed)
    if total_steps is not None and check_int("total_steps", total_steps, minimum=1) >= 2 and isinstance(gate, (DSelectK, COMET)):
        gate.set_annealing(GammaAnnealing.for_budget(total_steps))
    return gate


def _make_gate(name: str, model: ModelConfig, *, input_dim: int, num_keys: int | None, seed: int) -> nn.Module:
    n, k = model.num_experts, model.k
    d = input_dim if model.gate_input == "example" else None
    extra: dict[str, Any] = {}
    if model.entropy_weight is not None:
        extra["entropy_weight"] = model.entropy_weight
    if model.gamma is not None:
        extra["gamma"] = model.gamma
    if name == "softmax":
        return Softmax(n, d)
    if name == "topk":
        return TopK(n, k, d)
    if name == "gumbel":
        return GumbelSoftmax(n, d, generator=torch.Generator().manual_seed(seed))
    if name == "dselect_k":
        return DSelectK(n, k, d, **extra)
    if name == "comet":
        return COMET(n, k, d, **extra)
    if name == "hash":
        if num_keys is None:
            raise ValueError("gate 'hash' needs a dataset whose examples carry an integer key")
        return Hash(n, num_keys, seed=seed)
    raise ValueError(f"unknown gate {name!r}")


def cnn_expert(model: ModelConfig) -> nn.Module:
    """A CNN expert on a flat 36×36 image: conv 5×5 → ReLU → max-pool 2 (twice) → dense → ReLU."""
    c1, c2 = model.expert_channels
    side = ((IMAGE_SIDE - 4) // 2 - 4) // 2  # 36 → 32 → 16 → 12 → 6
    layers: list[nn.Module] = [
        nn.Unflatten(1, (1, IMAGE_SIDE, IMAGE_SIDE)),
        nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    ]
    width = c2 * side * side
    for h in model.expert_hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if model.dropout > 0:
            layers.append(nn.Dropout(model.dropout))
        width = h
    if width != model.expert_output:
        layers.append(nn.Linear(width, model.expert_output))
    return nn.Sequential(*layers)


def _mlp_expert(model: ModelConfig, input_dim: int, *, relu_output: bool) -> nn.Module:
    hidden = list(model.expert_hidden)
    if relu_output:
        # Dense layers only, every one followed by ReLU (and dropout): the expert's output is its last
        # hidden layer (MovieLens: Dense 256, ReLU, dropout 0.5).
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if model.dropout > 0:
                layers.append(nn.Dropout(model.dropout))
            width = h
        if width != model.expert_output:
            layers += [nn.Linear(width, model.expert_output), nn.ReLU()]
        return nn.Sequential(*layers)
    return MLP(input_dim, hidden, model.expert_output, dropout=model.dropout)


def _tower(model: ModelConfig, output_dim: int) -> nn.Module:
    if model.tower_hidden > 0:
        return MLP(model.expert_output, [model.tower_hidden], output_dim)
    if model.expert_output == output_dim == 1:
        return nn.Identity()
    return nn.Linear(model.expert_output, output_dim)


class EmbeddingMoE(nn.Module):
    """User and movie embeddings, concatenated, into a :class:`~routing_search.MultiGateMoE`.

    ``forward(x, key=None)``: ``x`` a LongTensor ``[B, 2]`` of (user, movie) indices, ``key`` passed to
    the gates (Hash routes by it). Returns the layer's :class:`~routing_search.MultiGateOutput`.
    """

    def __init__(self, num_users: int, num_movies: int, embedding_dim: int, moe: MultiGateMoE) -> None:
        super().__init__()
        self.user = nn.Embedding(num_users, embedding_dim)
        self.movie = nn.Embedding(num_movies, embedding_dim)
        self.moe = moe

    def forward(self, x: torch.Tensor, key: torch.Tensor | None = None) -> MultiGateOutput:
        """Embed the (user, movie) pair and run the multi-gate MoE."""
        h = torch.cat([self.user(x[:, 0]), self.movie(x[:, 1])], dim=1)
        return self.moe(h, key=key)


def moe_layer(model: nn.Module) -> MultiGateMoE:
    """The :class:`~routing_search.MultiGateMoE` of a model built here."""
    if isinstance(model, MultiGateMoE):
        return model
    found = [m for m in model.modules() if isinstance(m, MultiGateMoE)]
    if len(found) != 1:
        raise ValueError(f"expected one MultiGateMoE in the model, found {len(found)}")
    return found[0]


def _wrap_sinkhorn(gates: Sequence[nn.Module], config: ExperimentConfig, seed: int) -> list[nn.Module]:
    steps = config.sinkhorn.anneal_steps(config.train.epochs)
    generator = torch.Generator().manual_seed(10_007 * seed + 17)
    return list(
        SinkhornPermutation.shared(
            list(gates), anneal_steps=steps, entropy_weight=config.sinkhorn.entropy_weight, generator=generator
        )
    )


def build_model(
    config: ExperimentConfig,
    gate: str,
    arm: str,
    seed: int,
    *,
    input_shape: tuple[int, ...],
    num_tasks: int,
    output_dims: Sequence[int],
    num_keys: int | None = None,
    hash_seed: int | None = None,
    num_users: int | None = None,
    num_movies: int | None = None,
    total_steps: int | None = None,
) -> nn.Module:
    """The dataset's model with ``gate`` in every task, initialised from ``seed``.

    Args:
        config: the experiment (dataset and model sizes).
        gate: gate name; arm: ``'sinkhorn'`` wraps the task gates with one shared learned permutation,
            every other arm gets the plain model (the ``random`` arm permutes it afterwards).
        seed: initialisation seed (the same for every arm).
        input_shape: one example's ``x`` shape as the model receives it.
        num_tasks, output_dims: tasks and each tower's output width (1 for binary/regression, C classes).
        num_keys: distinct keys (Hash gates).
        hash_seed: seed of every task's Hash table (the keyed family's truth uses it; default ``seed``).
        num_users, num_movies: embedding table sizes (MovieLens).
        total_steps: the run's optimiser steps (:func:`training_steps`); DSelect-k / COMET gates anneal γ
            over them (None: the gates' default annealing).
    """
    m = config.model
    if len(output_dims) != num_tasks:
        raise ValueError(f"output_dims must hold one width per task ({num_tasks}), got {list(output_dims)}")
    torch.manual_seed(seed)
    if config.dataset == "movielens":
        if num_users is None or num_movies is None:
            raise ValueError("the MovieLens model needs num_users and num_movies")
        moe_input = 2 * m.embedding_dim
        experts = [_mlp_expert(m, moe_input, relu_output=True) for _ in range(m.num_experts)]
    elif config.dataset in ("multi-mnist", "multi-fashion"):
        moe_input = IMAGE_SIDE * IMAGE_SIDE
        if tuple(input_shape) != (moe_input,):
            raise ValueError(f"the image model takes flat {IMAGE_SIDE}x{IMAGE_SIDE} images [N, {moe_input}], got {list(input_shape)}")
        experts = [cnn_expert(m) for _ in range(m.num_experts)]
    else:
        if len(input_shape) != 1:
            raise ValueError(f"the synthetic model takes x of shape [N, d], got one row of shape {list(input_shape)}")
        moe_input = int(input_shape[0])
        experts = [_mlp_expert(m, moe_input, relu_output=False) for _ in range(m.num_experts)]
    gates = [
        make_gate(gate, m, input_dim=moe_input, num_keys=num_keys,
                  seed=(seed if hash_seed is None else hash_seed) if gate == "hash" else seed * 1000 + t, total_steps=total_steps)
        for t in range(num_tasks)
    ]
    towers = [_tower(m, out) for out in output_dims]
    if arm == "sinkhorn":
        gates = _wrap_sinkhorn(gates, config, seed)
    layer = MultiGateMoE(experts, gates, towers)
    if config.dataset == "movielens":
        assert num_users is not None and num_movies is not None
        torch.manual_seed(seed + 7_919)
        return EmbeddingMoE(num_users, num_movies, m.embedding_dim, layer)
    return layer
