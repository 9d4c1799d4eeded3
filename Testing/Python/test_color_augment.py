"""Tests of the stage-1 strong colour augmentation (torch only)."""

from __future__ import annotations

import pytest
import torch

from MedSegSuiteLib.training.color_augment import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    rgb_to_grey,
    strong_color_augment,
)


def _images(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_strong_augment_keeps_shape_range_and_input():
    x = _images()
    before = x.clone()
    out = strong_color_augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, before)
    assert not torch.allclose(out, x)


def test_strong_augment_is_reproducible_from_the_generator():
    x = _images()
    a = strong_color_augment(x, torch.Generator().manual_seed(3))
    b = strong_color_augment(x, torch.Generator().manual_seed(3))
    c = strong_color_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_per_sample_draws_differ_and_shared_draw_matches_official_batch_behaviour():
    x = _images(1).expand(6, -1, -1, -1).contiguous()
    per_sample = strong_color_augment(x, torch.Generator().manual_seed(0))
    shared = strong_color_augment(x, torch.Generator().manual_seed(0), per_sample=False)
    assert not torch.allclose(per_sample[0], per_sample[1])
    assert all(torch.allclose(shared[0], shared[i]) for i in range(1, 6))


def test_grey_probability_one_gives_equal_channels():
    out = strong_color_augment(_images(), torch.Generator().manual_seed(0), grey_p=1.0)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)


def test_hue_rotation_by_a_third_turns_red_into_green_and_zero_is_identity():
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    green = adjust_hue(red, torch.tensor([1 / 3]))
    assert torch.allclose(green, torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1).expand_as(red), atol=1e-5)
    x = _images()
    assert torch.allclose(adjust_hue(x, torch.zeros(4)), x, atol=1e-5)
    grey = rgb_to_grey(x).expand_as(x)
    assert torch.allclose(adjust_hue(grey, torch.full((4,), 0.3)), grey, atol=1e-5)


def test_jitter_factors_have_their_documented_limits():
    x = _images()
    assert torch.allclose(adjust_brightness(x, torch.ones(4)), x)
    assert torch.allclose(adjust_brightness(x, torch.full((4,), 2.0)), (2 * x).clamp(0, 1))
    flat = adjust_contrast(x, torch.zeros(4))
    assert torch.allclose(flat, rgb_to_grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), atol=1e-6)
    assert torch.allclose(adjust_saturation(x, torch.zeros(4)), rgb_to_grey(x).expand_as(x), atol=1e-6)
    assert torch.allclose(adjust_saturation(x, torch.ones(4)), x)


def test_blur_with_1x7_kernel_is_vertical_only_and_keeps_constants():
    vertical_line = torch.zeros(1, 3, 16, 16)
    vertical_line[..., :, 8] = 1.0
    horizontal_line = vertical_line.transpose(-1, -2).contiguous()
    sigma = torch.tensor([2.0])
    assert torch.allclose(gaussian_blur(vertical_line, sigma), vertical_line, atol=1e-6)
    blurred = gaussian_blur(horizontal_line, sigma)
    assert blurred[0, 0, 8, 3] < 0.5 and blurred[0, 0, 7, 3] > 0.05
    assert torch.allclose(blurred.sum(dim=-2), horizontal_line.sum(dim=-2), atol=1e-5)
    const = torch.full((2, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(const, torch.tensor([0.5, 3.0]), (5, 7)), const, atol=1e-6)


def test_strong_augment_rejects_bad_inputs():
    with pytest.raises(ValueError):
        strong_color_augment(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError):
        strong_color_augment(_images(), grey_p=2.0)
    with pytest.raises(ValueError):
        gaussian_blur(_images(), torch.ones(4), (2, 7))
