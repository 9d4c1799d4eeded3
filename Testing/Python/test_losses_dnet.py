"""D-Net loss: nnU-Net deep-supervision weights, target downsampling, Dice + CE values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from MedSegSuiteLib.training.losses.dnet import (
    DNetLoss,
    deep_supervision_weights,
    dice_ce_loss,
    downsample_labels,
    soft_dice,
)


def test_deep_supervision_weights_halve_per_level_drop_the_lowest_and_sum_to_one():
    weights = deep_supervision_weights(5)
    assert weights == pytest.approx([1 / 1.875, 0.5 / 1.875, 0.25 / 1.875, 0.125 / 1.875, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3, exclude_lowest=False) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_downsample_labels_picks_nearest_voxels_and_keeps_integer_labels():
    labels = torch.arange(4 * 4 * 4).reshape(1, 1, 4, 4, 4)
    small = downsample_labels(labels, (2, 2, 2))
    assert small.shape == (1, 2, 2, 2) and small.dtype == torch.int64
    assert set(small.flatten().tolist()) <= set(labels.flatten().tolist())
    assert torch.equal(downsample_labels(labels[:, 0], (4, 4, 4)), labels[:, 0])
    blocks = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    blocks[:, 4:, :4, 4:] = 2
    assert downsample_labels(blocks, (2, 2, 2))[0, 1, 0, 1] == 2 and downsample_labels(blocks, (2, 2, 2)).sum() == 2


def test_dice_ce_is_near_zero_for_a_confident_correct_prediction_and_large_otherwise():
    labels = torch.randint(0, 3, (2, 6, 6, 6))
    perfect = 20.0 * F.one_hot(labels, 3).movedim(-1, 1).float()
    assert dice_ce_loss(perfect, labels) < 1e-3
    wrong = 20.0 * F.one_hot((labels + 1) % 3, 3).movedim(-1, 1).float()
    assert dice_ce_loss(wrong, labels) > 10
    assert soft_dice(perfect, labels) == pytest.approx(1.0, abs=1e-4)
    assert soft_dice(wrong, labels) == pytest.approx(0.0, abs=1e-4)


def test_dice_ce_equals_cross_entropy_plus_one_minus_foreground_dice():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6)
    labels = torch.randint(0, 3, (2, 4, 5, 6))
    probs = logits.softmax(1)
    onehot = F.one_hot(labels, 3).movedim(-1, 1).float()
    inter = (probs * onehot).sum((2, 3, 4))[:, 1:]
    denom = (probs.sum((2, 3, 4)) + onehot.sum((2, 3, 4)))[:, 1:]
    expected = F.cross_entropy(logits, labels) + 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()
    torch.testing.assert_close(dice_ce_loss(logits, labels), expected)


def test_deep_supervision_loss_is_the_weighted_sum_and_ignores_the_lowest_level():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (2, 16, 16, 16))
    outs = [torch.randn(2, 2, 16 // s, 16 // s, 16 // s, requires_grad=True) for s in (1, 2, 4, 8, 16)]
    loss = DNetLoss()(outs, labels)
    weights = deep_supervision_weights(5)
    expected = sum(w * dice_ce_loss(o, labels) for w, o in zip(weights[:4], outs[:4]))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outs[:4])
    assert outs[4].grad is None
    single = DNetLoss()(outs[0], labels)
    torch.testing.assert_close(single, dice_ce_loss(outs[0], labels))
    assert math.isfinite(float(single.detach()))


def test_dnet_loss_rejects_mismatched_weights_and_single_channel_logits():
    with pytest.raises(ValueError, match="2 outputs but 3 weights"):
        DNetLoss(weights=[1, 1, 1])([torch.zeros(1, 2, 4, 4, 4)] * 2, torch.zeros(1, 4, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="K >= 2"):
        dice_ce_loss(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.long))
