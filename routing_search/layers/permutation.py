"""The explicit permutation between a gate and its experts.

Convention used throughout the package: ``index[s, i]`` is the expert that receives weight ``i`` of
selector ``s``. For a gate without selectors there is one row. With expert-space weights ``w`` and
gate weights ``g``: ``w[:, index[i]] = g[:, i]``, i.e. ``w = g[:, inverse]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_int, check_permutation
from ..gates.protocol import GateOutput

__all__ = ["Permutation", "check_permutation", "invert_permutation"]


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of a permutation (or of each row of a batch of permutations)."""
    return torch.argsort(perm, dim=-1)


class Permutation(nn.Module):
    """``num_selectors`` permutations of ``range(num_experts)``, identity at construction.

    The permutation is a buffer (saved in checkpoints, moved with ``.to(device)``), not a parameter:
    it is changed by discrete search or by rounding a learned Sinkhorn permutation.
    """

    index: torch.Tensor

    def __init__(self, num_experts: int, num_selectors: int = 1) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, minimum=2)
        self.num_selectors = check_int("num_selectors", num_selectors, minimum=1)
        self.register_buffer("index", torch.arange(num_experts).repeat(num_selectors, 1))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, num_selectors={self.num_selectors}"

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Refuse a saved ``index`` that is not a permutation in every row (before anything is copied)."""
        key = prefix + "index"
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(self.index.shape):
            for s, row in enumerate(value):
                try:
                    check_permutation(row, self.num_experts, name=f"{key} row {s}")
                except ValueError as exc:
                    raise ValueError(f"cannot load {key!r}: {exc} (the saved permutation buffer is corrupt)") from None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @property
    def is_identity(self) -> bool:
        """True when every row is the identity permutation."""
        return bool(torch.equal(self.index, torch.arange(self.num_experts, device=self.index.device).expand_as(self.index)))

    def get(self) -> np.ndarray:
        """Current permutation(s) as an int64 array ``[num_selectors, num_experts]``."""
        return self.index.detach().cpu().numpy().copy()

    @torch.no_grad()
    def set(self, perm: Sequence[int] | Sequence[Sequence[int]] | np.ndarray | torch.Tensor) -> None:
        """Set the permutation(s): one row per selector, or a single row applied to every selector."""
        arr = perm.detach().cpu().numpy() if isinstance(perm, torch.Tensor) else np.asarray(perm)
        if arr.ndim == 1:
            arr = np.broadcast_to(arr, (self.num_selectors, arr.shape[0]))
        if arr.ndim != 2 or arr.shape[0] != self.num_selectors:
            raise ValueError(
                f"permutation must have shape [{self.num_selectors}, {self.num_experts}] "
                f"(or [{self.num_experts}] for all selectors), got {arr.shape}"
            )
        rows = [check_permutation(row, self.num_experts, name=f"permutation row {s}") for s, row in enumerate(arr)]
        self.index.copy_(torch.as_tensor(np.stack(rows), device=self.index.device))

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the identity."""
        self.index.copy_(torch.arange(self.num_experts, device=self.index.device).expand_as(self.index))

    def apply(self, gate_output: GateOutput) -> torch.Tensor:  # type: ignore[override]  # (not nn.Module.apply(fn))
        """Expert-space weights ``[batch, num_experts]`` from a gate output."""
        return apply_permutation(gate_output, self.index)


def apply_permutation(gate_output: GateOutput, index: torch.Tensor) -> torch.Tensor:
    """Expert-space weights for ``index`` of shape ``[S, n]`` (S = 1 or the gate's number of selectors)."""
    weights = gate_output.weights
    n = weights.shape[1]
    if index.shape[-1] != n:
        raise ValueError(f"the gate returned weights over {n} experts but the permutation has {index.shape[-1]}")
    inverse = invert_permutation(index.to(weights.device))
    if index.shape[0] == 1:
        return weights[:, inverse[0]]
    if not gate_output.has_selectors:
        raise ValueError(
            f"a permutation per selector ({index.shape[0]} rows) needs a gate that returns "
            "selector_weights and selector_mix"
        )
    sel = gate_output.selector_weights
    mix = gate_output.selector_mix
    assert sel is not None and mix is not None  # has_selectors
    if sel.shape[1] != index.shape[0]:
        raise ValueError(f"the gate has {sel.shape[1]} selectors but the permutation has {index.shape[0]} rows")
    permuted = torch.gather(sel, 2, inverse.unsqueeze(0).expand(sel.shape[0], -1, -1))
    return torch.einsum("bk,bkn->bn", mix, permuted)
