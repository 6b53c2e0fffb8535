"""The gate protocol shared by every gate, built-in or user-written.

A gate is a ``torch.nn.Module`` with an integer attribute ``num_experts`` whose call
``gate(x, task=None, key=None)`` returns a :class:`GateOutput`. Its ``forward`` must accept ``task``
and ``key`` as keyword arguments; gates that do not use them ignore them, so layers can pass both
uniformly. ``weights`` is ``[batch, num_experts]`` with every row on the probability simplex
(non-negative, summing to 1) and exact zeros off the support.

Layers check the protocol (:func:`check_gate` at construction: ``num_experts``, ``num_selectors``
and the ``task=``/``key=`` keywords; :func:`check_gate_outputs` on every call: a :class:`GateOutput`
of the right shapes and, when the layer validates, rows on the simplex), naming the gate that
breaks it.

Input checked once. A layer with ``validate=True`` scans its input for NaN/inf once and then calls
its gates through :func:`call_gate` with ``checked=True``; a :class:`BaseGate` called with
``checked=True`` skips its own scan (it still checks the shape). Other gates are called without the
keyword. So a multi-gate layer pays for one scan per call, not one per task gate.

Token-shaped input. :class:`BaseGate` accepts ``x`` of shape ``[batch, tokens, d]``: it flattens
the leading dimensions to rows, calls ``forward`` on ``[rows, d]`` and restores them on every
:class:`GateOutput` field (:func:`flatten_leading`, :func:`restore_leading`). ``task`` and ``key`` may
then be ``[batch]`` (broadcast over the tokens) or ``[batch, tokens]``.

Gates built from ``k`` selectors or trees (DSelect-k, COMET) also set ``num_selectors = k`` and fill
``selector_weights`` / ``selector_mix`` so that a permutation can act on each selector separately.

Optional attributes a gate may set (read through the helpers here, which supply the defaults):

``num_selectors`` (int, default 1)
    See above; read with :func:`num_selectors_of`.
``zeros_carry_gradient`` (bool, default False)
    True when an exact zero in ``weights`` can still carry gradient to the gate's parameters (e.g. a
    straight-through estimator such as ``GumbelSoftmax(hard=True)``). Sparse dispatch never runs an
    expert on a row whose weight is exactly zero, so it would drop that gradient: layers with
    ``dispatch='auto'`` use dense dispatch for such gates while gradients are recorded. Read with
    :func:`zeros_carry_gradient`; a gate may make it a property (e.g. depending on ``hard``). A gate
    that wraps other gates carries gradient through zeros when any gate inside it does.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .._validation import check_input, check_int, check_positive_float

__all__ = [
    "GateOutput",
    "Gate",
    "BaseGate",
    "WeightSchedule",
    "resolve_weight",
    "check_gate",
    "check_weight_schedule",
    "num_selectors_of",
    "zeros_carry_gradient",
    "call_gate",
    "check_gate_outputs",
    "simplex_tolerance",
    "flatten_leading",
    "restore_leading",
    "entropy",
]

# A regulariser weight: a constant, or a function of the number of training calls made so far.
WeightSchedule = float | Callable[[int], float]


@dataclass
class GateOutput:
    """What a gate returns.

    Attributes:
        weights: ``[batch, num_experts]``; every row on the probability simplex with exact zeros off
            the support.
        loss: 0-dim tensor holding the gate's regularisers / auxiliary losses, already weighted.
        selector_weights: ``[batch, k, num_experts]`` per-selector distributions (selector gates only).
        selector_mix: ``[batch, k]`` mixing weights of the selectors (selector gates only), such that
            ``weights = einsum('bk,bkn->bn', selector_mix, selector_weights)``.
    """

    weights: torch.Tensor
    loss: torch.Tensor
    selector_weights: torch.Tensor | None = None
    selector_mix: torch.Tensor | None = None

    @property
    def has_selectors(self) -> bool:
        """True when the gate returned per-selector distributions and their mixing weights."""
        return self.selector_weights is not None and self.selector_mix is not None


@runtime_checkable
class Gate(Protocol):
    """Structural type of a gate: ``num_experts`` and a call returning :class:`GateOutput`."""

    num_experts: int

    def __call__(
        self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None
    ) -> GateOutput: ...


def num_selectors_of(gate: nn.Module) -> int:
    """Number of selectors a gate exposes for per-selector permutations (1 for plain gates)."""
    return int(getattr(gate, "num_selectors", 1))


def zeros_carry_gradient(gate: nn.Module) -> bool:
    """True when ``gate`` (or a gate inside it) declares ``zeros_carry_gradient = True``.

    Such a gate's exact zeros still carry gradient, so sparse dispatch would drop part of its gradient.

    >>> from torch import nn
    >>> zeros_carry_gradient(nn.Linear(2, 2))
    False
    """
    return any(bool(getattr(m, "zeros_carry_gradient", False)) for m in gate.modules())


def check_gate(gate: Any, *, name: str = "gate") -> nn.Module:
    """Check that ``gate`` follows the protocol well enough to be used by layers and searches."""
    if not isinstance(gate, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module following the gate protocol, got {type(gate).__name__}")
    n = getattr(gate, "num_experts", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise TypeError(f"{name} must have an integer attribute num_experts >= 2, got {n!r}")
    k = num_selectors_of(gate)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name}.num_selectors must be an integer >= 1, got {k!r}")
    _check_forward_signature(gate, name)
    return gate


def _check_forward_signature(gate: nn.Module, name: str) -> None:
    try:
        params = inspect.signature(gate.forward).parameters.values()
    except (TypeError, ValueError):  # a signature Python cannot read (e.g. a C extension): trust it
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    keywords = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    missing = [k for k in ("task", "key") if k not in keywords]
    if missing:
        raise TypeError(
            f"{name} ({type(gate).__name__}).forward must accept the keyword argument(s) "
            f"{', '.join(m + '=' for m in missing)} of the gate protocol; add "
            "`task=None, key=None` to its signature (a gate that does not use them ignores them)"
        )


def simplex_tolerance(dtype: torch.dtype) -> float:
    """How far a row sum of gate weights in ``dtype`` may be from 1: ``max(1e-4, sqrt(eps))``.

    >>> simplex_tolerance(torch.float64)
    0.0001
    """
    return max(1e-4, math.sqrt(torch.finfo(dtype).eps))


def check_gate_outputs(
    outputs: Sequence[Any],
    gates: Sequence[nn.Module],
    rows: int,
    *,
    names: Sequence[str] | None = None,
    values: bool = True,
) -> list[GateOutput]:
    """Check what ``gates`` returned for a batch of ``rows`` rows; raise naming the gate that breaks the protocol.

    Always (no host synchronisation): a :class:`GateOutput` whose ``weights`` is a floating tensor
    ``[rows, num_experts]``, a 0-dim tensor ``loss`` and, when given, ``selector_weights``
    ``[rows, k, num_experts]`` and ``selector_mix`` ``[rows, k]``. With ``values`` (one
    synchronisation for all gates together): every weight finite and >= 0 and every row summing to 1
    within :func:`simplex_tolerance`.
    """
    names = [f"gates[{t}]" for t in range(len(gates))] if names is None else list(names)
    for out, gate, name in zip(outputs, gates, names):
        label = f"{name} ({type(gate).__name__})"
        if not isinstance(out, GateOutput):
            raise TypeError(
                f"{label} returned {type(out).__name__}; a gate must return "
                "routing_search.gates.GateOutput(weights=..., loss=...)"
            )
        w = out.weights
        n = gate.num_experts
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"{label} returned weights that are not a floating tensor: {type(w).__name__}")
        if tuple(w.shape) != (rows, n):
            raise ValueError(f"{label} returned weights of shape {tuple(w.shape)}; expected [batch, num_experts] = [{rows}, {n}]")
        if not isinstance(out.loss, torch.Tensor) or out.loss.dim() != 0:
            got = tuple(out.loss.shape) if isinstance(out.loss, torch.Tensor) else type(out.loss).__name__
            raise TypeError(f"{label} returned a loss that is not a 0-dim tensor: {got}")
        if out.selector_weights is not None or out.selector_mix is not None:
            sw, sm = out.selector_weights, out.selector_mix
            if sw is None or sm is None or sw.dim() != 3 or tuple(sw.shape[::2]) != (rows, n) or tuple(sm.shape) != tuple(sw.shape[:2]):
                raise ValueError(
                    f"{label} returned selector outputs of shapes "
                    f"{None if sw is None else tuple(sw.shape)} and {None if sm is None else tuple(sm.shape)}; "
                    f"expected selector_weights [{rows}, k, {n}] and selector_mix [{rows}, k]"
                )
    if not values or rows == 0:
        return list(outputs)
    with torch.no_grad():
        weights = [out.weights.detach() for out in outputs]
        if len(weights) > 1 and len({(w.dtype, w.device, w.shape) for w in weights}) == 1:
            d = torch.stack(weights)  # [gates, rows, n]: the same reductions once for every gate
            lowest_off = torch.stack([d.amin(dim=(1, 2)), (d.sum(dim=2) - 1).abs().amax(dim=1)], dim=1).float()
        else:
            lowest_off = torch.stack([torch.stack([d.amin(), (d.sum(dim=1) - 1).abs().amax()]).float() for d in weights])
    summary = lowest_off.tolist()  # one host synchronisation for every gate
    for (lowest, off), out, gate, name in zip(summary, outputs, gates, names):
        tol = simplex_tolerance(out.weights.dtype)
        if not (lowest >= 0 and off <= tol):  # also catches NaN
            problem = (
                "NaN/inf weights" if not (math.isfinite(lowest) and math.isfinite(off))
                else f"a negative weight ({lowest:.3g})" if lowest < 0
                else f"a row whose sum is {off:.3g} away from 1 (tolerance {tol:.1g})"
            )
            raise ValueError(
                f"{name} ({type(gate).__name__}) returned {problem}; gate weights must be rows on the "
                "probability simplex (non-negative, summing to 1)"
            )
    return list(outputs)


def call_gate(
    gate: nn.Module,
    x: torch.Tensor,
    task: torch.Tensor | int | None = None,
    key: torch.Tensor | None = None,
    *,
    checked: bool = False,
) -> Any:
    """Call ``gate`` on ``x``; ``checked=True`` says ``x`` was already scanned for NaN/inf.

    A :class:`BaseGate` then skips its own scan; any other gate is called as ``gate(x, task=, key=)``.
    """
    if checked and isinstance(gate, BaseGate):
        return gate(x, task=task, key=key, checked=True)
    return gate(x, task=task, key=key)


def _flatten_side(name: str, value: Any, lead: torch.Size) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    d = value.dim()
    if d > len(lead) or tuple(value.shape) != tuple(lead[:d]):
        raise ValueError(
            f"{name} must have shape [batch] (broadcast over the tokens) or {list(lead)} for an input of "
            f"leading shape {list(lead)}, got {list(value.shape)}"
        )
    return value.reshape(tuple(value.shape) + (1,) * (len(lead) - d)).expand(lead).reshape(-1)


def flatten_leading(
    x: torch.Tensor, task: Any = None, key: Any = None
) -> tuple[torch.Tensor, Any, Any, torch.Size]:
    """``x`` ``[*lead, d]`` as rows ``[prod(lead), d]``, with ``task``/``key`` broadcast to match.

    Returns ``(rows, task, key, lead)``. With a 2-D ``x`` everything is returned unchanged. Otherwise a
    tensor ``task``/``key`` of shape ``lead[:m]`` (e.g. ``[batch]``) is broadcast over the remaining
    dimensions and flattened; ints and 0-dim tensors pass through.

    >>> rows, task, key, lead = flatten_leading(torch.zeros(2, 3, 5), torch.tensor([0, 1]))
    >>> rows.shape, task.tolist(), key, tuple(lead)
    (torch.Size([6, 5]), [0, 0, 0, 1, 1, 1], None, (2, 3))
    """
    lead = x.shape[:-1]
    if x.dim() <= 2:
        return x, task, key, lead
    return x.reshape(-1, x.shape[-1]), _flatten_side("task", task, lead), _flatten_side("key", key, lead), lead


def restore_leading(output: GateOutput, lead: torch.Size | Sequence[int]) -> GateOutput:
    """A :class:`GateOutput` computed on flattened rows, with the leading shape ``lead`` restored on every field."""
    lead = tuple(lead)

    def shaped(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(lead + tuple(t.shape[1:]))

    weights = shaped(output.weights)
    assert weights is not None
    return replace(
        output,
        weights=weights,
        selector_weights=shaped(output.selector_weights),
        selector_mix=shaped(output.selector_mix),
    )


def entropy(p: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """Shannon entropy along ``dim`` with ``eps`` inside the log (as in the official DSelect-k code)."""
    return -(p * torch.log(p + eps)).sum(dim=dim)


def resolve_weight(weight: WeightSchedule, calls: int) -> float:
    """Value of a constant or scheduled regulariser weight after ``calls`` training calls.

    A schedule must return a finite number >= 0, as a constant weight must be (a NaN made the gate's
    loss NaN, and a negative weight was used by some gates and silently ignored by others).

    >>> resolve_weight(lambda calls: 0.1 * calls, 3)
    0.30000000000000004
    """
    value = weight(calls) if callable(weight) else weight
    return check_positive_float(f"the regulariser weight schedule's value at call {calls}", value, allow_zero=True)


class BaseGate(nn.Module):
    """Convenience base for built-in gates: input checking, token-shaped input and a training-call counter.

    Subclasses implement ``forward(x, task=None, key=None) -> GateOutput`` on rows ``[rows, d]`` and
    start it with ``x = self._check_x(x)``. Calling the gate, ``gate(x, task=None, key=None, *,
    checked=False)``, checks ``x`` (shape, width and, with ``validate``, NaN/inf unless ``checked=True``
    says the caller already did), flattens leading dimensions (``[batch, tokens, d]`` -> rows, ``task``
    and ``key`` broadcast, see :func:`flatten_leading`), runs ``forward`` (hooks included) and restores
    the leading shape on every :class:`GateOutput` field. Inside that call ``_check_x`` only checks the
    shape; called directly (``gate.forward(x)``, or from another method) it scans too.

    The counter ``calls`` (a buffer, so it is saved in checkpoints) drives regulariser schedules; it
    advances once per call in training mode.
    """

    num_experts: int
    num_selectors: int = 1
    calls: torch.Tensor
    #: See the module docstring; subclasses with straight-through zeros set it (or a property) to True.
    zeros_carry_gradient: bool = False

    def __init__(self, num_experts: int, input_dim: int | None, *, validate: bool = True) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, minimum=2)
        self.input_dim = None if input_dim is None else check_int("input_dim", input_dim, minimum=1)
        self.validate = bool(validate)
        self._input_checked = False
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def __call__(  # type: ignore[override]
        self,
        x: torch.Tensor,
        task: torch.Tensor | int | None = None,
        key: torch.Tensor | None = None,
        *,
        checked: bool = False,
    ) -> GateOutput:
        """Check ``x`` once, flatten leading dimensions, run ``forward`` and restore them (class docstring)."""
        x = check_input(x, self.input_dim, validate=self.validate and not checked, tokens=True)
        rows, task, key, lead = flatten_leading(x, task, key)
        # A plain per-call flag, written to the instance dict: nn.Module.__setattr__ costs microseconds per call.
        state = self.__dict__
        previous = state.get("_input_checked", False)
        state["_input_checked"] = True
        try:
            out = super().__call__(rows, task=task, key=key)
        finally:
            state["_input_checked"] = previous
        return out if len(lead) == 1 or not isinstance(out, GateOutput) else restore_leading(out, lead)

    @property
    def is_static(self) -> bool:
        """True when the gate ignores the input (same weights for every example)."""
        return self.input_dim is None

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        # A static gate only needs the batch size, so any width is accepted. Inside __call__ the input
        # was scanned already (or the caller said it was): only the shape is checked again.
        scan = self.validate and not getattr(self, "_input_checked", False)
        return check_input(x, self.input_dim, validate=scan)

    def _tick(self) -> int:
        """Return the number of training calls so far and advance the counter when training."""
        calls = int(self.calls)
        self._count_call()
        return calls

    def _count_call(self) -> None:
        """Advance the training-call counter (training mode only), for gates that do not read it."""
        if self.training:
            self.calls.add_(1)  # in place, without a trip through nn.Module.__setattr__ on every call

    def _zero_loss(self, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=like.dtype, device=like.device)


def check_weight_schedule(name: str, weight: WeightSchedule) -> WeightSchedule:
    """Accept a non-negative constant or a callable schedule."""
    if callable(weight):
        return weight
    return check_positive_float(name, weight, allow_zero=True)
