"""Tests of the BA-Net losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from MedSegSuiteLib.training.losses.banet import banet_loss, boundary_target, soft_dice_loss


def _square(size: int = 12, lo: int = 4, hi: int = 8) -> torch.Tensor:
    y = torch.zeros(1, size, size, dtype=torch.long)
    y[:, lo:hi, lo:hi] = 1
    return y


def test_boundary_target_is_a_two_pixel_band_straddling_the_contour():
    y = _square()
    band = boundary_target(y)[0]
    assert band.dtype == torch.long
    expected = torch.zeros(12, 12, dtype=torch.long)
    expected[3:9, 3:9] = 1
    expected[5:7, 5:7] = 0
    assert torch.equal(band, expected)


def test_boundary_target_marks_foreground_at_the_image_border_and_accepts_float_masks():
    y = torch.zeros(1, 1, 6, 6)
    y[..., :, :3] = 1.0
    band = boundary_target(y)[0]
    assert band[0, 0] == 1 and band[3, 0] == 1  # zero padding counts, as in the official code
    assert band[3, 2] == 1 and band[3, 3] == 1 and band[3, 5] == 0
    assert boundary_target(torch.zeros(2, 5, 5)).sum() == 0


def test_soft_dice_uses_standard_smoothing():
    empty = torch.zeros(1, 8, 8, dtype=torch.long)
    confident_background = torch.stack([torch.full((1, 8, 8), 30.0), torch.full((1, 8, 8), -30.0)], 1)
    assert soft_dice_loss(confident_background, empty).abs() < 1e-6  # official form gives -1 here
    y = _square(8, 2, 6)
    perfect = torch.stack([(1 - y) * 30.0, y * 30.0], 1).float()
    assert soft_dice_loss(perfect, y) < 1e-4
    assert 0.9 < soft_dice_loss(-perfect, y) <= 1.0


def test_banet_loss_sums_main_and_side_terms():
    torch.manual_seed(0)
    y = _square().expand(2, -1, -1)
    logits = torch.randn(2, 2, 12, 12)
    side = tuple((torch.randn(2, 2, 12, 12), torch.randn(2, 2, 12, 12)) for _ in range(4))
    parts = banet_loss(logits, side, y)
    edges = boundary_target(y)
    expected_edge = sum(F.cross_entropy(e, edges) for _, e in side)
    expected_seg = sum(F.cross_entropy(s, y) for s, _ in side)
    assert torch.allclose(parts["side_edge"], expected_edge, atol=1e-6)
    assert torch.allclose(parts["side_seg"], expected_seg, atol=1e-6)
    expected = F.cross_entropy(logits, y) + soft_dice_loss(logits, y) + expected_seg + expected_edge
    assert torch.allclose(parts["loss"], expected, atol=1e-6)
    weighted = banet_loss(logits, side, y, edge_class_weight=(1.0, 10.0))
    assert not torch.allclose(weighted["side_edge"], parts["side_edge"])


def test_banet_loss_gradient_reaches_every_output():
    y = _square().unsqueeze(1).float()  # [B, 1, H, W] float masks are accepted
    logits = torch.randn(1, 2, 12, 12, requires_grad=True)
    side = tuple(
        (torch.randn(1, 2, 12, 12, requires_grad=True), torch.randn(1, 2, 12, 12, requires_grad=True)) for _ in range(4)
    )
    banet_loss(logits, side, y)["loss"].backward()
    assert logits.grad.abs().sum() > 0
    assert all(s.grad.abs().sum() > 0 and e.grad.abs().sum() > 0 for s, e in side)


def test_banet_loss_rejects_bad_side_outputs():
    y = _square()
    with pytest.raises(ValueError):
        banet_loss(torch.randn(1, 2, 12, 12), (), y)
    with pytest.raises(ValueError):
        boundary_target(torch.zeros(1, 2, 4, 4))
