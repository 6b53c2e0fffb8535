"""The pieces of fit's data-parallel mode in one process: sharding rules, the world-size check of checkpoints,
and fit under a gloo group of one process (same run as without a group). The multi-process behaviour is in
test_ddp.py."""

from __future__ import annotations


import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from routing_search.gates import TopK
from routing_search.layers import MoE, make_experts
from routing_search.search import SinkhornPermutation
from routing_search.training import CheckpointError, SearchSchedule, fit, load_checkpoint
from routing_search.training.distributed_training import (
    DistributedContext,
    GlobalBatchSampler,
    RunRecord,
    check_world_size_change,
    make_distributed_loader,
    shard_bounds,
    split_sizes,
    train_order,
)


@pytest.mark.parametrize("rows,batch", [(50, 16), (7, 3), (2, 5), (0, 4)])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_ranks_parts_make_up_exactly_the_single_process_batches(rows, batch, world):
    parts = [list(GlobalBatchSampler(rows, batch, torch.Generator().manual_seed(3), rank=r, world_size=world)) for r in range(world)]
    single = [b.tolist() for b in torch.randperm(rows, generator=torch.Generator().manual_seed(3)).split(batch)] if rows else []
    assert all(len(p) == len(single) for p in parts)  # every rank takes the same number of steps
    for k, whole in enumerate(single):
        pieces = [p[k] for p in parts]
        assert [i for piece in pieces for i in piece] == whole  # contiguous parts, in rank order, nothing dropped or repeated
        assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_split_sizes_and_bounds():
    assert split_sizes(7, 3) == [3, 2, 2] and split_sizes(1, 3) == [1, 0, 0]
    assert [shard_bounds(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ValueError, match="rank must be in"):
        shard_bounds(7, 3, 3)


def test_a_distributed_loader_of_one_process_gives_make_loaders_batches():
    data = TensorDataset(torch.arange(10.0), torch.zeros(10))
    loader = make_distributed_loader(data, batch_size=4, seed=1, process_group=False)
    want = torch.randperm(10, generator=torch.Generator().manual_seed(1)).split(4)
    assert [b[0].tolist() for b in loader] == [torch.arange(10.0)[i].tolist() for i in want]
    assert train_order(loader) == "global"
    with pytest.raises(TypeError, match="chooses"):
        make_distributed_loader(data, batch_size=4, sampler=None)


def _state(world: int, **record) -> dict:
    return {"distributed": RunRecord(world_size=world, **record).to_dict()}


def test_the_world_size_check_of_a_checkpoint():
    one, two = DistributedContext(None, 0, 1), DistributedContext(object(), 0, 2)
    assert check_world_size_change(_state(2, consumed_rng=["torch"]), "c.pt", DistributedContext(object(), 1, 2), "global").consumed_rng == ["torch"]
    assert check_world_size_change(_state(2), "c.pt", one, "global").world_size == 2  # nothing world-size dependent
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\).*per-rank random streams \['gate.generator', 'torch'\]"):
        check_world_size_change(_state(2, consumed_rng=["torch", "gate.generator"]), "c.pt", one, "global")
    with pytest.raises(CheckpointError, match=r"\[\"BatchNorm 'bn'\"\] are computed over each rank's part"):
        check_world_size_change(_state(1, batch_statistics=["BatchNorm 'bn'"]), "c.pt", two, "global")
    with pytest.raises(CheckpointError, match="distributed sampler DataLoader"):
        check_world_size_change(_state(2, train_order="distributed_sampler"), "c.pt", one, "global")
    with pytest.raises(CheckpointError, match="this run's training batches come from a loader"):
        check_world_size_change(_state(1), "c.pt", two, "loader")
    with pytest.raises(CheckpointError, match="does not record"):
        check_world_size_change({}, "c.pt", two, "global")
    assert check_world_size_change({}, "c.pt", one, "loader").world_size == 1  # an older single-process file, resumed alone


# ------------------------------------------------------------------------------- a group of one process


def _model() -> MoE:
    torch.manual_seed(0)
    return MoE(make_experts(4, 3, [6], 2, generator=torch.Generator().manual_seed(0)), TopK(4, 2, 3)).double()


def _data(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, generator=g, dtype=torch.float64), torch.randn(rows, 2, generator=g, dtype=torch.float64)


