"""Per-example losses against torch.nn.functional (reduction='none')."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from routing_search.losses import bce_with_logits_loss, cross_entropy_loss, mse_loss, multitask_loss


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_mse_per_example_matches_functional(gen):
    pred, target = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    out = mse_loss(pred, target)
    assert out.shape == (6,)
    torch.testing.assert_close(out, F.mse_loss(pred, target, reduction="none").mean(dim=1))


def test_column_prediction_against_flat_target(gen):
    pred, target = torch.randn(5, 1, generator=gen), torch.randn(5, generator=gen)
    torch.testing.assert_close(mse_loss(pred, target), (pred[:, 0] - target) ** 2)
    torch.testing.assert_close(mse_loss(pred[:, 0], target[:, None]), (pred[:, 0] - target) ** 2)
    labels = (target > 0).float()
    torch.testing.assert_close(
        bce_with_logits_loss(pred, labels), F.binary_cross_entropy_with_logits(pred[:, 0], labels, reduction="none")
    )


def test_shape_mismatch_is_an_error(gen):
    with pytest.raises(ValueError, match="does not match"):
        mse_loss(torch.zeros(4, 2), torch.zeros(4, 3))


def test_bce_per_example_matches_functional(gen):
    pred = torch.randn(7, 2, generator=gen)
    target = torch.randint(0, 2, (7, 2), generator=gen).float()
    expected = F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(dim=1)
    torch.testing.assert_close(bce_with_logits_loss(pred, target), expected)


def test_cross_entropy_indices_probabilities_and_float_labels(gen):
    logits = torch.randn(8, 4, generator=gen)
    labels = torch.randint(0, 4, (8,), generator=gen)
    expected = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(cross_entropy_loss(logits, labels), expected)
    torch.testing.assert_close(cross_entropy_loss(logits, labels.float()), expected)
    torch.testing.assert_close(cross_entropy_loss(logits, labels[:, None]), expected)
    probs = torch.softmax(torch.randn(8, 4, generator=gen), dim=1)
    torch.testing.assert_close(cross_entropy_loss(logits, probs), F.cross_entropy(logits, probs, reduction="none"))
    with pytest.raises(ValueError, match="whole numbers"):
        cross_entropy_loss(logits, labels.float() + 0.5)


def test_multitask_weighted_combination(gen):
    alpha = 0.3
    p1, p2 = torch.randn(6, 1, generator=gen), torch.randn(6, 1, generator=gen)
    targets = torch.stack([torch.randint(0, 2, (6,), generator=gen).float(), torch.randn(6, generator=gen)], dim=1)
    fn = multitask_loss(["bce", "mse"], [alpha, 1 - alpha])
    out = fn([p1, p2], targets)
    expected = alpha * F.binary_cross_entropy_with_logits(p1[:, 0], targets[:, 0], reduction="none") + (1 - alpha) * (
        p2[:, 0] - targets[:, 1]
    ) ** 2
    assert out.shape == (6,)
    torch.testing.assert_close(out, expected)
    # targets as a list, predictions as one [B, T] tensor
    torch.testing.assert_close(fn(torch.cat([p1, p2], dim=1), [targets[:, 0], targets[:, 1]]), expected)


def test_multitask_with_cross_entropy_task(gen):
    logits, reg = torch.randn(5, 3, generator=gen), torch.randn(5, 1, generator=gen)
    targets = torch.stack([torch.tensor([0.0, 2, 1, 1, 0]), torch.randn(5, generator=gen)], dim=1)
    out = multitask_loss(["cross_entropy", "mse"])([logits, reg], targets)
    expected = F.cross_entropy(logits, targets[:, 0].long(), reduction="none") + (reg[:, 0] - targets[:, 1]) ** 2
    torch.testing.assert_close(out, expected)


def test_multitask_bad_arguments():
    with pytest.raises(ValueError, match="'hinge'.*not a known loss"):
        multitask_loss(["mse", "hinge"])
    with pytest.raises(ValueError, match="one weight per task"):
        multitask_loss(["mse", "bce"], [1.0])
    with pytest.raises(TypeError):
        multitask_loss("mse")
    fn = multitask_loss(["mse", "mse"])
    with pytest.raises(ValueError, match="expected 2 predictions"):
        fn([torch.zeros(3, 1)], torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        fn([torch.zeros(3, 1), torch.zeros(3, 1)], torch.zeros(3, 3))


def test_mse_integer_prediction_does_not_truncate_float_target():
    # Regression: the target was cast to the prediction's integer dtype (1.5 -> 1): loss 0 instead of 0.25.
    out = mse_loss(torch.tensor([1, 2]), torch.tensor([1.5, 2.5]))
    torch.testing.assert_close(out, torch.tensor([0.25, 0.25]))


def test_empty_batch_with_output_units_and_predictions_without_units():
    # Regression: a [0, u] batch failed in reshape(0, -1) with an obscure message.
    assert mse_loss(torch.zeros(0, 3), torch.zeros(0, 3)).shape == (0,)
    assert bce_with_logits_loss(torch.zeros(0, 2), torch.zeros(0, 2)).shape == (0,)
    # Regression: [B, 0] predictions gave NaN losses silently.
    with pytest.raises(ValueError, match="no output units"):
        mse_loss(torch.zeros(2, 0), torch.zeros(2, 0))


def test_bce_refuses_targets_outside_unit_interval():
    # Regression: labels in {-1, 1} gave a finite, negative loss silently.
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        bce_with_logits_loss(torch.tensor([2.0, -2.0]), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        bce_with_logits_loss(torch.tensor([2.0, -2.0]), torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="floating-point logits"):
        bce_with_logits_loss(torch.tensor([2, -2]), torch.tensor([1.0, 0.0]))
    soft = torch.tensor([0.0, 0.3, 1.0])
    logits = torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(
        bce_with_logits_loss(logits, soft), F.binary_cross_entropy_with_logits(logits, soft, reduction="none")
    )


def test_cross_entropy_refuses_class_indices_out_of_range():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # Regression: -100 (torch's ignore_index) gave loss 0 silently; -1 and 2 raised obscure IndexErrors.
    for bad in (-100, -1, 2):
        with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
            cross_entropy_loss(logits, torch.tensor([0, bad]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
        cross_entropy_loss(logits, torch.tensor([0.0, -100.0]))
    with pytest.raises(TypeError, match="dtype torch.bool"):
        cross_entropy_loss(logits, torch.tensor([True, False]))
    with pytest.raises(TypeError, match="floating-point logits"):
        cross_entropy_loss(torch.tensor([[2, 0], [0, 1]]), torch.tensor([0, 1]))


def test_multitask_loss_refuses_non_finite_or_negative_weights():
    # Regression: a NaN weight made every loss NaN silently.
    for bad in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match=r"weights\[1\]"):
            multitask_loss(["mse", "bce"], [0.5, bad])
    with pytest.raises(TypeError, match=r"weights\[0\]"):
        multitask_loss(["mse"], ["a"])


def test_cross_entropy_refuses_probability_targets_off_the_simplex(gen):
    # Regression: negative, NaN or unnormalised probability targets gave a number (-sum t log p) silently;
    # a single-logit [B, 1] prediction with 0/1 float targets gave loss 0 for every row.
    logits = torch.randn(3, 4, generator=gen)
    probs = torch.softmax(torch.randn(3, 4, generator=gen), dim=1)
    torch.testing.assert_close(cross_entropy_loss(logits, probs), F.cross_entropy(logits, probs, reduction="none"))
    for bad in (torch.tensor([[2.0, -1.0, 0.0, 0.0]] * 3), torch.ones(3, 4), torch.full((3, 4), float("nan"))):
        with pytest.raises(ValueError, match="must be non-negative and sum to 1"):
            cross_entropy_loss(logits, bad)
    with pytest.raises(ValueError, match="must be non-negative and sum to 1"):
        cross_entropy_loss(torch.randn(3, 1, generator=gen), torch.tensor([[0.0], [1.0], [0.0]]))


def test_cross_entropy_accepts_any_integer_class_index_dtype(gen):
    # Regression: int32 class indices (e.g. from a numpy int32 array) failed inside F.cross_entropy with
    # "expected target dtype to be Long or Byte, but got Int".
    logits = torch.randn(4, 3, generator=gen)
    labels = torch.tensor([0, 2, 1, 2])
    expected = F.cross_entropy(logits, labels, reduction="none")
    for dtype in (torch.int32, torch.int16, torch.uint8, torch.int8):
        torch.testing.assert_close(cross_entropy_loss(logits, labels.to(dtype)), expected)
