"""DSelect-k (Hazimeh et al. 2021): k binary-encoded single-expert selectors, smoothed with S."""

from __future__ import annotations


import torch
from torch import nn

from .._validation import check_choice, check_positive_float
from .binary_encoding import hard_selector, log_code_matrix, mix_selectors, num_bits, zero_log
from .annealed import AnnealedGate, BudgetAnnealing
from .protocol import GateOutput, WeightSchedule, entropy, resolve_weight
from .router import check_input_dtype
from .smooth_step import (
    GammaAnnealing,
    first_order_only,
    smooth_step,
    smooth_step_and_slope,
    entropy_terms,
    smooth_step_init_,
    smooth_step_slope,
    stacked_logits_t,
)

__all__ = ["DSelectK"]

_EPS = 1e-6
_ALPHA_INIT = 0.05


class _SmoothSelector(torch.autograd.Function):
    """``selector_fast(S(z))`` over all ``2^m`` codes with one fused backward.

    Forward: the factors ``(1 - s_j, s_j)`` of ``s = S(z)``, their logs (:func:`log_factors`), one
    matrix product with the 0/1 code matrix and ``exp``. Backward: ``dL/dz_j = sum_c G_c r_c
    (S'_j / s_j [bit j of c set] - S'_j / (1 - s_j) [bit unset])``: one matrix product with the
    transposed code matrix, the per-factor slopes ``S' / f`` (0 where the factor is 0, as the
    autograd of :func:`log_factors` gives) kept from the forward.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, z: torch.Tensor, gamma: float, log_codes: torch.Tensor
    ) -> torch.Tensor:
        factors, slope = _code_factors(z, gamma)
        r = _log_selector(factors, log_codes)
        ctx.save_for_backward(r, factors, slope, log_codes)
        return r

    @staticmethod
    @first_order_only
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        r, factors, slope, log_codes = ctx.saved_tensors  # type: ignore[attr-defined]
        return _selector_backward(grad * r, factors, slope, log_codes), None, None


def _code_factors(z: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``[1 - s, s]`` ``[..., 2m]`` (all ``1 - s_j`` first) of ``s = S(z)``, and ``S'(z)`` ``[..., m]``."""
    s, slope = smooth_step_slope(z, gamma)
    return torch.cat([1 - s, s], dim=-1), slope


