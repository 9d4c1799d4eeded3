"""Exporting a segmentation node: Slicer ``.seg.nrrd``, a label map + JSON table, or a DICOM SEG.

The node is written to a temporary ``.seg.nrrd`` by Slicer's own storage node (names,
colours, terminology, tags and layers as Slicer stores them) when its reference
geometry is the volume's grid; otherwise its segments are resampled onto the volume's
grid (nearest neighbour) and written through the library's
:class:`~MedSegSuiteLib.io.segmentation.Segmentation`. Then
:func:`MedSegSuiteLib.export.export` writes the chosen format atomically. It runs in
the GUI process: it is file I/O without torch that takes about a second for a
typical CT, it works while the worker is busy (or not installed), and the status
line can report the files at once.

A DICOM SEG must reference the series its volume came from. In 3D Slicer a volume
loaded from the DICOM database has the attribute ``DICOM.instanceUIDs`` (its SOP
instance UIDs), whose files the database knows; an explicit series folder may be
given instead.

The segment a refinement ensemble adds to show where its chains disagree
("Uncertain (refinement)", see :mod:`.refinement`) is no label of a model: it is left
out of every format (the export works on a copy without it).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import slicer

from ..errors import InputError
from ..io.label_table import parse_terminology
from .segmentations import (
    TAG_LABEL_VALUE,
    TAG_MODEL,
    geometry_matches,
    is_uncertainty_segment,
    label_segment_ids,
    same_frame,
    segment_ids,
    segment_mask,
    segment_tag,
    segment_terminology,
)
from .volumes import grid_from_node

__all__ = [
    "DICOM_UIDS_ATTRIBUTE",
    "FORMATS",
    "dicom_files",
    "dicom_unavailable_reason",
    "export_segmentation",
    "format_of",
    "with_format",
]

log = logging.getLogger(__name__)

DICOM_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"

#: Export formats: key -> (file suffix, title for the format selector).
FORMATS = {
    "seg.nrrd": (".seg.nrrd", "Slicer segmentation (.seg.nrrd)"),
    "nifti": (".nii.gz", "NIfTI label map + JSON table (.nii.gz)"),
    "nrrd": (".nrrd", "NRRD label map + JSON table (.nrrd)"),
    "dicom": (".dcm", "DICOM SEG (.dcm)"),
}
_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".dcm")


def _suffix(path: str) -> str:
    lower = path.lower()
    return next((suffix for suffix in _SUFFIXES if lower.endswith(suffix)), "")


def format_of(path: str) -> Optional[str]:
    """The format key a file name asks for (``.nii`` counts as NIfTI), or None."""
    suffix = _suffix(path)
    if suffix == ".nii":
        return "nifti"
    return next((key for key, (ext, _) in FORMATS.items() if ext == suffix), None)


def with_format(path: str, format_key: str) -> str:
    """``path`` with its export suffix replaced by ``format_key``'s (added when it has none)."""
    path = str(path).strip()
    if not path:
        return path
    suffix = _suffix(path)
    stem = path[: len(path) - len(suffix)] if suffix else path
    return stem + FORMATS[format_key][0]


def dicom_files(volume_node: Any) -> list[str]:
    """The DICOM files a volume was loaded from, as the DICOM database knows them ([] when unknown)."""
    uids = (volume_node.GetAttribute(DICOM_UIDS_ATTRIBUTE) or "").split() if volume_node is not None else []
    database = getattr(slicer, "dicomDatabase", None)
    if not uids or database is None:
        return []
    files = [database.fileForInstance(uid) for uid in uids]
    return [str(f) for f in files if f and os.path.isfile(str(f))]


def dicom_unavailable_reason(volume_node: Any, dicom_folder: Optional[Union[str, Path]] = None) -> str:
    """Why a DICOM SEG cannot be exported for this volume ("" when it can)."""
    if dicom_folder is not None:
        return "" if Path(dicom_folder).is_dir() else f"the DICOM folder {dicom_folder} does not exist"
    if volume_node is None:
        return "choose the input volume first"
    if not volume_node.GetAttribute(DICOM_UIDS_ATTRIBUTE):
        return (
            f"{volume_node.GetName()!r} was not loaded from DICOM; a DICOM SEG must reference the DICOM images "
            "it segments (load them through the DICOM module)"
        )
    if not dicom_files(volume_node):
        return f"the DICOM files of {volume_node.GetName()!r} are not in the DICOM database any more"
    return ""


def _labels_only(segmentation_node: Any) -> Any:
    """The node itself, or (when it holds uncertainty segments) a copy outside the scene without them."""
    segmentation = segmentation_node.GetSegmentation()
    extra = [sid for sid in segment_ids(segmentation_node) if is_uncertainty_segment(segmentation.GetSegment(sid))]
    if not extra:
        return segmentation_node
    copy = slicer.vtkMRMLSegmentationNode()
    copy.SetName(segmentation_node.GetName())
    copy.GetSegmentation().DeepCopy(segmentation)
    for segment_id in extra:
        copy.GetSegmentation().RemoveSegment(segment_id)
    return copy


def _write_seg_nrrd(segmentation_node: Any, path: Path) -> None:
    segmentation_node = _labels_only(segmentation_node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    storage.SetCropToMinimumExtent(False)
    storage.SetUseCompression(False)
    if not storage.WriteData(segmentation_node):
        raise InputError(f"Slicer could not write {segmentation_node.GetName()!r} to a temporary file")


def _has_voxels(segmentation_node: Any, segment_id: str) -> bool:
    """Whether the segment holds any voxel on its own geometry."""
    from vtk.util import numpy_support

    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node,
        segment_id,
        labelmap,
        False,  # the node's own coordinates: only the voxel values matter
    ):
        return False
    scalars = labelmap.GetPointData().GetScalars()
    value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    return scalars is not None and bool((numpy_support.vtk_to_numpy(scalars) == value).any())


