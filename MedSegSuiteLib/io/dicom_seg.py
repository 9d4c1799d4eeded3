"""DICOM Segmentation (SEG) objects, written and read with highdicom.

A written SEG is a BINARY segmentation (overlapping segments allowed) that
references the source series it was drawn on: its frames are the source slices
(empty frames omitted), it shares their Frame of Reference UID, and it lists every
source SOP instance. Each segment description carries the segment's name, its
property category and type (and type modifier, anatomic region and region modifier
when present) as coded concepts from its terminology codes, its recommended display
colour (CIELab), and an algorithm identification naming MedSegSuite and the model.
Segments without terminology are coded as Tissue (SCT 85756007), as Slicer does.

Only series of single-frame images (CT, MR, PET ...) are supported as sources.
highdicom and pydicom are imported when a function is called.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..volume import Grid
from .atomic import atomic_output
from .dicom_enhanced import is_enhanced
from .segmentation import GRID_TOLERANCE_MM, Segment, Segmentation, describe_grid

__all__ = ["AlgorithmInfo", "SourceSeries", "read_dicom_seg", "read_source_series", "write_dicom_seg"]

log = logging.getLogger(__name__)
PathLike = Union[str, Path]

_TISSUE = ("SCT", "85756007", "Tissue")
_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _require_highdicom() -> Any:
    try:
        import highdicom
    except ImportError:
        raise InputError(
            "DICOM SEG needs the highdicom package, which is not installed: pip install highdicom"
        ) from None
    return highdicom


@dataclass(frozen=True)
class AlgorithmInfo:
    """Who made the segmentation: the model id and version (None: not known), for the SEG's algorithm identification."""

    model_id: Optional[str] = None
    model_version: Optional[str] = None


@dataclass(frozen=True)
class SourceSeries:
    """A source DICOM series: its datasets (no pixel data) and, for each, its slice index k on ``grid``."""

    grid: Grid
    datasets: tuple[Any, ...]
    slice_index: tuple[int, ...]
    series_uid: str


