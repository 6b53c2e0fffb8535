"""A learned gate→expert permutation in the manner of COMET+ (Sinkhorn relaxation, Hungarian rounding).

:class:`SinkhornPermutation` wraps any gate of the protocol and is itself a gate. It has two phases:

* **soft** (from construction until :meth:`SinkhornPermutation.round_`): a doubly stochastic
  ``P = exp(log_sinkhorn(log_alpha / tau, iters))`` moves gate weight ``i`` to expert ``j`` with
  probability ``P_ij``; the rows of the result are renormalised onto the simplex, and the gate loss gains
  ``entropy_weight * permutation_entropy(log P)``, which is smallest at permutation matrices.
  ``tau`` and ``iters`` follow a schedule set by :meth:`SinkhornPermutation.set_progress`.
* **hard** (after :meth:`SinkhornPermutation.round_`, which runs the Hungarian algorithm once): the
  rounded permutation is applied exactly, like :class:`routing_search.layers.permutation.Permutation`
  (``index[i]`` is the expert that receives gate weight ``i``; ``w = g[:, argsort(index)]``), so exact
  zeros stay exact zeros, and ``log_alpha`` stops receiving gradients.

Differences from the published COMET+ code: rounding happens once (not on every step), and the soft
weights are computed with the row-normalised ``P`` (see :meth:`SinkhornPermutation.forward`), which is
the same at convergence but never divides 0 by 0 when Sinkhorn has not converged at tiny ``tau``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .._validation import check_int, check_positive_float
from ..distributed import broadcast_object, is_main_process, resolve_group
from ..gates.protocol import GateOutput, check_gate, num_selectors_of

__all__ = ["log_sinkhorn", "permutation_entropy", "SinkhornPermutation", "SinkhornState", "sinkhorn_modules"]


def log_sinkhorn(log_alpha: torch.Tensor, num_iters: int) -> torch.Tensor:
    """Sinkhorn normalisation in log space; returns ``log P`` with the shape of ``log_alpha``.

    Each iteration normalises the rows (last dimension) and then the columns (second-to-last) with
    ``logsumexp``, so the columns of ``exp(result)`` sum to 1 up to rounding and the rows approach 1 as
    the iterations proceed. Works for any finite input scale (e.g. ``log_alpha / 1e-7``).

    Args:
        log_alpha: ``[..., n, n]`` finite scores.
        num_iters: number of (row, column) normalisation pairs, >= 1.
    """
    if not isinstance(log_alpha, torch.Tensor):
        raise TypeError(f"log_alpha must be a torch.Tensor, got {type(log_alpha).__name__}")
    if log_alpha.dim() < 2 or log_alpha.shape[-1] != log_alpha.shape[-2]:
        raise ValueError(f"log_alpha must have shape [..., n, n], got {tuple(log_alpha.shape)}")
    if not log_alpha.is_floating_point():
        raise TypeError(f"log_alpha must be a floating-point tensor, got {log_alpha.dtype}")
    num_iters = check_int("num_iters", num_iters, minimum=1)
    log_p = log_alpha
    for _ in range(num_iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
    return log_p


def _entropy_from_log(log_q: torch.Tensor, dim: tuple[int, ...]) -> torch.Tensor:
    # -Σ q log q computed from log q; an underflowed q contributes exactly 0 (value and gradient).
    return -(log_q.exp() * log_q).sum(dim=dim)


def permutation_entropy(log_p: torch.Tensor) -> torch.Tensor:
    """``H(P) + H(row-normalised P)`` for ``log_p`` of shape ``[n, n]`` (or ``[..., n, n]``), in nats.

    * ``H(P)``: entropy of ``P / ΣP`` as one distribution over the ``n²`` entries (``ΣP = n`` for a
      doubly stochastic ``P``). On doubly stochastic matrices it lies in ``[log n, 2 log n]`` and
      equals ``log n`` exactly at permutation matrices.
    * ``H(row-normalised P)``: mean over rows of the entropy of ``P_i· / Σ_j P_ij``; in ``[0, log n]``,
      0 exactly when every row is one-hot.

    Both are computed in log space, so they are finite (with finite gradients) for any finite ``log_p``.
    """
    log_joint = log_p - torch.logsumexp(log_p.flatten(-2), dim=-1)[..., None, None]
    log_rows = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    h_joint = _entropy_from_log(log_joint, (-2, -1))
    h_rows = _entropy_from_log(log_rows, (-1,)).mean(dim=-1)
    return h_joint + h_rows


def _renormalise(w: torch.Tensor) -> torch.Tensor:
    """Rows (last dimension) divided by their sums; a row summing to 0 is left at 0."""
    total = w.sum(dim=-1, keepdim=True)
    return w / total.clamp_min(torch.finfo(w.dtype).tiny)


class SinkhornState(nn.Module):
    """``log_alpha`` and the schedule / rounding buffers of a learned permutation (shareable)."""

    tau: torch.Tensor
    num_iters: torch.Tensor
    schedule_step: torch.Tensor
    frozen_flag: torch.Tensor
    index: torch.Tensor

    def __init__(self, log_alpha: torch.Tensor, tau_start: float, iters_start: int) -> None:
        super().__init__()
        n = log_alpha.shape[0]
        self.log_alpha = nn.Parameter(log_alpha)
        self.register_buffer("tau", torch.tensor(tau_start, dtype=torch.float64))
        self.register_buffer("num_iters", torch.tensor(iters_start, dtype=torch.long))
        self.register_buffer("schedule_step", torch.tensor(0, dtype=torch.long))
        self.register_buffer("frozen_flag", torch.tensor(False))
        self.register_buffer("index", torch.arange(n, dtype=torch.long))


class SinkhornPermutation(nn.Module):
    """A learned permutation between a gate and its experts (COMET+), itself following the gate protocol.

    Args:
        gate: any module following the gate protocol; ``num_experts`` and ``num_selectors`` are copied.
        tau_start: temperature at schedule step 0.
        tau_end: temperature at schedule step ``anneal_steps - 1``; ``tau_start >= tau_end > 0``.
            Between the two, ``tau`` is log-linear in the step.
        iters_start: Sinkhorn iterations at step 0 (>= 1).
        iters_end: Sinkhorn iterations at step ``anneal_steps - 1`` (>= 1); linear in between, rounded.
        anneal_steps: number of schedule steps (typically epochs) of the soft phase, >= 1 (required).
            With one step the schedule stays at ``(tau_start, iters_start)``.
        entropy_weight: ζ >= 0, the weight of :func:`permutation_entropy` in the soft phase.
        init_scale: ``log_alpha`` starts U(-init_scale, init_scale) (>= 0).
        generator: optional ``torch.Generator`` for that initialisation.
        share: the :class:`SinkhornState` of another wrapper (its ``.state``) to learn one permutation
            for several gates, as COMET+ does in multi-task models; see :meth:`shared`. Only the owner
            of the state adds the entropy penalty.

    State (in the submodule ``state``, saved in checkpoints): ``log_alpha``, ``tau`` (float64),
    ``num_iters`` and ``schedule_step`` (long), ``frozen_flag`` (bool) and ``index`` (long ``[n]``, the
    rounded permutation, identity before); the wrapper exposes each as an attribute.

    A training loop calls :meth:`set_progress` at the start of each schedule step (epoch) of the soft
    phase and :meth:`round_` once when it ends; :func:`sinkhorn_modules` finds the modules in a model.
    Note that the soft ``P`` makes every weight non-zero, so an MoE dispatches densely until rounding.
    """

    def __init__(
        self,
        gate: nn.Module,
        *,
        tau_start: float = 1e-3,
        tau_end: float = 1e-7,
        iters_start: int = 20,
        iters_end: int = 150,
        anneal_steps: int,
        entropy_weight: float = 1e-4,
        init_scale: float = 0.05,
        generator: torch.Generator | None = None,
        share: "SinkhornState | None" = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        self.num_experts: int = int(getattr(gate, "num_experts"))  # checked by check_gate
        self.num_selectors: int = num_selectors_of(gate)
        self.tau_start = check_positive_float("tau_start", tau_start)
        self.tau_end = check_positive_float("tau_end", tau_end)
        if self.tau_start < self.tau_end:
            raise ValueError(f"tau_start must be >= tau_end (annealing lowers tau), got tau_start={tau_start}, tau_end={tau_end}")
        self.iters_start = check_int("iters_start", iters_start, minimum=1)
        self.iters_end = check_int("iters_end", iters_end, minimum=1)
        self.anneal_steps = check_int("anneal_steps", anneal_steps, minimum=1)
        self.entropy_weight = check_positive_float("entropy_weight", entropy_weight, allow_zero=True)
        self.init_scale = check_positive_float("init_scale", init_scale, allow_zero=True)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

        n = self.num_experts
        if share is None:
            device = generator.device if generator is not None else None
            init = torch.rand((n, n), generator=generator, device=device).cpu()
            share = SinkhornState((2.0 * init - 1.0) * self.init_scale, self.tau_start, self.iters_start)
            self.owns_state = True
        else:
            if not isinstance(share, SinkhornState):
                raise TypeError(f"share must be the SinkhornState of another SinkhornPermutation (its .state), got {type(share).__name__}")
            if share.log_alpha.shape != (n, n):
                raise ValueError(f"share holds a permutation over {share.log_alpha.shape[0]} experts but the gate has num_experts={n}")
            self.owns_state = False  # the owner adds the entropy penalty, once
        self.state = share
        # Keep log_alpha non-trainable when a frozen checkpoint is loaded into a fresh module.
        self.register_load_state_dict_post_hook(SinkhornPermutation._sync_requires_grad)

    @classmethod
    def shared(cls, gates: list[nn.Module], **kwargs: Any) -> list["SinkhornPermutation"]:
        """Wrap several gates (e.g. one per task) with ONE learned permutation shared by all of them."""
        gates = list(gates)
        if not gates:
            raise ValueError("gates must hold at least one gate")
        first = cls(gates[0], **kwargs)
        return [first] + [cls(g, share=first.state, **kwargs) for g in gates[1:]]

    @property
    def log_alpha(self) -> nn.Parameter:
        """The learnable scores ``[n, n]`` (shared when the state is shared)."""
        return self.state.log_alpha

    @property
    def tau(self) -> torch.Tensor:
        """Current Sinkhorn temperature (float64 buffer)."""
        return self.state.tau

    @property
    def num_iters(self) -> torch.Tensor:
        """Current number of Sinkhorn iterations."""
        return self.state.num_iters

    @property
    def schedule_step(self) -> torch.Tensor:
        """Last schedule step set by :meth:`set_progress`."""
        return self.state.schedule_step

    @property
    def frozen_flag(self) -> torch.Tensor:
        """Bool buffer: True once rounded."""
        return self.state.frozen_flag

    @property
    def index(self) -> torch.Tensor:
        """The rounded permutation (identity before :meth:`round_`)."""
        return self.state.index

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, tau_start={self.tau_start:g}, tau_end={self.tau_end:g}, "
            f"iters_start={self.iters_start}, iters_end={self.iters_end}, anneal_steps={self.anneal_steps}, "
            f"entropy_weight={self.entropy_weight:g}"
        )

    # ------------------------------------------------------------------ schedule
    def schedule(self, step: int) -> tuple[float, int]:
        """``(tau, iters)`` at schedule step ``step`` (steps past the last one stay at the last values)."""
        step = check_int("step", step, minimum=0)
        t = min(step, self.anneal_steps - 1) / (self.anneal_steps - 1) if self.anneal_steps > 1 else 0.0
        if t == 0.0 or t == 1.0:
            tau = self.tau_start if t == 0.0 else self.tau_end  # exact endpoints, free of exp/log rounding
        else:
            tau = math.exp((1.0 - t) * math.log(self.tau_start) + t * math.log(self.tau_end))
        iters = int(round(self.iters_start + t * (self.iters_end - self.iters_start)))
        return tau, iters

    @torch.no_grad()
    def set_progress(self, step: int) -> None:
        """Set ``tau`` and the iteration count for schedule step ``step`` (0-based, e.g. the epoch)."""
        tau, iters = self.schedule(step)
        self.tau.fill_(tau)
        self.num_iters.fill_(iters)
        self.schedule_step.fill_(step)

    # ------------------------------------------------------------------ state
    @property
    def frozen(self) -> bool:
        """True once :meth:`round_` has fixed the hard permutation."""
        return bool(self.frozen_flag)

    def log_soft_permutation(self) -> torch.Tensor:
        """``log P`` at the current ``tau`` and iteration count (differentiable w.r.t. ``log_alpha``).

        Computed in at least float32 (``log_alpha / tau`` overflows float16 at small ``tau``).
        """
        dtype = torch.promote_types(self.log_alpha.dtype, torch.float32)
        tau = self.tau.to(device=self.log_alpha.device, dtype=dtype)
        return log_sinkhorn(self.log_alpha.to(dtype) / tau, int(self.num_iters))

    @torch.no_grad()
    def soft_permutation(self) -> torch.Tensor:
        """The current doubly stochastic ``P`` ``[n, n]``, detached (``P_ij``: gate weight i → expert j)."""
        return self.log_soft_permutation().exp()

    def permutation(self) -> np.ndarray:
        """The rounded permutation (``perm[i]`` = expert receiving gate weight ``i``) as int64 ``[n]``."""
        if not self.frozen:
            raise RuntimeError("the permutation is still soft: call round_() first (see soft_permutation())")
        return self.index.detach().cpu().numpy().copy()

    @torch.no_grad()
    def round_(self, *, process_group: Any = None) -> np.ndarray:
        """Round ``P`` to the permutation maximising ``Σ_i P_{i,perm[i]}`` (Hungarian) and freeze.

        After this the forward applies the hard permutation exactly and ``log_alpha`` no longer
        requires gradients. Calling it again returns the frozen permutation without re-rounding.

        Args:
            process_group: ``None`` (default): the world group when ``torch.distributed`` is initialised;
                ``False``: this process alone; or a ``ProcessGroup``. With a group, rank 0 rounds and
                broadcasts its permutation, so every rank freezes the same one (every rank must call
                ``round_`` at the same point).
        """
        if not self.frozen:
            # Checked on every rank (they hold the same log_alpha), so no rank waits for a broadcast that never comes.
            if not bool(torch.isfinite(self.log_alpha).all()):
                raise ValueError(
                    "SinkhornPermutation.round_(): log_alpha holds NaN/inf (training diverged); lower the learning "
                    "rate or restore an earlier checkpoint before rounding"
                )
            group = resolve_group(process_group)
            perm: np.ndarray | None = None
            if is_main_process(group):
                p = self.soft_permutation().detach().cpu().to(torch.float64).numpy()
                rows, cols = linear_sum_assignment(-p)
                perm = np.empty(self.num_experts, dtype=np.int64)
                perm[rows] = cols
            perm = broadcast_object(perm, group)
            self.index.copy_(torch.as_tensor(perm, device=self.index.device))
            self.frozen_flag.fill_(True)
        self.log_alpha.requires_grad_(False)
        return self.permutation()

    @staticmethod
    def _sync_requires_grad(module: nn.Module, incompatible_keys: object) -> None:
        if isinstance(module, SinkhornPermutation) and module.frozen:
            module.log_alpha.requires_grad_(False)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None) -> GateOutput:
        """The inner gate's output with its weights moved to the experts chosen by the permutation.

        Soft phase: with ``R`` the row-normalised ``P``, ``weights = renorm(g @ R)`` (``renorm`` divides
        each row by its sum), selector distributions become ``renorm(sel @ R)`` per selector with
        ``selector_mix`` unchanged and ``weights = einsum('bk,bkn->bn', mix, sel')``; the loss is the
        inner loss plus ``entropy_weight * permutation_entropy(log P)``.
        Hard phase: ``weights = g[:, argsort(index)]`` (selectors gathered likewise), inner loss only.
        """
        out = self.gate(x, task=task, key=key)
        g = out.weights
        if g.dim() != 2 or g.shape[1] != self.num_experts:
            raise ValueError(f"the inner gate returned weights of shape {tuple(g.shape)}, expected [batch, {self.num_experts}]")
        sel, mix = (out.selector_weights, out.selector_mix) if out.has_selectors else (None, None)

        if self.frozen:
            inverse = torch.argsort(self.index.to(g.device))
            weights = g[:, inverse]
            new_sel = sel[:, :, inverse] if sel is not None else None
            return GateOutput(weights=weights, loss=out.loss, selector_weights=new_sel, selector_mix=mix)

        log_p = self.log_soft_permutation()
        # Row-normalised P: every gate slot's mass is fully spread over the experts, even where a row of
        # an unconverged P has underflowed to 0 at tiny tau (R equals P once Sinkhorn has converged).
        rows = (log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)).exp().to(device=g.device, dtype=g.dtype)
        if sel is not None and mix is not None:
            new_sel = _renormalise(torch.matmul(sel, rows))
            weights = torch.einsum("bk,bkn->bn", mix, new_sel)
        else:
            new_sel = None
            weights = _renormalise(g @ rows)
        loss = out.loss
        if self.entropy_weight > 0 and self.owns_state:
            penalty = self.entropy_weight * permutation_entropy(log_p)
            loss = loss + penalty.to(device=loss.device, dtype=loss.dtype)
        return GateOutput(weights=weights, loss=loss, selector_weights=new_sel, selector_mix=mix)


def sinkhorn_modules(model: nn.Module) -> list[SinkhornPermutation]:
    """Every :class:`SinkhornPermutation` in ``model`` (each once, in ``model.modules()`` order)."""
    return [m for m in model.modules() if isinstance(m, SinkhornPermutation)]
