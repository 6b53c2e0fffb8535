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

__all__ = ["Permutation", "apply_permutation", "check_permutation", "invert_permutation", "permute_weights"]


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of a permutation (or of each row of a batch of permutations)."""
    return torch.argsort(perm, dim=-1)


class Permutation(nn.Module):
    """``num_selectors`` permutations of ``range(num_experts)``, identity at construction.

    The permutation is a buffer (saved in checkpoints, moved with ``.to(device)``), not a parameter:
    it is changed by discrete search or by rounding a learned Sinkhorn permutation.

    :meth:`apply` reuses the inverse permutation (and whether it is the identity) between calls. The
    cache is keyed on the ``index`` tensor object, its storage and its in-place version counter, so any
    change — :meth:`set`, :meth:`reset`, ``load_state_dict``, ``.to(device)``, a direct
    ``index.copy_(...)`` or ``index[...] = ...``, or assigning a new tensor to ``index`` — is seen by the
    next call.
    """

    index: torch.Tensor

    def __init__(self, num_experts: int, num_selectors: int = 1) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, minimum=2)
        self.num_selectors = check_int("num_selectors", num_selectors, minimum=1)
        self.register_buffer("index", torch.arange(num_experts).repeat(num_selectors, 1))
        # (index tensor, data pointer, version) -> (inverse, is identity); not a buffer, never saved.
        self._inverse_key: tuple[torch.Tensor, int, int] | None = None
        self._inverse_value: tuple[torch.Tensor, bool] | None = None

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

    def inverse(self) -> tuple[torch.Tensor, bool]:
        """``(inverse, identity)``: the inverse of every row ``[num_selectors, num_experts]`` and whether
        every row is the identity, cached until ``index`` changes (see the class docstring)."""
        index = self.index
        if index.is_inference():  # no version counter to key a cache on
            return invert_permutation(index), self.is_identity
        key = self._inverse_key
        if (
            key is not None
            and self._inverse_value is not None
            and key[0] is index
            and key[1] == index.data_ptr()
            and key[2] == index._version
        ):
            return self._inverse_value
        with torch.no_grad():
            inverse = invert_permutation(index)
            identity = bool(torch.equal(index, torch.arange(self.num_experts, device=index.device).expand_as(index)))
        if torch.is_inference_mode_enabled():
            # Not cached: an inverse made under torch.inference_mode() is an inference tensor, and a later
            # forward with autograd would fail to save it for backward.
            return inverse, identity
        self._inverse_key = (index, index.data_ptr(), index._version)
        self._inverse_value = (inverse, identity)
        return self._inverse_value

    def apply(self, gate_output: GateOutput) -> torch.Tensor:  # type: ignore[override]  # (not nn.Module.apply(fn))
        """Expert-space weights ``[batch, num_experts]`` from a gate output (same as
        :func:`apply_permutation` with ``index``, without recomputing the inverse on every call)."""
        inverse, identity = self.inverse()
        return permute_weights(gate_output, inverse, identity=identity)


def apply_permutation(gate_output: GateOutput, index: torch.Tensor) -> torch.Tensor:
    """Expert-space weights for ``index`` of shape ``[S, n]`` (S = 1 or the gate's number of selectors).

    A 1-D ``index`` ``[n]`` is one permutation for the gate's weights (``[1, n]``).
    """
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a tensor [S, n] of permutations, got {type(index).__name__}")
    if index.dim() == 1:
        index = index.unsqueeze(0)
    weights = gate_output.weights
    n = weights.shape[1]
    if index.shape[-1] != n:
        raise ValueError(f"the gate returned weights over {n} experts but the permutation has {index.shape[-1]}")
    return permute_weights(gate_output, invert_permutation(index))


def permute_weights(gate_output: GateOutput, inverse: torch.Tensor, *, identity: bool = False) -> torch.Tensor:
    """Expert-space weights given the inverse permutation(s) ``[S, n]`` (see :func:`apply_permutation`).

    ``identity=True`` says every row of ``inverse`` is the identity: one-row permutations then return
    the gate's weights themselves instead of a permuted copy (equal values).
    """
    weights = gate_output.weights
    n = weights.shape[1]
    if inverse.dim() != 2:
        # A 1-D permutation read as n per-selector rows was silently wrong for a gate with k = n selectors.
        raise ValueError(f"the inverse permutations must have shape [S, n], got {tuple(inverse.shape)}")
    if inverse.shape[-1] != n:
        raise ValueError(f"the gate returned weights over {n} experts but the permutation has {inverse.shape[-1]}")
    if inverse.device != weights.device:
        inverse = inverse.to(weights.device)
    if inverse.shape[0] == 1:
        return weights if identity else weights[:, inverse[0]]
    if not gate_output.has_selectors:
        raise ValueError(
            f"a permutation per selector ({inverse.shape[0]} rows) needs a gate that returns "
            "selector_weights and selector_mix"
        )
    sel = gate_output.selector_weights
    mix = gate_output.selector_mix
    assert sel is not None and mix is not None  # has_selectors
    if sel.shape[1] != inverse.shape[0]:
        raise ValueError(f"the gate has {sel.shape[1]} selectors but the permutation has {inverse.shape[0]} rows")
    permuted = torch.gather(sel, 2, inverse.unsqueeze(0).expand(sel.shape[0], -1, -1))
    return torch.einsum("bk,bkn->bn", mix, permuted)
