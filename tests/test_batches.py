"""routing_search.batches: ``data=`` forms are read as batches or rows, never confused (issue 9).

A list of single rows ``[(x_row, y_row), ...]`` used to be concatenated as if every row were a batch:
wrong shapes (a refusal deep in the model), or, for token rows ``[T, d]`` with a scalar label, a silently
wrong objective (every label repeated ``T`` times, the tokens taken as rows).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler, TensorDataset

from routing_search import MoE, TopK, local_search, make_experts
from routing_search.batches import as_batch, check_batch, check_loader
from routing_search.losses import mse_loss
from routing_search.search.refit import refit_search

N, D, T = 12, 4, 3


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randn(N, 1, generator=g)


def _moe(seed: int = 1) -> MoE:
    torch.manual_seed(seed)
    return MoE(make_experts(4, D, [8], 1), TopK(4, 2, input_dim=D))


def _row_lists() -> dict[str, list]:
    x, y = _data()
    return {
        "rows y[1]": list(zip(x, y)),
        "rows y[]": list(zip(x, y[:, 0])),
        "rows float y": [(xr, float(yr)) for xr, yr in zip(x, y[:, 0])],
        "dict rows": [({"x": xr, "task": 0}, yr) for xr, yr in zip(x, y)],
        "one row": [(x[0], y[0])],
        "two rows": [(x[0], y[0]), (x[1], y[1])],
        "tuple of rows": tuple(zip(x, y)),
        "multi-task rows": [(xr, [yr, yr]) for xr, yr in zip(x, y[:, 0])],
    }


class _Rows(IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


# ----------------------------------------------------------------------------- lists of single rows
@pytest.mark.parametrize("kind", list(_row_lists()))
def test_a_list_of_single_rows_is_refused_naming_data_and_how_to_pass_rows(kind: str) -> None:
    rows = _row_lists()[kind]
    with pytest.raises(ValueError, match=r"^data\[0\]: .*torch\.stack.*Dataset.*batch_size"):
        as_batch(rows)


@pytest.mark.parametrize("kind", ["rows y[1]", "rows y[]", "dict rows", "one row", "tuple of rows"])
def test_local_search_and_refit_search_refuse_a_list_of_single_rows(kind: str) -> None:
    rows = _row_lists()[kind]
    with pytest.raises(ValueError, match=r"data\[0\]: .*single rows"):
        local_search(_moe(), rows, mse_loss)
    with pytest.raises(ValueError, match=r"data\[0\]: .*single rows"):
        refit_search(_moe(), rows, rows, mse_loss)


def test_token_rows_with_a_scalar_label_are_refused_not_searched_per_token() -> None:
    """Rows ``[T, d]`` (one sequence each) with one label per sequence: was a silent per-token objective."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, T, D, generator=g), torch.randn(6, generator=g)
    rows = list(zip(x, y))
    with pytest.raises(ValueError, match=r"data\[0\]: targets hold a 0-dim tensor"):
        local_search(_moe(), rows, mse_loss)
    with pytest.raises(ValueError, match=r"data\[0\]: targets hold a 0-dim tensor"):
        refit_search(_moe(), rows, rows, mse_loss)


def test_a_single_row_passed_as_the_pair_is_refused() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match="^data: targets hold a 0-dim tensor"):
        as_batch((x[0], y[0, 0]))
    with pytest.raises(ValueError, match=r"^data: its tensors have different numbers of rows \[1, 4\]"):
        local_search(_moe(), (x[0], y[0]), mse_loss)
    with pytest.raises(ValueError, match=r"^score_data: .*different numbers of rows \[5, 12\]"):
        as_batch((x, y[:5]), name="score_data")


# ----------------------------------------------------------------------------- Datasets hold rows
@pytest.mark.parametrize("form", ["TensorDataset", "IterableDataset", "list of rows in a DataLoader"])
def test_a_dataset_of_rows_is_stacked_and_searches_exactly_like_the_tensors(form: str) -> None:
    x, y = _data()
    data = {
        "TensorDataset": TensorDataset(x, y),
        "IterableDataset": _Rows(x, y),
        "list of rows in a DataLoader": DataLoader(list(zip(x, y)), batch_size=5),
    }[form]
    inputs, targets = as_batch(data)
    assert torch.equal(inputs, x) and torch.equal(targets, y)
    expected = local_search(_moe(), (x, y), mse_loss)
    got = local_search(_moe(), data, mse_loss)
    assert got.fun == expected.fun and got.nfev == expected.nfev
    assert [p.tolist() for p in got.x] == [p.tolist() for p in expected.x]
    assert refit_search(_moe(), data, data, mse_loss).fun == refit_search(_moe(), (x, y), (x, y), mse_loss).fun


