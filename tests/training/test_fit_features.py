"""fit for real training: loaders, metrics, select_by, callbacks, gate reports and hardening, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from routing_search import DSelectK, MoE, MultiGateMoE, Softmax, TopK, make_experts
from routing_search.data import make_synthetic_moe
from routing_search.training import (
    FitEvent,
    SearchSchedule,
    fit,
    make_loader,
    mse_loss,
    multitask_loss,
    task_metrics,
)


def build(seed: int = 0, *, dropout: float = 0.0) -> MoE:
    torch.manual_seed(seed)
    experts = make_experts(4, 5, [8], 1, dropout=dropout) if dropout else [nn.Linear(5, 1) for _ in range(4)]
    return MoE(experts, TopK(4, k=2, input_dim=5))


@pytest.fixture(scope="module")
def task():
    data = make_synthetic_moe(num_samples=300, input_dim=5, num_experts=4, k=2, num_tasks=1, seed=3)
    train, val = data.split((2 / 3, 1 / 3))
    return (train.x, train.y), (val.x, val.y)


@pytest.fixture(scope="module")
def two_task():
    data = make_synthetic_moe(num_samples=240, input_dim=5, num_experts=4, k=2, num_tasks=2, seed=5)
    train, val = data.split((0.75, 0.25))
    return ({"x": train.x}, list(train.y.unbind(1))), ({"x": val.x}, list(val.y.unbind(1)))


def build_two(seed: int = 0) -> MultiGateMoE:
    torch.manual_seed(seed)
    return MultiGateMoE([nn.Linear(5, 1) for _ in range(4)], [Softmax(4, input_dim=5), TopK(4, k=2, input_dim=5)])


class PairDataset(Dataset):
    """Items ({'x': row}, [target of task 0, target of task 1]), like a user's multi-task dataset."""

    def __init__(self, pair):
        self.inputs, self.targets = pair

    def __len__(self):
        return self.inputs["x"].shape[0]

    def __getitem__(self, i):
        return {"x": self.inputs["x"][i]}, [t[i] for t in self.targets]


def states_equal(a: nn.Module, b: nn.Module) -> None:
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), key


# ------------------------------------------------------------------------------------------ data forms
@pytest.mark.parametrize("form", ["dataset", "loader"])
def test_dataset_and_loader_equal_tensor_pairs(task, form):
    train, val = task
    kwargs = dict(epochs=3, batch_size=32, seed=11, progress=False, search=SearchSchedule(every_steps=4, rounds=3))
    reference = fit(build(dropout=0.2), train, mse_loss, val_data=val, **kwargs)
    dataset = TensorDataset(*train)
    data = dataset if form == "dataset" else make_loader(dataset, batch_size=32, seed=11)
    val_form = TensorDataset(*val) if form == "dataset" else make_loader(TensorDataset(*val), batch_size=32, shuffle=False)
    got = fit(build(dropout=0.2), data, mse_loss, val_data=val_form, **kwargs)
    states_equal(reference.model, got.model)
    assert got.history.step_loss == reference.history.step_loss
    assert got.history.val_loss == reference.history.val_loss
    assert [s["moves"] for s in got.history.searches] == [s["moves"] for s in reference.history.searches]


def test_multitask_dataset_with_dict_inputs_equals_tensors(two_task):
    train, val = two_task
    loss = multitask_loss(["mse", "mse"])
    kwargs = dict(epochs=2, batch_size=40, seed=2, progress=False)
    reference = fit(build_two(), train, loss, val_data=val, **kwargs)
    got = fit(build_two(), PairDataset(train), loss, val_data=PairDataset(val), **kwargs)
    states_equal(reference.model, got.model)
    assert got.history.step_loss == reference.history.step_loss


