"""Segmentation metrics: Dice, IoU and the 95th-percentile Hausdorff distance in mm.

Conventions (stated because papers differ): when both masks are empty Dice and IoU are
1 and HD95 is 0; when exactly one is empty Dice and IoU are 0 and HD95 is infinite
(reported as ``None`` in JSON). HD95 is the 95th percentile of the pooled
surface-to-surface distances in both directions, with the voxel spacing applied.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

__all__ = ["case_metrics", "dice", "hd95", "iou", "summarize"]


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    p, t = prediction.astype(bool), truth.astype(bool)
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total


def iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    p, t = prediction.astype(bool), truth.astype(bool)
    union = int((p | t).sum())
    return 1.0 if union == 0 else int((p & t).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    eroded = ndimage.binary_erosion(mask, structure=np.ones((3,) * mask.ndim, bool), border_value=0)
    return mask & ~eroded


def hd95(prediction: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """95th-percentile symmetric surface distance in mm between two masks of the same (z, y, x) grid."""
    from scipy import ndimage

    p, t = prediction.astype(bool), truth.astype(bool)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return math.inf
    sampling = tuple(float(s) for s in spacing_zyx)[-p.ndim :]
    sp, st = _surface(p), _surface(t)
    to_truth = ndimage.distance_transform_edt(~st, sampling=sampling)
    to_prediction = ndimage.distance_transform_edt(~sp, sampling=sampling)
    distances = np.concatenate([to_truth[sp], to_prediction[st]])
    return float(np.percentile(distances, 95))


def case_metrics(
    prediction: np.ndarray, truth: np.ndarray, values: Sequence[int], spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[int, dict[str, Optional[float]]]:
    """Per label value: Dice, IoU and HD95 (mm; ``None`` when infinite) of two label maps on one grid."""
    spacing_zyx = tuple(spacing_xyz)[::-1]
    out = {}
    for value in values:
        p, t = prediction == value, truth == value
        distance = hd95(p, t, spacing_zyx)
        out[int(value)] = {
            "dice": dice(p, t),
            "iou": iou(p, t),
            "hd95": None if math.isinf(distance) else distance,
        }
    return out


def summarize(per_case: Sequence[dict[int, dict[str, Optional[float]]]]) -> dict[str, Optional[float]]:
    """Means over cases and labels: ``dice``, ``iou`` and ``hd95`` (finite values only; None if there are none)."""
    result: dict[str, Optional[float]] = {}
    for name in ("dice", "iou", "hd95"):
        values = [m[name] for case in per_case for m in case.values() if m[name] is not None]
        result[name] = float(np.mean(values)) if values else None
    return result
