"""The GUI side of finetuning: labelled cases in the scene, their label maps, the loss curve and time estimates.

A *labelled case* is a segmentation node together with its reference volume (the
volume whose grid it was made on, e.g. a segmentation corrected after **Segment**).
:func:`parent_label_map` turns it into one label map in the parent model's label
values, matching segments to labels as refinement does
(:func:`.refinement.match_segments`: name, then terminology type code, then the
model's own label-value tag); a segment that matches no label is refused before
anything is sent to the worker, and a refinement's "Uncertain (refinement)" segment is
skipped (it is no label). :func:`case_geometry` checks that the segmentation
lies on its volume's voxel grid: one drawn on another grid over the same region is
resampled only after the user agrees (:class:`GridQuestion`), one over another region
is refused.

:class:`FinetuneCurve` keeps the loss and the validation Dice of a run in two
``vtkMRMLTableNode`` objects drawn by one ``vtkMRMLPlotChartNode`` (shown in a plot
view when Slicer has a layout). :class:`FinetuneTiming` holds what a timing job
measured and :func:`estimate_seconds` turns it into the duration of a run.
:func:`finetune_outcome` says in plain words whether a finished run beat its parent on
the held-back cases and whether Segment switches to the new model.
:func:`unfinished_run` finds a run that can be resumed, without torch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import InputError
from ..io.segmentation import describe_grid, same_region
from ..training.runs import pending_finetune_runs
from ..training.verdict import FinetuneVerdict
from ..volume import Grid
from .messages import _
from .refinement import match_segments
from .segmentations import geometry_matches, label_segment_ids, same_frame, segment_labelmap, segment_mask
from .volumes import INPUT_VOLUME_CLASSES, LPS_FROM_RAS, grid_from_node, input_volumes

__all__ = [
    "FinetuneCurve",
    "FinetuneTiming",
    "GridQuestion",
    "candidate_pairs",
    "case_geometry",
    "describe_duration",
    "estimate_seconds",
    "finetune_outcome",
    "parent_label_map",
    "reference_volume",
    "unfinished_run",
    "validation_count",
]

log = logging.getLogger(__name__)

_LOSS_COLOUR = (0.85, 0.33, 0.10)
_DICE_COLOUR = (0.0, 0.45, 0.74)


def reference_volume(segmentation_node: Any, scene: Optional[Any] = None) -> Optional[Any]:
    """The volume a segmentation was made on, or None.

    That is its reference geometry node; a segmentation without one (e.g. loaded from
    a file) belongs to the one volume of the scene whose grid is exactly its reference
    geometry, if there is exactly one.
    """
    node = segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
    if node is not None:
        if node.GetClassName() not in INPUT_VOLUME_CLASSES:  # a label map, a DWI or tensor volume, not a volume
            return None
        return node if node.GetImageData() is not None else None
    scene = scene or segmentation_node.GetScene() or slicer.mrmlScene
    found = [
        volume
        for volume in _volumes(scene)
        if volume.GetImageData() is not None
        and same_frame(segmentation_node, volume)
        and geometry_matches(segmentation_node, volume, atol=1e-4)
    ]
    return found[0] if len(found) == 1 else None


def _volumes(scene: Any) -> list[Any]:
    return input_volumes(scene)


def candidate_pairs(scene: Optional[Any] = None) -> list[tuple[Any, Any]]:
    """``(segmentation node, its reference volume)`` for every segmentation of the scene that has one."""
    scene = scene or slicer.mrmlScene
    pairs = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        segmentation = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        if segmentation.GetHideFromEditors():
            continue
        volume = reference_volume(segmentation, scene)
        if volume is not None:
            pairs.append((segmentation, volume))
    return pairs


class GridQuestion(InputError):
    """A segmentation lies on another voxel grid than its volume, over the same region.

    It can be resampled onto the volume (nearest neighbour), but only when the user
    agrees: ask, then start again with ``resample=True``. The message says what differs.
    """


def _matrix(getter: Any) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    getter(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _oriented_grid(image: Any) -> Optional[Grid]:
    """The LPS grid of a ``vtkOrientedImageData`` (its whole extent), or None when it is empty or degenerate."""
    extent = image.GetExtent()
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if min(shape) < 1:
        return None
    matrix = _matrix(image.GetImageToWorldMatrix)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if np.any(spacing <= 0):
        return None
    origin = matrix @ np.array([extent[0], extent[2], extent[4], 1.0])
    try:
        return Grid(shape, tuple(spacing), tuple(LPS_FROM_RAS @ origin[:3]), LPS_FROM_RAS @ (matrix[:3, :3] / spacing))
    except InputError:
        return None


def _segmentation_grid(segmentation_node: Any) -> Optional[Grid]:
    """The segmentation's reference image geometry (the grid it is edited on), or None when it has none."""
    converter = slicer.vtkSegmentationConverter
    text = segmentation_node.GetSegmentation().GetConversionParameter(
        converter.GetReferenceImageGeometryParameterName()
    )
    geometry = slicer.vtkOrientedImageData()
    if not text or not converter.DeserializeImageGeometry(text, geometry, False):
        return None
    return _oriented_grid(geometry)


