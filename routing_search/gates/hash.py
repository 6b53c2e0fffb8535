"""Hash routing (Roller et al., 2021): a fixed random map from an integer key to one expert.

The map is a balanced random table ``table[key] = expert`` over ``num_keys`` keys (a vocabulary of
token ids, user ids, ...): every expert receives ``num_keys // n`` or ``num_keys // n + 1`` keys.
It is built once from ``torch.Generator().manual_seed(seed)``, so the same seed gives the same table
on every machine, and it is stored as a buffer, so it is saved in checkpoints. The gate has no
learnable parameters; which expert serves which bucket is exactly what a permutation search changes.
"""

from __future__ import annotations

import torch

from .._validation import check_int, check_num_experts_k
from .protocol import BaseGate, GateOutput

__all__ = ["Hash", "balanced_hash_table"]


def balanced_hash_table(num_keys: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """A balanced random assignment ``[num_keys]`` (int64) of keys to experts, reproducible from ``seed``.

    Key counts per expert differ by at most one, and which experts get the extra key is random too.
    """
    num_keys = check_int("num_keys", num_keys, minimum=1)
    num_experts, _ = check_num_experts_k(num_experts)
    seed = check_int("seed", seed, minimum=0)
    generator = torch.Generator().manual_seed(seed)
    expert_labels = torch.randperm(num_experts, generator=generator)
    key_order = torch.randperm(num_keys, generator=generator)
    balanced = expert_labels[torch.arange(num_keys) % num_experts]
    return balanced[key_order]


class Hash(BaseGate):
    """Hash-routing gate: example ``b`` goes entirely to expert ``table[key[b]]``.

    Args:
        num_experts: number of experts n >= 2.
        num_keys: number of distinct keys (vocabulary size); keys must lie in ``[0, num_keys)``.
            Defaults to ``num_experts`` (the table is then a random permutation of the experts).
        seed: seed of the table (a non-negative integer).
        validate: check ``x`` for NaN/inf. Keys are always checked.

    Call ``gate(x, key=key)`` with ``key`` an integer tensor ``[batch]``. ``x`` is any 2-D tensor; only
    its batch size, device and (floating) dtype are used. Output: one-hot ``weights``, zero ``loss``.
    """

    table: torch.Tensor

    def __init__(
        self,
        num_experts: int,
        num_keys: int | None = None,
        *,
        seed: int = 0,
        validate: bool = True,
    ) -> None:
        n, _ = check_num_experts_k(num_experts)
        num_keys = n if num_keys is None else check_int("num_keys", num_keys, minimum=1)
        super().__init__(n, None, validate=validate)
        self.num_keys = num_keys
        self.seed = check_int("seed", seed, minimum=0)
        self.register_buffer("table", balanced_hash_table(num_keys, n, self.seed))

    def _check_key(self, key: torch.Tensor | None, batch: int) -> torch.Tensor:
        if key is None:
            raise ValueError(
                "Hash routing needs key=: an integer tensor [batch] of ids in "
                f"[0, num_keys={self.num_keys})"
            )
        if not isinstance(key, torch.Tensor):
            raise TypeError(f"key must be an integer torch.Tensor of shape [batch], got {type(key).__name__}")
        if key.is_floating_point() or key.is_complex() or key.dtype == torch.bool:
            raise TypeError(f"key must have an integer dtype, got {key.dtype}")
        if key.dim() != 1 or key.shape[0] != batch:
            raise ValueError(f"key must have shape [batch]=[{batch}], got shape {tuple(key.shape)}")
        if key.numel() > 0:
            low, high = int(key.min()), int(key.max())
            if low < 0 or high >= self.num_keys:
                bad = low if low < 0 else high
                raise ValueError(f"key values must be in [0, num_keys={self.num_keys}), got {bad}")
        return key

    def experts_of(self, key: torch.Tensor) -> torch.Tensor:
        """Expert index ``[batch]`` (int64) of every key, on the key's device."""
        # Any length is accepted here; -1 makes a key that is not 1-D fail the shape check.
        batch = key.shape[0] if isinstance(key, torch.Tensor) and key.dim() == 1 else -1
        key = self._check_key(key, batch)
        return self.table.to(key.device)[key.long()]

    def forward(
        self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None
    ) -> GateOutput:
        """Gate weights for the batch ``x`` (see the class docstring); returns a :class:`GateOutput`."""
        x = self._check_x(x)
        self._count_call()
        key = self._check_key(key, x.shape[0])
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        experts = self.table.to(x.device)[key.to(x.device).long()]
        weights = torch.zeros(x.shape[0], self.num_experts, dtype=dtype, device=x.device)
        weights.scatter_(1, experts.unsqueeze(1), 1.0)
        return GateOutput(weights=weights, loss=self._zero_loss(weights))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, num_keys={self.num_keys}, seed={self.seed}"
