"""Hardening binary-encoded gates: from the smooth relaxation to the exact form of Prop. 1.

DSelect-k (paper §3.1.3) trains ``q(alpha, S(Z))``; once ``S(Z)`` is binary this *is* the
combinatorial gate ``q(alpha, Z)`` of Prop. 1 and selects at most ``k`` experts. COMET's trees behave
the same way once every node output is 0 or 1. This module

* measures how far a trained gate is from that binary form on some data (:func:`certify`,
  :class:`HardenCertificate`);
* wraps a gate so it always runs its rounded (hard) form (:class:`HardGate`);
* hardens a gate, an :class:`~routing_search.layers.MoE`, a
  :class:`~routing_search.layers.MultiGateMoE` or any model containing them in one call
  (:func:`harden`): static gates get their code parameters saturated to ``±gamma`` (the soft gate
  then *equals* the hard one exactly), per-example gates are replaced by :class:`HardGate`.

"Rounded" always means ``S > 0.5 -> 1`` (ties go to 0), the convention of ``DSelectK.hard`` and
``COMET.hard``; DSelect-k codes that name no expert (``n`` not a power of two) are folded as
``DSelectK.selected_experts`` folds them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batches import call_model, eval_mode
from ..gates.comet import COMET, leaf_paths
from ..gates.dselect_k import DSelectK
from .._validation import check_positive_float
from ..gates.protocol import GateOutput, flatten_leading, restore_leading
from ..gates.task_aware import TaskAware
from ..layers.moe import MoE
from ..layers.multigate import MultiGateMoE

__all__ = ["HardenCertificate", "HardGate", "certify", "harden", "snap_codes_"]

_CERTIFY_ACCEPTS = "a DSelectK or COMET gate (static or per-example) or a HardGate"
_HARDEN_ACCEPTS = (
    "a DSelectK or COMET gate (static or per-example), a HardGate, a TaskAware wrapper, "
    "an MoE, a MultiGateMoE, or a model containing any of them"
)


def _is_dselect(obj: object) -> bool:
    return isinstance(obj, DSelectK)


def _is_selector_gate(obj: object) -> bool:
    return isinstance(obj, (DSelectK, COMET))


# --------------------------------------------------------------------------- certificate
@dataclass(frozen=True)
class HardenCertificate:
    """How far a DSelectK/COMET gate is from its binary (Prop. 1) form on some data.

    The *codes* are ``S(Z)`` for DSelect-k and the node outputs for COMET. For a static gate they
    are counted once (``k*m`` resp. ``k*(n-1)`` entries); for a per-example gate once per example.
    An entry is *fractional* when ``min(s, 1 - s) > atol``.

    Attributes:
        max_fractional_distance: max over code entries of ``min(s, 1 - s)`` (0 when binary).
        num_fractional_entries: number of fractional code entries.
        fraction_fractional: ``num_fractional_entries / num_entries`` (0 when there are no entries).
        examples_over_k: examples whose *soft* weights have more than ``k`` non-zeros.
        max_support_size: the largest number of non-zeros in a soft weight row.
        hard_soft_max_abs_diff: ``max |q_hard - q_soft|`` over the data.
        agree: ``hard_soft_max_abs_diff <= atol``, i.e. the soft gate is its exact binary form on
            the data (Prop. 1 applies).
        num_examples: rows the weights were evaluated on (1 for a static gate certified without data).
        num_entries: code entries inspected.
        name: where the gate sits in the hardened module (``"gate"``, ``"gates.1"``, ...; ``""`` for a
            bare gate or an aggregate).
        num_gates: gates covered (1 for one gate; aggregates sum their parts).
        parts: per-gate certificates of an aggregate (from :func:`harden` on a container), else ``()``.
        after: set by :func:`harden` on the certificate it returns: the same measurements on the
            hardened result (``None`` otherwise).

    Aggregates take the max of the max-type fields, sum the counts (``num_examples`` counts
    gate-example evaluations), and ``agree`` is the conjunction.
    """

    max_fractional_distance: float
    num_fractional_entries: int
    fraction_fractional: float
    examples_over_k: int
    max_support_size: int
    hard_soft_max_abs_diff: float
    agree: bool
    num_examples: int
    num_entries: int = 0
    name: str = ""
    num_gates: int = 1
    parts: tuple[HardenCertificate, ...] = ()
    after: HardenCertificate | None = None

    @property
    def is_binary(self) -> bool:
        """True when no code entry is fractional."""
        return self.num_fractional_entries == 0

    @classmethod
    def aggregate(cls, parts: list[HardenCertificate] | tuple[HardenCertificate, ...]) -> HardenCertificate:
        """Combine per-gate certificates (empty input: a vacuous certificate with ``num_gates=0``)."""
        parts = tuple(parts)
        entries = sum(p.num_entries for p in parts)
        fractional = sum(p.num_fractional_entries for p in parts)
        return cls(
            max_fractional_distance=max((p.max_fractional_distance for p in parts), default=0.0),
            num_fractional_entries=fractional,
            fraction_fractional=fractional / entries if entries else 0.0,
            examples_over_k=sum(p.examples_over_k for p in parts),
            max_support_size=max((p.max_support_size for p in parts), default=0),
            hard_soft_max_abs_diff=max((p.hard_soft_max_abs_diff for p in parts), default=0.0),
            agree=all(p.agree for p in parts),
            num_examples=sum(p.num_examples for p in parts),
            num_entries=entries,
            num_gates=sum(p.num_gates for p in parts),
            parts=parts,
        )

    def _line(self) -> str:
        where = f"{self.name}: " if self.name else ""
        verdict = "binary, soft == hard (Prop. 1 applies)" if self.agree and self.is_binary else (
            "soft == hard" if self.agree else "soft != hard"
        )
        return (
            f"{where}{verdict}; fractional entries {self.num_fractional_entries}/{self.num_entries} "
            f"({100 * self.fraction_fractional:.1f}%), max min(s, 1-s) = {self.max_fractional_distance:.3g}; "
            f"examples over k: {self.examples_over_k}/{self.num_examples}, max support {self.max_support_size}; "
            f"max |hard - soft| = {self.hard_soft_max_abs_diff:.3g}"
        )

    def summary(self) -> str:
        """A few human-readable lines (per gate for aggregates, then the hardened result if known)."""
        if self.num_gates == 0:
            lines = ["no DSelectK/COMET gate found: nothing to harden"]
        else:
            lines = [self._line()]
            if self.parts:
                lines[0] = f"{self.num_gates} gate(s): " + lines[0]
                lines += ["  " + p._line() for p in self.parts]
        if self.after is not None:
            lines.append("after hardening: " + self.after.summary().replace("\n", "\n  "))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _dummy_input(gate: nn.Module) -> torch.Tensor:
    param = next(gate.parameters(), None)
    if param is None:
        return torch.zeros(1, 1)
    return torch.zeros(1, 1, dtype=param.dtype, device=param.device)


def _codes(gate: Any, x: torch.Tensor | None) -> torch.Tensor:
    """``S(Z)`` (DSelect-k) or the node outputs on the paths each COMET tree takes; ``x=None`` only for
    static gates.

    A COMET node behind a branch of probability 0 never changes the output (and never trains), so it is
    reported as binary (1): the gate is binary exactly when every tree picks one leaf.
    """
    if _is_dselect(gate):
        return gate.smooth_codes(x)
    s = gate.node_outputs(x)
    n = gate.num_experts
    on_path = torch.zeros(n - 1, n, dtype=s.dtype, device=s.device)  # node q on expert i's root path
    for expert, (_, path) in enumerate(leaf_paths(n)):
        for node, _ in path:
            on_path[node, expert] = 1.0
    reached = gate.reach_probabilities(x) @ on_path.t() > 0  # [..., k, n-1]
    return torch.where(reached, s, torch.ones_like(s))


def certify(gate: nn.Module, x: torch.Tensor | None = None, *, atol: float = 0.0, name: str = "") -> HardenCertificate:
    """Certificate of how far ``gate`` is from its binary form on ``x``.

    Args:
        gate: a :class:`~routing_search.gates.DSelectK`, :class:`~routing_search.gates.COMET` or
            :class:`HardGate` (whose codes are binary by construction).
        x: the data ``[B, input_dim]``, or token-shaped ``[B, tokens, input_dim]`` (each token is a row,
            as the gate routes it). Optional for static gates (a one-row dummy is used), required for
            per-example gates.
        atol: tolerance for both "entry is binary" (``min(s, 1 - s) <= atol``) and
            "hard equals soft" (``max |q_hard - q_soft| <= atol``). The default 0 asks for exactness.
        name: label stored in the certificate.

    The gate is evaluated without gradients and without advancing its training-call counter.

    Example:
        A freshly initialised static DSelect-k gate has fractional codes (its soft output is not its
        hard one); after :func:`snap_codes_` every code is binary and soft equals hard exactly:

        >>> from routing_search.gates import DSelectK
        >>> _ = torch.manual_seed(0)
        >>> gate = DSelectK(num_experts=5, k=2)
        >>> before = certify(gate)
        >>> before.is_binary, before.agree, before.num_entries       # k · ceil(log2 n) code entries
        (False, False, 6)
        >>> after = certify(snap_codes_(gate))
        >>> after.is_binary, after.agree, after.max_support_size <= 2
        (True, True, True)
    """
    atol = check_positive_float("atol", atol, allow_zero=True)
    if isinstance(x, torch.Tensor) and x.dim() > 2:
        x = x.reshape(-1, x.shape[-1])  # token-shaped input: every token is routed on its own
    hard_wrapper = isinstance(gate, HardGate)
    inner: Any = gate.gate if isinstance(gate, HardGate) else gate
    if not _is_selector_gate(inner):
        raise TypeError(f"certify() accepts {_CERTIFY_ACCEPTS}; got {type(gate).__name__}")
    static = inner.is_static
    if x is None and not static:
        raise ValueError(
            f"x is required to certify a per-example {type(inner).__name__} gate (input_dim={inner.input_dim}): "
            "its codes depend on the input, so the certificate is computed on data"
        )
    k = inner.num_selectors
    with torch.no_grad(), eval_mode(inner):
        data = _dummy_input(inner) if x is None else x
        hard = inner.hard(data).weights
        if hard_wrapper:
            soft = hard
            s = _hard_codes(inner, None if static else data)
        else:
            soft = inner(data).weights
            s = _codes(inner, None if static else data)
    dist = torch.minimum(s, 1 - s)
    fractional = dist > atol
    support = (soft != 0).sum(dim=-1)
    diff = float((hard - soft).abs().max()) if hard.numel() else 0.0
    num_entries = int(s.numel())
    num_fractional = int(fractional.sum())
    return HardenCertificate(
        max_fractional_distance=float(dist.max()) if dist.numel() else 0.0,
        num_fractional_entries=num_fractional,
        fraction_fractional=num_fractional / num_entries if num_entries else 0.0,
        examples_over_k=int((support > k).sum()),
        max_support_size=int(support.max()) if support.numel() else 0,
        hard_soft_max_abs_diff=diff,
        agree=diff <= atol,
        num_examples=int(soft.shape[0]),
        num_entries=num_entries,
        name=name,
    )


def _hard_codes(gate: Any, x: torch.Tensor | None) -> torch.Tensor:
    """The rounded codes the hard gate uses (folded for DSelect-k), as 0/1 floats."""
    if _is_dselect(gate):
        # The binary code of the expert each selector picks after rounding and folding (public API).
        experts = gate.selected_experts(x)
        powers = 2 ** torch.arange(gate.num_bits, device=experts.device)
        dtype = gate.smooth_codes(x).dtype
        return ((experts.unsqueeze(-1) // powers) % 2).to(dtype)
    s = gate.node_outputs(x)
    return (s > 0.5).to(s.dtype)


# --------------------------------------------------------------------------- hard gate
class HardGate(nn.Module):
    """A DSelectK/COMET gate that always runs its hard form ``gate.hard(x)``.

    Output rows have at most ``k`` non-zeros (exact zeros), the selectors are one-hot and the loss
    is 0, so MoE layers can use sparse dispatch. For DSelect-k this is
    ``q(alpha(x), round(S(Z(x))))``, the combinatorial gate of Prop. 1. Gradients still reach the
    selector weights (``alpha``; COMET's leaf logits); the rounded codes carry none.

    Args:
        gate: the DSelectK or COMET gate to wrap (static or per-example).
        copy: wrap a deep copy instead of sharing the gate (and its parameters).
    """

    gate: Any  # the wrapped DSelectK or COMET gate

    def __init__(self, gate: nn.Module, *, copy: bool = False) -> None:
        super().__init__()
        if not _is_selector_gate(gate):
            raise TypeError(f"HardGate wraps a DSelectK or COMET gate; got {type(gate).__name__}")
        self.gate = _deepcopy(gate) if copy else gate
        self.num_experts: int = int(self.gate.num_experts)
        self.num_selectors: int = int(self.gate.num_selectors)
        self.input_dim: int | None = self.gate.input_dim

    @property
    def is_static(self) -> bool:
        """True when the wrapped gate ignores the input."""
        return self.input_dim is None

    def forward(
        self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None
    ) -> GateOutput:
        """The wrapped gate's hard output on ``x`` (``task`` and ``key`` are ignored).

        Token-shaped ``x`` (``[batch, tokens, d]``) is routed token by token, as every gate routes it.
        """
        rows, _, _, lead = flatten_leading(x)
        out = self.gate.hard(rows)
        return out if len(lead) == 1 else restore_leading(out, lead)

    def hard(self, x: torch.Tensor) -> GateOutput:
        """Same as :meth:`forward` (already hard)."""
        return self.gate.hard(x)

    def codes(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """The 0/1 codes in use: folded ``round(S(Z))`` for DSelect-k, rounded node outputs for COMET."""
        return _hard_codes(self.gate, x)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.num_selectors}, input_dim={self.input_dim}"


def _deepcopy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


# --------------------------------------------------------------------------- snapping
def snap_codes_(gate: DSelectK | COMET) -> DSelectK | COMET:
    """Saturate a *static* gate's code logits to ``±gamma`` in place, so its soft output is exact.

    DSelect-k: ``z_logits <- +gamma`` where the rounded, folded code bit is 1, else ``-gamma``
    (unreachable rounded codes are folded first, as :meth:`DSelectK.hard` does, so every selector
    names a real expert and no mass is lost). COMET: ``node_logits <- +gamma`` where
    ``S(node) > 0.5``, else ``-gamma``. The hard output is unchanged; afterwards the soft gate equals
    it exactly and the codes get zero gradient (frozen). Returns ``gate``.
    """
    if not _is_selector_gate(gate):
        raise TypeError(f"snap_codes_() accepts a static DSelectK or COMET gate; got {type(gate).__name__}")
    if not gate.is_static:
        raise ValueError(
            f"snap_codes_() needs a static gate; this {type(gate).__name__} is per-example "
            f"(input_dim={gate.input_dim}): wrap it in HardGate instead"
        )
    with torch.no_grad():
        param = gate.z_logits if isinstance(gate, DSelectK) else gate.node_logits
        assert isinstance(param, torch.Tensor)
        bits = _hard_codes(gate, None)
        gamma = torch.full_like(param, gate.gamma)
        param.copy_(torch.where(bits > 0.5, gamma, -gamma))
    return gate


# --------------------------------------------------------------------------- finding gates
@dataclass
class _Site:
    """A hardenable gate found in a module, the input it sees, and how to replace it."""

    gate: nn.Module
    x: torch.Tensor | None
    name: str
    replace: Callable[[nn.Module], None]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _task_rows(x: torch.Tensor | None, task: torch.Tensor | int | None, t: int) -> torch.Tensor | None:
    """Rows of ``x`` routed by task ``t`` (all rows when ``task`` is None)."""
    if x is None or task is None:
        return x
    if isinstance(task, torch.Tensor) and task.dim() > 0:
        return x[task.to(x.device) == t]  # a [batch] or [batch, tokens] task: the rows / tokens of task t
    return x if int(task) == t else x[:0]


def _embedded_input(wrapper: TaskAware, x: torch.Tensor | None, task: torch.Tensor | int | None) -> torch.Tensor | None:
    """What a task-embedding TaskAware feeds its inner gate; every task for every row if task is None."""
    if x is None:
        return None
    if x.dim() > 2:  # token-shaped: every token is a row, with its row's task
        x, task, _, _ = flatten_leading(x, task)
    emb = wrapper.task_embedding
    assert emb is not None, "a task-embedding TaskAware has a task embedding"
    batch = x.shape[0]
    if task is None:
        tasks = torch.arange(wrapper.num_tasks).repeat_interleave(batch)
        x = x.repeat(wrapper.num_tasks, 1)
    elif isinstance(task, torch.Tensor) and task.dim() > 0:
        tasks = task
    else:
        tasks = torch.full((batch,), int(task), dtype=torch.long)
    with torch.no_grad():
        e = emb(tasks.to(device=emb.weight.device, dtype=torch.long)).to(device=x.device, dtype=x.dtype)
    return torch.cat([x, e], dim=1)


def _attr_setter(owner: nn.Module, attr: str) -> Callable[[nn.Module], None]:
    """Replace ``owner.<attr>`` (registers the new module under the same name)."""

    def replace(new: nn.Module) -> None:
        setattr(owner, attr, new)

    return replace


def _item_setter(items: Any, index: int) -> Callable[[nn.Module], None]:
    """Replace ``items[index]`` of a ``ModuleList``."""

    def replace(new: nn.Module) -> None:
        items[index] = new

    return replace


def _find(
    module: nn.Module,
    x: torch.Tensor | None,
    task: torch.Tensor | int | None,
    name: str,
    replace: Callable[[nn.Module], None],
) -> list[_Site] | None:
    """Hardenable gates inside ``module``; ``None`` when ``module`` is of no supported kind."""

    if isinstance(module, HardGate) or _is_selector_gate(module):
        return [_Site(module, x, name, replace)]
    sites: list[_Site] = []
    if isinstance(module, TaskAware):
        if module.mode == "per_task":
            assert module.gates is not None, "a per-task TaskAware holds one gate per task"
            for t, g in enumerate(module.gates):
                sites += _find(g, _task_rows(x, task, t), None, _join(name, f"gates.{t}"), _item_setter(module.gates, t)) or []
            return sites
        assert module.gate is not None, "a task-embedding TaskAware holds one gate"
        inner_x = _embedded_input(module, x, task)
        return _find(module.gate, inner_x, None, _join(name, "gate"), _attr_setter(module, "gate")) or []
    if isinstance(module, MoE):
        return _find(module.gate, x, task, _join(name, "gate"), _attr_setter(module, "gate")) or []
    if isinstance(module, MultiGateMoE):
        for t, g in enumerate(module.gates):
            sites += _find(g, x, task, _join(name, f"gates.{t}"), _item_setter(module.gates, t)) or []
        return sites
    return None  # another gate (Softmax, TopK, a user's gate ...): left unchanged


def _is_site_root(module: nn.Module) -> bool:
    """A module :func:`_find` handles directly (a selector gate, HardGate, TaskAware, MoE, MultiGateMoE)."""
    return isinstance(module, (HardGate, TaskAware, MoE, MultiGateMoE)) or _is_selector_gate(module)


def _concat_tasks(tasks: list[Any], rows: list[int], where: str) -> torch.Tensor | None:
    """The ``task`` arguments of several calls as one ``[rows]`` tensor (None when no call passed one)."""
    if all(t is None for t in tasks):
        return None
    if any(t is None for t in tasks):
        raise ValueError(
            f"the model calls {where!r} several times, with and without task=; harden it directly "
            "(pass the layer and its input) so that each gate is certified on the rows it routes"
        )
    parts = []
    for t, r in zip(tasks, rows):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            parts.append(t.reshape(-1).to(torch.long).cpu())
        else:
            parts.append(torch.full((r,), int(t), dtype=torch.long))
    return torch.cat(parts)


def _captured_inputs(
    model: nn.Module, roots: list[tuple[str, nn.Module]], inputs: Any
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | int | None]]:
    """Run ``model`` once on ``inputs`` and record what each root module is called with (``x``, ``task``).

    Rows of repeated calls are concatenated, so every gate is certified on all the rows it routes.
    Runs without gradients, every submodule in eval mode (restored afterwards).
    """
    calls: dict[str, list[tuple[Any, Any]]] = {name: [] for name, _ in roots}
    handles = []
    for name, sub in roots:

        def grab(module: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            x = args[0] if args else kwargs.get("x")
            task = args[1] if len(args) > 1 else kwargs.get("task")
            calls[name].append((x, task))

        handles.append(sub.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, tuple[torch.Tensor | None, torch.Tensor | int | None]] = {}
    for name, seen in calls.items():
        xs = [x for x, _ in seen if isinstance(x, torch.Tensor)]
        if not xs:
            continue
        if len(xs) == 1:
            out[name] = (xs[0], seen[0][1])
        else:
            out[name] = (torch.cat(xs), _concat_tasks([t for _, t in seen], [x.shape[0] for x in xs], name))
    return out


def _find_in_model(model: nn.Module, inputs: Any, task: torch.Tensor | int | None) -> list[_Site] | None:
    """Hardenable gates anywhere inside a user's model; ``None`` when it contains no routing module.

    The outermost MoE / MultiGateMoE / TaskAware / selector-gate submodules are found by name; their
    inputs are recorded by running the model once on ``inputs`` (when given). A module the forward
    does not call gets no data (fine for static gates; a per-example gate then asks for ``x``).
    """
    roots: list[tuple[str, nn.Module]] = []
    for name, sub in model.named_modules():
        if name and _is_site_root(sub) and not any(name.startswith(r + ".") for r, _ in roots):
            roots.append((name, sub))
    if not roots:
        return None
    seen = _captured_inputs(model, roots, inputs) if inputs is not None else {}
    sites: list[_Site] = []
    for name, sub in roots:
        parent_name, _, child = name.rpartition(".")
        x_sub, task_sub = seen.get(name, (None, None))
        setter = _attr_setter(model.get_submodule(parent_name), child)
        sites += _find(sub, x_sub, task_sub if task is None else task, name, setter) or []
    return sites


def _sites(module: nn.Module, x: Any, task: torch.Tensor | int | None, replace: Callable[[nn.Module], None]) -> list[_Site] | None:
    if _is_site_root(module):
        return _find(module, x, task, "", replace)
    return _find_in_model(module, x, task)


def _harden_gate(gate: Any, *, snap: bool) -> nn.Module:
    if isinstance(gate, HardGate):
        return gate
    if snap and gate.is_static:
        return snap_codes_(gate)
    return HardGate(gate)


def _certify_sites(sites: list[_Site], atol: float) -> list[HardenCertificate]:
    return [certify(s.gate, s.x, atol=atol, name=s.name) for s in sites]


def harden(
    obj: nn.Module,
    x: torch.Tensor | Mapping[str, Any] | None = None,
    *,
    snap: bool = True,
    atol: float = 0.0,
    inplace: bool = False,
    task: torch.Tensor | int | None = None,
) -> tuple[nn.Module, HardenCertificate]:
    """Turn every DSelectK/COMET gate in ``obj`` into its exact binary form (Prop. 1).

    Args:
        obj: a DSelectK/COMET gate, a :class:`HardGate`, a TaskAware wrapper, an MoE, a
            MultiGateMoE, or any model containing them (as ``local_search`` accepts). Inside
            containers every DSelectK/COMET gate is hardened, including those inside TaskAware
            wrappers; other gates are left unchanged.
        x: data the certificates are computed on: the input of ``obj`` (a tensor, or a dict of
            keyword arguments for a model that takes them). For a model containing routing layers
            the model is run once on ``x`` (no gradients, eval mode) and each layer's gates are
            certified on the input that layer receives (all its calls, concatenated). TaskAware
            inner gates see what the wrapper would feed them. Required when a per-example gate is
            hardened.
        snap: static gates get their code logits saturated to ``±gamma`` in place
            (:func:`snap_codes_`), so the module keeps its type and its soft output equals the hard
            one exactly. With ``snap=False``, and always for per-example gates, the gate is replaced
            by :class:`HardGate` (sharing its parameters).
        atol: tolerance of the certificates (see :func:`certify`).
        inplace: modify ``obj`` itself (a bare gate that must be wrapped is still returned as a new
            :class:`HardGate` around ``obj``); by default a deep copy is hardened and ``obj`` is left
            untouched.
        task: the task of each row of ``x`` for TaskAware wrappers (an int or a ``[B]`` tensor). By
            default every per-task gate is certified on all rows and a task-embedding gate on every
            row paired with every task.

    Returns:
        ``(hardened, certificate)``. ``certificate`` describes ``obj`` *before* hardening (how far
        the trained gate was from binary on the data); ``certificate.after`` holds the same
        measurements on ``hardened``. For a bare gate both are single-gate certificates; for a
        container they are aggregates whose ``parts`` list one certificate per gate found, named by
        its path in the model (``"gate"``, ``"gates.1"``, ``"block.moe.gate"``, ...).

    Example:
        A static DSelect-k gate whose codes are already decided: hardening snaps them to ``±gamma``,
        after which the soft gate equals its hard (binary, at most k experts) form exactly:

        >>> from routing_search.gates import DSelectK
        >>> from routing_search.layers import MoE, make_experts
        >>> _ = torch.manual_seed(0)
        >>> moe = MoE(make_experts(4, 3, [8], 1), DSelectK(num_experts=4, k=2))
        >>> model = nn.Sequential(nn.Linear(3, 3), moe)          # a model containing an MoE
        >>> hard, cert = harden(model, torch.randn(16, 3))
        >>> cert.num_gates, [p.name for p in cert.parts], cert.after.agree, cert.after.is_binary
        (1, ['1.gate'], True, True)
        >>> isinstance(hard[1].gate, DSelectK), hard is not model   # snapped in a copy, same type
        (True, True)
    """
    if not isinstance(obj, nn.Module):
        raise TypeError(f"harden() accepts {_HARDEN_ACCEPTS}; got {type(obj).__name__}")
    atol = check_positive_float("atol", atol, allow_zero=True)
    single = isinstance(obj, HardGate) or _is_selector_gate(obj)
    module = obj if inplace else _deepcopy(obj)
    root: list[nn.Module] = [module]

    def set_root(new: nn.Module) -> None:
        root[0] = new

    sites = _sites(module, x, task, set_root)
    if sites is None:
        raise TypeError(f"harden() accepts {_HARDEN_ACCEPTS}; got {type(obj).__name__}")
    for s in sites:  # check every input before changing anything (matters for inplace=True)
        inner = s.gate.gate if isinstance(s.gate, HardGate) else s.gate
        if s.x is None and not inner.is_static:
            where = f" at {s.name!r}" if s.name else ""
            raise ValueError(
                f"x is required to harden the per-example {type(inner).__name__} gate{where} "
                f"(input_dim={inner.input_dim}): the certificate is computed on data"
            )
    before = _certify_sites(sites, atol)
    for s in sites:
        new = _harden_gate(s.gate, snap=snap)
        if new is not s.gate:
            s.replace(new)
    hardened = root[0]
    after_sites = _sites(hardened, x, task, lambda new: None) or []
    after = _certify_sites(after_sites, atol)
    if single:
        cert_before, cert_after = before[0], after[0]
    else:
        cert_before, cert_after = HardenCertificate.aggregate(before), HardenCertificate.aggregate(after)
    return hardened, dataclasses.replace(cert_before, after=cert_after)
