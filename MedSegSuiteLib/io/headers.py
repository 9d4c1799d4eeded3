"""Checks of image headers before ITK reads them.

ITK quietly replaces a NaN or infinite spacing, origin or direction with a default
(moving the voxels in space), and follows a header's pointer to its data file
wherever it leads. :func:`check_header` refuses both, reading only the header:

- NIfTI-1/2: ``pixdim`` of the spatial axes, and the quaternion/offset (``qform``)
  and affine rows (``sform``) when their codes say they are used;
- NRRD / detached NHDR: ``spacings``, ``space directions``, ``space origin`` and
  ``data file``;
- MetaImage (``.mha``/``.mhd``): spacing, offset/origin, direction fields and
  ``ElementDataFile``.

A data file named by a header must be a regular file inside the header's own
folder (or a sub-folder of it).
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import Iterable, Optional

from ..errors import InputError

__all__ = ["check_header"]

_HEADER_LIMIT = 1 << 16
_NOT_FINITE = re.compile(r"(?<![A-Za-z])[-+]?(nan|inf|infinity)(?![A-Za-z])", re.IGNORECASE)
_NRRD_GEOMETRY = ("spacings", "space directions", "space origin", "axis mins", "axis maxs")
_META_GEOMETRY = (
    "elementspacing",
    "elementsize",
    "offset",
    "origin",
    "position",
    "transformmatrix",
    "rotation",
    "orientation",
    "centerofrotation",
)


def _impossible(path: Path, what: str) -> InputError:
    return InputError(
        f"{path} has an impossible geometry: its header gives {what}; fix the header (spacing must be a positive "
        "number, origin and direction finite numbers)"
    )


def _check_finite(path: Path, values: Iterable[float], what: str) -> None:
    for value in values:
        if not math.isfinite(value):
            raise _impossible(path, f"{'a NaN' if math.isnan(value) else 'an infinite'} {what}")


def _check_nifti(path: Path, header: bytes) -> None:
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            pixdim = struct.unpack(endian + "8f", header[76:108])
            qform, sform = struct.unpack(endian + "2h", header[252:256])
            quaternion = struct.unpack(endian + "6f", header[256:280])
            rows = struct.unpack(endian + "12f", header[280:328])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            pixdim = struct.unpack(endian + "8d", header[104:168])
            qform, sform = struct.unpack(endian + "2i", header[344:352])
            quaternion = struct.unpack(endian + "6d", header[352:400])
            rows = struct.unpack(endian + "12d", header[400:496])
            break
    else:
        return
    axes = min(max(int(dims[0]), 0), 3)
    _check_finite(path, pixdim[1 : axes + 1], "voxel spacing (pixdim)")
    if qform > 0:
        _check_finite(path, quaternion, "orientation or origin (qform quaternion/offset)")
    if sform > 0:
        _check_finite(path, rows, "orientation or origin (sform affine)")


def _text_header(path: Path, data: bytes, blank_line_ends: bool) -> list[tuple[str, str]]:
    """``(field, value)`` pairs of a text header (NRRD ``key: value`` or MetaImage ``Key = value``)."""
    fields = []
    for raw in data.split(b"\n"):
        line = raw.decode("latin-1").rstrip("\r")
        if blank_line_ends and not line.strip():
            break
        if line.startswith("#"):
            continue
        key, sep, value = line.partition(":=" if ":=" in line else (":" if blank_line_ends else "="))
        if sep:
            fields.append((key.strip().lower(), value.strip()))
            if not blank_line_ends and key.strip().lower() == "elementdatafile":
                break
    return fields


def _check_data_file(path: Path, name: str) -> None:
    """Refuse a data file that is outside the header's folder, missing or not a regular file."""
    folder = path.parent.resolve()
    target = (path.parent / name).resolve()
    if folder != target.parent and folder not in target.parents:
        raise InputError(
            f"{path} names its voxel data file {name!r} outside its own folder; refused: keep the header and its "
            "data file in one folder (or save the image as one file, e.g. .nrrd or .nii.gz)"
        )
    if not target.exists():
        raise InputError(f"{path} names its voxel data file {name!r}, which does not exist beside it")
    if not target.is_file():
        raise InputError(f"{path} names its voxel data file {name!r}, which is not a regular file; refused")


def _check_nrrd(path: Path, data: bytes) -> None:
    if not data.startswith(b"NRRD"):
        return
    fields = _text_header(path, data, blank_line_ends=True)
    for key, value in fields:
        if key in _NRRD_GEOMETRY and _NOT_FINITE.search(value):
            raise _impossible(path, f"a NaN or infinite value in '{key}: {value[:60]}'")
        if key in ("data file", "datafile"):
            if value.upper().startswith("LIST"):
                raise InputError(f"{path}: NRRD data files given as a LIST are not supported; save as one .nrrd file")
            name = value.split()[0] if "%" in value else value
            if "%" in name:
                raise InputError(
                    f"{path}: NRRD data files given as a numbered pattern are not supported; save as one .nrrd file"
                )
            _check_data_file(path, name)


def _check_meta(path: Path, data: bytes) -> None:
    fields = _text_header(path, data, blank_line_ends=False)
    for key, value in fields:
        if key in _META_GEOMETRY and _NOT_FINITE.search(value):
            raise _impossible(path, f"a NaN or infinite value in '{key} = {value[:60]}'")
        if key == "elementdatafile" and value.upper() not in ("LOCAL", ""):
            if value.upper().startswith("LIST") or "%" in value:
                raise InputError(
                    f"{path}: MetaImage data split over several files is not supported; save as one .mha file"
                )
            _check_data_file(path, value)


def check_header(path: Path, suffix: str) -> None:
    """Raise InputError for a header with a NaN/infinite geometry or a data file outside its folder.

    ``suffix`` is the file type (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``,
    ``.mhd``); other types pass. Only the header is read.
    """
    header: Optional[bytes]
    if suffix in (".nii", ".nii.gz"):
        import gzip
        import zlib

        try:
            with gzip.open(path, "rb") if suffix == ".nii.gz" else open(path, "rb") as handle:
                header = handle.read(540)
        except (EOFError, OSError, zlib.error):
            return  # the completeness check reports a corrupt file
        _check_nifti(path, header)
        return
    if suffix not in (".nrrd", ".nhdr", ".mha", ".mhd"):
        return
    try:
        with open(path, "rb") as handle:
            header = handle.read(_HEADER_LIMIT)
    except OSError:
        return
    if suffix in (".nrrd", ".nhdr"):
        _check_nrrd(path, header)
    else:
        _check_meta(path, header)