def case_geometry(segmentation_node: Any, volume_node: Any) -> str:
    """Check that a labelled case's segments lie on its volume; returns "" or what needs resampling.

    "" means every segment's voxels lie on the volume's voxel grid (possibly a cropped
    part of it) and inside the volume: they are taken as they are. Otherwise, when some
    segments lie on another grid, inside the volume, and the segmentation's own grid
    (its reference geometry) is the volume's or covers the same region (both within
    one voxel of the coarser grid), the answer describes both grids: resampling
    (nearest neighbour) needs the user's consent. Raises InputError when the
    segmentation covers another region or a segment reaches outside the volume.
    """
    name, volume_name = segmentation_node.GetName(), volume_node.GetName()
    volume_grid = grid_from_node(volume_node)
    to_volume_ijk = np.linalg.inv(_matrix(volume_node.GetIJKToRASMatrix))
    dims = np.array(volume_node.GetImageData().GetDimensions(), dtype=np.float64)
    off_grid, outside = [], []
    other_grid: Optional[Grid] = None
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in label_segment_ids(segmentation_node):
        labelmap = segment_labelmap(segmentation_node, segment_id, volume_node)  # in the volume's own coordinates
        if labelmap is None:
            continue
        extent = labelmap.GetExtent()
        scalars = labelmap.GetPointData().GetScalars()
        if scalars is None or extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
            continue
        shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        values = numpy_support.vtk_to_numpy(scalars).reshape(shape)
        mask = values == segmentation.GetSegment(segment_id).GetLabelValue()
        ks = np.flatnonzero(mask.any(axis=(1, 2)))
        if ks.size == 0:
            continue
        js, is_ = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
        transform = to_volume_ijk @ _matrix(labelmap.GetImageToWorldMatrix)  # labelmap IJK -> volume IJK
        shift = transform[:3, 3]
        on_grid = np.allclose(transform[:3, :3], np.eye(3), atol=1e-4) and np.allclose(
            shift, np.round(shift), atol=1e-3
        )
        if not on_grid:
            off_grid.append(segmentation.GetSegment(segment_id).GetName())
            other_grid = other_grid or _oriented_grid(labelmap)
        # the corners of the segment's voxels (i, j, k), in the volume's voxel indices
        low = np.array([is_[0] + extent[0], js[0] + extent[2], ks[0] + extent[4]]) - 0.5
        high = np.array([is_[-1] + extent[0], js[-1] + extent[2], ks[-1] + extent[4]]) + 0.5
        corners = np.array([[(high if (bits >> a) & 1 else low)[a] for a in range(3)] + [1.0] for bits in range(8)])
        ijk = (transform @ corners.T).T[:, :3]
        if on_grid:
            slack = np.full(3, 1e-3)
        else:  # one voxel of the coarser grid, as for the region check
            spacing = np.linalg.norm(transform[:3, :3], axis=0)
            slack = np.full(3, max(1.0, float(spacing.max())))
        if np.any(ijk < -0.5 - slack) or np.any(ijk > dims - 0.5 + slack):
            outside.append(segmentation.GetSegment(segment_id).GetName())
    if not off_grid and not outside:
        return ""
    # the segmentation's own grid is comparable only when both nodes share their coordinates
    grid = _segmentation_grid(segmentation_node) if same_frame(segmentation_node, volume_node) else None
    if grid is None or grid.same_as(volume_grid, atol=1e-3):  # only segments are off the grid: they decide
        grid, region_ok = other_grid, True
    else:
        region_ok = same_region(grid, volume_grid)
    described = _("{name} has {grid}; {volume} has {volume_grid}").format(
        name=repr(name),
        grid=describe_grid(grid) if grid is not None else _("another grid"),
        volume=repr(volume_name),
        volume_grid=describe_grid(volume_grid),
    )
    if outside or not region_ok:
        where = (
            " " + _("(segment(s) {segments} reach outside the volume)").format(segments=", ".join(map(repr, outside)))
            if outside
            else ""
        )
        raise InputError(
            _(
                "{name} was not drawn on {volume}: it covers another region{where}; {described}. "
                "Choose the volume it was drawn on as its reference geometry (Segment Editor: Specify geometry)"
            ).format(name=repr(name), volume=repr(volume_name), where=where, described=described)
        )
    return _(
        "{name} was drawn on another voxel grid than {volume}, over the same region: {described}; "
        "its segments must be resampled onto the volume (nearest neighbour) to learn from it"
    ).format(name=repr(name), volume=repr(volume_name), described=described)