def read_source_series(folder: PathLike, series_uid: Optional[str] = None) -> SourceSeries:
    """Read the headers of a DICOM series in ``folder`` and place every slice on the series' grid.

    Raises InputError when the folder holds no series, several series and no
    ``series_uid``, multi-frame images, or slices that do not form one regular grid.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from .images import read_image

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"DICOM series folder {folder} does not exist or is not a folder")
    by_series: dict[str, list[Any]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if "SeriesInstanceUID" not in dataset or ("ImagePositionPatient" not in dataset and not is_enhanced(dataset)):
            continue
        by_series.setdefault(str(dataset.SeriesInstanceUID), []).append(dataset)
    if not by_series:
        raise InputError(f"{folder} holds no DICOM image series")
    if series_uid is None:
        if len(by_series) > 1:
            listing = "; ".join(f"{uid} ({len(items)} files)" for uid, items in by_series.items())
            raise InputError(f"{folder} holds {len(by_series)} DICOM series, choose one by its UID: {listing}")
        series_uid = next(iter(by_series))
    elif series_uid not in by_series:
        raise InputError(f"DICOM series {series_uid} is not in {folder}; series there: {', '.join(by_series)}")
    datasets = by_series[series_uid]
    if any(int(getattr(d, "NumberOfFrames", 1) or 1) > 1 for d in datasets):
        raise InputError(
            f"{folder}: a DICOM SEG cannot yet reference multi-frame (enhanced) source images; export the "
            "segmentation as .seg.nrrd (Slicer) or as a NIfTI or NRRD label map (.nii.gz, .nrrd) instead"
        )
    if any(not str(getattr(d, "FrameOfReferenceUID", "") or "") for d in datasets):
        raise InputError(
            f"{folder}: the series has no Frame of Reference UID (0020,0052), which a DICOM SEG must share with it"
        )
    grid = read_image(folder, series_uid=series_uid).grid
    indices = []
    for dataset in datasets:
        ijk = grid.physical_to_index([float(v) for v in dataset.ImagePositionPatient])
        k = int(round(ijk[2]))
        if abs(ijk[0]) > 1e-2 or abs(ijk[1]) > 1e-2 or abs(ijk[2] - k) > 1e-2 or not 0 <= k < grid.shape[0]:
            raise InputError(f"{folder}: slice {dataset.SOPInstanceUID} does not lie on the series' regular grid")
        indices.append(k)
    if sorted(indices) != list(range(grid.shape[0])):
        raise InputError(f"{folder}: the series' slices do not form one regular volume (missing or repeated slices)")
    order = np.argsort(indices)
    return SourceSeries(
        grid,
        tuple(datasets[i] for i in order),
        tuple(int(indices[i]) for i in order),
        series_uid,
    )


def _coded(code: Sequence[str]) -> Any:
    from highdicom.sr.coding import CodedConcept

    scheme, value, meaning = (str(part) for part in code)
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning or value)


def _description(number: int, segment: Segment, algorithm: AlgorithmInfo, version: str) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    terminology = segment.terminology or {}
    category = terminology.get("category") or _TISSUE
    prop_type = terminology.get("type") or _TISSUE
    if algorithm.model_id:
        algorithm_type = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        identification = hd.AlgorithmIdentificationSequence(
            name=f"MedSegSuite {algorithm.model_id}",
            family=codes.cid7162.ArtificialIntelligence,
            version=algorithm.model_version or "unknown",
            source=f"MedSegSuite {version}",
            parameters={"model": algorithm.model_id},
        )
    else:
        algorithm_type = hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC
        identification = hd.AlgorithmIdentificationSequence(
            name="MedSegSuite", family=codes.cid7162.ArtificialIntelligence, version=version, source="MedSegSuite"
        )
    region = terminology.get("region")
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment.name[:64],
        segmented_property_category=_coded(category),
        segmented_property_type=_coded(prop_type),
        algorithm_type=algorithm_type,
        algorithm_identification=identification,
        tracking_uid=hd.UID(),
        tracking_id=segment.id[:64],
        anatomic_regions=[_coded(region)] if region else None,
        display_color=hd.color.CIELabColor.from_rgb(*segment.color),
    )
    if terminology.get("modifier"):
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _coded(terminology["modifier"])
        ]
    if region and terminology.get("region_modifier"):
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [_coded(terminology["region_modifier"])]
    return description


def _with_true_slice_spacing(source: SourceSeries) -> list[Any]:
    """The source datasets, without a SpacingBetweenSlices that is not the distance between their slices.

    highdicom copies that attribute into the SEG, where readers take it as the frame
    spacing; without it highdicom derives the spacing from the slice positions.
    """
    import copy

    out = []
    for dataset in source.datasets:
        value = dataset.get("SpacingBetweenSlices")
        try:
            wrong = value is not None and abs(float(value) - source.grid.spacing[2]) > GRID_TOLERANCE_MM
        except (TypeError, ValueError):
            wrong = True
        if wrong:
            dataset = copy.deepcopy(dataset)
            del dataset.SpacingBetweenSlices
        out.append(dataset)
    if len(out) and any(a is not b for a, b in zip(out, source.datasets)):
        log.warning("the source series' Spacing Between Slices is not its slice distance; the SEG uses the positions")
    return out


def write_dicom_seg(
    segmentation: Segmentation,
    path: PathLike,
    source: SourceSeries,
    overwrite: bool = False,
    algorithm: Optional[AlgorithmInfo] = None,
) -> Path:
    """Write ``segmentation`` as a DICOM SEG referencing ``source`` (see the module docstring), atomically.

    The segmentation must lie on the source series' grid (within 1e-3 mm); put it
    there first with :meth:`Segmentation.on_grid`. Refuses an existing file unless
    ``overwrite``; a failed write leaves no file. Returns the path written.
    """
    hd = _require_highdicom()
    from .. import __version__

    path = Path(path)
    if not segmentation.segments:
        raise InputError("the segmentation has no segments; a DICOM SEG needs at least one")
    if not segmentation.grid.same_as(source.grid, atol=GRID_TOLERANCE_MM):
        raise InputError(
            f"the segmentation's grid ({describe_grid(segmentation.grid)}) is not the DICOM series' grid "
            f"({describe_grid(source.grid)})"
        )
    algorithm = algorithm or AlgorithmInfo()
    rows, columns = segmentation.shape[1], segmentation.shape[2]
    order = list(source.slice_index)
    count = len(segmentation.segments)
    if segmentation.overlaps(limit=1):  # one binary plane per segment
        pixels = np.zeros((len(order), rows, columns, count), dtype=bool)
        for number, segment in enumerate(segmentation.segments):
            pixels[..., number] = segmentation.mask(segment)[order]
    else:  # a label map of segment numbers: much smaller than one plane per segment
        pixels = np.zeros((len(order), rows, columns), dtype=np.uint8 if count < 256 else np.uint16)
        for number, segment in enumerate(segmentation.segments, start=1):
            pixels[segmentation.mask(segment)[order]] = number
    descriptions = [
        _description(number + 1, segment, algorithm, __version__)
        for number, segment in enumerate(segmentation.segments)
    ]
    first = source.datasets[0]
    try:
        series_number = int(getattr(first, "SeriesNumber", 0) or 0) + 1000
    except (TypeError, ValueError):
        series_number = 1000
    try:
        seg = hd.seg.Segmentation(
            source_images=_with_true_slice_spacing(source),
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="MedSegSuite",
            manufacturer_model_name=(algorithm.model_id or "MedSegSuite")[:64],
            software_versions=__version__,
            device_serial_number="0",
            content_description="MedSegSuite segmentation"[:64],
            content_label="SEGMENTATION",
            series_description="MedSegSuite segmentation",
        )
    except (ValueError, TypeError, AttributeError) as error:
        raise InputError(f"cannot build the DICOM SEG: {error}") from None
    with atomic_output(path, overwrite=overwrite) as tmp:
        seg.save_as(tmp)
    return path


# -- reading -------------------------------------------------------------------------------------
def _code_list(item: Any) -> list[str]:
    return [str(item.CodingSchemeDesignator), str(item.CodeValue), str(getattr(item, "CodeMeaning", ""))]


def _terminology(description: Any) -> Optional[dict[str, Any]]:
    out: dict[str, Any] = {}
    if "SegmentedPropertyCategoryCodeSequence" in description:
        out["category"] = _code_list(description.SegmentedPropertyCategoryCodeSequence[0])
    if "SegmentedPropertyTypeCodeSequence" in description:
        type_item = description.SegmentedPropertyTypeCodeSequence[0]
        out["type"] = _code_list(type_item)
        if "SegmentedPropertyTypeModifierCodeSequence" in type_item:
            out["modifier"] = _code_list(type_item.SegmentedPropertyTypeModifierCodeSequence[0])
    if "AnatomicRegionSequence" in description:
        region_item = description.AnatomicRegionSequence[0]
        out["region"] = _code_list(region_item)
        if "AnatomicRegionModifierSequence" in region_item:
            out["region_modifier"] = _code_list(region_item.AnatomicRegionModifierSequence[0])
    if "category" not in out or "type" not in out:
        return None
    return out


def _color(description: Any) -> tuple[int, int, int]:
    import highdicom as hd

    value = description.get("RecommendedDisplayCIELabValue")
    if value is None:
        return (128, 174, 128)
    return tuple(int(c) for c in hd.color.CIELabColor.from_dicom_value(value).to_rgb(clip=True))  # type: ignore[return-value]


def _grid_of(volume: Any) -> Grid:
    """Our grid for a highdicom Volume whose array axes are (slice, row, column) = (k, j, i)."""
    affine = np.asarray(volume.affine, dtype=np.float64)
    axes = np.stack([affine[:3, 2], affine[:3, 1], affine[:3, 0]], axis=1)  # i, j, k columns
    spacing = np.linalg.norm(axes, axis=0)
    return Grid(tuple(volume.spatial_shape), tuple(spacing), tuple(affine[:3, 3]), axes / spacing[None, :])


def _lattice_placement(source: Grid, target: Grid) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """For grids on one voxel lattice: the (i, j, k) index of every source axis step and origin in ``target``."""
    to_target = np.linalg.inv(target.index_to_physical_matrix) @ source.index_to_physical_matrix
    linear, shift = to_target[:3, :3], to_target[:3, 3]
    rounded = np.round(linear)
    if not np.allclose(linear, rounded, atol=1e-3) or not np.allclose(shift, np.round(shift), atol=1e-3):
        return None
    if not (np.abs(rounded).sum(axis=0) == 1).all() or not (np.abs(rounded).sum(axis=1) == 1).all():
        return None  # not a signed permutation of the axes
    return rounded.astype(int), np.round(shift).astype(int)


def _place(masks: np.ndarray, source: Grid, target: Grid, path: Path) -> np.ndarray:
    """Masks ``(n, z, y, x)`` on ``source`` moved exactly onto ``target`` (same voxel lattice), else InputError."""
    placement = _lattice_placement(source, target)
    if placement is None:
        raise InputError(
            f"{path}: the DICOM SEG's frames ({describe_grid(source)}) do not lie on the reference volume's voxels "
            f"({describe_grid(target)}); pass --resample"
        )
    linear, shift = placement
    out = np.zeros((masks.shape[0],) + target.shape, dtype=bool)
    nz = np.nonzero(masks.any(axis=0))
    if not len(nz[0]):
        return out
    ijk = np.stack([nz[2], nz[1], nz[0]], axis=0)  # (3, N) source (i, j, k)
    dst = linear @ ijk + shift[:, None]
    n_dst = np.array([target.shape[2], target.shape[1], target.shape[0]])
    if np.any(dst < 0) or np.any(dst >= n_dst[:, None]):
        raise InputError(f"{path}: segmented voxels lie outside the reference volume ({describe_grid(target)})")
    out[:, dst[2], dst[1], dst[0]] = masks[:, nz[0], nz[1], nz[2]]
    return out


def _frames_on_reference(dataset: Any, numbers: Sequence[int], reference: Grid) -> Optional[np.ndarray]:
    """Segment masks ``(n, z, y, x)`` built by placing every SEG frame on ``reference`` by its position.

    None when the frames do not lie on reference slices (other orientation, pixel
    spacing or size, or positions between slices).
    """
    try:
        shared = dataset.SharedFunctionalGroupsSequence[0]
        frames = dataset.PerFrameFunctionalGroupsSequence

        def item(frame: Any, name: str) -> Any:
            return (getattr(frame, name, None) or getattr(shared, name))[0]

        orientation = np.array([float(v) for v in item(frames[0], "PlaneOrientationSequence").ImageOrientationPatient])
        pixel_spacing = [float(v) for v in item(frames[0], "PixelMeasuresSequence").PixelSpacing]
        positions = [[float(v) for v in item(f, "PlanePositionSequence").ImagePositionPatient] for f in frames]
        segment_of = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for f in frames]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    if (
        (int(dataset.Rows), int(dataset.Columns)) != reference.shape[1:]
        or not np.allclose(orientation[:3], reference.direction[:, 0], atol=1e-3)
        or not np.allclose(orientation[3:], reference.direction[:, 1], atol=1e-3)
        or not np.allclose(pixel_spacing[::-1], reference.spacing[:2], atol=GRID_TOLERANCE_MM)
    ):
        return None
    slices = []
    for position in positions:
        ijk = reference.physical_to_index(position)
        k = int(round(ijk[2]))
        if np.any(np.abs(ijk[:2]) > 0.05) or abs(ijk[2] - k) > 0.05 or not 0 <= k < reference.shape[0]:
            return None
        slices.append(k)
    pixels = np.asarray(dataset.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[None]
    threshold = 0
    if str(dataset.SegmentationType).upper() == "FRACTIONAL":
        threshold = float(getattr(dataset, "MaximumFractionalValue", 255)) / 2.0
    index_of = {number: index for index, number in enumerate(numbers)}
    masks = np.zeros((len(numbers),) + reference.shape, dtype=bool)
    for frame, (k, number) in enumerate(zip(slices, segment_of)):
        if number in index_of:
            masks[index_of[number], k] |= pixels[frame] > threshold
    return masks


def read_dicom_seg(path: PathLike, reference: Optional[Grid] = None) -> Segmentation:
    """Read a DICOM SEG into a :class:`Segmentation`, one segment per SEG segment (overlaps kept in layers).

    Segment names, colours and terminology come from the segment descriptions, and
    each segment's ``label_value`` is its segment number. With ``reference`` (the
    source series' grid, or any grid on the same voxel lattice), the result is
    placed exactly on it, which restores the slices the SEG omitted as empty;
    without it the grid spans the SEG's own frames.
    """
    hd = _require_highdicom()
    import pydicom

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:  # noqa: BLE001 - pydicom raises many kinds for broken files
        raise InputError(f"cannot read DICOM file {path}: {error}") from None
    if str(getattr(dataset, "SOPClassUID", "")) != _SEG_SOP_CLASS:
        sop_class = getattr(dataset, "SOPClassUID", "?")
        raise InputError(f"{path} is a DICOM file but not a Segmentation (its SOP class is {sop_class})")
    fractional = str(getattr(dataset, "SegmentationType", "")).upper() == "FRACTIONAL"
    try:
        seg = hd.seg.Segmentation.from_dataset(dataset, copy=False)
        numbers = list(seg.get_segment_numbers())
        masks = _frames_on_reference(dataset, numbers, reference) if reference is not None else None
        if masks is None:
            volume = seg.get_volume(
                combine_segments=False, dtype=np.float32 if fractional else np.uint8, segment_numbers=numbers
            )
    except (ValueError, RuntimeError, KeyError, AttributeError) as error:
        raise InputError(f"cannot read the DICOM SEG {path} as a volume: {error}") from None
    if masks is not None:
        grid = reference
    else:
        grid = _grid_of(volume)
        array = np.asarray(volume.array)
        if array.ndim == 3:
            array = array[..., None]
        masks = np.moveaxis(array, -1, 0) > (0.5 if fractional else 0)
        if reference is not None and not grid.same_as(reference, atol=GRID_TOLERANCE_MM):
            masks = _place(masks, grid, reference, path)
            grid = reference
        elif reference is not None:
            grid = reference
    segments = []
    for number in numbers:
        description = seg.get_segment_description(number)
        segments.append(
            Segment(
                id=f"Segment_{number}",
                name=str(description.segment_label),
                color=_color(description),
                terminology=_terminology(description),
                value=int(number),
                label_value=int(number),
            )
        )
    return Segmentation.from_masks(grid, list(masks), segments)
