"""Per-task metrics: the right task, scikit-learn's values, directions and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from routing_search.training.task_metrics import (
    TaskMetric,
    accuracy,
    log_loss,
    mae,
    metrics_for_tasks,
    mse,
    r2,
    roc_auc,
)


@pytest.fixture
def two_tasks():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 1, generator=g, dtype=torch.float64)
    labels = (torch.rand(50, generator=g, dtype=torch.float64) < torch.sigmoid(logits[:, 0])).to(torch.float64)
    reg = torch.randn(50, 1, generator=g, dtype=torch.float64)
    reg_t = reg[:, 0] + 0.3 * torch.randn(50, generator=g, dtype=torch.float64)
    return [logits, reg], [labels, reg_t]


def test_values_match_scikit_learn_on_the_chosen_task(two_tasks):
    preds, targets = two_tasks
    p0, t0 = preds[0][:, 0].numpy(), targets[0].numpy()
    p1, t1 = preds[1][:, 0].numpy(), targets[1].numpy()
    assert roc_auc(0)(preds, targets) == pytest.approx(skm.roc_auc_score(t0, p0))
    assert accuracy(0)(preds, targets) == pytest.approx(skm.accuracy_score(t0, p0 > 0))
    prob = 1 / (1 + np.exp(-p0))
    assert log_loss(0)(preds, targets) == pytest.approx(skm.log_loss(t0, prob))
    assert mse(1)(preds, targets) == pytest.approx(np.mean((p1 - t1) ** 2))
    assert mae(1)(preds, targets) == pytest.approx(np.mean(np.abs(p1 - t1)))
    assert r2(1)(preds, targets) == pytest.approx(skm.r2_score(t1, p1))


def test_task_selects_columns_of_matrices_and_none_takes_a_tensor():
    preds = torch.tensor([[0.0, 1.0], [1.0, 3.0], [2.0, 5.0]])
    targets = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    assert mse(0)(preds, targets) == 0.0
    assert mse(1)(preds, targets) == pytest.approx((0 + 4 + 16) / 3)
    assert mse()(preds[:, 0], targets[:, 0]) == 0.0
    # a single-task MultiGateMoE returns a one-element list: task=None reads it
    assert mse()([preds[:, :1]], [targets[:, 0]]) == 0.0


def test_multiclass_accuracy_auc_and_log_loss():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 1])
    assert accuracy()(logits, labels) == 0.75
    assert accuracy()(logits, labels.to(torch.float32)) == 0.75  # whole-valued floats are class indices
    probs = torch.softmax(logits.double(), dim=1).numpy()
    assert roc_auc()(logits, labels) == pytest.approx(skm.roc_auc_score(labels.numpy(), probs, multi_class="ovr"))
    assert log_loss()(logits, labels) == pytest.approx(skm.log_loss(labels.numpy(), probs))


def test_directions_and_modes():
    assert [m.mode for m in (roc_auc(), accuracy(), r2())] == ["max"] * 3
    assert [m.mode for m in (mse(), mae(), log_loss())] == ["min"] * 3
    assert isinstance(roc_auc(1), TaskMetric) and repr(roc_auc(1)) == "roc_auc(task=1)"


def test_accuracy_threshold_for_probabilities():
    probs = torch.tensor([0.2, 0.6, 0.4, 0.9])
    labels = torch.tensor([0.0, 1.0, 1.0, 1.0])
    assert accuracy(threshold=0.5)(probs, labels) == 0.75
    assert accuracy()(probs, labels) == 0.75  # every probability > 0: all predicted 1


def test_metrics_for_tasks_names_and_kinds():
    from routing_search.data import TaskSpec

    found = metrics_for_tasks([TaskSpec("watched", "binary"), TaskSpec("rating", "regression")])
    assert sorted(found) == ["rating/mse", "watched/accuracy", "watched/roc_auc"]
    assert found["rating/mse"].task == 1 and found["watched/roc_auc"].task == 0
    assert metrics_for_tasks(["multiclass"])["task0/accuracy"].task is None
    with pytest.raises(ValueError, match="kind 'ranking'"):
        metrics_for_tasks(["ranking"])


def test_clear_errors():
    preds = [torch.zeros(4), torch.zeros(4)]
    targets = [torch.zeros(4), torch.zeros(4)]
    with pytest.raises(ValueError, match="pass task="):
        mse()(preds, targets)
    with pytest.raises(ValueError, match="task=2 is out of range"):
        mse(2)(preds, targets)
    with pytest.raises(TypeError, match="task must be an integer"):
        mse("a")
    with pytest.raises(ValueError, match="binary targets must be 0 or 1"):
        roc_auc()(torch.zeros(3), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="whole numbers"):
        accuracy()(torch.zeros(2), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="predictions contain NaN"):
        mse()(torch.tensor([float("nan"), 0.0]), torch.zeros(2))
    with pytest.raises(ValueError, match="2 predictions for 3 targets"):
        mse()(torch.zeros(2), torch.zeros(3))
    with pytest.warns(Warning, match="one class"):
        assert np.isnan(roc_auc()(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])))
