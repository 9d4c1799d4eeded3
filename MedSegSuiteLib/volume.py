"""The image type every part of MedSegSuite passes around."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import InputError

__all__ = ["Grid", "Volume"]

_ORTHONORMAL_TOL = 1e-4


def _vector3(value: Sequence[float], what: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be three numbers, got {value!r}") from None
    if len(out) != 3 or not all(np.isfinite(out)):
        raise InputError(f"{what} must be three finite numbers, got {value!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid in LPS physical space.

    ``shape`` is ``(z, y, x)`` (numpy order, i.e. k, j, i); ``spacing`` is ``(x, y, z)``
    in mm; ``origin`` is the LPS position (mm) of voxel (0, 0, 0); ``direction`` is a
    3x3 matrix whose columns are the unit LPS directions of the i, j and k axes (the
    SimpleITK convention). Construction validates all four and raises
    :class:`~MedSegSuiteLib.errors.InputError` with a plain reason.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Any = None

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise InputError(f"grid shape must be three positive sizes (z, y, x), got {self.shape!r}")
        spacing = _vector3(self.spacing, "spacing")
        if min(spacing) <= 0:
            raise InputError(f"spacing must be positive in every direction, got {spacing} mm; fix the image header")
        origin = _vector3(self.origin, "origin")
        direction = np.eye(3) if self.direction is None else np.array(self.direction, dtype=np.float64)
        if direction.shape != (3, 3) or not np.all(np.isfinite(direction)):
            raise InputError(f"direction must be a finite 3x3 matrix, got shape {direction.shape}")
        if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_TOL):
            raise InputError(
                "direction matrix is not orthonormal (its axes are not perpendicular unit vectors); "
                "the image header is corrupt or sheared: resample it to an orthogonal grid first"
            )
        direction.setflags(write=False)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    @property
    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) to LPS (x, y, z, 1) in mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    def index_to_physical(self, ijk: Sequence[float]) -> np.ndarray:
        """LPS position (mm) of continuous voxel index ``(i, j, k)``."""
        return np.asarray(self.origin) + self.direction @ (np.asarray(ijk, dtype=np.float64) * self.spacing)

    def physical_to_index(self, lps: Sequence[float]) -> np.ndarray:
        """Continuous voxel index ``(i, j, k)`` of LPS position ``lps`` (mm)."""
        offset = np.asarray(lps, dtype=np.float64) - np.asarray(self.origin)
        return (self.direction.T @ offset) / np.asarray(self.spacing)

    def same_as(self, other: Grid, atol: float = 1e-4) -> bool:
        """True when both grids have the same shape and geometry within ``atol`` (mm / unitless)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def describe(self) -> str:
        """One line for error messages."""
        return (
            f"shape (z,y,x)={self.shape}, spacing={tuple(round(s, 4) for s in self.spacing)} mm, "
            f"origin={tuple(round(o, 3) for o in self.origin)} mm"
        )


@dataclass(frozen=True, eq=False)
class Volume:
    """An image or label map on a physical grid.

    ``array`` is a numpy array of shape ``(z, y, x)`` or ``(c, z, y, x)`` (channels
    first, e.g. ``c = 3`` for RGB); a 2D image is a volume with ``z = 1``. Geometry
    follows :class:`Grid`: ``spacing`` (x, y, z) mm, ``origin`` LPS mm, ``direction``
    3x3 with columns = i, j, k axes in LPS.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Any = None

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim not in (3, 4):
            raise InputError(
                f"expected a 3D volume (z, y, x) or a multi-channel one (c, z, y, x), got {array.ndim} dimensions "
                f"with shape {array.shape}"
            )
        if array.ndim == 4 and array.shape[0] > 16:
            raise InputError(
                f"{array.shape[0]} channels is not a multi-channel image (at most 16); 4D time series are not "
                "supported: split them into 3D volumes first"
            )
        grid = Grid(tuple(array.shape[-3:]), self.spacing, self.origin, self.direction)
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "spacing", grid.spacing)
        object.__setattr__(self, "origin", grid.origin)
        object.__setattr__(self, "direction", grid.direction)
        object.__setattr__(self, "_grid", grid)

    @classmethod
    def on_grid(cls, array: np.ndarray, grid: Grid) -> Volume:
        """A volume holding ``array`` on ``grid``; the array's last three axes must equal ``grid.shape``."""
        if tuple(np.shape(array)[-3:]) != grid.shape:
            raise InputError(f"array shape {np.shape(array)} does not fit grid shape {grid.shape}")
        return cls(array, grid.spacing, grid.origin, grid.direction)

    @property
    def grid(self) -> Grid:
        """The voxel grid (shape without channels, spacing, origin, direction)."""
        return self._grid  # type: ignore[attr-defined]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(z, y, x)``."""
        return self.grid.shape

    @property
    def channels(self) -> int:
        """Number of channels: 1 for a scalar volume."""
        return int(self.array.shape[0]) if self.array.ndim == 4 else 1

    @property
    def is_2d(self) -> bool:
        """True for a single-slice image."""
        return self.shape[0] == 1

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume on the same grid holding ``array`` (same spatial shape, any channels)."""
        return Volume.on_grid(array, self.grid)

    def channel_first(self) -> np.ndarray:
        """The array as ``(c, z, y, x)``, adding a channel axis to scalar volumes (a view)."""
        return self.array if self.array.ndim == 4 else self.array[None]
