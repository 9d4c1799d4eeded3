"""Exporting segmentations to other tools, and importing theirs as labels.

:func:`export` converts a label map, a Slicer ``.seg.nrrd`` or a DICOM SEG into the
format ``output``'s extension names:

- ``.seg.nrrd``: a Slicer segmentation with every segment's name, colour,
  terminology and layer (overlapping segments are kept in separate layers);
- ``.nii.gz`` / ``.nii`` / ``.nrrd``: a label map plus the JSON label table
  ``<name>.labels.json`` beside it (value, name, colour, terminology). A label map
  holds one label per voxel, so overlapping segments are refused unless
  ``overlap`` is ``"first"`` (the first listed segment wins) or ``"last"``;
- ``.dcm``: a DICOM SEG referencing the source series ``dicom_series``.

With ``reference`` (or ``dicom_series``) the output lies on that volume's grid. A
segmentation whose grid matches it within 1e-3 mm is used as is; one on another
grid is resampled (nearest neighbour) only with ``resample=True`` and only when it
covers the same physical region; otherwise the export is refused naming both grids.

Label values without a label table become segments ``Segment_1``, ``Segment_2``...
``labels`` supplies a table: a registered model id (its card's labels), a JSON label
table file, or a sequence of :class:`~MedSegSuiteLib.models.card.Label`. For a label
map it names the values; for a ``.seg.nrrd`` or DICOM SEG the segments are matched
to it (see :func:`~MedSegSuiteLib.io.segmentation.match_labels`).

Every write is atomic (temporary file + rename; the label map and its table are
committed together or not at all) and an existing file is replaced only with
``overwrite``.

:func:`import_labels` loads any of these files as a label map in a model's label
values on a reference volume, for finetuning or as the starting mask of refinement.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from .errors import InputError
from .io.atomic import atomic_outputs, check_folder, compound_suffix
from .io.segmentation import OVERLAP_MODES, Segmentation
from .volume import Grid, Volume

if TYPE_CHECKING:
    from .io.dicom_seg import AlgorithmInfo
    from .models.card import Label

__all__ = [
    "LABEL_MAP_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "export",
    "import_labels",
    "read_label_map",
    "read_segmentation",
    "resolve_labels",
    "table_path_for",
]

log = logging.getLogger(__name__)
PathLike = Union[str, Path]

LABEL_MAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
OUTPUT_SUFFIXES = (".seg.nrrd",) + LABEL_MAP_SUFFIXES + (".dcm",)
TABLE_SUFFIX = ".labels.json"
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
LabelsSpec = Union[None, str, Path, Sequence["Label"]]


def table_path_for(label_map: PathLike) -> Path:
    """The JSON label table that goes beside a label map: ``case.nii.gz`` -> ``case.labels.json``."""
    label_map = Path(label_map)
    suffix = compound_suffix(label_map)
    stem = label_map.name[: len(label_map.name) - len(suffix)] if suffix else label_map.name
    return label_map.with_name(stem + TABLE_SUFFIX)


def resolve_labels(labels: LabelsSpec) -> tuple[Optional[tuple[Label, ...]], Optional[AlgorithmInfo]]:
    """The label table named by ``labels`` and, for a model, who made it.

    ``labels`` is None, a sequence of labels, a JSON label table path (``.json``),
    or a model id / model folder of the registry (ModelError when unknown).
    """
    from .io.dicom_seg import AlgorithmInfo

    if labels is None:
        return None, None
    if not isinstance(labels, (str, Path)):
        return tuple(labels), None
    text = str(labels)
    if text.lower().endswith(".json"):
        from .io.label_table import read_label_table

        return read_label_table(text), None
    from .models import ModelRegistry

    entry = ModelRegistry().resolve(text)
    return tuple(entry.card.labels), AlgorithmInfo(entry.card.id, entry.card.version)


def read_label_map(path: PathLike) -> Volume:
    """A label map file as a one-channel Volume; a mask saved as 0/255 (in any format, with JPEG
    noise in a raster image) becomes 0/1."""
    from .io import read_image

    path = Path(path)
    volume = read_image(path)
    if compound_suffix(path) in _RASTER_SUFFIXES:
        array = volume.array.max(axis=0) if volume.array.ndim == 4 else volume.array
        if array.max(initial=0) > 200:  # an 8-bit mask image (0/255, perhaps with JPEG noise)
            array = (array > 127).astype(np.uint8)
        volume = volume.with_array(array)
    elif volume.array.ndim == 4:
        raise InputError(f"{path} has {volume.channels} channels; a label map has one")
    elif volume.array.dtype.kind in "ui" and int(volume.array.max(initial=0)) == 255:
        if set(np.unique(volume.array).tolist()) == {0, 255}:  # a binary mask written as 0/255
            volume = volume.with_array((volume.array == 255).astype(np.uint8))
    return volume


def read_segmentation(
    path: PathLike,
    labels: Optional[Sequence[Label]] = None,
    reference: Optional[Grid] = None,
    by_value: str = "unnamed",
) -> Segmentation:
    """Read a label map, ``.seg.nrrd`` or DICOM SEG (``.dcm``) as a :class:`Segmentation`.

    A label map uses ``labels`` as its table, else the ``<name>.labels.json`` beside
    it, else generated names. Segments of a ``.seg.nrrd`` or DICOM SEG are matched to
    ``labels`` when given. ``reference`` lets a DICOM SEG restore the empty slices it
    omitted (it is not a resampling target here; see :meth:`Segmentation.on_grid`).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    suffix = compound_suffix(path)
    if suffix == ".seg.nrrd":
        from .io.seg_nrrd import read_seg_nrrd

        segmentation = read_seg_nrrd(path)
    elif suffix == ".dcm":
        from .io.dicom_seg import read_dicom_seg

        segmentation = read_dicom_seg(path, reference=reference)
    else:
        volume = read_label_map(path)
        table = labels
        if table is None and table_path_for(path).is_file():
            from .io.label_table import read_label_table

            table = read_label_table(table_path_for(path))
        return Segmentation.from_label_map(volume, table, source=str(path))
    if labels is not None:
        segmentation = segmentation.with_labels(labels, by_value=by_value)
    return segmentation


