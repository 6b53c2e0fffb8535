"""The alternating trainer: learning, search, history, early stopping, checkpoints and exact resume."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from routing_search import MoE, MultiGateMoE, Softmax, TopK, make_experts
from routing_search.data import make_synthetic_moe
from routing_search.search.sinkhorn import SinkhornPermutation
from routing_search.training import CheckpointError, SearchSchedule, fit, mse_loss, multitask_loss


def build(seed: int = 0, *, num_experts: int = 4, dropout: float = 0.0, sinkhorn: bool = False) -> MoE:
    torch.manual_seed(seed)
    experts = make_experts(num_experts, 5, [8], 1, dropout=dropout) if dropout else [nn.Linear(5, 1) for _ in range(num_experts)]
    gate = TopK(num_experts, k=2, input_dim=5)
    if sinkhorn:
        gate = SinkhornPermutation(gate, anneal_steps=2, generator=torch.Generator().manual_seed(seed))
    return MoE(experts, gate)


@pytest.fixture(scope="module")
def task():
    data = make_synthetic_moe(num_samples=384, input_dim=5, num_experts=4, k=2, num_tasks=1, seed=3)
    train, val = data.split((2 / 3, 1 / 3))
    return (train.x, train.y), (val.x, val.y)


def states_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_fit_reduces_training_loss(task):
    train, val = task
    result = fit(build(), train, mse_loss, val_data=val, epochs=6, batch_size=32, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), progress=False)
    h = result.history
    assert result.epochs_run == 6 and not result.stopped_early
    assert len(h.step_loss) == 6 * 8 and len(h.train_loss) == 6
    assert h.train_loss[-1] < 0.7 * h.train_loss[0]
    assert h.val_loss[-1] < h.val_loss[0]
    assert result.best_val == min(h.val_loss)
    usage = h.usage[-1][""][0]
    assert len(usage["soft"]) == 4 and abs(sum(usage["soft"]) - 1) < 1e-6
    assert abs(sum(usage["hard"]) - 2) < 1e-6  # Top-2: two experts per row
    json.dumps(h.to_dict())


def test_fit_with_search_records_moves_and_never_worsens(task):
    train, val = task
    result = fit(build(), train, mse_loss, val_data=val, epochs=4, batch_size=32, search=SearchSchedule(every_epochs=1), progress=False)
    h = result.history
    assert len(h.searches) == 4
    assert sum(s["accepted"] for s in h.searches) >= 1
    for record, val_after in zip(h.searches, h.val_loss):
        assert record["fun"] <= record["fun0"]
        assert record["accepted"] == len(record["moves"])
        # the search data is the validation data, evaluated right after the search
        assert val_after == pytest.approx(record["fun"], rel=1e-5)
    assert h.permutations[-1][""] == [result.model.permutation.index.tolist()]
    assert all(s >= 0 for s in h.search_seconds) and 0 <= h.search_share() < 1


def test_step_schedule_and_rounds(task):
    train, val = task
    result = fit(build(), train, mse_loss, val_data=val, epochs=2, batch_size=32, search=SearchSchedule(every_steps=5, rounds=2), progress=False)
    assert [s["step"] for s in result.history.searches] == [5, 10]
    with pytest.warns(DeprecationWarning, match="SearchSchedule"):
        old = fit(build(), train, mse_loss, val_data=val, epochs=2, batch_size=32, search={"every": 5, "rounds": 2}, progress=False)
    # the deprecated dict is the same schedule
    assert [(s["step"], s["fun"], s["moves"]) for s in old.history.searches] == [(s["step"], s["fun"], s["moves"]) for s in result.history.searches]


@pytest.mark.parametrize("variant", ["search", "dropout", "sinkhorn"])
def test_resume_equals_uninterrupted(task, tmp_path, variant):
    train, val = task
    kwargs = dict(
        val_data=val,
        batch_size=32,
        search=SearchSchedule(method="ils", every_steps=3, options={"perturbations": 2}) if variant != "sinkhorn" else SearchSchedule(),
        progress=False,
    )
    options = {"dropout": 0.3} if variant == "dropout" else {"sinkhorn": True} if variant == "sinkhorn" else {}

    full = fit(build(**options), train, mse_loss, epochs=4, checkpoint_dir=tmp_path / "full", **kwargs)

    fit(build(**options), train, mse_loss, epochs=2, checkpoint_dir=tmp_path / "part", **kwargs)
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    resumed = fit(build(seed=7, **options), train, mse_loss, epochs=4, checkpoint_dir=tmp_path / "part", resume=True, **kwargs)

    states_equal(full.model, resumed.model)
    a, b = full.history, resumed.history
    assert a.step_loss == b.step_loss and a.train_loss == b.train_loss and a.val_loss == b.val_loss
    assert a.permutations == b.permutations and a.usage == b.usage and a.sinkhorn == b.sinkhorn
    assert [(s["fun0"], s["fun"], s["moves"]) for s in a.searches] == [(s["fun0"], s["fun"], s["moves"]) for s in b.searches]
    assert resumed.epochs_run == 4 and len(b.epoch) == 4
    if variant == "sinkhorn":
        assert [e["event"] for e in a.sinkhorn] == ["progress", "progress", "round"]
    else:
        assert sum(s["accepted"] for s in a.searches) >= 1


def test_refuses_existing_checkpoint_unless_resume_or_overwrite(task, tmp_path):
    train, val = task
    first = fit(build(), train, mse_loss, val_data=val, epochs=1, batch_size=64, checkpoint_dir=tmp_path, progress=False)
    before = first.checkpoint_path.read_bytes()
    with pytest.raises(FileExistsError, match="resume=True.*overwrite=True"):
        fit(build(), train, mse_loss, val_data=val, epochs=1, batch_size=64, checkpoint_dir=tmp_path, progress=False)
    assert first.checkpoint_path.read_bytes() == before
    fit(build(), train, mse_loss, val_data=val, epochs=1, batch_size=64, checkpoint_dir=tmp_path, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="contradict"):
        fit(build(), train, mse_loss, epochs=1, checkpoint_dir=tmp_path, resume=True, overwrite=True, progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        fit(build(), train, mse_loss, epochs=1, checkpoint_dir=tmp_path / "empty", resume=True, progress=False)


def test_resume_from_corrupt_checkpoint_is_clear_and_harmless(task, tmp_path):
    train, val = task
    result = fit(build(), train, mse_loss, val_data=val, epochs=1, batch_size=64, checkpoint_dir=tmp_path, progress=False)
    path = result.checkpoint_path
    path.write_bytes(path.read_bytes()[:200])
    before = path.read_bytes()
    model = build(seed=3)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        fit(model, train, mse_loss, epochs=2, batch_size=64, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())


def test_resume_with_mismatched_model(task, tmp_path):
    train, val = task
    result = fit(build(), train, mse_loss, val_data=val, epochs=1, batch_size=64, checkpoint_dir=tmp_path, progress=False)
    before = result.checkpoint_path.read_bytes()
    with pytest.raises(CheckpointError, match=r"experts\.5\.weight") as info:
        fit(build(num_experts=6), train, mse_loss, epochs=2, batch_size=64, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert str(result.checkpoint_path) in str(info.value)
    assert result.checkpoint_path.read_bytes() == before


def test_early_stopping_restores_best_weights(task):
    (x, y), (xv, yv) = task
    anti_val = (xv, -yv)  # training towards y makes this validation loss worse
    kwargs = dict(batch_size=32, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), progress=False)
    result = fit(build(), (x, y), mse_loss, val_data=anti_val, epochs=20, early_stopping_patience=2, **kwargs)
    h = result.history
    assert result.stopped_early and result.epochs_run < 20
    best_epoch = min(range(len(h.val_loss)), key=h.val_loss.__getitem__)
    assert result.epochs_run == best_epoch + 1 + 2
    assert result.best_val == h.val_loss[best_epoch]
    reference = fit(build(), (x, y), mse_loss, val_data=anti_val, epochs=best_epoch + 1, **kwargs)
    states_equal(result.model, reference.model)


def test_multigate_dict_inputs_and_multitask_loss():
    data = make_synthetic_moe(num_samples=256, input_dim=5, num_experts=4, k=2, num_tasks=2, seed=1)
    train, val = data.split((0.75, 0.25))
    torch.manual_seed(0)
    model = MultiGateMoE(
        [nn.Linear(5, 1) for _ in range(4)], [Softmax(4, input_dim=5), TopK(4, k=2, input_dim=5)]
    )
    loss = multitask_loss(["mse", "mse"], [0.5, 0.5])
    result = fit(model, ({"x": train.x}, train.y), loss, val_data=({"x": val.x}, val.y), epochs=2, batch_size=64,
                 search=SearchSchedule(), max_steps=5, progress=True)
    h = result.history
    assert len(h.step_loss) == 5 and result.epochs_run == 2
    assert len(h.usage[-1][""]) == 2  # one usage entry per task
    assert len(h.permutations[-1][""]) == 2


def test_bad_arguments(task):
    train, val = task
    with pytest.raises(ValueError, match="epochs"):
        fit(build(), train, mse_loss, epochs=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit(build(), train, mse_loss, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="'screan'"):
        fit(build(), train, mse_loss, val_data=val, search=SearchSchedule(options={"screan": 4}), progress=False)
    with pytest.raises(ValueError, match="search_data"):
        fit(build(), train, mse_loss, search=SearchSchedule(), progress=False)
    with pytest.raises(ValueError, match="not both"):
        SearchSchedule(every_steps=2, every_epochs=1)
    with pytest.raises(ValueError, match="not both"), pytest.warns(DeprecationWarning):
        fit(build(), train, mse_loss, val_data=val, search={"every": 2, "every_epochs": 1}, progress=False)
    with pytest.raises(ValueError, match="val_data"):
        fit(build(), train, mse_loss, early_stopping_patience=2, progress=False)
    with pytest.raises(ValueError, match=r"^train_data: its tensors have different numbers of rows"):
        fit(build(), (train[0], train[1][:10]), mse_loss, progress=False)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        fit(build(), train, mse_loss, resume=True, progress=False)


def test_user_searcher_and_history_round_trip(task):
    from routing_search.training import History, LocalSearcher

    train, val = task
    model = build()
    searcher = LocalSearcher(model, mse_loss, every=4, rounds=1, rng=0)
    result = fit(model, train, mse_loss, val_data=val, epochs=1, batch_size=32, search=searcher, progress=False)
    assert [s["step"] for s in result.history.searches] == [4] and searcher.rounds_done == 1
    data = json.loads(json.dumps(result.history.to_dict()))
    assert History.from_dict(data) == result.history
    with pytest.raises(ValueError, match="different model"):
        fit(build(), train, mse_loss, val_data=val, epochs=1, search=searcher, progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_and_resume_on_cuda(task, tmp_path):
    train, val = task
    kwargs = dict(val_data=val, batch_size=32, search=SearchSchedule(every_steps=3), device="cuda", progress=False)
    full = fit(build(dropout=0.3), train, mse_loss, epochs=3, checkpoint_dir=tmp_path / "full", **kwargs)
    fit(build(dropout=0.3), train, mse_loss, epochs=1, checkpoint_dir=tmp_path / "part", **kwargs)
    resumed = fit(build(dropout=0.3), train, mse_loss, epochs=3, checkpoint_dir=tmp_path / "part", resume=True, **kwargs)
    assert all(p.device.type == "cuda" for p in resumed.model.parameters())
    for (key, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)


def test_search_uses_a_fixed_seeded_subset_of_the_held_out_rows(task):
    from routing_search.search import local_search
    from routing_search.training.data_source import search_subset as _search_subset

    train, val = task
    (x_sub, y_sub) = _search_subset(val, 50, seed=4)
    assert x_sub.shape[0] == 50 and y_sub.shape[0] == 50
    again = _search_subset(val, 50, seed=4)
    assert torch.equal(again[0], x_sub) and torch.equal(again[1], y_sub)
    rows = [int(torch.nonzero((val[0] == r).all(dim=1))[0]) for r in x_sub]
    assert rows == sorted(rows) and len(set(rows)) == 50  # distinct rows of val, in their original order
    assert torch.equal(_search_subset(val, None, seed=4)[0], val[0])
    assert torch.equal(_search_subset(val, 10_000, seed=4)[0], val[0])

    # The search inside fit scores exactly that subset: its recorded start loss is the subset's loss.
    model = build()
    result = fit(model, train, mse_loss, val_data=val, epochs=1, batch_size=32, search=SearchSchedule(rows=50), seed=4, progress=False)
    (record,) = result.history.searches
    probe = copy.deepcopy(result.model)
    probe.permutation.set(record["moves"][0]["before"] if record["moves"] else probe.permutation.get()[0])
    assert local_search(probe, (x_sub, y_sub), mse_loss, "swap", max_iter=0).fun0 == pytest.approx(record["fun0"], rel=1e-6)
    with pytest.raises(ValueError, match="search rows"):
        SearchSchedule(rows=0)


def test_the_validation_loss_of_a_loss_with_several_values_per_row_is_their_mean():
    # Regression: a loss returning [B, D] was trained on as its mean but validated as sum / B (D times larger).
    torch.manual_seed(0)
    model = MoE(make_experts(4, 3, [4], 2), TopK(num_experts=4, k=2, input_dim=3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(37, 3, generator=g), torch.randn(37, 2, generator=g)
    xv, yv = torch.randn(11, 3, generator=g), torch.randn(11, 2, generator=g)
    result = fit(model, (x, y), lambda p, t: (p - t) ** 2, val_data=(xv, yv), epochs=1, batch_size=5, progress=False)
    with torch.no_grad():
        expected = float(((model(xv).output - yv) ** 2).mean())
    assert result.history.val_loss[0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("first,second", [
    (SearchSchedule(), None),
    (None, SearchSchedule()),
    (SearchSchedule(method="swap"), SearchSchedule(method="insertion")),
    (SearchSchedule(every_epochs=1), SearchSchedule(every_steps=2)),
    (SearchSchedule(options={"max_iter": 5}), SearchSchedule(options={"max_iter": 50})),
])
def test_resuming_with_another_search_warns(task, tmp_path, first, second):
    # Regression: a resumed run silently searched otherwise (or not at all) than the run it continues.
    train, val = task
    kwargs = dict(val_data=val, batch_size=32, progress=False, checkpoint_dir=tmp_path)
    fit(build(), train, mse_loss, epochs=1, search=first, **kwargs)
    with pytest.warns(UserWarning, match=r"resuming with search=.* but the checkpoint was written with search="):
        fit(build(), train, mse_loss, epochs=2, search=second, resume=True, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same search resumes without a word
        fit(build(), train, mse_loss, epochs=3, search=second, resume=True, **kwargs)


def test_resuming_with_restore_best_after_a_run_that_kept_no_best_weights_warns(task, tmp_path):
    # Regression: the resumed run reported best_epoch from the checkpoint but silently ended with the last
    # epoch's weights (the original run kept no best weights to restore).
    train, val = task
    kwargs = dict(val_data=val, batch_size=32, progress=False, checkpoint_dir=tmp_path)
    fit(build(), train, mse_loss, epochs=1, **kwargs)
    with pytest.warns(UserWarning, match=r"resuming with restore_best=True but the checkpoint was written with restore_best=False"):
        fit(build(), train, mse_loss, epochs=2, restore_best=True, resume=True, **kwargs)


@pytest.mark.parametrize("metric", [lambda p, t: None, lambda p, t: torch.zeros(p.shape[0]), lambda p, t: "good"])
def test_a_metric_that_returns_no_single_number_is_named(task, metric):
    # Regression: float() of the value raised "only one element tensors can be converted..." naming no metric.
    train, val = task
    with pytest.raises(TypeError, match=r"metrics\['mine'\] returned .*; a metric returns one number"):
        fit(build(), train, mse_loss, val_data=val, epochs=1, progress=False, metrics={"mine": metric})


def test_search_data_without_a_search_is_refused(task):
    # Regression: search_data was ignored without a word when search=None (no search ran).
    train, val = task
    with pytest.raises(ValueError, match=r"search_data is used only by a search; pass search=SearchSchedule"):
        fit(build(), train, mse_loss, search_data=val, epochs=1, progress=False)


def test_a_loss_cut_off_from_the_model_is_named(task):
    # Regression: torch's "element 0 of tensors does not require grad and does not have a grad_fn" said nothing
    # about the loss.
    train, _ = task
    with pytest.raises(ValueError, match=r"the training loss does not depend on the model's parameters"):
        fit(build(), train, lambda p, t: mse_loss(p.detach(), t), epochs=1, progress=False, gate_loss_weight=0.0)


def test_a_directory_where_the_checkpoint_file_goes_is_refused_before_training(task, tmp_path):
    # Regression: with overwrite=True the clash surfaced only when the first epoch's checkpoint was written.
    train, _ = task
    (tmp_path / "checkpoint.pt").mkdir()
    steps = []
    with pytest.raises(IsADirectoryError, match=r"checkpoint\.pt' is a directory"):
        fit(build(), train, mse_loss, epochs=1, progress=False, checkpoint_dir=tmp_path, overwrite=True,
            callbacks=[lambda event: steps.append(event.step)])
    assert steps == []
