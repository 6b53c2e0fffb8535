"""Building blocks of the exact binary-encoding reformulation (DSelect-k, §3.1.1–3.1.2).

Expert ``i`` (0-based) has the code ``i`` written with ``m = ceil(log2 n)`` bits, least significant bit
first: bit ``j`` of code ``i`` is ``(i >> j) & 1``. A selector ``z`` in ``[0, 1]^m`` puts mass
``r(z)_i = prod_{j in B(i)} z_j * prod_{j not in B(i)} (1 - z_j)`` on expert ``i``. For binary ``z``
this is the one-hot vector of the expert that ``z`` encodes (Prop. 1); for ``z`` in ``[0, 1]^m``
the ``2^m`` entries over all codes lie on the simplex (Prop. 2).

When ``n`` is not a power of two the codes ``n .. 2^m - 1`` name no expert: the functions here
return only the first ``n`` entries, so that mass is simply missing (see :func:`reachable_mass`) and
the caller decides what to do with it.
"""

from __future__ import annotations

import torch

from .._validation import check_int

__all__ = [
    "num_bits",
    "code_matrix",
    "selector",
    "reachable_mass",
    "hard_selector",
    "hard_gate",
    "selector_fast",
    "log_code_matrix",
    "log_factors",
    "zero_log",
    "selector_softmax",
    "mix_selectors",
]


def num_bits(num_experts: int) -> int:
    """Number of code bits ``m = ceil(log2(num_experts))``, at least 1."""
    n = check_int("num_experts", num_experts, minimum=1)
    return max(1, (n - 1).bit_length())


