"""Intensity normalisation and channel matching, shared by inference and training.

A model card's ``input.normalization`` is one of:

- ``{"kind": "none"}``: values as stored.
- ``{"kind": "zscore", "nonzero": false}``: per channel, subtract the mean and divide
  by the standard deviation of the whole volume. With ``nonzero`` the statistics are
  those of the non-zero voxels and zero voxels (empty background, padding, the corners
  of a resampled scan) stay 0, so the result does not depend on how much empty
  background surrounds the structure.
- ``{"kind": "scale", "divisor": 255}``: divide by a constant (8-bit photos to [0, 1]).
- ``{"kind": "imagenet", "divisor": 255}``: divide, then subtract the ImageNet RGB mean
  and divide by its standard deviation.
- ``{"kind": "window", "low": -100, "high": 400}``: clip to the window, map it to [0, 1].
- ``{"kind": "percentile", "low": 0.5, "high": 99.5}``: clip to those percentiles of
  the volume, map them to [0, 1].

Channel rule: a grey image given to a 3-channel model is replicated to three
channels; an RGB image given to a 1-channel model becomes its luminance
(ITU-R BT.601 weights). Other mismatches (a 2-channel or 4-or-more-channel image, or any
image for a model of 2 or 4+ channels with another count) have no meaningful mapping and are
refused: :func:`check_channels` says so before any work, :func:`match_channels` applies the rule.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from .errors import InputError

__all__ = [
    "NORMALIZATIONS",
    "channels_map",
    "check_channels",
    "match_channels",
    "normalize",
    "pixel_affine",
    "validate_normalization",
]

NORMALIZATIONS = ("none", "zscore", "scale", "imagenet", "window", "percentile")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def validate_normalization(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``spec`` with defaults filled in, or raise ``ValueError`` naming the problem."""
    if not isinstance(spec, Mapping) or spec.get("kind") not in NORMALIZATIONS:
        raise ValueError(f"normalization.kind must be one of {', '.join(NORMALIZATIONS)}, got {spec!r}")
    kind = spec["kind"]
    out = dict(spec)
    if kind == "zscore":
        out.setdefault("nonzero", False)
    elif kind in ("scale", "imagenet"):
        out.setdefault("divisor", 255.0)
        if not float(out["divisor"]) > 0:
            raise ValueError("normalization.divisor must be positive")
    elif kind in ("window", "percentile"):
        if "low" not in out or "high" not in out or not float(out["low"]) < float(out["high"]):
            raise ValueError(f"normalization {kind} needs numbers low < high, got {spec!r}")
    return out


def pixel_affine(spec: Mapping[str, Any], channels: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(a, b)`` with ``normalize(x) = a * x + b`` per channel (``[channels]`` float32 arrays).

    Only a fixed per-pixel map has one: ``none``, ``scale`` and ``imagenet`` (3 channels); the
    normalisations that depend on the image (z-score, window, percentile) return ``None``.
    """
    spec = validate_normalization(spec)
    ones, zeros = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    if spec["kind"] == "none":
        return ones, zeros
    if spec["kind"] == "scale":
        return ones / float(spec["divisor"]), zeros
    if spec["kind"] == "imagenet" and channels == 3:
        return 1.0 / (float(spec["divisor"]) * _IMAGENET_STD), -_IMAGENET_MEAN / _IMAGENET_STD
    return None


def channels_map(have: int, channels: int) -> bool:
    """True when the channel rule above turns a ``have``-channel image into the ``channels`` a model takes."""
    return have == channels or (have, channels) in ((1, 3), (3, 1))


def check_channels(
    have: int, channels: int, image: str = "this image", model: str = "the model", remedy: str = ""
) -> None:
    """Refuse (InputError, one line) an image whose channels the channel rule cannot map onto the model's.

    The message names both counts and what to do: ``remedy`` when given, else to choose a model for
    ``have``-channel images or to make a ``channels``-channel copy of the image.
    """
    if channels_map(have, channels):
        return
    remedy = remedy or (
        f"choose a model for {have}-channel images or make a {channels}-channel copy of the image first"
    )
    raise InputError(
        f"{model} expects {channels}-channel images but {image} has {have} channels, and only grey to RGB and "
        f"RGB to grey are converted: {remedy}"
    )


def match_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """Return a ``(channels, z, y, x)`` array from a ``(c, z, y, x)`` one by the channel rule above."""
    have = array.shape[0]
    check_channels(have, channels)
    if have == channels:
        return array
    if have == 1:
        return np.repeat(array, 3, axis=0)
    return np.tensordot(_LUMA, array.astype(np.float32, copy=False), axes=(0, 0))[None]


def normalize(array: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """Normalise a ``(c, z, y, x)`` array by ``spec`` into a new float32 array of the same shape."""
    spec = validate_normalization(spec)
    kind = spec["kind"]
    out = array.astype(np.float32, copy=True)
    if kind == "none":
        return out
    if kind == "zscore":
        for c in range(out.shape[0]):
            zero = out[c] == 0 if spec["nonzero"] else None
            values = out[c][~zero] if zero is not None else out[c]
            if values.size == 0:
                continue
            mean, std = float(values.mean()), float(values.std())
            out[c] -= mean
            out[c] /= std if std > 0 else 1.0
            if zero is not None:
                out[c][zero] = 0.0
        return out
    if kind in ("scale", "imagenet"):
        out /= float(spec["divisor"])
        if kind == "imagenet":
            if out.shape[0] != 3:
                raise InputError(f"ImageNet normalisation needs 3 channels, got {out.shape[0]}")
            out -= _IMAGENET_MEAN[:, None, None, None]
            out /= _IMAGENET_STD[:, None, None, None]
        return out
    if kind == "window":
        low, high = float(spec["low"]), float(spec["high"])
    else:
        low, high = (float(v) for v in np.percentile(out, [float(spec["low"]), float(spec["high"])]))
        if high <= low:
            high = low + 1.0
    np.clip(out, low, high, out=out)
    out -= low
    out /= high - low
    return out
