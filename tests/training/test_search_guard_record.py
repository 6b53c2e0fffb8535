"""Every search fit runs records its guard report (each guard's value at the search's start and end), taken
from the search result itself, in ``History.searches`` and in ``LocalSearcher.log``; plain values only."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import torch
from scipy.optimize import OptimizeResult

from routing_search import MultiGateMoE, make_experts
from routing_search.gates import DSelectK, TopK
from routing_search.losses import multitask_loss
from routing_search.result import make_result
from routing_search.search import MetricGuard
from routing_search.search.codes import set_selector_slot
from routing_search.search.refit import RefitOptions
from routing_search.training import LocalSearcher, SearchSchedule, fit
from routing_search.training.searcher import guard_record

LOSS = multitask_loss(["mse"] * 3)


def _data(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, generator=g)
    y = torch.stack([torch.sin(x[:, 0] * (t + 1)) + x[:, t] for t in range(3)], dim=1)
    return x, y


TRAIN, VAL = _data(160, 1), _data(60, 2)
KW: dict[str, Any] = dict(val_data=VAL, batch_size=40, progress=False, gate_loss_weight=0.0,
                          optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))


def _topk_model() -> MultiGateMoE:
    torch.manual_seed(0)
    return MultiGateMoE(make_experts(4, 3, [6], 1, generator=torch.Generator().manual_seed(0)), [TopK(4, 1, 3) for _ in range(3)])


def _task_mse(task: int) -> MetricGuard:
    def metric(preds: Any, targets: Any) -> float:
        return float(((preds[task].reshape(-1) - targets[:, task]) ** 2).mean())

    return MetricGuard(metric, greater_is_better=False, tolerance=1e-3, name=f"task{task}/mse")


def _opposed() -> MetricGuard:  # higher when the loss is higher: refuses every improving move
    return MetricGuard(lambda p, t: float(LOSS(p, t).mean()), name="opposed")


class _Recording:
    """A searcher that keeps every result of the LocalSearcher it wraps (the Searcher protocol)."""

    def __init__(self, inner: LocalSearcher) -> None:
        self.inner = inner
        self.results: list[OptimizeResult] = []

    @property
    def log(self) -> list[dict[str, Any]]:
        return self.inner.log

    def due(self, step: int) -> bool:
        return self.inner.due(step)

    def step(self, step: int, data: Any) -> OptimizeResult | None:
        result = self.inner.step(step, data)
        if result is not None:
            self.results.append(result)
        return result

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def _assert_record_is_the_result(record: dict[str, Any] | None, result: OptimizeResult) -> None:
    assert record is not None and result.guard is not None
    assert set(record) == set(result.guard)
    for name, entry in result.guard.items():
        assert record[name]["start"] == entry["start"] and record[name]["end"] == entry["end"]
        assert record[name]["tolerance"] == entry["tolerance"]
        assert record[name]["greater_is_better"] is entry["greater_is_better"]


def test_each_search_in_fit_records_the_guard_values_of_its_result() -> None:
    model = _topk_model()
    guards = [_task_mse(t) for t in range(3)] + [_opposed()]
    searcher = _Recording(LocalSearcher(model, LOSS, every=2, rng=0, guard=guards))
    history = fit(model, TRAIN, LOSS, epochs=1, search=searcher, **KW).history
    assert len(history.searches) == len(searcher.results) == len(searcher.log) == 2
    for record, entry, result in zip(history.searches, searcher.log, searcher.results):
        _assert_record_is_the_result(record["guard"], result)
        assert entry["guard"] == record["guard"]  # the searcher's own log says the same
        assert set(record["guard"]) == {"task0/mse", "task1/mse", "task2/mse", "opposed"}
    assert sum(r["guard_rejections"] for r in history.searches) > 0  # the guards really judged moves
    json.dumps(history.to_dict())  # plain values (History is saved in checkpoints and reports)


def test_guard_record_comes_with_the_search_event() -> None:
    events: list[dict[str, Any]] = []

    class Spy:
        def on_search(self, event: Any) -> None:
            events.append(event.search)

    schedule = SearchSchedule(every_epochs=1, options={"guard": _task_mse(0)})
    history = fit(_topk_model(), TRAIN, LOSS, epochs=2, search=schedule, callbacks=[Spy()], **KW).history
    assert len(events) == len(history.searches) == 2
    assert [e["guard"] for e in events] == [s["guard"] for s in history.searches]
    assert all(set(e["guard"]) == {"task0/mse"} for e in events)


def test_an_unguarded_search_records_none() -> None:
    model = _topk_model()
    searcher = LocalSearcher(model, LOSS, every=2, rng=0)
    history = fit(model, TRAIN, LOSS, epochs=1, search=searcher, **KW).history
    assert history.searches and all(s["guard"] is None for s in history.searches)
    assert all(entry["guard"] is None for entry in searcher.log)


def test_refit_search_records_the_first_stage_start_and_the_refit_end() -> None:
    torch.manual_seed(0)
    gates = [DSelectK(4, 1) for _ in range(3)]
    for g in gates:
        set_selector_slot(g, 0, 0)
    model = MultiGateMoE(make_experts(4, 3, [6], 1, generator=torch.Generator().manual_seed(0)), gates)
    searcher = LocalSearcher(model, LOSS, refit=RefitOptions(max_iter=3), fit_data=TRAIN, rng=0, guard=_task_mse(1))
    result = searcher(VAL)
    (entry,) = searcher.log
    first, second = result.stages["search"].guard["task1/mse"], result.stages["refit"].guard["task1/mse"]
    assert entry["guard"]["task1/mse"]["start"] == first["start"] == second["start"]
    assert entry["guard"]["task1/mse"]["end"] == second["end"]
    buffer = io.BytesIO()  # the log is saved with checkpoints: plain values load with weights_only
    torch.save(searcher.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["log"][0]["guard"] == entry["guard"]


def test_guard_record_rejects_a_malformed_report() -> None:
    with pytest.raises(TypeError, match="result.guard must be None or a dict"):
        guard_record(make_result(x=[0], fun=0.0, nit=0, nfev=1, status=0, message="", guard=[1.0, 2.0]))
