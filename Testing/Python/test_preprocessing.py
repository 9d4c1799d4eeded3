"""Intensity normalisation and the channel rule."""

from __future__ import annotations

import numpy as np
import pytest

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.preprocessing import match_channels, normalize, pixel_affine, validate_normalization


def test_zscore_gives_zero_mean_unit_std_per_channel():
    data = np.random.default_rng(0).normal([[[[5.0]]], [[[-3.0]]]], [[[[2.0]]], [[[7.0]]]], (2, 4, 5, 6))
    out = normalize(data, {"kind": "zscore"})
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.reshape(2, -1).mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(out.reshape(2, -1).std(1), 1, atol=1e-5)


def test_zscore_nonzero_ignores_background_and_constant_channel_does_not_divide_by_zero():
    data = np.zeros((1, 2, 3, 4))
    data[0, 0, :2, :2] = [[1.0, 3.0], [1.0, 3.0]]
    out = normalize(data, {"kind": "zscore", "nonzero": True})
    np.testing.assert_allclose(out[0, 0, :2, :2], [[-1, 1], [-1, 1]])
    assert np.all(out[0, 1] == 0) and np.all(out[0, 0, 2:] == 0)  # empty background stays empty
    padded = np.pad(data, ((0, 0), (3, 3), (3, 3), (3, 3)))  # more background, same statistics
    np.testing.assert_allclose(normalize(padded, {"kind": "zscore", "nonzero": True})[:, 3:-3, 3:-3, 3:-3], out)
    assert np.all(np.isfinite(normalize(np.full((1, 2, 2, 2), 7.0), {"kind": "zscore"})))


def test_scale_imagenet_window_and_percentile():
    rgb = np.full((3, 1, 2, 2), 255.0)
    np.testing.assert_allclose(normalize(rgb, {"kind": "scale", "divisor": 255})[..., 0, 0, 0], 1.0)
    imagenet = normalize(rgb, {"kind": "imagenet"})
    np.testing.assert_allclose(
        imagenet[:, 0, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], rtol=1e-6
    )
    ct = np.array([[[[-1000.0, -100.0, 150.0, 3000.0]]]])
    np.testing.assert_allclose(normalize(ct, {"kind": "window", "low": -100, "high": 400})[0, 0, 0], [0, 0, 0.5, 1])
    ramp = np.arange(1000, dtype=float).reshape(1, 1, 10, 100)
    out = normalize(ramp, {"kind": "percentile", "low": 1, "high": 99})
    assert out.min() == 0 and out.max() == 1


@pytest.mark.parametrize(
    "spec", [{"kind": "magic"}, {"kind": "window", "low": 5, "high": 1}, {"kind": "scale", "divisor": 0}, "zscore"]
)
def test_invalid_normalization_specs_are_refused(spec):
    with pytest.raises(ValueError):
        validate_normalization(spec)


def test_channel_rule_replicates_grey_and_takes_luminance_of_rgb():
    grey = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    assert np.array_equal(match_channels(grey, 3), np.repeat(grey, 3, 0))
    rgb = np.stack([np.full((1, 1, 1), v, np.float32) for v in (100, 200, 50)])
    np.testing.assert_allclose(match_channels(rgb, 1)[0, 0, 0, 0], 0.299 * 100 + 0.587 * 200 + 0.114 * 50, rtol=1e-6)
    with pytest.raises(InputError, match="expects 4-channel images but this image has 3"):
        match_channels(rgb, 4)


@pytest.mark.parametrize(
    "spec", [{"kind": "none"}, {"kind": "scale", "divisor": 255}, {"kind": "imagenet", "divisor": 255}]
)
def test_pixel_affine_reproduces_the_fixed_per_pixel_normalisations(spec):
    raw = np.random.default_rng(0).uniform(0, 255, (3, 1, 5, 6)).astype(np.float32)
    a, b = pixel_affine(spec, 3)
    assert np.allclose(normalize(raw, spec), a[:, None, None, None] * raw + b[:, None, None, None], atol=1e-5)


def test_pixel_affine_is_none_for_normalisations_that_depend_on_the_image():
    assert pixel_affine({"kind": "zscore"}, 1) is None
    assert pixel_affine({"kind": "percentile", "low": 1, "high": 99}, 1) is None
    assert pixel_affine({"kind": "imagenet"}, 1) is None  # ImageNet statistics need RGB