def test_loader_batches_must_be_pairs(task):
    train, _ = task
    loader = torch.utils.data.DataLoader(TensorDataset(train[0], train[1], train[1]), batch_size=32)
    with pytest.raises(TypeError, match="train_data: every batch must be a pair"):
        fit(build(), loader, mse_loss, epochs=1, progress=False)


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_are_computed_on_the_whole_validation_set(two_task):
    train, val = two_task
    seen = []

    def spy(predictions, targets):
        seen.append((predictions, targets))
        return float(len(predictions))

    metrics = {"mse0": task_metrics.mse(0), "mse1": task_metrics.mse(1), "spy": spy}
    result = fit(build_two(), train, multitask_loss(["mse", "mse"]), val_data=val, epochs=2, batch_size=16,
                 metrics=metrics, select_by="mse1", progress=False)
    h = result.history
    assert [sorted(m) for m in h.metrics] == [["mse0", "mse1", "spy"]] * 2
    predictions, targets = seen[-1]
    assert isinstance(predictions, list) and len(predictions) == 2  # a list per task, concatenated over batches
    assert predictions[0].shape[0] == val[0]["x"].shape[0] and torch.equal(targets[1], val[1][1])
    with torch.no_grad():
        result.model.eval()
        direct = result.model(**val[0]).outputs
    assert h.metrics[-1]["mse1"] == pytest.approx(float(((direct[1][:, 0] - val[1][1]) ** 2).mean()), rel=1e-5)
    # select_by with a task metric restores its best epoch
    best = min(range(2), key=lambda e: h.metrics[e]["mse1"])
    assert result.best_epoch == best and result.best_score == h.metrics[best]["mse1"] and result.select_mode == "min"


class Scripted:
    """A metric returning scripted values, one per call."""

    def __init__(self, values):
        self.values = list(values)

    def __call__(self, predictions, targets):
        return self.values.pop(0)


@pytest.mark.parametrize("mode,best", [("max", 1), ("min", 2)])
def test_select_by_metric_restores_that_epoch(task, mode, best):
    train, val = task
    kwargs = dict(val_data=val, batch_size=32, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), progress=False)
    result = fit(build(), train, mse_loss, epochs=4, metrics={"score": Scripted([0.2, 0.9, 0.1, 0.5])},
                 select_by="score", select_mode=mode, **kwargs)
    assert result.best_epoch == best and result.restored_best
    reference = fit(build(), train, mse_loss, epochs=best + 1, **kwargs)
    states_equal(result.model, reference.model)
    assert result.history.metric("score") == [0.2, 0.9, 0.1, 0.5]


def test_select_by_errors(task):
    train, val = task
    with pytest.raises(ValueError, match="select_mode is needed"):
        fit(build(), train, mse_loss, val_data=val, metrics={"s": lambda p, t: 0.0}, select_by="s", progress=False)
    with pytest.raises(ValueError, match="neither 'val_loss' nor a key of metrics"):
        fit(build(), train, mse_loss, val_data=val, select_by="auc", progress=False)
    with pytest.raises(ValueError, match="select_mode must be one of"):
        fit(build(), train, mse_loss, val_data=val, select_mode="up", progress=False)
    with pytest.raises(ValueError, match="metrics need val_data"):
        fit(build(), train, mse_loss, metrics={"m": task_metrics.mse()}, progress=False)
    with pytest.raises(TypeError, match=r"metrics\['m'\] must be callable"):
        fit(build(), train, mse_loss, val_data=val, metrics={"m": 3}, progress=False)


def test_early_stopping_follows_the_selected_metric(task):
    train, val = task
    result = fit(build(), train, mse_loss, val_data=val, epochs=10, batch_size=32, early_stopping_patience=2,
                 metrics={"score": Scripted([0.5, 0.7, 0.6, 0.6, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0])},
                 select_by="score", select_mode="max", progress=False)
    assert result.stopped_early and result.stop_reason == "early_stopping"
    assert result.epochs_run == 4 and result.best_epoch == 1


# -------------------------------------------------------------------------------------------- callbacks
def test_callbacks_see_events_and_can_stop(task, tmp_path):
    train, val = task
    events: list[tuple[str, int]] = []

    class Recorder:
        def on_epoch_end(self, event: FitEvent) -> None:
            events.append((event.kind, event.epoch))
            assert event.val_loss == event.history.val_loss[-1]
            if event.epoch == 1:
                event.request_stop("enough")

        def on_search(self, event: FitEvent) -> None:
            events.append((event.kind, event.epoch))
            assert event.search is event.history.searches[-1]

    result = fit(build(), train, mse_loss, val_data=val, epochs=5, batch_size=32, search=SearchSchedule(every_epochs=1),
                 callbacks=[Recorder()], checkpoint_dir=tmp_path, progress=False)
    assert events == [("search", 0), ("epoch_end", 0), ("search", 1), ("epoch_end", 1)]
    assert result.epochs_run == 2 and result.stop_reason == "callback: enough" and not result.stopped_early
    # the stopping epoch was checkpointed: a resume continues from epoch 2
    resumed = fit(build(), train, mse_loss, val_data=val, epochs=3, batch_size=32, search=SearchSchedule(every_epochs=1),
                  checkpoint_dir=tmp_path, resume=True, progress=False)
    assert resumed.history.epoch == [0, 1, 2]