def test_a_dataset_with_dict_rows_gets_a_task_per_row() -> None:
    x, y = _data()
    data = [({"x": x[i], "task": i % 2}, y[i]) for i in range(N)]
    inputs, targets = as_batch(DataLoader(data, batch_size=5))
    assert torch.equal(inputs["x"], x) and torch.equal(inputs["task"], torch.arange(N) % 2) and torch.equal(targets, y)


def test_a_dataset_whose_items_are_not_pairs_is_refused() -> None:
    x, _ = _data()
    with pytest.raises(TypeError, match="every Dataset item must be one row"):
        as_batch(TensorDataset(x))
    with pytest.raises(ValueError, match="the Dataset holds no rows"):
        as_batch(TensorDataset(x[:0], x[:0]))


# ----------------------------------------------------------------------------- DataLoaders yield batches
def test_a_loader_without_batching_over_a_tensor_dataset_is_refused() -> None:
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=None)
    with pytest.raises(ValueError, match=r"^data: DataLoader\(batch_size=None\) over a TensorDataset yields single rows"):
        local_search(_moe(), loader, mse_loss)
    with pytest.raises(ValueError, match="yields single rows"):
        check_loader(DataLoader(TensorDataset(x, y), batch_size=None, shuffle=True))


def test_a_loader_without_batching_over_a_list_of_rows_is_refused() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match=r"^data\[0\]: its tensors have different numbers of rows"):
        local_search(_moe(), DataLoader(list(zip(x, y)), batch_size=None), mse_loss)


def test_loaders_that_yield_batches_are_concatenated_in_order() -> None:
    x, y = _data()
    batched = DataLoader(TensorDataset(x, y), batch_size=5)
    # batch_size=None with a sampler of index lists: each item is a batch (TensorDataset indexed by a list).
    fancy = DataLoader(TensorDataset(x, y), batch_size=None, sampler=BatchSampler(SequentialSampler(range(N)), 5, False))
    premade = DataLoader([(x[:7], y[:7]), (x[7:], y[7:])], batch_size=None)
    for loader in (batched, fancy, premade):
        inputs, targets = as_batch(loader)
        assert torch.equal(inputs, x) and torch.equal(targets, y)


# ----------------------------------------------------------------------------- lists of batches still work
def test_a_list_of_batches_is_concatenated() -> None:
    x, y = _data()
    inputs, targets = as_batch([(x[:5], y[:5]), (x[5:], y[5:])])
    assert torch.equal(inputs, x) and torch.equal(targets, y)
    one, _ = as_batch([(x, y)])
    assert one is x
    assert local_search(_moe(), [(x[:5], y[:5]), (x[5:], y[5:])], mse_loss).fun == local_search(_moe(), (x, y), mse_loss).fun


def test_check_batch_counts_rows_and_allows_plain_values_in_inputs_only() -> None:
    x, y = _data()
    assert check_batch(({"x": x, "task": 1, "w": torch.tensor(2.0)}, [y, y[:, 0]])) == N
    assert check_batch((x[:0], y[:0])) == 0
    assert check_batch((x, None)) == N  # a loss without targets
    with pytest.raises(ValueError, match=r"targets hold a 0-dim tensor"):
        check_batch((x, [y, torch.tensor(0.0)]))
    with pytest.raises(ValueError, match="no tensor with a batch dimension"):
        check_batch(({"task": 1}, None))
    with pytest.raises(TypeError, match="must be a pair"):
        check_batch((x, y, y))


def test_refit_search_names_fit_data_and_score_data() -> None:
    x, y = _data()
    rows = list(zip(x, y))
    with pytest.raises(ValueError, match=r"^fit_data\[0\]: .*single rows"):
        refit_search(_moe(), rows, (x, y), mse_loss)
    with pytest.raises(ValueError, match=r"^score_data\[0\]: .*single rows"):
        refit_search(_moe(), (x, y), rows, mse_loss)
