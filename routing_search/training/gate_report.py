"""Are the model's DSelect-k / COMET gates binary yet?  Per-gate reports and end-of-training hardening.

A selector gate (:class:`~routing_search.gates.DSelectK`, :class:`~routing_search.gates.COMET`) selects at
most ``k`` experts only once ``S(Z)`` / its tree paths are binary (Prop. 1 of DSelect-k). :func:`gate_report`
measures that with :func:`routing_search.analysis.certify` on the data each gate sees, and
:func:`harden_model` turns every such gate into its exact binary form with
:func:`routing_search.analysis.harden`.

Gates covered by the per-epoch report: a routing layer's own gates (``MoE.gate``,
``MultiGateMoE.gates[t]``), and static selector gates anywhere inside them (e.g. in a per-task
:class:`~routing_search.gates.TaskAware`). A per-example selector gate nested in a wrapper sees a
transformed input and is certified only by :func:`harden_model`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from ..analysis import HardenCertificate, HardGate, certify, harden
from ..batches import eval_mode
from ..gates.comet import COMET
from ..gates.dselect_k import DSelectK
from ..layers.multigate import MultiGateMoE
from .evaluation import routing_layers

__all__ = ["gate_report", "harden_model", "non_binary_gates", "warn_non_binary"]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _direct_gates(layer: nn.Module) -> dict[str, nn.Module]:
    if isinstance(layer, MultiGateMoE):
        return {f"gates.{t}": g for t, g in enumerate(layer.gates)}
    gate = layer.gate
    return {"gate": gate} if isinstance(gate, nn.Module) else {}


def _selector_sites(layer: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """``(name in layer, gate, sees the layer input)`` for every selector gate of the layer."""
    direct = {id(g): name for name, g in _direct_gates(layer).items()}
    sites: list[tuple[str, nn.Module, bool]] = []
    inside_hard: set[int] = set()
    for name, module in layer.named_modules():
        if isinstance(module, HardGate):
            inside_hard.add(id(module.gate))
            sites.append((name, module, id(module) in direct))
        elif isinstance(module, (DSelectK, COMET)) and id(module) not in inside_hard:
            sites.append((name, module, id(module) in direct))
    return sites


def _static(gate: nn.Module) -> bool:
    return bool(getattr(gate, "is_static", False))


@torch.no_grad()
def gate_report(model: nn.Module, layer_inputs: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, Any]]:
    """Binary status of every DSelect-k / COMET gate in ``model``.

    Args:
        model: any module holding ``MoE`` / ``MultiGateMoE`` layers.
        layer_inputs: ``{layer name: rows of the layer's input}`` (e.g. the validation inputs);
            per-example gates without an entry are skipped, static gates need none.

    Returns:
        ``{gate name: {'kind', 'k', 'binary', 'fraction_fractional', 'max_fractional_distance',
        'experts_per_row', 'max_experts', 'rows_over_k', 'rows'}}``: ``binary`` is True when every
        ``S(Z)`` entry / tree-node output is exactly 0 or 1 on the rows; ``experts_per_row`` is the mean
        number of non-zero weights per row (what the gate really uses; at most ``k`` once binary).
    """
    layer_inputs = layer_inputs or {}
    report: dict[str, dict[str, Any]] = {}
    for layer_name, layer in routing_layers(model):
        for name, gate, sees_input in _selector_sites(layer):
            inner = gate.gate if isinstance(gate, HardGate) else gate
            x = layer_inputs.get(layer_name)
            if _static(inner):
                cert = certify(gate, None)
                experts = float(cert.max_support_size)
            elif sees_input and x is not None and x.shape[0] > 0:
                param = next(inner.parameters(), None)
                if param is not None:
                    x = x.to(device=param.device, dtype=param.dtype)
                cert = certify(gate, x)
                with eval_mode(gate):
                    weights = gate(x).weights
                experts = float((weights != 0).sum(dim=-1).to(torch.float64).mean())
            else:
                continue
            report[_join(layer_name, name)] = {
                "kind": type(inner).__name__,
                "k": int(getattr(inner, "num_selectors", 1)),
                "binary": bool(cert.is_binary),
                "fraction_fractional": float(cert.fraction_fractional),
                "max_fractional_distance": float(cert.max_fractional_distance),
                "experts_per_row": experts,
                "max_experts": int(cert.max_support_size),
                "rows_over_k": int(cert.examples_over_k),
                "rows": int(cert.num_examples),
            }
    return report


def non_binary_gates(report: dict[str, dict[str, Any]]) -> list[str]:
    """Names of the gates of a :func:`gate_report` that are not binary."""
    return [name for name, entry in report.items() if not entry["binary"]]


def warn_non_binary(report: dict[str, dict[str, Any]], *, stacklevel: int = 1) -> None:
    """Warn (``RuntimeWarning``) when a selector gate of ``report`` is not binary.

    ``stacklevel`` counts from the caller, as if it called ``warnings.warn`` itself (``fit`` passes 2 so
    that the warning names the line that called ``fit``).
    """
    names = non_binary_gates(report)
    if not names:
        return
    details = "; ".join(
        f"{n}: {report[n]['rows_over_k']} of {report[n]['rows']} rows use more than k={report[n]['k']} experts, "
        f"{100 * report[n]['fraction_fractional']:.3g}% fractional entries, "
        f"{report[n]['experts_per_row']:.2f} experts per row"
        for n in names
    )
    warnings.warn(
        f"training ended with non-binary selector gate(s) ({details}): where a code is fractional the gate "
        "mixes more experts than its hard (Prop. 1) form, which differs from what was trained. Train longer, "
        "raise the gate's entropy/sparsity weight, or pass harden=True to fit (and check the hardened "
        "validation loss)",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def harden_model(model: nn.Module, layer_inputs: dict[str, torch.Tensor] | None = None) -> HardenCertificate:
    """Harden every DSelect-k / COMET gate of every routing layer of ``model`` in place.

    Static gates have their codes saturated (the module keeps its type); per-example gates are replaced
    by :class:`~routing_search.analysis.HardGate` and need their layer's input rows in ``layer_inputs``.

    Returns:
        The certificate before hardening (``.after``: after), one part per layer with selector gates;
        ``num_gates == 0`` when there is none.
    """
    layer_inputs = layer_inputs or {}
    befores, afters = [], []
    for layer_name, layer in routing_layers(model):
        if not _selector_sites(layer):
            continue
        x = layer_inputs.get(layer_name)
        if x is not None:
            param = next(layer.parameters(), None)
            if param is not None:
                x = x.to(device=param.device, dtype=param.dtype)
        _, cert = harden(layer, x, inplace=True)
        befores.append(_named(cert, layer_name))
        afters.append(_named(cert if cert.after is None else cert.after, layer_name))
    if len(befores) == 1:
        return dataclasses.replace(befores[0], after=afters[0])
    return dataclasses.replace(HardenCertificate.aggregate(befores), after=HardenCertificate.aggregate(afters))


def _named(cert: HardenCertificate, layer_name: str) -> HardenCertificate:
    return dataclasses.replace(cert, name=layer_name, after=None)
