"""A simulated clinician correcting a segmentation, as the refinement benchmark assumes.

Arrays are label maps ``[z, y, x]`` in canonical orientation (axis 0 axial, see
:func:`~MedSegSuiteLib.geometry.to_canonical`); a photo has ``z = 1``. One correction:

- in a volume, the axial slice with the most wrong voxels is replaced by the reference;
- in a photo, the bounding box of the largest connected wrong region is replaced by the
  reference.

The corrected part joins ``keep``, the "keep my edits" mask that refinement never changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage

__all__ = ["Correction", "correct_once", "foreground_dice"]


@dataclass(frozen=True)
class Correction:
    """The mask after one more correction, every voxel edited so far, and the axial slice edited."""

    mask: np.ndarray
    keep: np.ndarray
    slice_index: int


def correct_once(mask: np.ndarray, reference: np.ndarray, keep: Optional[np.ndarray] = None) -> Optional[Correction]:
    """One correction of ``mask`` towards ``reference`` (same shape); None when nothing is wrong."""
    if mask.shape != reference.shape or mask.ndim != 3:
        raise ValueError(f"mask {mask.shape} and reference {reference.shape} must be equal [z, y, x] arrays")
    wrong = mask != reference
    if not wrong.any():
        return None
    if mask.shape[0] == 1:
        regions, count = ndimage.label(wrong[0])
        sizes = ndimage.sum_labels(wrong[0], regions, index=np.arange(1, count + 1))
        ys, xs = np.nonzero(regions == int(np.argmax(sizes)) + 1)
        box = (slice(0, 1), slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1))
        index = 0
    else:
        index = int(np.argmax(wrong.reshape(mask.shape[0], -1).sum(1)))
        box = (slice(index, index + 1), slice(None), slice(None))
    corrected = mask.copy()
    corrected[box] = reference[box]
    kept = np.zeros(mask.shape, bool) if keep is None else keep.copy()
    kept[box] = True
    return Correction(corrected, kept, index)


def foreground_dice(prediction: np.ndarray, reference: np.ndarray, where: Optional[np.ndarray] = None) -> float:
    """Mean Dice over the label values present in either map (0 is background), inside ``where`` if given.

    1.0 when no label is present on either side (nothing to find, nothing found).
    """
    if where is not None:
        prediction, reference = prediction[where], reference[where]
    values = sorted((set(np.unique(prediction)) | set(np.unique(reference))) - {0})
    if not values:
        return 1.0
    scores = []
    for value in values:
        p, r = prediction == value, reference == value
        scores.append(2.0 * float(np.count_nonzero(p & r)) / float(np.count_nonzero(p) + np.count_nonzero(r)))
    return float(np.mean(scores))
