"""What a ``fit`` checkpoint holds, and how it is put back into the live objects for an exact resume.

The checkpoint written at the end of epoch ``e`` holds the model state (the permutations, usage meters and
gate call counters are buffers), the optimiser's class and state, the searcher's round count and numpy
random state, every ``torch.Generator`` the data sources draw from (the shuffling generator, a
``DataLoader``'s sampler and worker-seed generators), every ``torch.Generator`` stored on a module (e.g. a
noisy gate's), the global torch RNG (dropout) and the CUDA RNG of the device in use, the history, the
best-epoch selection state (with the best weights) and the step/epoch counters. Nothing between the end of
an epoch and the start of the next consumes randomness, so restoring that state at epoch ``e + 1``
reproduces the uninterrupted run bit for bit on CPU (GPU kernels may be non-deterministic).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, check_compatible
from .searcher import Searcher

__all__ = ["module_generators", "optimizer_class_name", "checkpoint_state", "restore_checkpoint", "REQUIRED_KEYS"]

REQUIRED_KEYS = frozenset({"model", "optimizer", "searcher", "history", "epoch", "step", "rng", "early_stopping"})


def module_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` stored as an attribute of a module (e.g. a noisy gate's private one)."""
    found = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Generator):
                found[f"{name}.{attr}" if name else attr] = value
    return found


def optimizer_class_name(optimizer: torch.optim.Optimizer) -> str:
    """``module.QualifiedName`` of the optimiser's class (e.g. ``torch.optim.adam.Adam``)."""
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def checkpoint_state(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    searcher: Searcher | None,
    shuffle: torch.Generator,
    data_generators: dict[str, torch.Generator],
    generators: dict[str, torch.Generator],
    device: torch.device,
    history: dict[str, Any],
    epoch: int,
    step: int,
    selection: dict[str, Any],
    config: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint dict (see the module docstring)."""
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "optimizer_class": optimizer_class_name(optimizer),
        "searcher": None if searcher is None else searcher.state_dict(),
        "history": history,
        "epoch": epoch,
        "step": step,
        "rng": {
            "shuffle": shuffle.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": cuda_rng,
            "modules": {name: g.get_state() for name, g in generators.items()},
            "data": {name: g.get_state() for name, g in data_generators.items()},
        },
        "early_stopping": selection,
        "config": dict(config),
    }


def _check_optimizer(state: dict[str, Any], path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Refuse a checkpoint whose optimiser does not match, before anything is loaded."""
    saved_class = state.get("optimizer_class")
    current = optimizer_class_name(optimizer)
    if saved_class is not None and saved_class != current:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written with optimizer {saved_class} but this run uses {current}; "
            "resume with the same optimizer class (nothing was loaded)"
        )
    saved = state["optimizer"]
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list):
        raise CheckpointError(f"checkpoint {str(path)!r} holds no optimizer state")
    now = optimizer.state_dict()["param_groups"]
    saved_sizes = [len(g.get("params", [])) for g in groups]
    now_sizes = [len(g["params"]) for g in now]
    if saved_sizes != now_sizes:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: the optimizer's parameter groups hold {saved_sizes} parameters but this "
            f"run's hold {now_sizes}; build the optimizer as for the original run (nothing was loaded)"
        )
    saved_keys = {k for g in groups for k in g if k != "params"}
    now_keys = {k for g in now for k in g if k != "params"}
    if saved_class is None and saved_keys != now_keys:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: the optimizer's settings {sorted(saved_keys)} differ from this run's "
            f"{sorted(now_keys)}: another optimizer class? (nothing was loaded)"
        )


def restore_checkpoint(
    state: dict[str, Any],
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    searcher: Searcher | None,
    shuffle: torch.Generator,
    data_generators: dict[str, torch.Generator],
    generators: dict[str, torch.Generator],
    device: torch.device,
) -> None:
    """Load a checkpoint into the live objects; every check runs first, and on any failure the model and
    optimiser are left as they were."""
    missing = sorted(REQUIRED_KEYS - set(state))
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} was not written by fit (missing {missing})")
    check_compatible(state, model, path=path)
    _check_optimizer(state, path, optimizer)
    rng = state["rng"]
    unknown_generators = sorted(set(rng.get("modules", {})) ^ set(generators))
    if unknown_generators:
        raise CheckpointError(f"checkpoint {str(path)!r}: module generators differ from the model's: {unknown_generators}")
    saved_data = rng.get("data", {})
    if set(saved_data) != set(data_generators):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: the data's random generators {sorted(saved_data)} differ from this run's "
            f"{sorted(data_generators)}; pass the same kinds of train/validation data (tensors, Dataset or "
            "DataLoader) as in the original run"
        )
    saved_model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if searcher is not None and state["searcher"] is not None:
            searcher.load_state_dict(state["searcher"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model/optimizer/search: {exc}") from exc
    shuffle.set_state(rng["shuffle"])
    for name, g in data_generators.items():
        g.set_state(saved_data[name])
    for name, g in generators.items():
        g.set_state(rng["modules"][name])
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