def test_callable_callback_stops_after_a_search_inside_an_epoch(task):
    train, val = task
    calls = []

    def stop_after_first_search(event):
        calls.append(event.kind)
        return event.kind == "search"

    result = fit(build(), train, mse_loss, val_data=val, epochs=3, batch_size=32, search=SearchSchedule(every_steps=2),
                 callbacks=stop_after_first_search, progress=False)
    assert calls == ["search", "epoch_end"]
    assert len(result.history.step_loss) == 2 and result.epochs_run == 1
    assert result.stop_reason.startswith("callback")
    with pytest.raises(TypeError, match=r"callbacks\[0\]"):
        fit(build(), train, mse_loss, callbacks=[3], progress=False)


# ---------------------------------------------------------------------------------------- search inputs
class Keyworded(nn.Module):
    """A model whose inputs are not called x."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.moe = MoE([nn.Linear(5, 1) for _ in range(4)], TopK(4, k=2, input_dim=5))

    def forward(self, features, weight_scale):
        return self.moe(features * weight_scale).output


def test_search_with_any_keyword_names(task):
    (x, y), (xv, yv) = task
    scale = torch.ones(x.shape[0], 1)
    result = fit(Keyworded(), ({"features": x, "weight_scale": scale}, y), mse_loss,
                 val_data=({"features": xv, "weight_scale": torch.ones(xv.shape[0], 1)}, yv),
                 epochs=2, batch_size=32, search=SearchSchedule(rows=50), progress=False)
    assert len(result.history.searches) == 2


# -------------------------------------------------------------------------------------- NaN and errors
def test_non_finite_loss_fails_naming_the_step(task):
    train, val = task

    calls = []

    def exploding(pred, target):
        calls.append(1)
        return mse_loss(pred, target) * (float("nan") if len(calls) == 3 else 1.0)

    model = build()
    with pytest.raises(FloatingPointError, match=r"training loss is nan at epoch 0, step 3"):
        fit(model, train, exploding, epochs=2, batch_size=32, progress=False)


def test_non_finite_targets_fail_clearly(task):
    (x, y), (xv, yv) = task
    bad = y.clone()
    bad[5] = float("inf")
    with pytest.raises(ValueError, match="train_data: targets contain 1 NaN/inf"):
        fit(build(), (x, bad), mse_loss, progress=False)
    with pytest.raises(ValueError, match="val_data: targets contain"):
        fit(build(), (x, y), mse_loss, val_data=(xv, torch.full_like(yv, float("nan"))), progress=False)
    loader = make_loader(TensorDataset(x, bad), batch_size=32, shuffle=False)
    with pytest.raises(ValueError, match=r"train_data \(epoch 0, step 1\)"):
        fit(build(), loader, mse_loss, progress=False)


def test_arguments_are_named_in_errors(task):
    train, _ = task
    with pytest.raises(TypeError, match="seed must be an integer"):
        fit(build(), train, mse_loss, seed="1", progress=False)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        fit(build(), train, mse_loss, seed=-1, progress=False)
    with pytest.raises(ValueError, match="device must be None, 'cpu', 'cuda'"):
        fit(build(), train, mse_loss, device="gpu0", progress=False)
    with pytest.raises(TypeError, match="SearchSchedule.rng"):
        SearchSchedule(rng="abc")
    with pytest.raises(TypeError, match="search must be None, a SearchSchedule or a LocalSearcher"):
        fit(build(), train, mse_loss, search="swap", progress=False)
    with pytest.raises(TypeError, match="harden must be True or False"):
        fit(build(), train, mse_loss, harden="yes", progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_names_device(task):
    train, _ = task
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"device='cuda' was requested but CUDA is not available"):
        fit(model, train, mse_loss, device="cuda", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------- gates and hardening
def build_dselect(static: bool = True, anneal: object = None) -> MoE:
    """A DSelect-k MoE; ``anneal=None`` (fixed gamma) keeps it soft through a short run."""
    torch.manual_seed(0)
    gate = DSelectK(4, 2, None if static else 5) if anneal == "default" else DSelectK(4, 2, None if static else 5, anneal=anneal)
    return MoE([nn.Linear(5, 1) for _ in range(4)], gate)


@pytest.mark.parametrize("static", [True, False])
def test_gate_report_warning_and_harden(task, static):
    train, val = task
    kwargs = dict(val_data=val, epochs=2, batch_size=32, progress=False)
    with pytest.warns(RuntimeWarning, match="non-binary selector gate"):
        plain = fit(build_dselect(static), train, mse_loss, **kwargs)
    (entry,) = plain.history.gates[-1].values()
    assert list(plain.history.gates[-1]) == ["gate"] and len(plain.history.gates) == 2
    assert entry["kind"] == "DSelectK" and entry["k"] == 2 and not entry["binary"]
    assert entry["rows"] == (1 if static else val[0].shape[0])
    assert entry["experts_per_row"] > 2  # still dense: mixes more than k experts

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        hardened = fit(build_dselect(static), train, mse_loss, harden=True, **kwargs)
    cert = hardened.certificate
    assert cert is not None and cert.num_gates == 1 and not cert.is_binary
    assert cert.after.is_binary and cert.after.agree and cert.after.max_support_size <= 2
    assert hardened.hardened_val_loss is not None and math.isfinite(hardened.hardened_val_loss)
    with torch.no_grad():
        hardened.model.eval()
        weights = hardened.model(val[0]).weights
    assert int((weights != 0).sum(dim=1).max()) <= 2


def test_default_static_gate_ends_binary_within_a_short_fit_without_warning(task):
    # The default BudgetAnnealing is fitted to fit's budget, so 8 epochs (56 steps) are enough to end binary
    # (with the old call-count default, annealing began at call 500 and the gate stayed dense).
    train, val = task
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = fit(build_dselect(True, anneal="default"), train, mse_loss, val_data=val, epochs=8, batch_size=32,
                     progress=False)
    (entry,) = result.history.gates[-1].values()
    assert entry["binary"] and entry["experts_per_row"] <= 2


def test_default_per_example_gate_is_fractional_only_on_boundary_rows(task):
    # A per-example code is a linear function of x, so rows within gamma/2 of a decision boundary stay
    # fractional; everything else is binary, and the warning says how many rows use more than k experts.
    train, val = task
    with pytest.warns(RuntimeWarning, match=r"gate: \d+ of 100 rows use more than k=2 experts"):
        result = fit(build_dselect(False, anneal="default"), train, mse_loss, val_data=val, epochs=8, batch_size=32,
                     progress=False)
    (entry,) = result.history.gates[-1].values()
    assert entry["fraction_fractional"] < 0.02 and entry["experts_per_row"] <= 2


def test_no_warning_for_gates_without_selectors(task):
    train, val = task
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = fit(build(), train, mse_loss, val_data=val, epochs=1, progress=False, harden=True)
    assert result.history.gates == [{}] and result.certificate.num_gates == 0


# ------------------------------------------------------------------------------------------ checkpoints
def test_resume_is_exact_with_loaders_and_metrics(task, tmp_path):
    train, val = task
    loader = lambda: make_loader(TensorDataset(*train), batch_size=32, seed=5)  # noqa: E731
    kwargs = dict(val_data=TensorDataset(*val), batch_size=32, progress=False,
                  search=SearchSchedule(every_steps=3, method="ils", options={"perturbations": 2}),
                  metrics={"mse": task_metrics.mse(), "r2": task_metrics.r2()}, select_by="r2", restore_best=False)
    full = fit(build(dropout=0.3), loader(), mse_loss, epochs=4, checkpoint_dir=tmp_path / "full", **kwargs)
    fit(build(dropout=0.3), loader(), mse_loss, epochs=2, checkpoint_dir=tmp_path / "part", **kwargs)
    torch.manual_seed(999)
    resumed = fit(build(seed=4, dropout=0.3), loader(), mse_loss, epochs=4, checkpoint_dir=tmp_path / "part", resume=True, **kwargs)
    states_equal(full.model, resumed.model)
    a, b = full.history, resumed.history
    assert a.step_loss == b.step_loss and a.val_loss == b.val_loss and a.metrics == b.metrics
    assert [s["moves"] for s in a.searches] == [s["moves"] for s in b.searches]
    assert (full.best_epoch, full.best_score) == (resumed.best_epoch, resumed.best_score)


def test_resume_with_another_optimizer_class_is_refused_before_loading(task, tmp_path):
    train, val = task
    fit(build(), train, mse_loss, val_data=val, epochs=1, batch_size=64, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    before = path.read_bytes()
    model = build(seed=8)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception, match=r"written with optimizer torch\.optim\.adam\.Adam but this run uses torch\.optim\.sgd\.SGD") as info:
        fit(model, train, mse_loss, epochs=2, batch_size=64, checkpoint_dir=tmp_path, resume=True,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1), progress=False)
    assert type(info.value).__name__ == "CheckpointError"
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert path.read_bytes() == before


def test_checkpoint_dir_that_is_a_file_fails_before_training(task, tmp_path):
    train, _ = task
    not_a_dir = tmp_path / "runs"
    not_a_dir.write_text("notes")
    model = build()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotADirectoryError, match="checkpoint_dir=.*is an existing file"):
        fit(model, train, mse_loss, epochs=1, checkpoint_dir=not_a_dir, progress=False)
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        fit(model, train, mse_loss, epochs=1, checkpoint_dir=not_a_dir / "sub", progress=False)
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert not_a_dir.read_text() == "notes"


def test_fit_checkpoints_are_readable_by_teammates(task, tmp_path):
    import os

    train, _ = task
    old = os.umask(0o022)
    try:
        result = fit(build(), train, mse_loss, epochs=1, checkpoint_dir=tmp_path, progress=False)
    finally:
        os.umask(old)
    assert (result.checkpoint_path.stat().st_mode & 0o777) == 0o644


def test_checkpoints_of_the_previous_format_still_resume(task, tmp_path):
    """A version-1 checkpoint (no checksum, no optimiser class, no data generators, loss-only selection)."""
    from routing_search.training import load_checkpoint

    train, val = task
    kwargs = dict(val_data=val, batch_size=32, progress=False, early_stopping_patience=5)
    full = fit(build(), train, mse_loss, epochs=3, checkpoint_dir=tmp_path / "full", **kwargs)
    part = fit(build(), train, mse_loss, epochs=2, checkpoint_dir=tmp_path / "part", **kwargs)
    state = dict(load_checkpoint(part.checkpoint_path))
    for key in ("checksum", "optimizer_class"):
        del state[key]
    del state["rng"]["data"]
    selection = state["early_stopping"]
    state["early_stopping"] = {k: selection[k] for k in ("best_val", "bad_epochs", "best_state")}
    state["history"] = {k: v for k, v in state["history"].items() if k not in ("metrics", "gates")}
    state["config"] = {k: state["config"][k] for k in ("batch_size", "seed", "gate_loss_weight")}
    state["version"] = 1
    torch.save(state, part.checkpoint_path)
    resumed = fit(build(), train, mse_loss, epochs=3, checkpoint_dir=tmp_path / "part", resume=True, **kwargs)
    states_equal(full.model, resumed.model)
    assert resumed.history.step_loss == full.history.step_loss
    assert len(resumed.history.metrics) == len(resumed.history.gates) == len(resumed.history.epoch) == 3


def test_a_last_batch_of_one_row_that_batchnorm_cannot_take_is_explained():
    # Regression: torch's "Expected more than 1 value per channel when training" named neither the batch nor the fix.
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)) for _ in range(4)]
    model = MoE(experts, Softmax(num_experts=4, input_dim=3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(33, 3, generator=g), torch.randn(33, 2, generator=g)
    with pytest.raises(ValueError, match=r"epoch 0, step 2 holds a single row \(the last, partial batch: 33 rows, "
                                         r"batch_size=32\), and the model's BatchNorm \('experts\.0\.1'\)"):
        fit(model, (x, y), mse_loss, epochs=1, batch_size=32, progress=False)
    fit(model, (x, y), mse_loss, epochs=1, batch_size=31, progress=False)  # a last batch of 2 rows trains


class _OwnSearcher:
    """A user's searcher (the Searcher protocol) whose step returns ``result``."""

    def __init__(self, result):
        self.log, self.result = [], result

    def due(self, step):
        return step % 2 == 0

    def step(self, step, data):
        return self.result

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        return None


