"""Tests of the ConDSeg losses (stage 2 and stage 1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from MedSegSuiteLib.training.losses.condseg import (
    area_weights,
    complementarity_loss,
    condseg_loss,
    dice_bce_loss,
    stage1_consistency_loss,
)


def _maps(b: int = 2, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(b, 1, size, size, generator=g) * 2 for _ in range(4)]
    target = (torch.rand(b, 1, size, size, generator=g) > 0.6).float()
    return (*logits, target)


def test_dice_bce_applies_the_sigmoid_exactly_once():
    logits, _, _, _, target = _maps()
    p = torch.sigmoid(logits)
    expected = F.binary_cross_entropy(p, target) + 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    assert torch.allclose(dice_bce_loss(logits, target), expected, atol=1e-6)


def test_dice_bce_per_image_matches_single_image_batches():
    logits, _, _, _, target = _maps(b=3)
    per_image = dice_bce_loss(logits, target, per_image=True)
    assert per_image.shape == (3,)
    for b in range(3):
        assert torch.allclose(per_image[b], dice_bce_loss(logits[b : b + 1], target[b : b + 1]), atol=1e-6)


def test_dice_bce_is_near_zero_for_confident_correct_logits():
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert dice_bce_loss((target * 2 - 1) * 30, target) < 1e-3
    assert dice_bce_loss((1 - target * 2) * 30, target) > 5


def test_area_weights_are_per_image_detached_and_capped():
    logits = torch.full((3, 1, 8, 8), -20.0, requires_grad=True)
    with torch.no_grad():
        logits[0] = 20.0  # whole image foreground
        logits[1, :, :4] = 20.0  # half
    weights = area_weights(logits, max_weight=10.0)
    assert not weights.requires_grad
    assert torch.allclose(weights[0], 1 / torch.tanh(torch.tensor(1.0)), atol=1e-4)
    assert torch.allclose(weights[1], 1 / torch.tanh(torch.tensor(0.5)), atol=1e-4)
    assert weights[2] == 10.0  # vanished foreground: capped, not 1e15
    alone = area_weights(logits[1:2], max_weight=10.0)
    assert torch.allclose(alone, weights[1:2])  # independent of the other images in the batch


def test_condseg_loss_uses_one_minus_mask_as_background_target():
    main, fg, bg, uc, target = _maps()
    parts = condseg_loss(main, fg, bg, uc, target)
    beta_bg = area_weights(bg)
    expected_bg = (beta_bg * dice_bce_loss(bg, 1 - target, per_image=True)).mean()
    assert torch.allclose(parts["bg"], expected_bg, atol=1e-6)
    total = parts["main"] + parts["fg"] + parts["bg"] + parts["complementarity"]
    assert torch.allclose(parts["loss"], total, atol=1e-6)


def test_condseg_loss_gradient_does_not_flow_through_area_weights():
    main, fg, bg, uc, target = _maps()
    fg = fg.clone().requires_grad_(True)
    condseg_loss(main, fg, bg, uc, target)["loss"].backward()
    fg_ref = fg.detach().clone().requires_grad_(True)
    beta = area_weights(fg_ref)
    ((beta * dice_bce_loss(fg_ref, target, per_image=True)).mean() + complementarity_loss(fg_ref, bg, uc)).backward()
    assert torch.allclose(fg.grad, fg_ref.grad, atol=1e-6)


def test_condseg_legacy_weights_reproduce_batch_summed_official_form():
    main, fg, bg, uc, target = _maps()
    parts = condseg_loss(main, fg, bg, uc, target, legacy_weights=True)
    hw = 64
    beta_fg = 1 / (torch.tanh(torch.sigmoid(fg).sum() / hw) + 1e-15)
    assert torch.allclose(parts["fg"], beta_fg * dice_bce_loss(fg, target), atol=1e-6)


def test_complementarity_loss_follows_official_softmax_of_probabilities():
    _, fg, bg, uc, _ = _maps()
    probs = torch.softmax(torch.stack([torch.sigmoid(fg), torch.sigmoid(bg), torch.sigmoid(uc)], 1), 1)
    pf, pb, pu = probs[:, 0], probs[:, 1], probs[:, 2]
    expected = ((pf * pb).sum() + (pf * pu).sum() + (pb * pu).sum()) / (fg.shape[0] * 64)
    value = complementarity_loss(fg, bg, uc)
    assert torch.allclose(value, expected, atol=1e-6)
    assert 0.28 < value < 0.34
    big = torch.full_like(fg, 30.0)
    assert complementarity_loss(big, -big, -big) < complementarity_loss(fg * 0, fg * 0, fg * 0)


def test_condseg_loss_rejects_mismatched_shapes():
    main, fg, bg, uc, target = _maps()
    with pytest.raises(ValueError):
        condseg_loss(main, fg, bg, uc, target[:, :, :4])
    with pytest.raises(ValueError):
        area_weights(fg, max_weight=0)


def test_stage1_consistency_targets_carry_no_gradient():
    logits, logits_aug, _, _, target = _maps()
    a = logits.clone().requires_grad_(True)
    b = logits_aug.clone().requires_grad_(True)
    parts = stage1_consistency_loss(a, b, None)
    parts["loss"].backward()
    hard_b = (logits_aug > 0).float()
    a_ref = logits.clone().requires_grad_(True)
    F.binary_cross_entropy_with_logits(a_ref, hard_b).backward()
    assert torch.allclose(a.grad, a_ref.grad, atol=1e-7)
    assert parts["supervised"] == 0


def test_stage1_loss_adds_supervision_of_both_views():
    logits, logits_aug, _, _, target = _maps()
    parts = stage1_consistency_loss(logits, logits_aug, target)
    expected = dice_bce_loss(logits, target) + dice_bce_loss(logits_aug, target)
    assert torch.allclose(parts["supervised"], expected, atol=1e-6)
    confident = torch.sign(logits) * 30
    same = stage1_consistency_loss(confident, confident, target)
    assert same["consistency"] < 1e-3