def _check_targets(targets: Sequence[Path], overwrite: bool) -> None:
    for target in targets:
        if target.exists() and not overwrite:
            raise InputError(f"{target} already exists; pass --overwrite to replace it")
        check_folder(target)


def _write_label_map_pair(
    volume: Volume, labels: Sequence[Label], image_path: Path, table_path: Path, overwrite: bool
) -> None:
    import json

    from .io import write_image
    from .io.label_table import label_table_to_json

    text = json.dumps(label_table_to_json(labels), indent=2) + "\n"
    with atomic_outputs([image_path, table_path], overwrite) as (tmp_image, tmp_table):
        write_image(volume, tmp_image, overwrite=True)
        tmp_table.write_text(text, encoding="utf-8")


def _algorithm_from_tags(segmentation: Segmentation) -> Optional[AlgorithmInfo]:
    from .io.dicom_seg import AlgorithmInfo
    from .io.seg_nrrd import TAG_MODEL

    models = {segment.tags.get(TAG_MODEL) for segment in segmentation.segments} - {None, ""}
    return AlgorithmInfo(models.pop()) if len(models) == 1 else None


def export(
    segmentation_path: PathLike,
    output: PathLike,
    reference: Optional[PathLike] = None,
    labels: LabelsSpec = None,
    dicom_series: Optional[PathLike] = None,
    overwrite: bool = False,
    overlap: str = "refuse",
    resample: bool = False,
    series_uid: Optional[str] = None,
) -> list[Path]:
    """Write the segmentation at ``segmentation_path`` as ``output`` (format from its extension).

    See the module docstring for formats, ``labels``, ``overlap`` (label maps:
    ``refuse``, ``first`` or ``last``), ``reference`` / ``resample`` and atomicity.
    ``dicom_series`` is the source series folder, required for ``.dcm`` (with
    ``series_uid`` when it holds several). All arguments are checked before any
    voxel is read. Returns the paths written (the label map and its table, or one
    file). Raises InputError / ModelError with a one-line reason.
    """
    output = Path(output)
    suffix = compound_suffix(output)
    if suffix not in OUTPUT_SUFFIXES:
        raise InputError(
            f"{output.name}: cannot export to {suffix or 'a file without extension'}; use .seg.nrrd (Slicer), "
            ".nii.gz, .nii or .nrrd (label map + JSON label table) or .dcm (DICOM SEG)"
        )
    if overlap not in OVERLAP_MODES:
        raise InputError(f"overlap must be one of {', '.join(OVERLAP_MODES)}, got {overlap!r}")
    source_path = Path(segmentation_path)
    if not source_path.exists():
        raise InputError(f"{source_path} does not exist")
    if suffix == ".dcm" and dicom_series is None:
        raise InputError(
            "a DICOM SEG must reference the images it segments: give their series folder with --dicom-series DIR"
        )
    if reference is not None and not Path(reference).exists():
        raise InputError(f"reference volume {reference} does not exist")
    targets = [output] + ([table_path_for(output)] if suffix in LABEL_MAP_SUFFIXES else [])
    _check_targets(targets, overwrite)
    table, algorithm = resolve_labels(labels)

    source = None
    grid: Optional[Grid] = None
    if dicom_series is not None:
        from .io.dicom_seg import read_source_series

        source = read_source_series(dicom_series, series_uid)
        grid = source.grid
    if reference is not None:
        from .io import read_image

        ref_grid = read_image(reference, series_uid=series_uid).grid
        if grid is not None and not grid.same_as(ref_grid, atol=1e-3):
            raise InputError(f"--reference {reference} and --dicom-series {dicom_series} are not the same volume")
        grid = ref_grid
    segmentation = read_segmentation(source_path, table, reference=grid)
    if grid is not None:
        segmentation = segmentation.on_grid(grid, resample=resample, what=source_path.name)

    if suffix == ".seg.nrrd":
        from .io.seg_nrrd import write_seg_nrrd

        write_seg_nrrd(segmentation, output, overwrite=overwrite)
    elif suffix == ".dcm":
        from .io.dicom_seg import write_dicom_seg

        assert source is not None
        write_dicom_seg(
            segmentation, output, source, overwrite=overwrite, algorithm=algorithm or _algorithm_from_tags(segmentation)
        )
    else:
        volume, label_table = segmentation.to_label_map(overlap)
        _write_label_map_pair(volume, label_table, output, targets[1], overwrite)
    log.info("exported %s to %s", source_path, ", ".join(str(t) for t in targets))
    return targets


