"""Enhanced (multi-frame) DICOM images, read with pydicom from their functional groups.

An Enhanced MR or CT image (or any multi-frame image with a Per-frame Functional
Groups Sequence) keeps its geometry per frame: the pixel spacing (Pixel Measures),
the orientation (Plane Orientation) and the position of each frame (Plane Position)
lie in the Shared or the Per-frame Functional Groups, and so does the rescale
(Pixel Value Transformation). GDCM's geometry for such files (spacing between
frames, frame order) cannot be relied on, so they are read here with pydicom: the
frames are placed by their own headers, sorted along the slice normal and checked
by the same rules as a series of single-frame images
(:func:`~MedSegSuiteLib.io.dicom_series.check_stack`). The
:class:`~MedSegSuiteLib.volume.Volume` follows the series reader's conventions
(spacing x = column spacing, origin = first frame along the normal, direction
columns = row, column and slice normal), so a multi-frame file and the same images
written as a single-frame series give the same volume. Pixels are decoded only after
the geometry, the free memory and the transfer syntax have been checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..volume import Volume
from .dicom_series import NON_IMAGE_MODALITIES, Plane, check_stack, resample_uniform

__all__ = ["is_enhanced", "read_enhanced"]

log = logging.getLogger(__name__)
PathLike = Union[str, Path]

#: what to do about frames at the same position
_MIXED = (
    "it holds several stacks, echoes or time points; split it into one volume per stack "
    "(e.g. load it in Slicer's DICOM module and save each volume) and give one of them"
)
_DECOMPRESS = (
    "decompress it first, e.g. with `gdcmconv --raw IN.dcm OUT.dcm` (GDCM) or `dcmdjpeg IN.dcm OUT.dcm` (dcmtk)"
)
_ORTHONORMAL_TOL = 1e-3


@dataclass(frozen=True)
class _Header:
    """One multi-frame file before its pixels are read: its frames' planes and rescale, and what decoding needs."""

    path: Path
    planes: tuple[Plane, ...]
    slopes: np.ndarray
    intercepts: np.ndarray
    slice_spacing: Optional[float]
    bits_allocated: int
    transfer_syntax: Any


def is_enhanced(dataset: Any) -> bool:
    """True for a pydicom dataset (header) of a multi-frame image whose geometry lies in per-frame functional groups.

    Segmentations and other objects in
    :data:`~MedSegSuiteLib.io.dicom_series.NON_IMAGE_MODALITIES` are not images, even
    though some of them (DICOM SEG) have per-frame functional groups.
    """
    modality = str(dataset.get("Modality", "") or "").strip().upper()
    return "PerFrameFunctionalGroupsSequence" in dataset and "Rows" in dataset and modality not in NON_IMAGE_MODALITIES


def _macro(groups: Sequence[Any], sequence: str, attribute: str) -> Any:
    """``attribute`` of the first item of ``sequence`` in the first of ``groups`` (per frame, shared) holding it."""
    for group in groups:
        if group is None or sequence not in group:
            continue
        items = group[sequence].value
        if items and attribute in items[0]:
            value = items[0][attribute].value
            if value is not None and value != "":
                return value
    return None


