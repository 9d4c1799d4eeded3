"""The Refine and Export sections of the MedSegSuite panel (controllers used by :class:`.panel.SegmentPanel`).

Each section binds its widgets of ``Resources/UI/MedSegSuite.ui`` to the parameter
node and the logic, and reports through the panel's status line. The panel calls
``refresh`` / ``update_gui`` / ``update_parameters`` / ``update_enabled`` at the
same moments as for its own widgets. Written for PythonQt and PySide6 alike (see
:mod:`.panel`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

import slicer

from ..errors import MedSegSuiteError
from .exporting import DICOM_UIDS_ATTRIBUTE, FORMATS, dicom_unavailable_reason, format_of, with_format
from .logic import REFINE_SCOPES, TaskStatus, diffusion_steps, is_refiner

if TYPE_CHECKING:
    from .panel import SegmentPanel
    from .parameters import Parameters

__all__ = ["ExportSection", "RefineSection"]

log = logging.getLogger(__name__)


def _sentence(text: str) -> str:
    text = str(text).strip()
    return (text[0].upper() + text[1:]) if text else text


class RefineSection:
    """HiDiff model, steps, keep-my-edits, scope, **Refine** / **One step** (Cancel while running) and **Undo**."""

    def __init__(self, panel: SegmentPanel) -> None:
        self.panel = panel
        self.ui = ui = panel.ui
        self._entries: list[Any] = []
        for key, title in REFINE_SCOPES.items():
            ui.refineScopeSelector.addItem(title, key)
        ui.refineModelSelector.currentIndexChanged.connect(self._on_changed)
        ui.refineStepsSpinBox.valueChanged.connect(self._on_changed)
        ui.keepEditsCheckBox.toggled.connect(self._on_changed)
        ui.refineScopeSelector.currentIndexChanged.connect(self._on_changed)
        ui.refineRegionSelector.currentNodeChanged.connect(self._on_changed)
        ui.refineButton.clicked.connect(self.on_refine_clicked)
        ui.oneStepButton.clicked.connect(self.on_one_step_clicked)
        ui.undoRefineButton.clicked.connect(self.on_undo_clicked)

    # -- models ----------------------------------------------------------------------------
    def refresh(self, entries: list[Any]) -> None:
        """List the installed HiDiff models (the only ones that run refinement steps)."""
        self._entries = [entry for entry in entries if is_refiner(entry.card)]
        selector = self.ui.refineModelSelector
        selector.blockSignals(True)
        try:
            selector.clear()
            for entry in self._entries:
                selector.addItem(f"{entry.card.name} ({entry.card.version})", entry.card.id)
        finally:
            selector.blockSignals(False)
        selector.setToolTip(
            "The HiDiff model whose diffusion steps refine the current segmentation."
            if self._entries
            else "No HiDiff model is installed: import one with medsegsuite models import FILE."
        )

    @property
    def entries(self) -> list[Any]:
        """The HiDiff models listed in the selector, in its order."""
        return list(self._entries)

    def current_entry(self) -> Optional[Any]:
        index = self.ui.refineModelSelector.property("currentIndex")
        return self._entries[index] if index is not None and 0 <= index < len(self._entries) else None

    def scope(self) -> str:
        selector = self.ui.refineScopeSelector
        return selector.itemData(selector.property("currentIndex")) or "volume"

    # -- parameter node --------------------------------------------------------------------
    def update_gui(self, p: Parameters) -> None:
        ui = self.ui
        index = ui.refineModelSelector.findData(p.refine_model_id)
        if index >= 0:
            ui.refineModelSelector.setCurrentIndex(index)
        self._update_step_limit()
        ui.refineStepsSpinBox.setValue(p.refine_steps)
        ui.keepEditsCheckBox.setChecked(p.keep_edits)
        index = ui.refineScopeSelector.findData(p.refine_scope)
        ui.refineScopeSelector.setCurrentIndex(index if index >= 0 else 0)
        ui.refineRegionSelector.setCurrentNode(p.refine_region)

    def update_parameters(self, p: Parameters) -> None:
        entry = self.current_entry()
        if entry is not None:
            p.refine_model_id = entry.card.id
        p.refine_steps = int(self.ui.refineStepsSpinBox.property("value"))
        p.keep_edits = self.ui.keepEditsCheckBox.isChecked()
        p.refine_scope = self.scope()
        p.refine_region = self.ui.refineRegionSelector.currentNode()

    def _on_changed(self, *args: Any) -> None:
        self._update_step_limit()
        self.panel.update_parameter_node_from_gui()
        self.update_enabled()

    def _update_step_limit(self) -> None:
        entry = self.current_entry()
        limit = diffusion_steps(entry.card) if entry is not None else 10
        self.ui.refineStepsSpinBox.setMaximum(limit)
        self.ui.refineStepsSpinBox.setToolTip(
            f"Diffusion steps per click (1-{limit}): few stay close to the segmentation, more may move further."
        )

    # -- state -----------------------------------------------------------------------------
    def _why_not(self) -> str:
        ui = self.ui
        if self.current_entry() is None:
            return "Install a HiDiff model to refine segmentations."
        if ui.inputVolumeSelector.currentNode() is None:
            return "Choose the input volume first."
        if ui.outputSegmentationSelector.currentNode() is None:
            return "Choose a segmentation (segment first, or paint one in Segment Editor)."
        if self.scope() == "roi" and ui.refineRegionSelector.currentNode() is None:
            return "Choose the ROI to refine inside."
        return ""

    def update_enabled(self) -> None:
        ui, logic = self.ui, self.panel.logic
        running = logic.busy
        refining = running and logic.job_kind == "refine"
        for widget in (ui.refineModelSelector, ui.refineStepsSpinBox, ui.keepEditsCheckBox, ui.refineScopeSelector):
            widget.setEnabled(not running)
        ui.refineRegionSelector.setEnabled(not running and self.scope() == "roi")
        problem = self._why_not()
        ready = not running and not problem
        ui.refineButton.setEnabled(ready or refining)
        ui.refineButton.setText("Cancel" if refining else "Refine")
        ui.oneStepButton.setEnabled(ready)
        if refining:
            tip = "Stop the running refinement; the segmentation stays as it is."
        elif running:
            tip = "Wait for the running job to end."
        else:
            tip = problem or "Run the chosen number of diffusion steps on the current segmentation (in the background)."
        ui.refineButton.setToolTip(tip)
        ui.oneStepButton.setToolTip(problem or "Run a single diffusion step; click again for another.")
        segmentation = ui.outputSegmentationSelector.currentNode()
        can_undo = logic.can_undo(segmentation)
        ui.undoRefineButton.setEnabled(can_undo)
        ui.undoRefineButton.setToolTip(
            "Put the segmentation back as it was before the last refinement."
            if can_undo
            else "Nothing to undo: no refinement of this segmentation yet."
        )

    # -- actions ---------------------------------------------------------------------------
    def on_refine_clicked(self) -> None:
        """Run the chosen number of steps, or cancel the running refinement."""
        logic = self.panel.logic
        if logic.busy:
            if logic.job_kind == "refine":
                logic.cancel()
                self.panel.show_status(logic.status)
            return
        self.start(int(self.ui.refineStepsSpinBox.property("value")))

    def on_one_step_clicked(self) -> None:
        if not self.panel.logic.busy:
            self.start(1)

    def start(self, steps: int) -> None:
        """Send a refinement of the current segmentation with ``steps`` steps to the worker."""
        ui, logic, panel = self.ui, self.panel.logic, self.panel
        if not panel.ensure_dependencies():
            return
        entry = self.current_entry()
        problem = self._why_not()
        if problem:
            panel.show_status(TaskStatus("idle", problem))
            return
        volume = ui.inputVolumeSelector.currentNode()
        scope = self.scope()
        point, slice_index, note = None, None, ""
        if scope == "slice":
            point = logic.current_slice_point(volume)
            if point is None:  # no slice views (scripts, tests): the middle axial slice
                slice_index = volume.GetImageData().GetDimensions()[2] // 2
                note = f" (no slice view: axial slice {slice_index})"
        try:
            status = logic.start_refine(
                ui.outputSegmentationSelector.currentNode(),
                volume,
                entry,
                steps,
                keep_edits=ui.keepEditsCheckBox.isChecked(),
                scope=scope,
                slice_index=slice_index,
                point_lps=point,
                roi_node=ui.refineRegionSelector.currentNode() if scope == "roi" else None,
                device=panel.parameters.device if panel.parameters is not None else "auto",
            )
        except (MedSegSuiteError, OSError) as error:
            panel.show_status(TaskStatus("failed", _sentence(str(error)) + "."))
            return
        if note:
            status.message = status.message.rstrip(".") + note + "..."
        panel.job_started(status)

    def on_undo_clicked(self) -> None:
        logic, panel = self.panel.logic, self.panel
        try:
            status = logic.undo_refinement(self.ui.outputSegmentationSelector.currentNode())
        except MedSegSuiteError as error:
            status = TaskStatus("failed", _sentence(str(error)) + ".")
        panel.show_status(status)
        panel.update_enabled()


class ExportSection:
    """Format, output file, overwrite and **Export** of the current segmentation (runs in the GUI process)."""

    def __init__(self, panel: SegmentPanel) -> None:
        self.panel = panel
        self.ui = ui = panel.ui
        self._dicom_check: tuple[Any, str] = (None, "")
        for key, (_, title) in FORMATS.items():
            ui.exportFormatSelector.addItem(title, key)
        ui.exportFormatSelector.currentIndexChanged.connect(self._on_format_changed)
        ui.exportPathLineEdit.textChanged.connect(self._on_changed)
        ui.exportOverwriteCheckBox.toggled.connect(self._on_changed)
        ui.exportBrowseButton.clicked.connect(self.on_browse_clicked)
        ui.exportButton.clicked.connect(self.on_export_clicked)

    def format(self) -> str:
        selector = self.ui.exportFormatSelector
        return selector.itemData(selector.property("currentIndex")) or "seg.nrrd"

    def path(self) -> str:
        return str(self.ui.exportPathLineEdit.property("text") or "").strip()

    # -- parameter node --------------------------------------------------------------------
    def update_gui(self, p: Parameters) -> None:
        ui = self.ui
        index = ui.exportFormatSelector.findData(p.export_format)
        ui.exportFormatSelector.setCurrentIndex(index if index >= 0 else 0)
        if self.path() != p.export_path:
            ui.exportPathLineEdit.setText(p.export_path)
        ui.exportOverwriteCheckBox.setChecked(p.export_overwrite)

    def update_parameters(self, p: Parameters) -> None:
        p.export_format = self.format()
        p.export_path = self.path()
        p.export_overwrite = self.ui.exportOverwriteCheckBox.isChecked()

    def _on_changed(self, *args: Any) -> None:
        self.panel.update_parameter_node_from_gui()
        self.update_enabled()

    def _on_format_changed(self, *args: Any) -> None:
        path = self.path()
        if path and not self.panel.updating:
            self.ui.exportPathLineEdit.setText(with_format(path, self.format()))
        self._on_changed()

    # -- state -----------------------------------------------------------------------------
    def _dicom_problem(self) -> str:
        """Why the input cannot have a DICOM SEG ("" if it can); looked up once per volume and UID list."""
        volume = self.ui.inputVolumeSelector.currentNode()
        key = (volume.GetID(), volume.GetAttribute(DICOM_UIDS_ATTRIBUTE) or "") if volume is not None else None
        if self._dicom_check[0] != key or key is None:
            self._dicom_check = (key, dicom_unavailable_reason(volume))
        return self._dicom_check[1]

    def update_enabled(self) -> None:
        ui = self.ui
        selector = ui.exportFormatSelector
        index = selector.findData("dicom")
        problem = self._dicom_problem()
        item = selector.model().item(index)
        if item is not None:
            item.setEnabled(not problem)
            item.setToolTip(_sentence(problem) + "." if problem else "A DICOM SEG that references the input's series.")
        if problem and self.format() == "dicom":
            selector.setCurrentIndex(selector.findData("seg.nrrd"))
        segmentation = ui.outputSegmentationSelector.currentNode()
        path = self.path()
        if segmentation is None:
            tip = "Choose a segmentation first."
        elif not path:
            tip = "Choose the file to write."
        elif format_of(path) is None:
            tip = "The file name must end in " + ", ".join(ext for ext, _ in FORMATS.values()) + "."
        else:
            tip = f"Write {segmentation.GetName()!r} to {path}."
        ui.exportButton.setEnabled(tip.startswith("Write"))
        ui.exportButton.setToolTip(tip)

    # -- actions ---------------------------------------------------------------------------
    def on_browse_clicked(self) -> None:
        """Choose the output file in a dialog; confirming to replace a file there ticks "Replace existing files"."""
        import os

        import qt

        key = self.format()
        ext, title = FORMATS[key]
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        suggestion = self.path() or ((segmentation.GetName() if segmentation else "segmentation") + ext)
        chosen = qt.QFileDialog.getSaveFileName(None, "Export segmentation", suggestion, f"{title} (*{ext})")
        if isinstance(chosen, (tuple, list)):  # PySide6 returns (path, filter)
            chosen = chosen[0]
        if not chosen:
            return
        chosen = str(chosen) if format_of(str(chosen)) == key else with_format(str(chosen), key)
        self.ui.exportPathLineEdit.setText(chosen)
        if os.path.exists(chosen):
            self.ui.exportOverwriteCheckBox.setChecked(True)

    def on_export_clicked(self) -> None:
        """Write the current segmentation to the chosen file; the outcome goes to the status line."""
        ui, panel = self.ui, self.panel
        panel.show_status(TaskStatus("running", "Exporting..."))
        slicer.app.processEvents()
        try:
            status = panel.logic.export(
                ui.outputSegmentationSelector.currentNode(),
                self.path(),
                reference_node=ui.inputVolumeSelector.currentNode(),
                overwrite=ui.exportOverwriteCheckBox.isChecked(),
            )
        except (MedSegSuiteError, OSError) as error:
            status = TaskStatus("failed", f"Export failed: {error}.")
        if panel.logic.busy:  # a job runs: its progress owns the bar, the export result the line
            panel.ui.statusLabel.setText(status.message)
        else:
            panel.show_status(status)