def import_labels(
    path: PathLike,
    card_labels: Any,
    reference_volume: Union[Volume, Grid],
    resample: bool = False,
    overlap: str = "refuse",
    table: LabelsSpec = None,
    by_value: str = "unnamed",
) -> Volume:
    """A ``.seg.nrrd``, label map (+ JSON table) or DICOM SEG as a label map in a model's label values.

    ``card_labels`` is the model's label table (a sequence of labels, a model card,
    or a model id); the file's segments are matched to it by name (case-insensitive),
    then terminology type code, then value (see
    :func:`~MedSegSuiteLib.io.segmentation.match_labels`), and unmatched segments
    raise InputError listing them before any voxel is moved. The result lies exactly
    on ``reference_volume``'s grid (resampled, nearest neighbour, only with
    ``resample``), holds uint8 (uint16 above 255) values of the model's labels and 0
    elsewhere; overlapping segments follow ``overlap`` (refuse / first / last).
    ``table`` names a label map's values when no ``<name>.labels.json`` is beside it.
    """
    if overlap not in OVERLAP_MODES:
        raise InputError(f"overlap must be one of {', '.join(OVERLAP_MODES)}, got {overlap!r}")
    if isinstance(card_labels, (str, Path)):
        card_labels, _ = resolve_labels(card_labels)
    elif hasattr(card_labels, "labels"):
        card_labels = card_labels.labels
    grid = reference_volume.grid if isinstance(reference_volume, Volume) else reference_volume
    table_labels, _ = resolve_labels(table)
    path = Path(path)
    if compound_suffix(path) in (".seg.nrrd", ".dcm"):
        segmentation = read_segmentation(path, reference=grid)
    else:
        segmentation = read_segmentation(path, table_labels, reference=grid)
    segmentation = segmentation.with_labels(tuple(card_labels), by_value=by_value)
    segmentation = segmentation.on_grid(grid, resample=resample, what=path.name)
    volume, _ = segmentation.to_label_map(overlap)
    return volume
