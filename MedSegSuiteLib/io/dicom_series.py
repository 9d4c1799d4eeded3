"""The geometry of a DICOM series, checked plane by plane before it becomes one volume.

A stack of image planes (the files of a series of single-frame images, or the
frames of an enhanced multi-frame image) becomes a volume on a uniform grid only if
its planes really form one. :func:`check_stack` applies the rules to planes placed
by their headers and refuses, with the reason, a stack whose planes change
orientation, pixel spacing or size, repeat a position, leave out planes, are sheared
(gantry tilt) or are spaced very unevenly. Slightly uneven spacing (at most
:data:`UNEVEN_TOLERANCE` of the median step) is accepted: the caller resamples the
planes linearly onto a uniform grid (:func:`resample_uniform`) and says so.
:func:`check_series` reads each file's header of a single-frame series (no pixels)
and applies those rules to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError

__all__ = [
    "NON_IMAGE_MODALITIES",
    "Plane",
    "SeriesGeometry",
    "SeriesInfo",
    "StackGeometry",
    "check_series",
    "check_stack",
    "describe_series",
    "resample_uniform",
]

#: relative deviation from the median slice step that is resampled (above it: refused)
UNEVEN_TOLERANCE = 0.1
#: relative deviation treated as even (no resampling)
EVEN_TOLERANCE = 0.01
_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "NumberOfFrames")
_SERIES_MIXED = "it mixes several acquisitions or echoes; choose one by its series UID or split it"


@dataclass(frozen=True)
class Plane:
    """One image plane as its header places it: a single-frame file, or one frame of a multi-frame file.

    ``name`` names it in messages (a file name, ``frame 3``); ``position`` is the LPS
    position (mm) of its first pixel; ``orientation`` the six direction cosines of its
    rows and columns; ``spacing`` the DICOM PixelSpacing (between rows, between
    columns) in mm, None where the header has none.
    """

    name: str
    position: tuple[float, ...]
    orientation: tuple[float, ...]
    spacing: Optional[tuple[float, ...]]
    rows: int
    columns: int


@dataclass(frozen=True)
class StackGeometry:
    """The planes of a stack sorted along the slice normal.

    ``order`` holds the indices of the given planes in that order, ``positions`` their
    positions (mm along the normal), ``step`` the mean step and ``uneven`` whether the
    steps differ by more than :data:`EVEN_TOLERANCE` (so the caller must resample).
    """

    order: tuple[int, ...]
    positions: tuple[float, ...]
    step: float
    uneven: bool


@dataclass(frozen=True)
class SeriesGeometry:
    """Files sorted along the slice normal, their positions (mm along the normal), and the step."""

    files: tuple[str, ...]
    positions: tuple[float, ...]
    step: float
    uneven: bool
    rows: int
    columns: int
    bytes_per_pixel: int


#: modalities of DICOM objects that hold no image to segment
NON_IMAGE_MODALITIES = ("SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG", "DOC")


@dataclass(frozen=True)
class SeriesInfo:
    """What a series is, for listing it: modality, description, number of files and of images.

    ``enhanced`` is true when its first file is a multi-frame image whose geometry lies
    in per-frame functional groups (Enhanced MR/CT and the like); ``frames`` is that
    file's number of frames (1 for single-frame images).
    """

    modality: str
    description: str
    files: int
    images: int
    is_image: bool
    frames: int = 1
    enhanced: bool = False

    def summary(self) -> str:
        """``MR, 'T1 axial', 120 images``, or ``MR, 1 multi-frame file of 48 frames``."""
        parts = [self.modality or "unknown modality"]
        if self.description:
            parts.append(repr(self.description))
        if self.frames > 1:
            files = f"{self.files} multi-frame file{'s' if self.files != 1 else ''}"
            parts.append(f"{files} of {self.images} frames" if self.files == 1 else f"{files}, {self.images} frames")
        else:
            parts.append(f"{self.images} image{'s' if self.images != 1 else ''}")
        return ", ".join(parts)


def describe_series(files: Sequence[str]) -> SeriesInfo:
    """Modality, description and counts of a series from its first file's header (no pixels read)."""
    modality = description = ""
    frames = 1
    has_pixels = True
    enhanced = False
    try:
        import pydicom

        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        modality = str(ds.get("Modality", "") or "").strip()
        description = str(ds.get("SeriesDescription", "") or "").strip()
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        has_pixels = "Rows" in ds
        enhanced = has_pixels and "PerFrameFunctionalGroupsSequence" in ds
    except Exception:  # noqa: BLE001 - no pydicom or an odd header: list what is known
        pass
    is_image = has_pixels and modality.upper() not in NON_IMAGE_MODALITIES
    return SeriesInfo(modality, description, len(files), len(files) * frames, is_image, frames, enhanced)