def test_a_users_searcher_may_return_none_and_a_result_without_the_fields_is_named():
    # Regression: fit read result.fun0 at once: AttributeError 'NoneType' object has no attribute 'fun0' (the
    # protocol allows None) and a bare AttributeError 'fun0' for a result without it.
    from scipy.optimize import OptimizeResult

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 5, generator=g), torch.randn(20, 1, generator=g)
    result = fit(build(), (x, y), mse_loss, val_data=(x, y), epochs=1, batch_size=4, progress=False, search=_OwnSearcher(None))
    assert result.history.searches == [] and result.epochs_run == 1
    partial = OptimizeResult(x=[], fun=1.0, nit=0, nfev=1, status=0, success=True, message="")
    with pytest.raises(TypeError, match=r"step returned OptimizeResult without fun0; .* must return None \(no search\) or a result"):
        fit(build(), (x, y), mse_loss, val_data=(x, y), epochs=1, batch_size=4, progress=False, search=_OwnSearcher(partial))


def test_the_search_before_training_counts_in_the_first_epochs_search_time():
    # Regression: SearchSchedule(at_start=True)'s search was recorded in History.searches but its time was in no
    # per-epoch list, so search_share() (and the demo's "search Xs of Ys") left out the most expensive search.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, 1, generator=g)
    result = fit(build(), (x, y), mse_loss, val_data=(x, y), epochs=2, batch_size=16, progress=False,
                 search=SearchSchedule(every_steps=1000, at_start=True))
    h = result.history
    assert [(s["epoch"], s["step"]) for s in h.searches] == [(0, 0)]
    assert h.search_seconds[0] >= h.searches[0]["seconds"] > 0 and h.search_seconds[1] == 0.0
    assert h.epoch_seconds[0] >= h.search_seconds[0] + h.train_seconds[0] and h.search_share() > 0