def parent_label_map(segmentation_node: Any, volume_node: Any, card: Any, resample: bool = False) -> np.ndarray:
    """The segmentation as one ``[k, j, i]`` label map in ``card``'s label values on the volume's grid.

    Raises InputError naming the segments when one matches no label of the model (or
    two match the same label), or when the segmentation has no segments, or when it
    does not lie on the volume (see :func:`case_geometry`); raises :class:`GridQuestion`
    when it lies on another grid over the same region and ``resample`` is False.
    """
    matches, unknown = match_segments(segmentation_node, card)
    name = segmentation_node.GetName()
    names = ", ".join(label.name for label in card.labels)
    if unknown:
        raise InputError(
            _(
                "the labels of {name} do not match {model}'s label table ({labels}): {unknown}; "
                "rename or remove those segments before finetuning"
            ).format(name=repr(name), model=card.name, labels=names, unknown="; ".join(unknown))
        )
    if not matches:
        raise InputError(
            _("{name} has no segments; paint the structures ({labels}) first").format(name=repr(name), labels=names)
        )
    difference = case_geometry(segmentation_node, volume_node)
    if difference and not resample:
        raise GridQuestion(difference)
    grid = grid_from_node(volume_node)
    dtype = np.uint8 if max(label.value for label in card.labels) <= 255 else np.uint16
    labels = np.zeros(grid.shape, dtype=dtype)
    for match in matches:
        labels[segment_mask(segmentation_node, match.segment_id, volume_node)] = match.label.value
    return labels


def unfinished_run(parent_id: str, user_dir: Optional[Path] = None) -> Optional[tuple[str, int]]:
    """``(model id, last logged iteration)`` of the newest resumable finetuning of ``parent_id``, or None.

    Looks for ``<user models>/<parent>-ft-<n>.training/checkpoint.pt`` the way
    :func:`MedSegSuiteLib.training.finetune.next_finetune_id` does; needs no torch.
    """
    if user_dir is None:
        from ..models.registry import default_user_dir

        user_dir = default_user_dir()
    pending = pending_finetune_runs(Path(user_dir), parent_id)
    if not pending:
        return None
    workdir = pending[-1]
    iteration = 0
    try:
        history = json.loads((workdir / "log.json").read_text(encoding="utf-8"))
        iteration = max((int(r.get("iteration", 0)) for r in history if isinstance(r, dict)), default=0)
    except (OSError, ValueError, TypeError):
        pass
    return workdir.name[: -len(".training")], iteration


