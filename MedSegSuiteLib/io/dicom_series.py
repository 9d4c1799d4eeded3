"""The geometry of a DICOM series, checked slice by slice before it becomes one volume.

A series of single-frame images becomes a volume on a uniform grid only if its
slices really form one. :func:`check_series` reads each file's header (no pixels)
and refuses, with the reason, a series whose slices change orientation, pixel
spacing or size, repeat a position, leave out slices, are sheared (gantry tilt)
or are spaced very unevenly. Slightly uneven spacing (at most
:data:`UNEVEN_TOLERANCE` of the median step) is accepted: the caller resamples the
slices linearly onto a uniform grid (:func:`resample_uniform`) and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError

__all__ = ["SeriesGeometry", "SeriesInfo", "check_series", "describe_series", "resample_uniform"]

#: relative deviation from the median slice step that is resampled (above it: refused)
UNEVEN_TOLERANCE = 0.1
#: relative deviation treated as even (no resampling)
EVEN_TOLERANCE = 0.01
_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "NumberOfFrames")


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
    """What a series is, for listing it: modality, description, number of files and of images."""

    modality: str
    description: str
    files: int
    images: int
    is_image: bool

    def summary(self) -> str:
        """``MR, 'T1 axial', 120 images``."""
        parts = [self.modality or "unknown modality"]
        if self.description:
            parts.append(repr(self.description))
        parts.append(f"{self.images} image{'s' if self.images != 1 else ''}")
        return ", ".join(parts)


def describe_series(files: Sequence[str]) -> SeriesInfo:
    """Modality, description and counts of a series from its first file's header (no pixels read)."""
    modality = description = ""
    frames = 1
    has_pixels = True
    try:
        import pydicom

        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        modality = str(ds.get("Modality", "") or "").strip()
        description = str(ds.get("SeriesDescription", "") or "").strip()
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        has_pixels = "Rows" in ds
    except Exception:  # noqa: BLE001 - no pydicom or an odd header: list what is known
        pass
    is_image = has_pixels and modality.upper() not in NON_IMAGE_MODALITIES
    return SeriesInfo(modality, description, len(files), len(files) * frames, is_image)


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
    headers = []
    for name in files:
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True, specific_tags=list(_TAGS) + ["BitsAllocated"])
        except Exception:  # noqa: BLE001 - the full read reports unreadable files
            return None
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            return None
        position = _numbers(getattr(ds, "ImagePositionPatient", None), 3)
        orientation = _numbers(getattr(ds, "ImageOrientationPatient", None), 6)
        spacing = _numbers(getattr(ds, "PixelSpacing", None), 2)
        if position is None or orientation is None:
            return None
        for what, values in (("position", position), ("orientation", orientation), ("pixel spacing", spacing)):
            if values is not None and not all(math.isfinite(v) for v in values):
                raise InputError(
                    f"{Path(name).name} in {folder} has a NaN or infinite {what}; the series cannot be placed in space"
                )
        headers.append(
            (
                name,
                np.array(position),
                np.array(orientation),
                spacing,
                ds.get("Rows"),
                ds.get("Columns"),
                int(ds.get("BitsAllocated", 16) or 16),
            )
        )
    first = headers[0]
    for name, _, orientation, spacing, rows, columns, _ in headers[1:]:
        if np.max(np.abs(orientation - first[2])) > 1e-4:
            raise InputError(
                f"the slices of the DICOM series in {folder} change orientation ({Path(name).name} differs from "
                f"{Path(first[0]).name}); it is not one volume: split it or load it in a DICOM viewer"
            )
        if (spacing is None) != (first[3] is None) or (
            spacing is not None and max(abs(a - b) for a, b in zip(spacing, first[3])) > 1e-4
        ):
            raise InputError(
                f"the slices of the DICOM series in {folder} change pixel spacing ({Path(name).name}: {spacing}, "
                f"{Path(first[0]).name}: {first[3]}); it is not one volume"
            )
        if (rows, columns) != (first[4], first[5]):
            raise InputError(
                f"the slices of the DICOM series in {folder} change size ({Path(name).name}: {rows}x{columns}, "
                f"{Path(first[0]).name}: {first[4]}x{first[5]}); it is not one volume"
            )
    row, column = first[2][:3], first[2][3:]
    normal = np.cross(row, column)
    along = [(float(np.dot(position, normal)), name, position) for name, position, *_ in headers]
    along.sort(key=lambda item: item[0])
    positions = np.array([a for a, _, _ in along])
    steps = np.diff(positions)
    duplicates = int(np.sum(steps < 1e-3))
    if duplicates:
        at = positions[1:][steps < 1e-3][0]
        raise InputError(
            f"the DICOM series in {folder} has {duplicates} duplicate slice position(s) (e.g. at {at:.2f} mm along "
            "the slice normal): it mixes several acquisitions or echoes; choose one by its series UID or split it"
        )
    offsets = np.array([p for _, _, p in along]) - along[0][2]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    if np.max(np.abs(in_plane)) > max(1e-2, 0.01 * float(np.median(steps))):
        raise InputError(
            f"the slices of the DICOM series in {folder} are shifted within their plane from slice to slice (gantry "
            "tilt or a sheared stack); resample it in a DICOM tool (e.g. Slicer's DICOM module) first"
        )
    median = float(np.median(steps))
    deviation = np.abs(steps - median) / median
    gaps = np.round(steps / median)
    if np.any(gaps >= 2) and np.all(np.abs(steps - gaps * median) / median <= UNEVEN_TOLERANCE):
        missing = int(np.sum(gaps - 1))
        where = positions[:-1][gaps >= 2][0]
        raise InputError(
            f"the DICOM series in {folder} is missing {missing} slice(s) (the first gap is after {where:.2f} mm along "
            f"the slice normal, slices are {median:.3g} mm apart): export the complete series"
        )
    if np.max(deviation) > UNEVEN_TOLERANCE:
        raise InputError(
            f"the slices of the DICOM series in {folder} are unevenly spaced (steps from {steps.min():.3g} to "
            f"{steps.max():.3g} mm): it cannot be one regular volume; resample it in a DICOM tool first"
        )
    step = float((positions[-1] - positions[0]) / (len(positions) - 1))
    return SeriesGeometry(
        files=tuple(name for _, name, _ in along),
        positions=tuple(float(p) for p in positions),
        step=step,
        uneven=bool(np.max(deviation) > EVEN_TOLERANCE),
        rows=int(first[4] or 0),
        columns=int(first[5] or 0),
        bytes_per_pixel=max(first[6] // 8, 1),
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