def _write_on_grid(segmentation_node: Any, reference_node: Any, path: Path) -> None:
    """Write the node's segments resampled onto the reference volume's grid (for nodes on another geometry)."""
    from ..io.seg_nrrd import write_seg_nrrd
    from ..io.segmentation import Segment, Segmentation

    segmentation = segmentation_node.GetSegmentation()
    masks, records, outside = [], [], []
    for index, segment_id in enumerate(label_segment_ids(segmentation_node)):
        segment = segmentation.GetSegment(segment_id)
        try:
            terminology = parse_terminology(segment_terminology(segment)) or None
        except InputError:
            terminology = None
        value = segment_tag(segment, TAG_LABEL_VALUE)
        model = segment_tag(segment, TAG_MODEL)
        records.append(
            Segment(
                segment_id,
                segment.GetName(),
                tuple(int(round(c * 255)) for c in segment.GetColor()),  # type: ignore[arg-type]
                terminology,
                0,
                index + 1,
                int(value) if value.isdigit() else None,
                {TAG_MODEL: model} if model else {},
            )
        )
        masks.append(segment_mask(segmentation_node, segment_id, reference_node))
        if not masks[-1].any() and _has_voxels(segmentation_node, segment_id):
            outside.append(segment.GetName())
    if outside:
        raise InputError(
            f"segment(s) {', '.join(repr(name) for name in outside)} of {segmentation_node.GetName()!r} lie outside "
            f"volume {reference_node.GetName()!r}: choose the volume the segmentation was made on as the input volume"
        )
    write_seg_nrrd(Segmentation.from_masks(grid_from_node(reference_node), masks, records), path, compress=False)


def _link_or_copy(files: list[str], folder: Path) -> None:
    for index, source in enumerate(files):
        target = folder / f"{index:05d}.dcm"
        try:
            os.symlink(source, target)
        except (OSError, NotImplementedError):
            shutil.copyfile(source, target)


def export_segmentation(
    segmentation_node: Any,
    output: Union[str, Path],
    reference_node: Optional[Any] = None,
    overwrite: bool = False,
    dicom_folder: Optional[Union[str, Path]] = None,
    overlap: str = "refuse",
) -> list[Path]:
    """Write a segmentation node to ``output`` in the format its extension names; returns the files written.

    ``.seg.nrrd``, ``.nii.gz`` / ``.nii`` / ``.nrrd`` (label map + ``.labels.json``
    table) or ``.dcm`` (DICOM SEG). With ``reference_node`` the result lies on that
    volume's grid (segments on another geometry are resampled onto it, nearest
    neighbour; voxels outside the volume are dropped, and a segment with voxels but none inside the
    volume is refused). A DICOM SEG references ``dicom_folder`` or, by default, the DICOM files
    ``reference_node`` was loaded from. Files hold the reference volume's own (local)
    coordinates, like the volume's file; a segmentation under another (linear)
    transform than the volume is brought onto the volume's grid through both
    transforms. Existing files are replaced only with ``overwrite``. A refinement's
    uncertainty segment is not written (it is no label). Raises InputError with a
    one-line reason.
    """
    from ..export import export, table_path_for

    if segmentation_node is None:
        raise InputError("choose the segmentation to export")
    if not label_segment_ids(segmentation_node):
        raise InputError(f"{segmentation_node.GetName()!r} has no segments to export")
    output = Path(str(output).strip()).expanduser()
    if not str(output) or format_of(str(output)) is None:
        raise InputError(
            f"{output.name or 'the output'}: choose a file name ending in .seg.nrrd, .nii.gz, .nrrd or .dcm"
        )
    targets = [output] + ([table_path_for(output)] if format_of(str(output)) in ("nifti", "nrrd") else [])
    for target in targets:
        if target.exists() and not overwrite:
            raise InputError(f"{target} already exists; tick 'Replace existing files' to replace it")
    folder = Path(tempfile.mkdtemp(prefix="medsegsuite-export-"))
    try:
        source = folder / "segmentation.seg.nrrd"
        if reference_node is None or (
            same_frame(segmentation_node, reference_node) and geometry_matches(segmentation_node, reference_node)
        ):  # the file holds the node's own coordinates: exactly the volume's grid when both share a transform
            _write_seg_nrrd(segmentation_node, source)
        else:
            _write_on_grid(segmentation_node, reference_node, source)
        series = None
        if format_of(str(output)) == "dicom":
            if dicom_folder is not None:
                series = Path(dicom_folder)
            else:
                reason = dicom_unavailable_reason(reference_node)
                if reason:
                    raise InputError(f"cannot export a DICOM SEG: {reason}")
                series = folder / "dicom"
                series.mkdir()
                _link_or_copy(dicom_files(reference_node), series)
        try:
            written = export(source, output, dicom_series=series, overwrite=overwrite, overlap=overlap)
        except InputError as error:
            text = str(error).replace(
                "or choose which segment wins with --overlap first|last", "or remove the overlap in Segment Editor"
            )
            raise InputError(text) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    log.info("exported %s to %s", segmentation_node.GetName(), ", ".join(str(p) for p in written))
    return written
