"""Grid operations: canonical reorientation and its exact inverse, ROI boxes, resampling.

The canonical orientation is the axis-aligned grid closest to LPS: after
:func:`to_canonical`, voxel axis i points (mostly) to the patient's left, j to
posterior and k to superior, so axial slices show in radiological convention
(patient right on the image's left, anterior at the top). It only permutes and flips
axes; it never interpolates, so :meth:`CanonicalTransform.restore` gives back the
input array and geometry bit for bit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InputError
from .volume import Grid, Volume

__all__ = [
    "Box",
    "CanonicalTransform",
    "crop",
    "paste",
    "resample",
    "resampled_grid",
    "to_canonical",
]


def _closest_axes(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """The axis permutation that best aligns voxel axes with L, P, S, and the flips that make them point forwards.

    ``perm[a]`` is the voxel axis assigned to LPS axis ``a``: of the six permutations,
    the one with the largest summed ``|direction[a, perm[a]]|`` (the first in
    lexicographic order on ties).
    """
    weights = np.abs(np.asarray(direction))
    perm = max(itertools.permutations(range(3)), key=lambda p: round(sum(weights[a, p[a]] for a in range(3)), 12))
    flip = tuple(bool(direction[a, perm[a]] < 0) for a in range(3))
    return tuple(perm), flip  # type: ignore[return-value]


@dataclass(frozen=True)
class CanonicalTransform:
    """The permutation and flips that took an input grid to canonical orientation.

    ``perm[a]`` is the input voxel axis (0 = i, 1 = j, 2 = k) that became canonical
    axis ``a``; ``flip[a]`` says whether it was reversed. ``source`` is the input grid,
    kept so that :meth:`restore` returns its geometry exactly.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    source: Grid

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def _numpy_order(self, ndim: int) -> list[int]:
        lead = ndim - 3
        # numpy axis n (of the last three) holds voxel axis 2 - n.
        return list(range(lead)) + [lead + 2 - self.perm[2 - n] for n in range(3)]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Reorient an array on the source grid (``(..., z, y, x)``) to canonical order (a view when possible)."""
        out = np.transpose(array, self._numpy_order(array.ndim))
        lead = array.ndim - 3
        for a in range(3):
            if self.flip[a]:
                out = np.flip(out, axis=lead + 2 - a)
        return out

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Map an array on the canonical grid (``(..., z, y, x)``) back to the source order."""
        lead = array.ndim - 3
        for a in range(3):
            if self.flip[a]:
                array = np.flip(array, axis=lead + 2 - a)
        order = self._numpy_order(array.ndim)
        return np.transpose(array, np.argsort(order))

    def canonical_grid(self) -> Grid:
        """The grid of the reoriented array (same voxels, same physical positions)."""
        src = self.source
        n_ijk = (src.shape[2], src.shape[1], src.shape[0])
        start = [0.0, 0.0, 0.0]
        for a in range(3):
            if self.flip[a]:
                start[self.perm[a]] = n_ijk[self.perm[a]] - 1
        direction = np.stack(
            [src.direction[:, self.perm[a]] * (-1.0 if self.flip[a] else 1.0) for a in range(3)], axis=1
        )
        spacing = tuple(src.spacing[self.perm[a]] for a in range(3))
        shape_xyz = tuple(n_ijk[self.perm[a]] for a in range(3))
        return Grid((shape_xyz[2], shape_xyz[1], shape_xyz[0]), spacing, tuple(src.index_to_physical(start)), direction)

    def restore(self, array: np.ndarray) -> Volume:
        """A volume on exactly the source grid holding ``invert(array)`` (made contiguous)."""
        return Volume.on_grid(np.ascontiguousarray(self.invert(array)), self.source)


def to_canonical(volume: Volume) -> tuple[Volume, CanonicalTransform]:
    """Reorient ``volume`` to the canonical LPS-aligned orientation without interpolation.

    Returns the reoriented volume (its array may be a view of the input) and the
    transform that undoes it.
    """
    perm, flip = _closest_axes(volume.direction)
    transform = CanonicalTransform(perm, flip, volume.grid)
    if transform.is_identity:
        return volume, transform
    return Volume.on_grid(transform.apply(volume.array), transform.canonical_grid()), transform