def _log_selector(factors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``r = exp(log(factors) @ codes)`` with :func:`zero_log` for zero factors (exact zeros in ``r``).

    ``log 0 = -inf`` is raised to ``zero_log`` by the clamp; every positive factor's log is far above it.
    """
    logs = torch.log(factors).clamp_min_(zero_log(factors.dtype))
    return torch.exp(logs @ codes)


def _selector_backward(rows: torch.Tensor, factors: torch.Tensor, slope: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``dL/dz`` ``[..., m]`` from ``rows = dL/dr * r`` ``[..., 2^m]``.

    ``dL/d log f = rows @ codes.T``, computed as ``(codes @ rows.T).T`` (several times faster in that
    orientation on the CPU), then ``dL/dz_j = S'_j (g_{s_j} / s_j - g_{1-s_j} / (1 - s_j))``. A zero
    factor's ``g`` is exactly 0 (every code behind it has ``r = 0``), and dividing by the factor
    clamped to the smallest normal number keeps it 0: no gradient, as the autograd of
    :func:`log_factors` gives.
    """
    m = slope.shape[-1]
    glog = codes @ rows.reshape(-1, rows.shape[-1]).t()  # [2m, rows]
    f = factors.reshape(-1, 2 * m).clamp_min(torch.finfo(factors.dtype).tiny)
    grad = glog[m:].t() / f[:, m:] - glog[:m].t() / f[:, :m]
    return (grad * slope.reshape(-1, m)).reshape(slope.shape)


def _softmax_t(alpha_t: torch.Tensor) -> torch.Tensor:
    """``softmax`` over the first dimension of ``[k, ...]`` (the selectors).

    On the selector logits stored selector-major (``[k, rows]``) the max, the sum and the division run
    along contiguous rows, several times faster than over a last dimension of size ``k``. The soft
    and the hard gate both use it, so they agree bit for bit on binary codes.
    """
    return torch.softmax(alpha_t, dim=0)


class _DSelectKGate(torch.autograd.Function):
    """The whole soft gate when every code names an expert (``n = 2^m``), from the fused logits, with one hand-written backward.

    Input ``logits_t`` ``[width, rows]`` (selector-major, :func:`stacked_logits_t`): ``alpha`` in rows
    ``[0, k)``, the code logits ``z`` (selector by selector, bit by bit) in ``[k, k + k m)``, any
    further rows get gradient 0. Outputs ``weights`` ``[rows, n]``, the selector distributions
    ``r`` ``[rows, k, n]``, ``mix = softmax(alpha)`` ``[rows, k]`` and the entropy ``sum_i H(r_i)``
    ``[rows]`` (eps inside the log; zeros when not asked). Same numbers as the composed autograd form
    (``weights = sum_i mix_i r_i``) to rounding.

    The per-bit work (smooth step, factors ``(1 - s_j, s_j)``, the gradients) runs on contiguous
    ``[k, 2m, rows]`` rows; ``r`` is their Kronecker product (:func:`_half_products`, no logs). Backward:
    ``dL/dz_j = S'_j (g_j^1 / s_j - g_j^0 / (1 - s_j))`` with ``g_i = codes @ (dL/dr_i * r_i)^T``; the
    weights' part is taken before mixing (its two rows of bit 0 also sum to the gradient of ``mix``)
    and the entropy's part is reduced to its ``[k, 2m, rows]`` product in the forward, so nothing of
    size ``[rows, k, n]`` is kept but ``r``. A zero factor passes no gradient (every code behind it
    has ``r = 0``), as the autograd of :func:`log_factors` gives.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits_t: torch.Tensor,
        k: int,
        m: int,
        gamma: float,
        log_codes: torch.Tensor,
        gather: torch.Tensor,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # type: ignore[attr-defined]
        width, rows = logits_t.shape
        factors = logits_t.new_empty(k, 2 * m, rows)  # per selector: 1 - s_0 .. 1 - s_{m-1}, s_0 .. s_{m-1}
        slope = smooth_step_and_slope(logits_t[k : k + k * m].view(k, m, rows), gamma, out=factors[:, m:])
        torch.sub(factors.new_ones(()), factors[:, m:], out=factors[:, :m])
        n = log_codes.shape[1]
        r = logits_t.new_empty(rows, k, n)
        halves = _half_products(factors)
        n_high = 2 ** (m - m // 2)
        scratch = logits_t.new_empty(2, rows, n)
        ent = r.new_zeros(rows)
        ones = r.new_ones(n)
        ent_glog = logits_t.new_empty(k, 2 * m, rows) if with_entropy and ctx.needs_input_grad[0] else None  # type: ignore[attr-defined]
        for i in range(k):  # one selector at a time through one scratch buffer, r_i still in cache for its entropy
            r_i = torch.mm(halves[i, :n_high].t(), gather[:n_high], out=r[:, i, :])  # A_{c >> h}
            r_i.mul_(torch.mm(halves[i, n_high:].t(), gather[n_high:], out=scratch[0]))  # times B_{c mod 2^h}
            if with_entropy:
                _entropy_terms(r_i, scratch, ones, ent, log_codes, None if ent_glog is None else ent_glog[i])
        del halves, scratch
        # The backward divides by the factors: a zero one, clamped to the smallest normal number, keeps its g = 0.
        factors.clamp_min_(torch.finfo(factors.dtype).tiny)
        mix_t = _softmax_t(logits_t[:k])
        mix = torch.stack(mix_t.unbind(0), dim=1)
        weights = mix_selectors(mix, r)
        ctx.sizes = (k, m, width)  # type: ignore[attr-defined]
        ctx.save_for_backward(r, mix_t, factors, slope, log_codes, ent_glog)  # type: ignore[arg-type]
        return weights, r, mix, ent

    @staticmethod
    @first_order_only
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        g_weights: torch.Tensor | None,
        g_r: torch.Tensor | None,
        g_mix: torch.Tensor | None,
        g_ent: torch.Tensor | None,
    ) -> tuple[torch.Tensor, None, None, None, None, None, None]:
        r, mix_t, factors, slope, log_codes, ent_glog = ctx.saved_tensors  # type: ignore[attr-defined]
        k, m, width = ctx.sizes  # type: ignore[attr-defined]
        rows = r.shape[0]
        grad_mix = None if g_mix is None else g_mix.t()
        glog = None  # codes @ (dL/dr_i * r_i)^T, [k, 2m, rows]
        if g_weights is not None:
            glog = _code_products(r, log_codes, g_weights)
            # Every code has bit 0 unset or set: rows 0 and m sum r_i . g_weights over all codes.
            from_weights = glog[:, 0] + glog[:, m]
            grad_mix = from_weights if grad_mix is None else from_weights.add_(grad_mix)
            glog.mul_(mix_t.unsqueeze(1))
        if g_r is not None:
            from_r = _code_products(r, log_codes, g_r)
            glog = from_r if glog is None else glog.add_(from_r)
        if g_ent is not None and ent_glog is not None:
            neg = (-g_ent).view(1, 1, rows)
            glog = ent_glog * neg if glog is None else glog.addcmul_(ent_glog, neg)
        grad = r.new_empty(width, rows)
        grad[k + k * m :].zero_()
        if grad_mix is None:
            grad[:k].zero_()
        else:
            torch.mul(mix_t, grad_mix - (mix_t * grad_mix).sum(dim=0, keepdim=True), out=grad[:k])
        grad_z = grad[k : k + k * m].view(k, m, rows)
        if glog is None:
            grad_z.zero_()
        else:
            glog.div_(factors)  # a zero factor (clamped in the forward) has g = 0 exactly: no gradient
            torch.sub(glog[:, m:], glog[:, :m], out=grad_z).mul_(slope)
        return grad, None, None, None, None, None, None


def _bit_products(factors: torch.Tensor, lo: int, hi: int, out: torch.Tensor) -> None:
    """Products over bits ``lo .. hi-1`` of ``factors`` ``[k, 2m, rows]`` into ``out`` ``[k, 2^(hi-lo), rows]``.

    Entry ``p`` is ``prod_j f_j(bit j - lo of p)``, bit ``hi - 1`` outermost: one broadcast product per
    bit along contiguous rows (the empty product is 1).
    """
    k, two_m, rows = factors.shape
    m = two_m // 2
    if hi == lo:
        out.fill_(1)
        return
    prod = factors[:, hi - 1 :: m]  # rows 1 - s_{hi-1}, s_{hi-1}
    for j in range(hi - 2, lo - 1, -1):
        low = factors[:, j::m].unsqueeze(1)
        width = prod.shape[1]
        if j == lo:
            torch.mul(prod.unsqueeze(2), low, out=out.view(k, width, 2, rows))
            return
        prod = (prod.unsqueeze(2) * low).view(k, 2 * width, rows)
    out.copy_(prod)


def _half_products(factors: torch.Tensor) -> torch.Tensor:
    """``[A | B]`` ``[k, 2^(m-h) + 2^h, rows]``: the factor products over the high bits ``h .. m-1`` and the low bits ``0 .. h-1`` (``h = m // 2``).

    With :func:`_gather_matrix` two small matrix products per selector lay out ``A_{c >> h}`` and
    ``B_{c mod 2^h}`` for every code ``c`` (example-major, straight into ``r``'s layout), and one multiply
    gives ``r_i[c] = prod_j f_ij(bit j of c)``: the Kronecker product of the factors in the probability
    domain (exact zeros and ones, no logs). Each gathered entry is one product times 1 plus zeros, so
    it is exact.
    """
    k, two_m, rows = factors.shape
    m = two_m // 2
    low = m // 2
    n_high = 2 ** (m - low)
    halves = factors.new_empty(k, n_high + 2**low, rows)
    _bit_products(factors, low, m, halves[:, :n_high])
    _bit_products(factors, 0, low, halves[:, n_high:])
    return halves


def _gather_matrix(m: int) -> torch.Tensor:
    """0/1 ``[2^(m - h) + 2^h, 2^m]`` (``h = m // 2``): column ``c`` picks ``A_{c >> h}`` in the first block of rows and ``B_{c mod 2^h}`` in the second."""
    low = m // 2
    n_high, n = 2 ** (m - low), 2**m
    codes = torch.arange(n)
    out = torch.zeros(n_high + 2**low, n)
    out[codes >> low, codes] = 1.0
    out[n_high + (codes & (2**low - 1)), codes] = 1.0
    return out


def _code_products(r: torch.Tensor, log_codes: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``codes @ (grad_i * r_i)^T`` for every selector ``i``: ``[k, 2m, rows]`` (``grad`` ``[rows, n]`` or ``[rows, k, n]``).

    One selector at a time, through one ``[rows, n]`` buffer.
    """
    rows, k, _ = r.shape
    out = r.new_empty(k, log_codes.shape[0], rows)
    buf = r.new_empty(rows, r.shape[2])
    for i in range(k):
        torch.mul(r[:, i, :], grad if grad.dim() == 2 else grad[:, i, :], out=buf)
        torch.mm(log_codes, buf.t(), out=out[i])
    return out


def _entropy_terms(
    r_i: torch.Tensor,
    scratch: torch.Tensor,
    ones: torch.Tensor,
    ent: torch.Tensor,
    log_codes: torch.Tensor,
    glog_i: torch.Tensor | None,
) -> None:
    """Subtract ``sum_c r_ic log(r_ic + eps)`` from ``ent`` ``[rows]`` and, with ``glog_i``, write its code product there.

    ``glog_i`` ``[2m, rows]`` is ``codes @ (-r_i * dH/dr_i)^T`` with ``-r dH/dr = r log(r + eps) + r^2 / (r + eps)``
    (the caller multiplies by ``-dL/dH``). ``scratch`` ``[2, rows, n]`` holds the temporaries, each
    contiguous (``log`` on a strided ``[rows, n]`` view is about three times slower); ``ones`` is ``[n]``.
    """
    r_log, neg_slope = entropy_terms(r_i, _EPS, slope=glog_i is not None, out=(scratch[0], scratch[1]))
    ent.addmv_(r_log, ones, alpha=-1)  # the row sums, twice as fast as sum(-1) here
    if glog_i is not None:
        assert neg_slope is not None
        torch.mm(log_codes, neg_slope.t(), out=glog_i)


class DSelectK(AnnealedGate):
    """DSelect-k gate: ``q(alpha, Z) = sum_i softmax(alpha)_i r(S(z^(i)))`` (paper eq. 6).

    Static (``input_dim=None``): ``alpha`` in R^k and ``Z`` in R^{k x m} are parameters
    (``k + k*m`` of them; the input only sets the batch size). Per-example: ``alpha = G x + b`` and
    ``z^(i) = W^(i) x + b^(i)``. ``m = ceil(log2 n)``; bit ``j`` of expert ``i``'s code is
    ``(i >> j) & 1``.

    Output: ``selector_weights[b, i] = r(S(z^(i)))`` (after the policy below), ``selector_mix[b] =
    softmax(alpha)`` and ``weights = einsum('bk,bkn->bn', selector_mix, selector_weights)``. Every
    row is on the simplex; once ``S(Z)`` is binary at most ``k`` entries are nonzero (exact zeros).

    Loss: ``entropy_weight * sum_i H(selector_weights_i)`` (batch mean; eps 1e-6 inside the log),
    plus the reachability penalty below. ``entropy_weight`` may be a callable of the number of
    training calls so far.

    Unreachable codes (only when ``n`` is not a power of two; otherwise none of this applies): codes
    ``n .. 2^m - 1`` name no expert, so part of each selector's mass ``sum_{c >= n} r_c`` is lost.

    * ``unreachable="renormalize"`` (default): each selector's distribution is divided by its
      reachable mass ``mass = sum_{i < n} r_i``, with the official code's eps 1e-6 as a floor:
      ``(r_reach + eps * r_fold) / (mass + eps)``, where ``r_fold`` is the ``"fold"`` distribution
      below. Every row lies exactly on the simplex; for ``mass >> eps`` this is ``r_reach / mass``
      (relative difference below 1e-6), and as ``mass -> 0`` it moves continuously to ``r_fold``.
      So the gate has no jump where a selector's reachable mass reaches exactly 0, its gradient
      stays bounded there, and a binary code always gives a one-hot row.
    * ``unreachable="fold"``: the mass of unreachable code ``c`` goes to expert ``c - 2^(m-1)``
      (the top bit is dropped). Also exactly on the simplex, but some experts own two codes.

    In both cases the loss adds ``reachability_weight * sum_i -log((mass_i + eps) / (1 + eps))``
    (batch mean), 0 when all mass is reachable. It moves mass onto real experts. Near full mass it
    equals the official code's penalty ``sum_i 1/(mass_i + eps)`` (up to a constant) to first order
    (slope -1 per unit of lost mass); unlike ``1/mass`` its gradient stays bounded (below about
    ``reachability_weight / (2 sqrt(eps))`` times the slope of ``S``) when a selector's mass tends to 0,
    where the official form reaches ~1e9. It is off by default (``reachability_weight=0``): the
    renormalised (or folded) rows are on the simplex anyway, and the penalty biases every
    selector towards the low codes while it is fractional (losing mass means high bits set
    together), which cost support recovery and test loss in ``benchmarks/sparsity_study.py``
    (n = 6: median test MSE 1.77 with weight 1 against 0.85 without, seeds 0-4). The hard gate
    (:meth:`hard`) and :meth:`selected_experts` fold unreachable rounded codes, which is the soft
    gate's value (and limit) at that binary point under both policies, so they agree with the soft
    gate whenever ``S(Z)`` is binary.

    Smooth-step scale: ``gamma`` (default 1), annealed over the training budget by default
    (``anneal=BudgetAnnealing()``) so the codes end binary; the base class
    :class:`~routing_search.gates.annealed.AnnealedGate` describes the schedule and the other choices
    (an explicit ``GammaAnnealing``, ``None``, a callable ``gamma``).

    Init: ``Z`` parameters (weights and biases) ``U(-gamma/100, gamma/100)``, inside the fractional
    region of S; ``alpha`` parameters ``U(-0.05, 0.05)``.
    """

    _log_codes: torch.Tensor
    _gather: torch.Tensor

    def __init__(
        self,
        num_experts: int,
        k: int,
        input_dim: int | None = None,
        *,
        gamma: WeightSchedule = 1.0,
        anneal: GammaAnnealing | BudgetAnnealing | None = BudgetAnnealing(),
        entropy_weight: WeightSchedule = 0.0,
        unreachable: str = "renormalize",
        reachability_weight: float = 0.0,
        validate: bool = True,
    ) -> None:
        super().__init__(
            num_experts, k, input_dim, gamma=gamma, anneal=anneal, entropy_weight=entropy_weight, validate=validate
        )
        n, k = self.num_experts, self.num_selectors
        self.unreachable = check_choice("unreachable", unreachable, ("renormalize", "fold"))
        self.reachability_weight = check_positive_float(
            "reachability_weight", reachability_weight, allow_zero=True
        )
        self.num_bits = num_bits(n)
        m = self.num_bits
        # Rows of log_code_matrix reordered to the factor layout [1 - s_0 .. 1 - s_{m-1}, s_0 .. s_{m-1}].
        order = [2 * j for j in range(m)] + [2 * j + 1 for j in range(m)]
        self.register_buffer("_log_codes", log_code_matrix(m)[order], persistent=False)
        self.register_buffer("_gather", _gather_matrix(m), persistent=False)
        if input_dim is None:
            self.alpha_logits = nn.Parameter(torch.empty(k))
            self.z_logits = nn.Parameter(torch.empty(k, m))
        else:
            self.alpha_weight = nn.Parameter(torch.empty(k, input_dim))
            self.alpha_bias = nn.Parameter(torch.empty(k))
            self.z_weight = nn.Parameter(torch.empty(k, m, input_dim))
            self.z_bias = nn.Parameter(torch.empty(k, m))
        self.reset_parameters()

    @property
    def is_power_of_two(self) -> bool:
        """True when every code names an expert (``num_experts = 2^m``)."""
        return self.num_experts == 2**self.num_bits

    def reset_parameters(self) -> None:
        """Re-draw the parameters: ``Z`` inside the fractional region, ``alpha`` small."""
        with torch.no_grad():
            if self.is_static:
                self.alpha_logits.uniform_(-_ALPHA_INIT, _ALPHA_INIT)
                smooth_step_init_(self.z_logits, self.gamma)
            else:
                self.alpha_weight.uniform_(-_ALPHA_INIT, _ALPHA_INIT)
                self.alpha_bias.uniform_(-_ALPHA_INIT, _ALPHA_INIT)
                smooth_step_init_(self.z_weight, self.gamma)
                smooth_step_init_(self.z_bias, self.gamma)

    # ------------------------------------------------------------------ logits and codes
    def _logits_t(self, x: torch.Tensor | None) -> torch.Tensor:
        """``[alpha | z]`` selector-major, ``[k + k m, B]`` (:func:`stacked_logits_t`); ``[k + k m, 1]`` for a static gate."""
        if self.is_static:
            return torch.cat([self.alpha_logits, self.z_logits.reshape(-1)]).unsqueeze(1)
        if x is None:
            raise ValueError("x is required for a per-example DSelectK gate (input_dim is set)")
        check_input_dtype(x, self.z_weight, self)
        k, m, d = self.z_weight.shape
        return stacked_logits_t(
            x, [self.alpha_weight, self.z_weight.reshape(k * m, d)], [self.alpha_bias, self.z_bias.reshape(k * m)]
        )

    def _logits(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha`` ``[B, k]`` and ``z`` ``[B, k, m]`` (no batch dimension for a static gate with x None).

        Per-example: views of :meth:`_logits_t` (the same numbers as the soft gate's).
        """
        if self.is_static:
            if x is None:
                return self.alpha_logits, self.z_logits
            batch = x.shape[0]
            return (
                self.alpha_logits.expand(batch, -1),
                self.z_logits.expand(batch, -1, -1),
            )
        logits_t = self._logits_t(x)
        k, m = self.num_selectors, self.num_bits
        return logits_t[:k].t(), logits_t[k : k + k * m].view(k, m, -1).permute(2, 0, 1)

    def smooth_codes(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """``S(Z)`` in ``[0, 1]``: ``[k, m]`` for a static gate with ``x=None``, else ``[B, k, m]``."""
        _, z = self._logits(self._maybe_check(x))
        return smooth_step(z, self.gamma)

    def binary_codes(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """``S(Z)`` rounded to 0/1 (ties at 0.5 go to 0), same shape and dtype as :meth:`smooth_codes`."""
        s = self.smooth_codes(x)
        return (s > 0.5).to(s.dtype)

    def is_binary(self, x: torch.Tensor | None = None, atol: float = 0.0) -> bool:
        """Whether every entry of ``S(Z)`` is within ``atol`` of 0 or 1."""
        s = self.smooth_codes(x)
        return bool(((s <= atol) | (s >= 1 - atol)).all())

    def _fold_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """Clear the top bit of binary codes that name no expert (the fold policy on codes)."""
        if self.is_power_of_two:
            return bits
        m = self.num_bits
        powers = 2 ** torch.arange(m, device=bits.device)
        codes = (bits.to(torch.long) * powers).sum(dim=-1, keepdim=True)
        cleared = torch.cat([bits[..., : m - 1], torch.zeros_like(bits[..., m - 1 :])], dim=-1)
        return torch.where(codes >= self.num_experts, cleared, bits)

    def selected_experts(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Expert chosen by each selector after rounding ``S(Z)`` (int64, ``[k]`` or ``[B, k]``)."""
        bits = self._fold_codes(self.binary_codes(x))
        powers = 2 ** torch.arange(self.num_bits, device=bits.device)
        return (bits.to(torch.long) * powers).sum(dim=-1)

    # ------------------------------------------------------------------ distributions
    def _selector_distribution(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-selector distributions ``[..., n]`` from the code logits ``z`` ``[..., m]`` and the reachable mass."""
        n = self.num_experts
        full = _SmoothSelector.apply(z, self.gamma, self._log_codes.to(z.dtype))
        if self.is_power_of_two:
            return full, None
        half = 2 ** (self.num_bits - 1)
        reach = full[..., :n]
        mass = reach.sum(dim=-1)
        lo = n - half  # unreachable code c in [n, 2*half) folds onto c - half in [lo, half)
        folded = torch.cat([reach[..., :lo], reach[..., lo:half] + full[..., n:], reach[..., half:]], dim=-1)
        if self.unreachable == "fold":
            return folded, mass
        # Renormalise with the eps floor: continuous as mass -> 0, where it becomes the fold.
        return (reach + _EPS * folded) / (mass + _EPS).unsqueeze(-1), mass

    def forward(
        self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None
    ) -> GateOutput:
        """Soft DSelect-k gate on a batch ``x`` ``[B, input_dim]`` (any width for a static gate)."""
        x = self._check_x(x)
        calls = self._tick()
        batch = x.shape[0]
        # A static gate computes one row and broadcasts it (the same numbers, without B copies).
        lam = resolve_weight(self.entropy_weight, calls)
        ent: torch.Tensor | None
        logits_t = self._logits_t(None if self.is_static else x)
        if self.is_power_of_two:
            weights, r, mix, ent = _DSelectKGate.apply(
                logits_t,
                self.num_selectors,
                self.num_bits,
                self.gamma,
                self._log_codes.to(logits_t.dtype),
                self._gather.to(logits_t.dtype),
                lam != 0.0,
            )
            mass = None
        else:
            k, m = self.num_selectors, self.num_bits
            r, mass = self._selector_distribution(logits_t[k : k + k * m].view(k, m, -1).permute(2, 0, 1))
            mix = _softmax_t(logits_t[:k]).t()
            weights = mix_selectors(mix, r)
            ent = entropy(r, eps=_EPS).sum(dim=-1) if lam != 0.0 else None
        if lam != 0.0:
            assert ent is not None
            loss = lam * self._mean_over_batch(ent, batch)
        else:
            loss = self._zero_loss(weights)
        if mass is not None and self.reachability_weight != 0.0:
            penalty = -torch.log((mass + _EPS) / (1.0 + _EPS)).sum(dim=-1)
            loss = loss + self.reachability_weight * self._mean_over_batch(penalty, batch)
        if self.is_static:
            weights = weights.expand(batch, -1).contiguous()
            r = r.expand(batch, -1, -1).contiguous()
            mix = mix.expand(batch, -1).contiguous()
        return GateOutput(weights=weights, loss=loss, selector_weights=r, selector_mix=mix)

    def hard(self, x: torch.Tensor) -> GateOutput:
        """Combinatorial gate ``q(alpha, round(S(Z)))`` of Prop. 1 (at most ``k`` nonzeros per row).

        Unreachable rounded codes are folded as in the soft gate; equals :meth:`forward` exactly
        when ``S(Z)`` is binary. Does not advance the call counter; the loss is 0.
        """
        x = self._check_x(x)
        batch = x.shape[0]
        k, m = self.num_selectors, self.num_bits
        if self.is_static:
            mix = _softmax_t(self.alpha_logits.unsqueeze(1)).t().expand(batch, -1)
            z = self.z_logits.expand(batch, -1, -1)
        else:
            logits_t = self._logits_t(x)
            mix = _softmax_t(logits_t[:k]).t()
            z = logits_t[k : k + k * m].view(k, m, batch).permute(2, 0, 1)
        bits = self._fold_codes((smooth_step(z, self.gamma) > 0.5).to(z.dtype))
        one_hot = hard_selector(bits, self.num_experts, validate=False)
        weights = mix_selectors(mix, one_hot)
        return GateOutput(
            weights=weights,
            loss=self._zero_loss(weights),
            selector_weights=one_hot,
            selector_mix=mix.contiguous(),
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.num_selectors}, input_dim={self.input_dim}, "
            f"gamma={self.gamma}, unreachable={self.unreachable!r}"
        )