# -- the loss curve --------------------------------------------------------------------------
def _new_table(scene: Any, name: str, columns: Sequence[str]) -> Any:
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table = node.GetTable()
    for title in columns:
        array = vtk.vtkDoubleArray()
        array.SetName(title)
        table.AddColumn(array)
    return node


def _new_series(scene: Any, name: str, table: Any, y_column: str, colour: tuple[float, float, float]) -> Any:
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(name))
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetXColumnName(FinetuneCurve.loss_columns()[0])
    series.SetYColumnName(y_column)
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetColor(*colour)
    return series


class FinetuneCurve:
    """A run's loss (every few iterations) and validation Dice as MRML tables and one plot chart.

    ``loss_table`` has the columns ``Iteration`` and ``Loss``; ``validation_table``
    ``Iteration``, ``Validation Dice`` and ``Validation HD95 (mm)``; ``chart`` draws the
    loss and the Dice against the iteration. Column, series and axis names are shown to
    the user, so they are translated (:func:`.messages._`) when the nodes are made.
    """

    @staticmethod
    def loss_columns() -> tuple[str, str]:
        """The loss table's column names, as shown (translated)."""
        return (_("Iteration"), _("Loss"))

    @staticmethod
    def validation_columns() -> tuple[str, str, str]:
        """The validation table's column names, as shown (translated)."""
        return (_("Iteration"), _("Validation Dice"), _("Validation HD95 (mm)"))

    def __init__(self, loss_table: Any, validation_table: Any, chart: Any) -> None:
        self.loss_table = loss_table
        self.validation_table = validation_table
        self.chart = chart

    @classmethod
    def create(cls, scene: Optional[Any] = None, title: Optional[str] = None) -> FinetuneCurve:
        """New table, series and chart nodes in ``scene``; ``title`` defaults to "Finetuning" (translated)."""
        scene = scene or slicer.mrmlScene
        title = _("Finetuning") if title is None else title
        loss_columns, validation_columns = cls.loss_columns(), cls.validation_columns()
        loss_table = _new_table(scene, _("{title} loss").format(title=title), loss_columns)
        validation_table = _new_table(scene, _("{title} validation").format(title=title), validation_columns)
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(title))
        loss = _new_series(scene, loss_columns[1], loss_table, loss_columns[1], _LOSS_COLOUR)
        loss.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        dice = _new_series(scene, validation_columns[1], validation_table, validation_columns[1], _DICE_COLOUR)
        dice.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        chart.AddAndObservePlotSeriesNodeID(loss.GetID())
        chart.AddAndObservePlotSeriesNodeID(dice.GetID())
        chart.SetXAxisTitle(loss_columns[0])
        chart.SetYAxisTitle(_("Loss / Dice"))
        chart.SetTitle(title)
        return cls(loss_table, validation_table, chart)

    @classmethod
    def usable(cls, loss_table: Any, validation_table: Any, chart: Any) -> bool:
        """True when the three nodes exist and the tables have this class's columns."""
        if loss_table is None or validation_table is None or chart is None:
            return False
        return all(
            node.GetTable().GetNumberOfColumns() == len(columns)
            and all(node.GetTable().GetColumnByName(name) is not None for name in columns)
            for node, columns in ((loss_table, cls.loss_columns()), (validation_table, cls.validation_columns()))
        )

    def set_title(self, title: str) -> None:
        self.chart.SetTitle(title)

    def clear(self) -> None:
        """Remove every row (a new run starts)."""
        for node in (self.loss_table, self.validation_table):
            table = node.GetTable()
            for index in range(table.GetNumberOfColumns()):
                table.GetColumn(index).SetNumberOfTuples(0)
            table.Modified()
            node.Modified()

    @staticmethod
    def _append(node: Any, values: Sequence[float]) -> None:
        table = node.GetTable()
        for index, value in enumerate(values):
            table.GetColumn(index).InsertNextValue(float(value))
        table.Modified()
        node.Modified()

    def add(self, record: dict[str, Any]) -> bool:
        """Add a worker ``log`` record (loss or validation); False when it holds neither."""
        iteration = record.get("iteration")
        if not isinstance(iteration, (int, float)):
            return False
        if isinstance(record.get("val_dice"), (int, float)):
            hd95 = record.get("val_hd95")
            self._append(
                self.validation_table,
                (iteration, record["val_dice"], hd95 if isinstance(hd95, (int, float)) else float("nan")),
            )
            return True
        if isinstance(record.get("loss"), (int, float)):
            self._append(self.loss_table, (iteration, record["loss"]))
            return True
        return False

    def rows(self, which: str = "loss") -> list[tuple[float, ...]]:
        """The rows of the ``loss`` or ``validation`` table."""
        table = (self.loss_table if which == "loss" else self.validation_table).GetTable()
        columns = [table.GetColumn(i) for i in range(table.GetNumberOfColumns())]
        return [tuple(column.GetValue(r) for column in columns) for r in range(table.GetNumberOfRows())]

    def show(self) -> bool:
        """Show the chart in a plot view of Slicer's layout; False when there is no layout (scripts, tests)."""
        app = getattr(slicer, "app", None)
        layout = app.layoutManager() if app is not None and hasattr(app, "layoutManager") else None
        plots = getattr(getattr(slicer, "modules", None), "plots", None)
        if layout is None or plots is None:
            return False
        plots.logic().ShowChartInLayout(self.chart)
        return True


