"""training.data_source: fit's data arguments never take single rows for batches (issue 9).

``fit`` read ``DataLoader(rows, batch_size=None)`` (which yields single rows) as batches: a refusal deep
in the model, or with a loss that broadcasts, training on the wrong objective without a word.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from routing_search import MoE, TopK, make_experts
from routing_search.training import fit, mse_loss
from routing_search.training.data_source import materialize, search_subset

N, D, T = 12, 4, 3


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randn(N, 1, generator=g)


def _moe(seed: int = 1) -> MoE:
    torch.manual_seed(seed)
    return MoE(make_experts(4, D, [8], 1), TopK(4, 2, input_dim=D))


def _fit(train, **kwargs):
    return fit(_moe(), train, mse_loss, epochs=1, batch_size=4, progress=False, **kwargs)


@pytest.mark.parametrize("argument", ["train_data", "val_data"])
def test_a_list_of_single_rows_is_refused_naming_the_argument(argument: str) -> None:
    x, y = _data()
    rows = list(zip(x, y))
    kwargs = {"train": rows} if argument == "train_data" else {"train": (x, y), "val_data": rows}
    with pytest.raises(TypeError, match=rf"^{argument} must be .* got a list of 12 pairs .*torch\.stack"):
        _fit(**kwargs)
    with pytest.raises(TypeError, match=r"got a list of 1 pair \("):
        _fit(rows[:1])


def test_a_single_row_as_the_pair_is_refused() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match="^train_data: targets hold a 0-dim tensor"):
        _fit((x[0], y[0, 0]))


@pytest.mark.parametrize("argument", ["train_data", "val_data"])
def test_a_loader_yielding_single_rows_is_refused(argument: str) -> None:
    x, y = _data()
    for loader, message in [
        (DataLoader(list(zip(x, y)), batch_size=None), rf"^{argument}: batch 0: its tensors have different numbers of rows"),
        (DataLoader(TensorDataset(x, y), batch_size=None), rf"^{argument}: DataLoader\(batch_size=None\) over a TensorDataset"),
    ]:
        kwargs = {"train": loader} if argument == "train_data" else {"train": (x, y), "val_data": loader}
        with pytest.raises(ValueError, match=message):
            _fit(**kwargs)


def test_token_rows_with_a_broadcasting_loss_are_refused_not_trained_per_token() -> None:
    """Sequences ``[T, d]`` with one label each, through ``DataLoader(..., batch_size=None)``: every row
    was taken as a batch of T token rows and a broadcasting loss trained on the label repeated T times."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, T, D, generator=g), torch.randn(6, generator=g)

    def loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (prediction.squeeze(-1) - target) ** 2

    with pytest.raises(ValueError, match="^train_data: batch 0: targets hold a 0-dim tensor"):
        fit(_moe(), DataLoader(list(zip(x, y)), batch_size=None), loss, epochs=1, progress=False)


def test_loaders_of_batches_and_datasets_of_rows_still_train_like_the_tensors() -> None:
    x, y = _data()
    reference = _fit((x, y), val_data=(x, y), seed=5)
    from_dataset = _fit(TensorDataset(x, y), val_data=TensorDataset(x, y), seed=5)
    assert from_dataset.history.step_loss == reference.history.step_loss
    assert from_dataset.history.val_loss == reference.history.val_loss
    premade = DataLoader([(x[:8], y[:8]), (x[8:], y[8:])], batch_size=None)
    validated = _fit((x, y), val_data=premade, seed=5)
    assert validated.history.val_loss == pytest.approx(reference.history.val_loss, rel=1e-6)
    batched = _fit(premade, seed=5)
    assert len(batched.history.step_loss) == 2  # the two premade batches, each one step


def test_materialize_reads_lists_as_batches_and_datasets_as_rows() -> None:
    x, y = _data()
    for data in [(x, y), [(x[:5], y[:5]), (x[5:], y[5:])], TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=5)]:
        inputs, targets = materialize(data)
        assert torch.equal(inputs, x) and torch.equal(targets, y)
    with pytest.raises(ValueError, match=r"^search_data\[0\]: .*single rows"):
        materialize(list(zip(x, y)), name="search_data")
    with pytest.raises(ValueError, match=r"^search_data\[0\]: .*single rows"):
        search_subset(list(zip(x, y)), 5, seed=0, name="search_data")
    with pytest.raises(ValueError, match=r"^val_data: DataLoader\(batch_size=None\)"):
        materialize(DataLoader(TensorDataset(x, y), batch_size=None), name="val_data")


def test_fit_names_search_data_and_train_data_for_the_search_rows() -> None:
    from routing_search.search.refit import RefitOptions
    from routing_search.training import SearchSchedule

    x, y = _data()
    rows = list(zip(x, y))
    with pytest.raises(ValueError, match=r"^search_data\[0\]: .*single rows"):
        _fit((x, y), search=SearchSchedule(every_epochs=1), search_data=rows)
    with pytest.raises(TypeError, match=r"^val_data must be .* got a list of 12 pairs"):
        _fit((x, y), search=SearchSchedule(every_epochs=1), val_data=rows)
    refit = SearchSchedule(every_epochs=1, refit=RefitOptions(max_iter=1))
    with pytest.raises(ValueError, match=r"^train_data: DataLoader\(batch_size=None\)"):
        _fit(DataLoader(TensorDataset(x, y), batch_size=None), search=refit, search_data=(x, y))
