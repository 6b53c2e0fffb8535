"""Per-gate binary reports and hardening of every selector gate of a model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from routing_search import COMET, DSelectK, MoE, MultiGateMoE, Softmax, TopK
from routing_search.training import gate_report, harden_model
from routing_search.training.gate_report import non_binary_gates, warn_non_binary


def saturate(gate: nn.Module) -> nn.Module:
    with torch.no_grad():
        param = gate.z_logits if isinstance(gate, DSelectK) else gate.node_logits
        param.copy_(gate.gamma * torch.sign(torch.randn(param.shape, generator=torch.Generator().manual_seed(1))))
    return gate


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = MultiGateMoE([nn.Linear(4, 4) for _ in range(4)],
                                  [saturate(DSelectK(4, 2)), COMET(4, 2, 4), Softmax(4, input_dim=4)])
        self.second = MoE([nn.Linear(4, 1) for _ in range(4)], TopK(4, k=1, input_dim=4))

    def forward(self, x):
        return self.second(self.first(x).outputs[0]).output


def test_report_names_each_selector_gate_and_measures_it():
    model = TwoLayers()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    report = gate_report(model, {"first": x})
    assert sorted(report) == ["first.gates.0", "first.gates.1"]
    static, per_example = report["first.gates.0"], report["first.gates.1"]
    assert static["binary"] and static["experts_per_row"] <= 2 and static["rows"] == 1
    assert not per_example["binary"] and per_example["rows"] == 64 and per_example["kind"] == "COMET"
    assert non_binary_gates(report) == ["first.gates.1"]
    # without the layer's input only static gates can be certified
    assert sorted(gate_report(model)) == ["first.gates.0"]
    with pytest.warns(RuntimeWarning, match=r"first\.gates\.1: 64 of 64 rows use more than k=2 experts, 100% fractional"):
        warn_non_binary(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_non_binary({"first.gates.0": static})


def test_harden_model_makes_every_selector_gate_binary_in_place():
    model = TwoLayers()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    layer = model.first
    cert = harden_model(model, {"first": x})
    assert model.first is layer  # hardened in place
    assert cert.num_gates == 2 and not cert.is_binary and cert.after.is_binary and cert.after.agree
    report = gate_report(model, {"first": x})
    assert all(entry["binary"] and entry["experts_per_row"] <= 2 for entry in report.values())
    with pytest.raises(ValueError, match="x is required"):
        harden_model(TwoLayers(), {})


def test_warning_shows_a_small_fractional_share_instead_of_rounding_it_to_zero():
    # Regression: 0.4 % of the entries fractional was printed as "0% fractional entries" next to
    # "non-binary", which read as a contradiction.
    report = {"moe.gates.0": {"binary": False, "fraction_fractional": 0.004, "experts_per_row": 1.75, "k": 2,
                              "rows_over_k": 3, "rows": 500}}
    with pytest.warns(RuntimeWarning, match=r"moe\.gates\.0: 3 of 500 rows use more than k=2 experts, 0\.4% fractional "
                                            r"entries, 1\.75 experts per row"):
        warn_non_binary(report)
