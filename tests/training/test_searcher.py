"""LocalSearcher: schedule, rounds, random state round trip, option checking."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from routing_search import MoE, Softmax, TopK
from routing_search.training import LocalSearcher, mse_loss


def tiny_moe(seed: int = 0, gate: str = "topk") -> MoE:
    torch.manual_seed(seed)
    experts = [nn.Linear(5, 3) for _ in range(4)]
    g = TopK(4, k=2, input_dim=5) if gate == "topk" else Softmax(4, input_dim=5)
    return MoE(experts, g)


def data(seed: int = 1, rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 5, generator=gen), torch.randn(rows, 3, generator=gen)


def test_step_runs_on_schedule_and_counts_rounds():
    model = tiny_moe()
    searcher = LocalSearcher(model, mse_loss, every=3, rounds=2, rng=0)
    ran = [s for s in range(1, 11) if searcher.step(s, data()) is not None]
    assert ran == [3, 6]
    assert searcher.rounds_done == 2 and searcher.exhausted
    assert [entry["step"] for entry in searcher.log] == [3, 6]
    assert set(searcher.log[0]) == {"step", "fun0", "fun", "nit", "nfev", "seconds", "guard"}
    forced = searcher(data())  # __call__ always searches
    assert forced is not None and searcher.rounds_done == 3


def test_search_never_worse_and_preserves_mode():
    model = tiny_moe()
    model.train()
    result = LocalSearcher(model, mse_loss, every=1)(data())
    assert result.fun <= result.fun0
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    LocalSearcher(model, mse_loss, every=1)(data())
    assert not any(m.training for m in model.modules())


def test_rng_state_round_trips_through_weights_only_load():
    model = tiny_moe()
    searcher = LocalSearcher(model, mse_loss, method="ils", every=1, rng=123, perturbations=3)
    searcher(data())
    buffer = io.BytesIO()
    torch.save(searcher.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    twin_model = copy.deepcopy(model)
    twin = LocalSearcher(twin_model, mse_loss, method="ils", every=1, rng=999, perturbations=3)
    twin.load_state_dict(state)
    assert twin.rounds_done == 1 and twin.log == searcher.log
    a = searcher(data(seed=5))
    b = twin(data(seed=5))
    assert [x.tolist() for x in a.x] == [x.tolist() for x in b.x] and a.fun == b.fun
    assert searcher.rng.random() == twin.rng.random()


def test_other_bit_generator_round_trips():
    rng = np.random.Generator(np.random.MT19937(7))
    searcher = LocalSearcher(tiny_moe(), mse_loss, rng=rng)
    state = searcher.state_dict()
    other = LocalSearcher(tiny_moe(), mse_loss, rng=0)
    other.load_state_dict(state)
    assert other.rng.integers(1 << 30) == searcher.rng.integers(1 << 30)


def test_bad_arguments():
    model = tiny_moe()
    with pytest.raises(TypeError, match="'screan'"):
        LocalSearcher(model, mse_loss, screan=3)
    with pytest.raises(ValueError, match="method"):
        LocalSearcher(model, mse_loss, method="anneal")
    with pytest.raises(ValueError, match="every"):
        LocalSearcher(model, mse_loss, every=0)
    with pytest.raises(ValueError, match="not a LocalSearcher state"):
        LocalSearcher(model, mse_loss).load_state_dict({"rounds_done": 1})


def test_option_table_is_the_search_packages_and_process_group_is_checked():
    from routing_search.search import option_names
    from routing_search.training.searcher import search_option_names

    for method in ("swap", "ils", "exhaustive", "codes", "callable"):
        assert search_option_names(method) == option_names(method)
    model = tiny_moe()
    with pytest.raises(TypeError, match="process_group must be None"):
        LocalSearcher(model, mse_loss, process_group=True)
    with pytest.raises(RuntimeError, match="not initialised"):
        LocalSearcher(model, mse_loss, process_group=object())
    alone = LocalSearcher(copy.deepcopy(model), mse_loss, rng=0, process_group=False)
    default = LocalSearcher(copy.deepcopy(model), mse_loss, rng=0)
    assert alone(data()).x[0].tolist() == default(data()).x[0].tolist()