def _numbers(value: object, count: int) -> Optional[tuple[float, ...]]:
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def check_series(folder: Path, files: Sequence[str]) -> Optional[SeriesGeometry]:
    """Check that ``files`` (one series) form a uniform stack of slices; InputError naming the problem.

    Returns None when the headers cannot tell (no pydicom, missing position or
    orientation, a multi-frame file, a single file): the reader's own checks apply.
    """
    try:
        import pydicom
    except ImportError:
        return None
    if len(files) < 2:
        return None
    planes = []
    bits = 16
    for name in files:
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True, specific_tags=list(_TAGS) + ["BitsAllocated"])
        except Exception:  # noqa: BLE001 - the full read reports unreadable files
            return None
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            return None
        position = _numbers(getattr(ds, "ImagePositionPatient", None), 3)
        orientation = _numbers(getattr(ds, "ImageOrientationPatient", None), 6)
        if position is None or orientation is None:
            return None
        if not planes:
            bits = int(ds.get("BitsAllocated", 16) or 16)
        spacing = _numbers(getattr(ds, "PixelSpacing", None), 2)
        rows, columns = ds.get("Rows"), ds.get("Columns")
        planes.append(Plane(Path(name).name, position, orientation, spacing, rows, columns))  # type: ignore[arg-type]
    stack = check_stack(planes, f"the DICOM series in {folder}", "slice", _SERIES_MIXED, where=str(folder))
    return SeriesGeometry(
        files=tuple(files[i] for i in stack.order),
        positions=stack.positions,
        step=stack.step,
        uneven=stack.uneven,
        rows=int(planes[0].rows or 0),
        columns=int(planes[0].columns or 0),
        bytes_per_pixel=max(bits // 8, 1),
    )


def _check_finite(planes: Sequence[Plane], where: str) -> None:
    for plane in planes:
        for what, values in (
            ("position", plane.position),
            ("orientation", plane.orientation),
            ("pixel spacing", plane.spacing),
        ):
            if values is not None and not all(math.isfinite(v) for v in values):
                raise InputError(
                    f"{plane.name} in {where} has a NaN or infinite {what}; the series cannot be placed in space"
                )


def _check_alike(planes: Sequence[Plane], source: str, item: str) -> None:
    """Refuse planes that change orientation, pixel spacing or size."""
    first = planes[0]
    for plane in planes[1:]:
        if max(abs(a - b) for a, b in zip(plane.orientation, first.orientation)) > 1e-4:
            raise InputError(
                f"the {item}s of {source} change orientation ({plane.name} differs from {first.name}); "
                "it is not one volume: split it or load it in a DICOM viewer"
            )
        if (plane.spacing is None) != (first.spacing is None) or (
            plane.spacing is not None
            and first.spacing is not None
            and max(abs(a - b) for a, b in zip(plane.spacing, first.spacing)) > 1e-4
        ):
            raise InputError(
                f"the {item}s of {source} change pixel spacing ({plane.name}: {plane.spacing}, "
                f"{first.name}: {first.spacing}); it is not one volume"
            )
        if (plane.rows, plane.columns) != (first.rows, first.columns):
            raise InputError(
                f"the {item}s of {source} change size ({plane.name}: {plane.rows}x{plane.columns}, "
                f"{first.name}: {first.rows}x{first.columns}); it is not one volume"
            )


def check_stack(
    planes: Sequence[Plane], source: str, item: str = "slice", mixed: str = _SERIES_MIXED, where: str = ""
) -> StackGeometry:
    """Check that ``planes`` form one uniform stack and sort them along the slice normal.

    ``source`` names the stack in messages (``the DICOM series in /data/ct``), ``item``
    its planes (``slice``, ``frame``), ``mixed`` says what to do about duplicate
    positions, ``where`` (default ``source``) follows a plane's name in messages about
    one plane. Raises a one-line :class:`InputError` for NaN or infinite geometry,
    planes that change orientation, pixel spacing or size, duplicate positions, a
    sheared stack, missing planes, or steps uneven by more than :data:`UNEVEN_TOLERANCE`.
    One plane is only checked to be finite; its step is 0.
    """
    if not planes:
        raise ValueError("check_stack needs at least one plane")
    _check_finite(planes, where or source)
    _check_alike(planes, source, item)
    orientation = np.asarray(planes[0].orientation, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    along = sorted(
        ((float(np.dot(plane.position, normal)), index) for index, plane in enumerate(planes)), key=lambda a: a[0]
    )
    order = [index for _, index in along]
    positions = np.array([a for a, _ in along])
    if len(planes) == 1:
        return StackGeometry(order=(0,), positions=(float(positions[0]),), step=0.0, uneven=False)
    steps = np.diff(positions)
    duplicates = int(np.sum(steps < 1e-3))
    if duplicates:
        at = positions[1:][steps < 1e-3][0]
        raise InputError(
            f"{source} has {duplicates} duplicate {item} position(s) (e.g. at {at:.2f} mm along the slice normal): "
            f"{mixed}"
        )
    corners = np.array([planes[i].position for i in order], dtype=np.float64)
    offsets = corners - corners[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    if np.max(np.abs(in_plane)) > max(1e-2, 0.01 * float(np.median(steps))):
        raise InputError(
            f"the {item}s of {source} are shifted within their plane from {item} to {item} (gantry tilt or a sheared "
            "stack); resample it in a DICOM tool (e.g. Slicer's DICOM module) first"
        )
    median = float(np.median(steps))
    deviation = np.abs(steps - median) / median
    gaps = np.round(steps / median)
    if np.any(gaps >= 2) and np.all(np.abs(steps - gaps * median) / median <= UNEVEN_TOLERANCE):
        missing = int(np.sum(gaps - 1))
        at = positions[:-1][gaps >= 2][0]
        raise InputError(
            f"{source} is missing {missing} {item}(s) (the first gap is after {at:.2f} mm along the slice normal, "
            f"{item}s are {median:.3g} mm apart): export the complete series"
        )
    if np.max(deviation) > UNEVEN_TOLERANCE:
        raise InputError(
            f"the {item}s of {source} are unevenly spaced (steps from {steps.min():.3g} to {steps.max():.3g} mm): "
            "it cannot be one regular volume; resample it in a DICOM tool first"
        )
    return StackGeometry(
        order=tuple(order),
        positions=tuple(float(p) for p in positions),
        step=float((positions[-1] - positions[0]) / (len(positions) - 1)),
        uneven=bool(np.max(deviation) > EVEN_TOLERANCE),
    )


def resample_uniform(array: np.ndarray, positions: Sequence[float], step: float) -> np.ndarray:
    """Slices ``array[k]`` (axis -3) at ``positions`` linearly resampled onto ``positions[0] + i * step``."""
    positions = np.asarray(positions, dtype=np.float64)
    targets = positions[0] + step * np.arange(len(positions))
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = np.clip((targets - positions[lower]) / (positions[upper] - positions[lower]), 0.0, 1.0)
    source = np.moveaxis(array, -3, 0).astype(np.float32)
    shape = (-1,) + (1,) * (source.ndim - 1)
    out = source[lower] * (1 - weight).reshape(shape) + source[upper] * weight.reshape(shape)
    if np.issubdtype(array.dtype, np.integer):
        out = np.rint(out).astype(array.dtype)
    return np.moveaxis(out.astype(array.dtype, copy=False), 0, -3)