def test_empty_training_or_validation_datasets_are_refused():
    # Regression: an empty Dataset / DataLoader "trained" every epoch with no step (train_loss NaN, no word), and
    # an empty validation Dataset ended in "the validation loss is nan".
    from torch.utils.data import DataLoader, IterableDataset

    class Nothing(IterableDataset):
        def __iter__(self):
            return iter([])

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 5, generator=g), torch.randn(20, 1, generator=g)
    empty = TensorDataset(x[:0], y[:0])
    for train in (empty, DataLoader(empty, batch_size=4)):
        with pytest.raises(ValueError, match=r"train_data holds no rows \(an empty Dataset or DataLoader\)"):
            fit(build(), train, mse_loss, val_data=(x, y), epochs=2, progress=False)
    with pytest.raises(ValueError, match=r"train_data yielded no batch in epoch 0"):
        fit(build(), Nothing(), mse_loss, val_data=(x, y), epochs=2, progress=False)
    with pytest.raises(ValueError, match=r"val_data yielded no rows \(an empty Dataset or DataLoader\)"):
        fit(build(), (x, y), mse_loss, val_data=empty, epochs=2, progress=False)


def test_usage_of_token_shaped_input_is_one_value_per_expert_over_all_tokens():
    # Regression: weights [batch, tokens, n] were summed over the batch only, so History.usage held one list per
    # token position ([tokens][n]) instead of one value per expert.
    torch.manual_seed(0)
    model = MoE(make_experts(4, 3, [4], 2), TopK(num_experts=4, k=2, input_dim=3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 5, 3, generator=g), torch.randn(20, 5, 2, generator=g)
    result = fit(model, (x, y), mse_loss, val_data=(x, y), epochs=1, batch_size=8, progress=False)
    (usage,) = result.history.usage[-1][""]
    with torch.no_grad():
        weights = model.eval()(x).weights.reshape(-1, 4).to(torch.float64)
    assert usage["soft"] == pytest.approx(weights.mean(0).tolist(), rel=1e-9)
    assert usage["hard"] == pytest.approx((weights != 0).to(torch.float64).mean(0).tolist(), rel=1e-12)