# -- time estimates --------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneTiming:
    """What a timing job measured for one choice of model, cases and device (seconds).

    ``per_validation`` includes setting the training up, so estimates err long.
    """

    key: tuple
    device: str
    per_iteration: float
    per_validation: float
    setup: float

    @classmethod
    def from_info(cls, key: tuple, info: dict[str, Any]) -> FinetuneTiming:
        return cls(
            key,
            str(info.get("device", "?")),
            float(info["seconds_per_iteration"]),
            float(info.get("seconds_per_validation", 0.0)),
            float(info.get("seconds_setup", 0.0)),
        )


def validation_count(iterations: int) -> int:
    """How many validations a finetuning of ``iterations`` runs (every ``iterations // 5``, and at the end)."""
    iterations = max(1, int(iterations))
    every = max(1, iterations // 5)
    return iterations // every + (1 if iterations % every else 0)


def finetune_outcome(info: dict[str, Any], parent_name: str) -> tuple[str, bool]:
    """``(words, select)`` for a finished run's worker ``info``: is the new model better than its parent on
    the held-back cases, and should Segment switch to it (only when the run's verdict selected it)?"""
    model = str(info["model"]) if "model" in info else _("the new model")
    verdict = FinetuneVerdict.from_dict(info.get("verdict"))
    if verdict is None:
        text = _("Its gain was not checked; Segment keeps {parent} (choose {model} to use it).")
        return text.format(parent=parent_name, model=model), False
    words = verdict.sentence(parent_name)
    if verdict.selected:
        return words + " " + _("Segment uses the new model now."), True
    if verdict.outcome == "not checked":
        text = _("Segment keeps {parent}; choose {model} in the model list to try the new one.")
    else:
        text = _("Segment keeps {parent}; choose {model} in the model list to use it anyway.")
    return words + " " + text.format(parent=parent_name, model=model), False


def estimate_seconds(timing: FinetuneTiming, iterations: int) -> float:
    """The expected duration of a run: set-up, the parent's and every validation, and the iterations."""
    validations = 1 + validation_count(iterations)  # the parent is measured once before training
    return timing.setup + validations * timing.per_validation + max(1, int(iterations)) * timing.per_iteration


def describe_duration(seconds: float) -> str:
    """A rounded duration for people: "40 s", "3 min", "1 h 20 min"."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return _("{seconds} s").format(seconds=max(1, round(seconds)))
    minutes = round(seconds / 60)
    if minutes < 90:
        return _("{minutes} min").format(minutes=minutes)
    return _("{hours} h {minutes} min").format(hours=minutes // 60, minutes=minutes % 60)
