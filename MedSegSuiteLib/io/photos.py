"""Photos as a camera wrote them: EXIF orientation and 16-bit pixel ranges.

:func:`read_image` returns a photo's pixels as stored in the file, so a label map of
it lines up with the file in every tool. Two things about photos only matter for
what a network sees, and :func:`prepare_photo` handles both:

- a JPEG (or TIFF) whose EXIF orientation says it is displayed rotated or mirrored
  is shown to the network upright, and the result is turned back onto the stored
  pixels;
- a 16-bit PNG/TIFF given to a model that expects 8-bit photos (``scale`` or
  ``imagenet`` normalisation with divisor 255) is scaled by its own range onto 0-255.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ..volume import Volume
from .atomic import compound_suffix

__all__ = ["exif_orientation", "from_upright", "prepare_photo", "scale_to_8bit_range", "to_upright"]

log = logging.getLogger(__name__)
_PHOTO_SUFFIXES = (".jpg", ".jpeg", ".tif", ".tiff", ".png")
_EXIF_ORIENTATION = 0x0112


def exif_orientation(path: Union[str, Path]) -> int:
    """The EXIF orientation (1-8) of a photo file; 1 (as stored) when it has none or is no photo."""
    if compound_suffix(path) not in _PHOTO_SUFFIXES:
        return 1
    try:
        from PIL import Image

        with Image.open(path) as image:
            value = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def _apply(array: np.ndarray, orientation: int, inverse: bool) -> np.ndarray:
    axes = (-2, -1)  # (y, x)
    if orientation == 2:
        return array[..., ::-1]
    if orientation == 3:
        return array[..., ::-1, ::-1]
    if orientation == 4:
        return array[..., ::-1, :]
    if orientation == 5:
        return np.swapaxes(array, -1, -2)
    if orientation == 6:
        return np.rot90(array, k=1 if inverse else -1, axes=axes)
    if orientation == 7:
        return np.swapaxes(array[..., ::-1, ::-1], -1, -2)
    if orientation == 8:
        return np.rot90(array, k=-1 if inverse else 1, axes=axes)
    return array


def to_upright(volume: Volume, orientation: int) -> Volume:
    """``volume`` (a photo as stored) turned the way EXIF ``orientation`` says it is displayed."""
    if orientation == 1:
        return volume
    array = np.ascontiguousarray(_apply(volume.array, orientation, inverse=False))
    sx, sy, sz = volume.spacing
    spacing = (sy, sx, sz) if orientation >= 5 else (sx, sy, sz)
    return Volume(array, spacing)


def from_upright(result: Volume, stored: Volume, orientation: int) -> Volume:
    """A result computed on the upright photo, put back onto the ``stored`` photo's pixels and grid."""
    if orientation == 1:
        return result
    return stored.with_array(np.ascontiguousarray(_apply(result.array, orientation, inverse=True)))


def scale_to_8bit_range(volume: Volume) -> Volume:
    """Pixel values mapped linearly from their own [min, max] onto [0, 255] (float32)."""
    array = volume.array.astype(np.float32)
    low, high = float(array.min(initial=0)), float(array.max(initial=0))
    scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
    return volume.with_array(scaled)


def prepare_photo(
    path: Union[str, Path], volume: Volume, normalization: Optional[dict]
) -> tuple[Volume, Callable[[Volume], Volume], list[str]]:
    """What the network should see of the photo at ``path``, how to put a result back, and what was done.

    ``normalization`` is the model card's input normalisation. Files that are no
    photos come back unchanged.
    """
    notes: list[str] = []
    if compound_suffix(path) not in _PHOTO_SUFFIXES or not volume.is_2d:
        return volume, lambda result: result, notes
    shown = volume
    kind = (normalization or {}).get("kind")
    divisor = float((normalization or {}).get("divisor", 255.0) or 255.0)
    if kind in ("scale", "imagenet") and divisor <= 255.0 and volume.array.dtype.itemsize > 1:
        high = float(volume.array.max(initial=0))
        if high > 255:
            shown = scale_to_8bit_range(shown)
            notes.append(f"scaled the {volume.array.dtype.itemsize * 8}-bit photo by its own range onto 0-255")
    orientation = exif_orientation(path)
    if orientation != 1:
        shown = to_upright(shown, orientation)
        notes.append(f"turned the photo upright as its EXIF orientation ({orientation}) says")
    for note in notes:
        log.info("%s: %s", Path(path).name, note)
    return shown, (lambda result: from_upright(result, volume, orientation)), notes
