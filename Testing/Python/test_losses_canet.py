"""CANet loss pieces: SDF targets, squared Dice, ramp-up, adversarial terms, one semi-supervised step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from MedSegSuiteLib.networks.canet import CANet, CANetDiscriminator
from MedSegSuiteLib.training.losses.canet import (
    adversarial_weight,
    dice_loss,
    discriminator_loss,
    generator_adversarial_loss,
    sdf_loss,
    sdf_target,
    segmenter_loss,
    sigmoid_rampup,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _ball(shape=(20, 22, 18), centre=(9, 11, 8), radius=5.5) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2).astype(np.uint8)


def test_sdf_target_is_positive_outside_negative_inside_bounded_and_zero_on_the_inner_boundary():
    mask = _ball()
    sdf = sdf_target(mask[None])[0]
    inside = mask.astype(bool)
    boundary = inside & ~ndimage.binary_erosion(inside, ndimage.generate_binary_structure(3, 1), border_value=1)
    assert sdf.dtype == np.float32 and sdf.shape == mask.shape
    assert np.all(sdf[~inside] > 0) and np.all(sdf[inside & ~boundary] < 0) and np.all(sdf[boundary] == 0)
    assert sdf.min() == pytest.approx(-1.0) and sdf.max() == pytest.approx(1.0)
    assert boundary.sum() > 0


def test_sdf_target_matches_brute_force_distances_in_2d():
    mask = np.zeros((9, 11), dtype=np.uint8)
    mask[2:6, 3:9] = 1
    points = np.argwhere(np.ones_like(mask))
    fg, bg = np.argwhere(mask == 1), np.argwhere(mask == 0)
    d_in = np.array([0 if not mask[tuple(p)] else np.sqrt(((bg - p) ** 2).sum(1)).min() for p in points]).reshape(9, 11)
    d_out = np.array([0 if mask[tuple(p)] else np.sqrt(((fg - p) ** 2).sum(1)).min() for p in points]).reshape(9, 11)
    expected = d_out / d_out.max() - d_in / d_in.max()
    expected[(mask == 1) & (d_in == 1)] = 0  # voxels with a background neighbour across an edge
    np.testing.assert_allclose(sdf_target(mask[None])[0], expected, atol=1e-6)


def test_sdf_target_of_empty_and_full_masks_is_zero_and_torch_in_gives_torch_out():
    masks = np.stack([np.zeros((6, 6, 6), np.uint8), np.ones((6, 6, 6), np.uint8), _ball((6, 6, 6), (3, 3, 3), 2)])
    sdf = sdf_target(masks)
    assert np.all(sdf[0] == 0) and np.all(sdf[1] == 0) and np.isfinite(sdf).all() and sdf[2].any()
    as_tensor = sdf_target(torch.from_numpy(masks))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float32
    np.testing.assert_array_equal(as_tensor.numpy(), sdf)


def test_squared_dice_loss_follows_the_published_formula():
    probs = torch.tensor([[0.9, 0.2, 0.6, 0.0]])
    target = torch.tensor([[1, 0, 1, 0]])
    expected = 1 - (2 * (0.9 + 0.6) + 1e-5) / ((0.81 + 0.04 + 0.36) + 2 + 1e-5)
    assert float(dice_loss(probs, target)) == pytest.approx(expected)
    assert float(dice_loss(target.float(), target)) == pytest.approx(0.0, abs=1e-6)
    assert float(dice_loss(1 - target.float(), target)) == pytest.approx(1.0, abs=1e-5)


def test_adversarial_weight_ramps_from_exp_minus_five_to_its_maximum_at_6000():
    assert sigmoid_rampup(0, 0) == 1.0
    assert adversarial_weight(0) == pytest.approx(0.01 * math.exp(-5))
    assert adversarial_weight(149) == adversarial_weight(0) < adversarial_weight(150)
    assert adversarial_weight(3000) == pytest.approx(0.01 * math.exp(-5 * 0.5**2))
    assert adversarial_weight(6000) == pytest.approx(0.01) and adversarial_weight(9000) == pytest.approx(0.01)
    values = [adversarial_weight(t) for t in range(0, 6001, 150)]
    assert values == sorted(values)


def test_adversarial_losses_use_class_one_for_labelled():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    expected = torch.nn.functional.cross_entropy(logits, torch.ones(2).long())
    torch.testing.assert_close(generator_adversarial_loss(logits), expected)
    torch.testing.assert_close(
        discriminator_loss(logits, [True, False]), torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0]))
    )
    with pytest.raises(ValueError):
        discriminator_loss(logits, [1, 0, 0])


def test_sdf_loss_is_zero_for_the_exact_target():
    mask = torch.from_numpy(_ball((8, 8, 8), (4, 4, 4), 2.5))[None]
    target = torch.from_numpy(sdf_target(mask.numpy()))
    assert float(sdf_loss(target[:, None], mask)) == 0.0
    assert float(sdf_loss(torch.zeros(1, 1, 8, 8, 8), mask)) > 0


def test_one_semi_supervised_step_updates_both_networks_and_uses_the_unlabelled_items():
    torch.manual_seed(0)
    segmenter = CANet(base_filters=4, patch_size=(32, 32, 16), hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
    discriminator = CANetDiscriminator(base=4)
    opt_s = torch.optim.SGD(segmenter.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-4, betas=(0.9, 0.99))
    x = torch.randn(4, 1, 32, 32, 16, requires_grad=True)  # 2 labelled, then 2 unlabelled
    masks = torch.zeros(2, 32, 32, 16, dtype=torch.long)
    masks[:, 10:20, 12:22, 4:12] = 1
    before_s = [p.detach().clone() for p in segmenter.parameters()]
    before_d = [p.detach().clone() for p in discriminator.parameters()]

    # segmenter step: segmenter trains, discriminator judges in eval mode
    segmenter.train()
    discriminator.eval()
    sdf, logits = segmenter(x)
    d_unlabelled = discriminator(sdf[2:], x[2:])
    loss, parts = segmenter_loss(sdf[:2], logits[:2], masks, d_unlabelled, iteration=3000)
    adversarial = generator_adversarial_loss(d_unlabelled)
    adv_grad = torch.autograd.grad(adversarial, x, retain_graph=True)[0]
    assert adv_grad[2:].abs().sum() > 0  # unlabelled images enter the adversarial term
    assert parts["adv"] == pytest.approx(float(adversarial.detach()))
    assert parts["adv_weight"] == pytest.approx(adversarial_weight(3000))
    opt_s.zero_grad()
    loss.backward()
    opt_s.step()

    # discriminator step: segmenter in eval mode without gradients, all four items
    segmenter.eval()
    discriminator.train()
    with torch.no_grad():
        sdf_all, _ = segmenter(x.detach())
    d_loss = discriminator_loss(discriminator(sdf_all, x.detach()), [1, 1, 0, 0])
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()

    assert any(not torch.equal(a, b) for a, b in zip(before_s, segmenter.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before_d, discriminator.parameters()))
    assert math.isfinite(parts["total"]) and math.isfinite(float(d_loss.detach()))