@dataclass(frozen=True)
class Box:
    """A half-open voxel box ``[start, stop)`` in (i, j, k) = (x, y, z) index order."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @classmethod
    def parse(cls, text: str) -> Box:
        """Parse ``"x0,y0,z0,x1,y1,z1"`` (voxel indices, end exclusive)."""
        try:
            values = [int(v) for v in text.replace(" ", "").split(",")]
        except ValueError:
            raise InputError(f"ROI must be six integers x0,y0,z0,x1,y1,z1 (voxel indices), got {text!r}") from None
        if len(values) != 6:
            raise InputError(f"ROI must be six integers x0,y0,z0,x1,y1,z1 (voxel indices), got {text!r}")
        return cls(tuple(values[:3]), tuple(values[3:]))  # type: ignore[arg-type]

    def validate(self, grid: Grid) -> None:
        """Raise :class:`InputError` unless the box is non-empty and inside ``grid``."""
        size_xyz = (grid.shape[2], grid.shape[1], grid.shape[0])
        if any(a >= b for a, b in zip(self.start, self.stop)):
            raise InputError(f"ROI {self.start}..{self.stop} is empty: each end must be larger than its start")
        if any(a < 0 for a in self.start) or any(b > n for b, n in zip(self.stop, size_xyz)):
            raise InputError(
                f"ROI {self.start}..{self.stop} lies outside the image, whose voxel indices run from (0, 0, 0) "
                f"to {tuple(n for n in size_xyz)} (x, y, z, end exclusive)"
            )

    def numpy_slices(self) -> tuple[slice, slice, slice]:
        """Slices selecting the box from a ``(z, y, x)`` array."""
        return tuple(slice(self.start[a], self.stop[a]) for a in (2, 1, 0))  # type: ignore[return-value]


def crop(volume: Volume, box: Box) -> Volume:
    """The part of ``volume`` inside ``box``, with its origin moved so voxels keep their physical positions."""
    box.validate(volume.grid)
    sub = volume.array[(Ellipsis, *box.numpy_slices())]
    origin = volume.grid.index_to_physical(box.start)
    return Volume(sub, volume.spacing, tuple(origin), volume.direction)


def paste(array: np.ndarray, box: Box, grid: Grid, fill: float = 0) -> np.ndarray:
    """A ``(..., z, y, x)`` array on ``grid`` holding ``array`` inside ``box`` and ``fill`` elsewhere."""
    out = np.full(array.shape[:-3] + grid.shape, fill, dtype=array.dtype)
    out[(Ellipsis, *box.numpy_slices())] = array
    return out


def resampled_grid(grid: Grid, spacing: Sequence[float]) -> Grid:
    """The grid covering the same extent as ``grid`` with voxel size ``spacing`` (x, y, z mm)."""
    spacing = tuple(float(s) for s in spacing)
    size_xyz = np.array([grid.shape[2], grid.shape[1], grid.shape[0]], dtype=np.float64)
    new_size = np.maximum(1, np.round(size_xyz * np.asarray(grid.spacing) / np.asarray(spacing))).astype(int)
    # Keep the centre of the field of view fixed.
    centre_index = (size_xyz - 1) / 2.0
    centre = grid.index_to_physical(centre_index)
    origin = centre - grid.direction @ (((new_size - 1) / 2.0) * np.asarray(spacing))
    return Grid((int(new_size[2]), int(new_size[1]), int(new_size[0])), spacing, tuple(origin), grid.direction)


def resample(array: np.ndarray, source: Grid, target: Grid, order: int = 1, fill: float = 0.0) -> np.ndarray:
    """Resample a ``(z, y, x)`` or ``(c, z, y, x)`` array from ``source`` onto ``target``.

    ``order`` 0 is nearest neighbour (labels), 1 linear. Points outside the source get
    ``fill``. The result has ``array``'s dtype for order 0 and float32 otherwise.
    """
    import SimpleITK as sitk

    if order not in (0, 1):
        raise ValueError("order must be 0 (nearest) or 1 (linear)")
    interpolator = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    reference = sitk.Image([target.shape[2], target.shape[1], target.shape[0]], sitk.sitkUInt8)
    reference.SetSpacing(target.spacing)
    reference.SetOrigin(target.origin)
    reference.SetDirection(tuple(np.asarray(target.direction).ravel()))

    def one(channel: np.ndarray) -> np.ndarray:
        data = channel if order == 0 else channel.astype(np.float32, copy=False)
        image = sitk.GetImageFromArray(np.ascontiguousarray(data))
        image.SetSpacing(source.spacing)
        image.SetOrigin(source.origin)
        image.SetDirection(tuple(np.asarray(source.direction).ravel()))
        out = sitk.Resample(image, reference, sitk.Transform(), interpolator, fill)
        return sitk.GetArrayFromImage(out)

    if array.ndim == 3:
        return one(array)
    return np.stack([one(c) for c in array])