def _numbers(value: Any, count: int, what: str) -> Optional[tuple[float, ...]]:
    """``value`` (a DICOM DS value or list of them) as ``count`` floats; None when absent, InputError when malformed."""
    from pydicom.multival import MultiValue

    if value is None or value == "":
        return None
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"{what} is not a list of numbers ({value!r}); fix or re-export the file") from None
    if len(numbers) != count:
        raise InputError(f"{what} has {len(numbers)} value(s) instead of {count}; fix or re-export the file")
    return numbers


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _read_header(path: Path) -> _Header:
    """Read ``path``'s header (no pixels) and place each of its frames; InputError naming what is missing."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as error:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
        raise InputError(f"cannot read DICOM file {path}: {_first_line(error)}") from None
    if not is_enhanced(dataset):
        raise InputError(
            f"{path} is not a multi-frame image with per-frame geometry, but its series also holds such files; "
            "give one multi-frame file, or a folder that holds one kind of file"
        )
    if int(dataset.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(f"{path} is a colour multi-frame image; only greyscale multi-frame images are supported")
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    per_frame = list(dataset.PerFrameFunctionalGroupsSequence)
    if len(per_frame) != count:
        raise InputError(
            f"{path} has {count} frame(s) but {len(per_frame)} per-frame functional group item(s); "
            "the file is damaged: re-export it"
        )
    shared_items = dataset.get("SharedFunctionalGroupsSequence") or [None]
    shared = shared_items[0]
    rows, columns = int(dataset.Rows), int(dataset.get("Columns", 0) or 0)
    planes, slopes, intercepts = [], [], []
    for index, frame in enumerate(per_frame):
        groups = (frame, shared)
        label = f"frame {index + 1}"
        where = f"{label} of {path}"
        position = _numbers(
            _macro(groups, "PlanePositionSequence", "ImagePositionPatient"), 3, f"the position of {where}"
        )
        orientation = _numbers(
            _macro(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
            or dataset.get("ImageOrientationPatient"),
            6,
            f"the orientation of {where}",
        )
        if position is None or orientation is None:
            what = "position (Plane Position)" if position is None else "orientation (Plane Orientation)"
            raise InputError(
                f"{where} has no {what} in its per-frame or shared functional groups, so it cannot be placed "
                "in space; re-export the image with its geometry"
            )
        spacing = _numbers(
            _macro(groups, "PixelMeasuresSequence", "PixelSpacing") or dataset.get("PixelSpacing"),
            2,
            f"the pixel spacing of {where}",
        )
        slope = _macro(groups, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _macro(groups, "PixelValueTransformationSequence", "RescaleIntercept")
        slopes.append(float(slope if slope is not None else dataset.get("RescaleSlope", 1.0) or 1.0))
        intercepts.append(float(intercept if intercept is not None else dataset.get("RescaleIntercept", 0.0) or 0.0))
        planes.append(Plane(label, position, orientation, spacing, rows, columns))
    between = _numbers(
        _macro((per_frame[0], shared), "PixelMeasuresSequence", "SpacingBetweenSlices"),
        1,
        f"the spacing between slices of {path}",
    )
    meta = getattr(dataset, "file_meta", None)
    return _Header(
        path=path,
        planes=tuple(planes),
        slopes=np.asarray(slopes, dtype=np.float64),
        intercepts=np.asarray(intercepts, dtype=np.float64),
        slice_spacing=between[0] if between is not None and between[0] > 0 else None,
        bits_allocated=int(dataset.get("BitsAllocated", 16) or 16),
        transfer_syntax=getattr(meta, "TransferSyntaxUID", None),
    )


def _check_decodable(header: _Header) -> None:
    """Refuse, in one line, a compressed transfer syntax that no installed pydicom decoder can read."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    syntax = header.transfer_syntax
    if syntax is None:
        return  # pydicom assumes an uncompressed syntax and reports a mismatch when decoding
    syntax = UID(str(syntax))
    if not syntax.is_transfer_syntax:
        raise InputError(f"{header.path} uses the transfer syntax {syntax}, which is not a standard one; {_DECOMPRESS}")
    if not syntax.is_compressed:
        return
    name = syntax.name
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise InputError(
            f"{header.path} is compressed with {name}, which cannot be decoded here; {_DECOMPRESS}"
        ) from None
    if not decoder.is_available:
        needs = " or ".join(dep.split(" - requires ")[-1] for dep in decoder.missing_dependencies)
        raise InputError(
            f"{header.path} is compressed with {name}, which needs {needs or 'a decoder plugin'} to decode; "
            f"{_DECOMPRESS}, or install that package"
        )


def _check_orientation(plane: Plane, source: str) -> np.ndarray:
    """The direction matrix (columns: row, column, normal) of ``plane``; InputError when its cosines are not."""
    row, column = np.asarray(plane.orientation[:3]), np.asarray(plane.orientation[3:])
    if (
        abs(np.linalg.norm(row) - 1) > _ORTHONORMAL_TOL
        or abs(np.linalg.norm(column) - 1) > _ORTHONORMAL_TOL
        or abs(float(row @ column)) > _ORTHONORMAL_TOL
    ):
        raise InputError(
            f"the orientation of {source} ({', '.join(f'{v:g}' for v in plane.orientation)}) is not two "
            "perpendicular unit vectors; the header is corrupt: re-export the image"
        )
    direction = np.column_stack([row, column, np.cross(row, column)])
    if not np.allclose(direction.T @ direction, np.eye(3), rtol=0, atol=1e-12):
        u, _, vt = np.linalg.svd(direction)  # the nearest orthonormal matrix to cosines rounded in the header
        direction = u @ vt
    return direction


