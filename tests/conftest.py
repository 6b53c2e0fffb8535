"""Shared test helpers: every built-in gate by name, small and in float64.

``make_gate(kind, n, d, seed=..., binary=...)`` builds a gate; ``gate_extras(kind, batch, n, seed)``
gives the ``key``/``task`` keyword arguments that gate needs (an empty dict for most gates).
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist
from torch import nn

from routing_search.gates import COMET, DSelectK, GumbelSoftmax, Hash, Softmax, TaskAware, TopK

# Every gate kind of the package, in the forms the tests exercise.
GATE_KINDS = (
    "softmax",
    "softmax_static",
    "topk1",
    "topk2",
    "topk2_static",
    "hash",
    "gumbel",
    "dselect_static",
    "dselect",
    "comet_static",
    "comet",
    "task_aware",
)
SELECTOR_KINDS = ("dselect_static", "dselect", "comet_static", "comet")

# The tests use tiny tensors: intra-op threads only add overhead, and on a busy 2-core machine their
# spin-waiting made the suite ~8x slower. One thread also makes reductions run in a fixed order.
torch.set_num_threads(1)


def saturate_(gate: nn.Module, seed: int = 0) -> nn.Module:
    """Make a static DSelectK/COMET gate exactly binary (codes/nodes at ±γ) with spread-out mixes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if isinstance(gate, DSelectK):
            signs = torch.randint(0, 2, gate.z_logits.shape, generator=g) * 2 - 1
            gate.z_logits.copy_(gate.gamma * signs)
            gate.alpha_logits.copy_(torch.randn(gate.alpha_logits.shape, generator=g))
        elif isinstance(gate, COMET):
            signs = torch.randint(0, 2, gate.node_logits.shape, generator=g) * 2 - 1
            gate.node_logits.copy_(gate.gamma * signs)
            gate.leaf_logits.copy_(torch.randn(gate.leaf_logits.shape, generator=g))
        else:
            raise TypeError(f"cannot saturate a {type(gate).__name__}")
    return gate


def _spread_(gate: nn.Module, seed: int) -> None:
    """Larger random parameters than the tiny default inits, so that permutations matter."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in gate.named_parameters():
            if name.startswith(("z_", "node_")):
                # Codes/nodes inside the cubic region of S (|t| < γ/2 for the inputs used in tests).
                p.copy_((torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.5) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def build_gate(kind: str, n: int = 4, d: int = 3, *, seed: int = 0, k: int = 2, binary: bool = False) -> nn.Module:
    """A float64 gate of the given kind over ``n`` experts for inputs of width ``d``."""
    torch.manual_seed(seed)
    if kind == "softmax":
        gate: nn.Module = Softmax(n, d)
    elif kind == "softmax_static":
        gate = Softmax(n)
    elif kind == "topk1":
        gate = TopK(n, 1, d)
    elif kind == "topk2":
        gate = TopK(n, min(2, n), d)
    elif kind == "topk2_static":
        gate = TopK(n, min(2, n))
    elif kind == "hash":
        gate = Hash(n, num_keys=3 * n, seed=seed)
    elif kind == "gumbel":
        gate = GumbelSoftmax(n, d)
    elif kind == "dselect_static":
        gate = DSelectK(n, k)
    elif kind == "dselect":
        gate = DSelectK(n, k, d)
    elif kind == "comet_static":
        gate = COMET(n, k)
    elif kind == "comet":
        gate = COMET(n, k, d)
    elif kind == "task_aware":
        gate = TaskAware.per_task([Softmax(n, d), TopK(n, min(2, n), d)])
    else:
        raise ValueError(f"unknown gate kind {kind!r}")
    if kind != "hash":
        _spread_(gate, seed)
    if binary:
        saturate_(gate, seed)
    return gate.double()


def gate_extras(kind: str, batch: int, n: int = 4, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword arguments a gate of ``kind`` needs besides ``x`` (``key`` for Hash, ``task`` for TaskAware)."""
    g = torch.Generator().manual_seed(seed + 77)
    if kind == "hash":
        return {"key": torch.randint(0, 3 * n, (batch,), generator=g)}
    if kind == "task_aware":
        return {"task": torch.randint(0, 2, (batch,), generator=g)}
    return {}


@pytest.fixture(scope="session")
def make_gate():
    """The :func:`build_gate` factory (session scope, so usable with hypothesis)."""
    return build_gate


@pytest.fixture(scope="session")
def make_extras():
    """The :func:`gate_extras` factory."""
    return gate_extras


def init_group_of_one() -> None:
    """Initialise a one-process gloo group on a free port of 127.0.0.1 (collectives time out after 60 s)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timedelta(seconds=60))


@pytest.fixture
def group_of_one():
    """A one-process gloo group for the duration of a test (the world group), destroyed after it."""
    init_group_of_one()
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _load_by_path(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_by_path():
    """``load(name, path)``: import a helper module of the tests by its path (under ``--import-mode=importlib``
    the tests are not a package, so ``tests/mp_harness.py`` and the rank workers cannot be imported by name)."""
    return _load_by_path


@pytest.fixture(scope="session")
def harness() -> ModuleType:
    """``tests/mp_harness.py``: launches the ranks of the multi-process tests."""
    return _load_by_path("mp_harness", Path(__file__).with_name("mp_harness.py"))