def _rows(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean(dim=1)


def test_fit_in_a_group_of_one_process_equals_fit_alone(group_of_one, tmp_path):
    kwargs = dict(val_data=_data(20, 2), epochs=2, batch_size=8, search=SearchSchedule(), progress=False, gate_loss_weight=0.0)
    alone = fit(_model(), _data(30, 1), _rows, process_group=False, **kwargs)
    grouped = fit(_model(), _data(30, 1), _rows, checkpoint_dir=tmp_path, **kwargs)  # default: the initialised world group
    for a, b in zip(alone.model.parameters(), grouped.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert alone.history.permutations == grouped.history.permutations
    assert grouped.history.val_loss == pytest.approx(alone.history.val_loss, rel=1e-12)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["distributed"]["world_size"] == 1 and len(state["rank_rng"]) == 1


def test_fit_in_a_group_refuses_loaders_that_would_train_or_evaluate_wrongly(group_of_one):
    data = TensorDataset(*_data(30, 1))
    with pytest.raises(ValueError, match="training DataLoader must give each rank its own part"):
        fit(_model(), DataLoader(data, batch_size=8), _rows, epochs=1, progress=False)
    sharded = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=False))
    with pytest.raises(ValueError, match="sharded DataLoader cannot be used for evaluation"):
        fit(_model(), data, _rows, val_data=sharded, epochs=1, progress=False)
    result = fit(_model(), sharded, _rows, val_data=data, epochs=2, progress=False)  # a DistributedSampler trains
    assert result.epochs_run == 2 and train_order(sharded) == "distributed_sampler"


def test_a_model_wrapped_for_ddp_needs_a_group():
    wrapped = torch.nn.DataParallel(_model())
    with pytest.raises(ValueError, match="single process"):
        fit(wrapped, _data(10, 1), _rows, epochs=1, progress=False)


def test_a_learned_sinkhorn_permutation_is_rounded_once_inside_a_group(group_of_one):
    torch.manual_seed(0)
    gate = SinkhornPermutation(TopK(4, 2, 3), anneal_steps=1, generator=torch.Generator().manual_seed(0))
    model = MoE(make_experts(4, 3, [6], 2, generator=torch.Generator().manual_seed(0)), gate).double()
    result = fit(model, _data(30, 1), _rows, val_data=_data(20, 2), epochs=3, batch_size=8, progress=False)
    rounds = [e for e in result.history.sinkhorn if e["event"] == "round"]
    assert len(rounds) == 1 and rounds[0]["epoch"] == 1 and gate.frozen  # trained on after rounding (log_alpha frozen)


def _elementwise(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (pred - y) ** 2  # [B, D]: neither per-example nor a scalar; fit takes its mean


def test_a_loss_of_more_than_one_value_per_row_trains_and_evaluates_as_its_mean_in_a_group(group_of_one):
    # Regression: under a group a [B, D] loss was summed over all B*D values and divided by the rows, so every
    # gradient and the reported losses were D times those of the same run alone.
    kwargs = dict(val_data=_data(20, 2), epochs=2, batch_size=8, progress=False, gate_loss_weight=0.0,
                  optimizer=lambda params: torch.optim.SGD(params, lr=0.05))
    alone = fit(_model(), _data(30, 1), _elementwise, process_group=False, **kwargs)
    grouped = fit(_model(), _data(30, 1), _elementwise, **kwargs)
    for a, b in zip(alone.model.parameters(), grouped.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert grouped.history.train_loss == pytest.approx(alone.history.train_loss, rel=1e-12)
    assert grouped.history.val_loss == pytest.approx(alone.history.val_loss, rel=1e-12)


@pytest.mark.parametrize("value", ["gloo", 0, 1])
def test_a_process_group_that_is_not_a_group_is_named(group_of_one, value):
    # 'gloo' reached torch as a group: "Group gloo is not registered, please create group with ... new_group"
    from routing_search.distributed import resolve_group

    with pytest.raises(TypeError, match=rf"process_group must be None .*, False or a torch.distributed ProcessGroup .*got {value!r}"):
        resolve_group(value)
    with pytest.raises(TypeError, match="process_group must be None"):
        fit(torch.nn.Linear(2, 1), (torch.randn(6, 2), torch.randn(6, 1)), lambda p, t: ((p - t) ** 2).mean(1), epochs=1,
            process_group=value, progress=False)
    assert resolve_group(group_of_one) is group_of_one and resolve_group(None) is group_of_one and resolve_group(False) is None


def test_a_rank_outside_the_process_group_is_told_so(group_of_one):
    # new_group([1, 2]) gives rank 0 the placeholder GroupMember.NON_GROUP_MEMBER (-100), which fit took as a group
    import torch.distributed as dist

    from routing_search.distributed import resolve_group

    with pytest.raises(ValueError, match=r"this process \(rank 0 of the world\) is not a member of process_group"):
        resolve_group(dist.GroupMember.NON_GROUP_MEMBER)