def _decode(header: _Header) -> np.ndarray:
    """The stored pixel values of ``header``'s file, shape (frames, rows, columns); InputError when undecodable."""
    import pydicom

    try:
        dataset = pydicom.dcmread(header.path)
        array = dataset.pixel_array
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - decoders raise many kinds for damaged pixel data
        raise InputError(
            f"cannot decode the pixel data of {header.path}: {_first_line(error)} (is the file truncated?)"
        ) from None
    first = header.planes[0]
    expected = (len(header.planes), first.rows, first.columns)
    if array.size != int(np.prod(expected)):
        raise InputError(
            f"the pixel data of {header.path} holds {array.size} values instead of "
            f"{' x '.join(map(str, expected))}; the file is damaged: re-export it"
        )
    return array.reshape(expected)


def _rescaled(header: _Header, array: np.ndarray) -> np.ndarray:
    """``array`` with each frame's rescale slope and intercept applied (float32), unchanged when all are identity."""
    if np.all(header.slopes == 1.0) and np.all(header.intercepts == 0.0):
        return array
    out = np.empty(array.shape, dtype=np.float32)
    for k in range(array.shape[0]):  # frame by frame: no float64 copy of the whole volume
        out[k] = array[k].astype(np.float64) * header.slopes[k] + header.intercepts[k]
    return out


def read_enhanced(files: Sequence[PathLike], folder: Optional[PathLike] = None) -> Volume:
    """Read one or more multi-frame files of one series (Enhanced MR/CT ...) into one :class:`Volume`.

    The frames of all ``files`` are placed by their functional groups, sorted along the
    slice normal and checked like the slices of a single-frame series; slightly uneven
    frames (at most 10 % of the step) are resampled onto a uniform grid with a warning.
    The voxels are the stored values with each frame's rescale slope and intercept
    applied (float32 when any is not 1 and 0, else the stored type). ``folder`` names a
    series of several files in messages. Raises a one-line :class:`InputError` (or
    :class:`~MedSegSuiteLib.errors.OutOfMemory`) saying what to do, before any pixel is
    decoded, for frames that are not one volume, a compressed transfer syntax that
    cannot be decoded here, or an image too large for the free memory.
    """
    from ..memory import check_fits

    paths = [Path(name) for name in files]
    if not paths:
        raise InputError("no multi-frame DICOM file given")
    headers = [_read_header(path) for path in paths]
    if len(headers) == 1:
        source = f"the enhanced DICOM file {paths[0]}"
        planes = list(headers[0].planes)
    else:
        source = f"the enhanced DICOM series in {folder or paths[0].parent}"
        planes = [replace(plane, name=f"{plane.name} of {h.path.name}") for h in headers for plane in h.planes]
    where = str(paths[0]) if len(paths) == 1 else str(folder or paths[0].parent)
    stack = check_stack(planes, source, "frame", _MIXED, where=where)
    direction = _check_orientation(planes[0], source)
    first = planes[0]
    bytes_per_pixel = max(max(h.bits_allocated for h in headers) // 8, 1)
    check_fits(  # the file's bytes, the decoded frames and a float32 copy (rescale, resampling) at once
        float(first.rows) * first.columns * len(planes) * (2 * bytes_per_pixel + 4),
        f"reading {source} ({first.columns} x {first.rows} x {len(planes)} voxels)",
        "crop or downsample it first, or use a machine with more memory",
    )
    for header in headers:
        _check_decodable(header)
    arrays = [_rescaled(header, _decode(header)) for header in headers]
    if len({a.dtype for a in arrays}) > 1:
        arrays = [a.astype(np.float32, copy=False) for a in arrays]
    array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    array = np.ascontiguousarray(array[list(stack.order)])
    ordered = [planes[i] for i in stack.order]
    row_spacing, column_spacing = first.spacing if first.spacing is not None else (1.0, 1.0)
    if first.spacing is None:
        log.warning("%s gives no pixel spacing; assumed 1 mm", source)
    if len(ordered) > 1:
        span = np.asarray(ordered[-1].position) - np.asarray(ordered[0].position)
        step = float(np.linalg.norm(span)) / (len(ordered) - 1)  # as ITK's series reader measures it
    else:
        step = headers[0].slice_spacing or 1.0
    if stack.uneven:
        steps = np.diff(stack.positions)
        log.warning(
            "the frames of %s are unevenly spaced (%.3g to %.3g mm apart); resampled them linearly onto a uniform "
            "grid of %.3g mm",
            source,
            steps.min(),
            steps.max(),
            stack.step,
        )
        array = resample_uniform(array, stack.positions, stack.step)
        step = stack.step
    return Volume(array, (column_spacing, row_spacing, step), ordered[0].position, direction)
