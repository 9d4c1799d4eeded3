"""The GUI side of finetuning: labelled cases in the scene, their label maps, the loss curve and time estimates.

A *labelled case* is a segmentation node together with its reference volume (the
volume whose grid it was made on, e.g. a segmentation corrected after **Segment**).
:func:`parent_label_map` turns it into one label map in the parent model's label
values, matching segments to labels as refinement does
(:func:`.refinement.match_segments`: name, then terminology type code, then the
model's own label-value tag); a segment that matches no label is refused before
anything is sent to the worker.

:class:`FinetuneCurve` keeps the loss and the validation Dice of a run in two
``vtkMRMLTableNode`` objects drawn by one ``vtkMRMLPlotChartNode`` (shown in a plot
view when Slicer has a layout). :class:`FinetuneTiming` holds what a timing job
measured and :func:`estimate_seconds` turns it into the duration of a run.
:func:`unfinished_run` finds a run that can be resumed, without torch.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import slicer
import vtk

from ..errors import InputError
from .refinement import match_segments
from .segmentations import segment_mask
from .volumes import grid_from_node

__all__ = [
    "FinetuneCurve",
    "FinetuneTiming",
    "candidate_pairs",
    "describe_duration",
    "estimate_seconds",
    "parent_label_map",
    "reference_volume",
    "unfinished_run",
    "validation_count",
]

log = logging.getLogger(__name__)

_LOSS_COLOUR = (0.85, 0.33, 0.10)
_DICE_COLOUR = (0.0, 0.45, 0.74)


def reference_volume(segmentation_node: Any) -> Optional[Any]:
    """The volume a segmentation was made on (its reference geometry node), or None."""
    node = segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
    if node is None or not node.IsA("vtkMRMLVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        return None
    return node if node.GetImageData() is not None else None


def candidate_pairs(scene: Optional[Any] = None) -> list[tuple[Any, Any]]:
    """``(segmentation node, its reference volume)`` for every segmentation of the scene that has one."""
    scene = scene or slicer.mrmlScene
    pairs = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        segmentation = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        if segmentation.GetHideFromEditors():
            continue
        volume = reference_volume(segmentation)
        if volume is not None:
            pairs.append((segmentation, volume))
    return pairs


def parent_label_map(segmentation_node: Any, volume_node: Any, card: Any) -> np.ndarray:
    """The segmentation as one ``[k, j, i]`` label map in ``card``'s label values on the volume's grid.

    Raises InputError naming the segments when one matches no label of the model (or
    two match the same label), or when the segmentation has no segments.
    """
    matches, unknown = match_segments(segmentation_node, card)
    name = segmentation_node.GetName()
    names = ", ".join(label.name for label in card.labels)
    if unknown:
        raise InputError(
            f"the labels of {name!r} do not match {card.name}'s label table ({names}): {'; '.join(unknown)}; "
            "rename or remove those segments before finetuning"
        )
    if not matches:
        raise InputError(f"{name!r} has no segments; paint the structures ({names}) first")
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
    base = re.sub(r"-ft-\d+$", "", parent_id)
    try:
        pending = sorted(
            Path(user_dir).glob(f"{base}-ft-*.training/checkpoint.pt"), key=lambda path: path.stat().st_mtime
        )
    except OSError:
        return None
    if not pending:
        return None
    workdir = pending[-1].parent
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
    series.SetXColumnName("Iteration")
    series.SetYColumnName(y_column)
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetColor(*colour)
    return series


class FinetuneCurve:
    """A run's loss (every few iterations) and validation Dice as MRML tables and one plot chart.

    ``loss_table`` has the columns ``Iteration`` and ``Loss``; ``validation_table``
    ``Iteration``, ``Validation Dice`` and ``Validation HD95 (mm)``; ``chart`` draws the
    loss and the Dice against the iteration.
    """

    LOSS_COLUMNS = ("Iteration", "Loss")
    VALIDATION_COLUMNS = ("Iteration", "Validation Dice", "Validation HD95 (mm)")

    def __init__(self, loss_table: Any, validation_table: Any, chart: Any) -> None:
        self.loss_table = loss_table
        self.validation_table = validation_table
        self.chart = chart

    @classmethod
    def create(cls, scene: Optional[Any] = None, title: str = "Finetuning") -> FinetuneCurve:
        """New table, series and chart nodes in ``scene``."""
        scene = scene or slicer.mrmlScene
        loss_table = _new_table(scene, f"{title} loss", cls.LOSS_COLUMNS)
        validation_table = _new_table(scene, f"{title} validation", cls.VALIDATION_COLUMNS)
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(title))
        loss = _new_series(scene, "Loss", loss_table, "Loss", _LOSS_COLOUR)
        loss.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        dice = _new_series(scene, "Validation Dice", validation_table, "Validation Dice", _DICE_COLOUR)
        dice.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        chart.AddAndObservePlotSeriesNodeID(loss.GetID())
        chart.AddAndObservePlotSeriesNodeID(dice.GetID())
        chart.SetXAxisTitle("Iteration")
        chart.SetYAxisTitle("Loss / Dice")
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
            for node, columns in ((loss_table, cls.LOSS_COLUMNS), (validation_table, cls.VALIDATION_COLUMNS))
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


def estimate_seconds(timing: FinetuneTiming, iterations: int) -> float:
    """The expected duration of a run: set-up, the parent's and every validation, and the iterations."""
    validations = 1 + validation_count(iterations)  # the parent is measured once before training
    return timing.setup + validations * timing.per_validation + max(1, int(iterations)) * timing.per_iteration


def describe_duration(seconds: float) -> str:
    """A rounded duration for people: "40 s", "3 min", "1 h 20 min"."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"
