"""Code moves for static binary-encoded gates: move one selector (DSelect-k) or tree (COMET) to
another expert by rewriting its codes Z (bit flips) or node decisions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..batches import eval_mode
from ..gates.comet import COMET
from ..gates.dselect_k import DSelectK
from ..gates.protocol import GateOutput

__all__ = ["CodeSite", "code_sites", "set_selector_slot", "selector_slot", "gate_selector_slot", "moved_gate_output"]


@dataclass(frozen=True)
class CodeSite:
    """Selector ``selector`` of task ``task``'s gate, a static gate whose codes are binary."""

    task: int
    selector: int


def _is_static_binary(gate: nn.Module) -> bool:
    return isinstance(gate, (DSelectK, COMET)) and gate.is_static and gate.is_binary()


def code_sites(gates: list[nn.Module]) -> list[CodeSite]:
    """Every selector of every static binary DSelectK / COMET gate among ``gates`` (one per task)."""
    return [
        CodeSite(t, j)
        for t, g in enumerate(gates)
        if isinstance(g, (DSelectK, COMET)) and _is_static_binary(g)
        for j in range(g.num_selectors)
    ]


def selector_slot(gate_output: GateOutput, selector: int) -> int:
    """The gate slot a binary selector points at (row 0 of a static gate's output)."""
    assert gate_output.selector_weights is not None, "a binary DSelectK / COMET gate returns selector weights"
    return int(torch.argmax(gate_output.selector_weights[0, selector]))


@torch.no_grad()
def gate_selector_slot(gate: nn.Module, selector: int) -> int:
    """The gate slot a static binary gate's selector points at, read from the gate itself (no data needed).

    The gate runs once on a dummy row in eval mode (a training call would advance its schedules).
    """
    param = next(gate.parameters())
    with eval_mode(gate):
        return selector_slot(gate(torch.zeros(1, 1, dtype=param.dtype, device=param.device)), selector)


def moved_gate_output(gate_output: GateOutput, selector: int, slot: int, gate: nn.Module | None = None) -> GateOutput:
    """The gate output with one binary selector moved to ``slot``.

    DSelect-k's mixing weights do not depend on the codes, so they are kept. A binary COMET tree's
    mixing score is the logit of the leaf it reaches, so pass the static COMET ``gate`` to get the
    exact mix after the move (without it the mix is kept, which is only right for DSelect-k).
    """
    assert gate_output.selector_weights is not None, "a binary DSelectK / COMET gate returns selector weights"
    sel = gate_output.selector_weights.clone()
    sel[:, selector] = 0
    sel[:, selector, slot] = 1
    mix = gate_output.selector_mix
    if isinstance(gate, COMET):
        leaves = gate.leaf_logits.detach().to(sel.dtype).unsqueeze(0).expand(sel.shape[0], -1, -1)
        scores = torch.gather(leaves, 2, sel.argmax(dim=-1, keepdim=True)).squeeze(-1)  # [B, k]
        mix = torch.softmax(scores, dim=-1)
    weights = torch.einsum("bk,bkn->bn", mix, sel)
    return GateOutput(weights=weights, loss=gate_output.loss, selector_weights=sel, selector_mix=mix)


@torch.no_grad()
def set_selector_slot(gate: nn.Module, selector: int, slot: int) -> None:
    """Rewrite a static gate's parameters so that selector/tree ``selector`` picks gate slot ``slot``.

    The new codes are saturated at ±γ, i.e. exactly binary after the smooth-step.
    """
    if not (isinstance(gate, (DSelectK, COMET)) and gate.is_static):
        raise TypeError("code moves need a static DSelectK or COMET gate (input_dim=None)")
    if not 0 <= slot < gate.num_experts:
        raise ValueError(f"slot must be in [0, {gate.num_experts - 1}], got {slot}")
    gamma = float(gate.gamma)
    if isinstance(gate, DSelectK):
        bits = torch.tensor([(slot >> j) & 1 for j in range(gate.z_logits.shape[1])], dtype=gate.z_logits.dtype)
        gate.z_logits[selector] = torch.where(bits > 0, gamma, -gamma).to(gate.z_logits.device)
        return
    for node, went_left in _root_path(gate.leaf_order[slot]):
        gate.node_logits[selector, node] = gamma if went_left else -gamma


def _root_path(leaf: int) -> list[tuple[int, bool]]:
    """``(node, went_left)`` from the root down to heap node ``leaf`` (children of q: 2q+1 left, 2q+2 right)."""
    path = []
    while leaf > 0:
        parent = (leaf - 1) // 2
        path.append((parent, leaf == 2 * parent + 1))
        leaf = parent
    return path[::-1]