def code_matrix(
    num_experts: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """The constant 0/1 code matrix ``C`` of shape ``[num_experts, m]`` with ``C[i, j] = (i >> j) & 1``."""
    m = num_bits(num_experts)
    codes = torch.arange(num_experts, device=device).unsqueeze(1)
    shifts = torch.arange(m, device=device).unsqueeze(0)
    bits = torch.bitwise_and(torch.bitwise_right_shift(codes, shifts), 1)
    return bits.to(torch.get_default_dtype() if dtype is None else dtype)


def _check_bits(name: str, z: torch.Tensor, num_experts: int) -> int:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [..., m], got {type(z).__name__}")
    m = num_bits(num_experts)
    if z.dim() < 1 or z.shape[-1] != m:
        raise ValueError(
            f"{name} must have last dimension m = ceil(log2(num_experts)) = {m} for "
            f"num_experts={num_experts}, got shape {tuple(z.shape)}"
        )
    return m


def selector(z: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Soft single-expert selector ``r(z)``: ``[..., m] -> [..., num_experts]``.

    Computed as a plain product over the bits (no logarithms), so it is exact for binary ``z`` and
    differentiable everywhere. Only the first ``num_experts`` codes are returned; when
    ``num_experts`` is not a power of two the entries may sum to less than 1.

    This is the reference form (one factor per bit, multiplied in bit order); :func:`selector_fast`
    computes the same table in log space with one matrix product.

    >>> selector(torch.tensor([1.0, 0.0]), 4)  # code 1 = bits (1, 0)
    tensor([0., 1., 0., 0.])
    >>> selector(torch.tensor([0.5, 0.5]), 3)  # code 3 names no expert: a quarter of the mass is lost
    tensor([0.2500, 0.2500, 0.2500])
    """
    m = _check_bits("z", z, num_experts)
    if not z.is_floating_point():
        z = z.to(torch.get_default_dtype())
    codes = code_matrix(num_experts, dtype=z.dtype, device=z.device)  # [n, m]
    out = None
    for j in range(m):
        zj = z[..., j : j + 1]  # [..., 1], broadcasts against the n codes
        bit = codes[:, j]
        factor = bit * zj + (1 - bit) * (1 - zj)  # z_j where the bit is set, else 1 - z_j
        out = factor if out is None else out * factor
    assert out is not None
    return out


def log_code_matrix(
    m: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[2m, 2^m]`` 0/1 matrix for :func:`selector_fast`: row ``2j + b`` marks the codes whose bit ``j`` is ``b``.

    >>> log_code_matrix(1)
    tensor([[1., 0.],
            [0., 1.]])
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    codes = torch.arange(2**m, device=device)
    rows = []
    for j in range(m):
        bit = torch.bitwise_and(torch.bitwise_right_shift(codes, j), 1)
        rows += [(bit == 0).to(dtype), (bit == 1).to(dtype)]
    return torch.stack(rows)


def zero_log(dtype: torch.dtype) -> float:
    """The stand-in for ``log 0`` used by :func:`log_factors`: ``-1e6`` (less for float16), finite, so
    ``0 * log`` in a matrix product stays 0, and far below the log of any positive number of ``dtype``
    times a path length (float32 ``>= -104``, float64 ``>= -745`` per factor)."""
    return -min(1e6, torch.finfo(dtype).max / 1e3)


def log_factors(p: torch.Tensor) -> torch.Tensor:
    """``log p`` for ``p`` in ``[0, 1]``, with :func:`zero_log` where ``p == 0`` (``exp`` of any sum with it is 0)."""
    positive = p > 0
    return torch.where(positive, torch.log(torch.where(positive, p, torch.ones_like(p))), zero_log(p.dtype))


def selector_fast(z: torch.Tensor, num_experts: int, *, log_codes: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`selector` computed in log space with one matrix product, for ``z`` in ``[0, 1]^m``.

    ``log r_c = sum_j log f_j(c)`` is a product of ``[..., 2m]`` log-factors with a constant 0/1
    matrix; a zero factor is given the log :func:`zero_log` so that its codes get exactly 0 after ``exp``
    (and a zero gradient, as in :func:`selector` wherever the smooth step is saturated). Entries
    agree with :func:`selector` to a few units in the last place; binary ``z`` gives the same
    exact one-hot rows. :class:`~routing_search.gates.DSelectK` computes this log-space product (fused
    with its backward) when ``num_experts`` is not a power of two, and a probability-domain Kronecker
    product of the factors otherwise; :func:`selector` is the reference.
    ``log_codes`` is :func:`log_code_matrix` ``(m)`` in ``z``'s dtype, to skip rebuilding it.

    >>> selector_fast(torch.tensor([1.0, 0.0]), 4)
    tensor([0., 1., 0., 0.])
    """
    m = _check_bits("z", z, num_experts)
    if not z.is_floating_point():
        z = z.to(torch.get_default_dtype())
    if log_codes is None:
        log_codes = log_code_matrix(m, dtype=z.dtype, device=z.device)
    factors = torch.stack([1 - z, z], dim=-1).flatten(-2)  # [..., 2m]: (1 - z_j, z_j) for each j
    out = torch.exp(log_factors(factors) @ log_codes)
    return out if out.shape[-1] == num_experts else out[..., :num_experts]


def reachable_mass(z: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``sum_{i < num_experts} r(z)_i``, shape ``[...]``; identically 1 when ``num_experts = 2^m``."""
    return selector(z, num_experts).sum(dim=-1)


def _check_binary(name: str, z: torch.Tensor) -> None:
    if not bool(((z == 0) | (z == 1)).all()):
        bad = z[(z != 0) & (z != 1)]
        raise ValueError(
            f"{name} must be binary (every entry 0 or 1); found {bad.numel()} other value(s), "
            f"e.g. {bad.flatten()[0].item()!r}"
        )


def _codes_of(z: torch.Tensor) -> torch.Tensor:
    """Integer code ``sum_j z_j 2^j`` of binary ``z`` (``[..., m] -> [...]``, int64)."""
    powers = 2 ** torch.arange(z.shape[-1], device=z.device)
    return (z.to(torch.long) * powers).sum(dim=-1)


def hard_selector(
    z_binary: torch.Tensor, num_experts: int | None = None, *, validate: bool = True
) -> torch.Tensor:
    """One-hot selector of binary codes: ``[..., m] -> [..., num_experts]``.

    ``num_experts`` defaults to ``2^m``. With ``validate`` the codes are checked to be binary and to
    name an expert (``code < num_experts``). The result has ``z_binary``'s dtype when that is
    floating, else the default dtype; it equals :func:`selector` on the same (binary) input.
    """
    if not isinstance(z_binary, torch.Tensor):
        raise TypeError(f"z_binary must be a torch.Tensor of shape [..., m], got {type(z_binary).__name__}")
    if z_binary.dim() < 1 or z_binary.shape[-1] < 1:
        raise ValueError(f"z_binary must have shape [..., m] with m >= 1, got {tuple(z_binary.shape)}")
    if num_experts is None:
        num_experts = 2 ** z_binary.shape[-1]
    _check_bits("z_binary", z_binary, num_experts)
    if validate:
        _check_binary("z_binary", z_binary)
    codes = _codes_of(z_binary)
    if validate and codes.numel() and int(codes.max()) >= num_experts:
        raise ValueError(
            f"z_binary encodes code {int(codes.max())}, which names no expert (num_experts={num_experts})"
        )
    dtype = z_binary.dtype if z_binary.is_floating_point() else torch.get_default_dtype()
    return torch.nn.functional.one_hot(codes, num_experts).to(dtype)


def selector_softmax(alpha: torch.Tensor) -> torch.Tensor:
    """``softmax(alpha)`` over the last dimension (the ``k`` selectors), as whole-tensor ops.

    For the short rows of the selector logits this is several times faster on the CPU than
    ``torch.softmax`` (whose kernel is built for long rows); the numbers agree to rounding. DSelect-k's
    soft and hard gates both use it, so they agree bit for bit on binary codes.

    >>> selector_softmax(torch.tensor([0.0, 0.0]))
    tensor([0.5000, 0.5000])
    """
    e = torch.exp(alpha - alpha.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def mix_selectors(mix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``sum_i mix[..., i] rows[..., i, :]`` (``[..., k]``, ``[..., k, n]`` -> ``[..., n]``), one term per selector in order.

    Accumulated in place (one multiply-add per selector after the first, no temporaries); a term whose
    row entry is 0 or 1 adds exactly ``0`` or ``mix_i``, so one-hot rows give the same bits whatever
    the rounding of the fused multiply-add.

    >>> mix_selectors(torch.tensor([0.25, 0.75]), torch.eye(3)[:2])
    tensor([0.2500, 0.7500, 0.0000])
    """
    out = rows[..., 0, :] * mix[..., 0:1]
    for i in range(1, rows.shape[-2]):
        out.addcmul_(rows[..., i, :], mix[..., i : i + 1])
    return out


def hard_gate(
    alpha: torch.Tensor, Z: torch.Tensor, num_experts: int, *, validate: bool = True
) -> torch.Tensor:
    """Combinatorial gate ``q(alpha, Z) = sum_i softmax(alpha)_i r(Z^(i))`` of Prop. 1.

    Args:
        alpha: ``[..., k]`` selector logits.
        Z: ``[..., k, m]`` binary codes, one row per selector; every code must be ``< num_experts``.
        num_experts: number of experts ``n``.
        validate: check that ``Z`` is binary and that every code names an expert.

    Returns:
        ``[..., num_experts]`` on the simplex with at most ``k`` nonzeros (fewer when selectors agree).
    """
    if not isinstance(alpha, torch.Tensor) or not isinstance(Z, torch.Tensor):
        raise TypeError("alpha and Z must be torch.Tensors")
    _check_bits("Z", Z, num_experts)
    if Z.dim() < 2 or alpha.shape != Z.shape[:-1]:
        raise ValueError(
            f"alpha must have shape Z.shape[:-1] (one logit per selector row of Z); got alpha "
            f"{tuple(alpha.shape)} and Z {tuple(Z.shape)}"
        )
    if validate:
        _check_binary("Z", Z)
        codes = _codes_of(Z)
        if codes.numel() and int(codes.max()) >= num_experts:
            raise ValueError(
                f"Z encodes code {int(codes.max())}, which names no expert (num_experts={num_experts}); "
                "every row of Z must encode a code < num_experts"
            )
    one_hot = hard_selector(Z, num_experts, validate=False).to(alpha.dtype)
    return mix_selectors(selector_softmax(alpha), one_hot)
