"""The MedSegSuite panel: binds ``Resources/UI/MedSegSuite.ui`` to the parameter node and the logic.

The panel never waits: **Segment** (and **Refine** / **One step** in the Refine
section, **Start** / **Resume** / **Estimate time** in the Finetune section) sends a
job to the worker and starts a ``QTimer`` that polls the logic every 100 ms,
updating the progress bar and the status line shared by all sections; the clicked
button becomes **Cancel** while the job runs. Choices live in the parameter
node (:mod:`.parameters`), so they are saved with the scene and restored when it is
loaded. The Refine, Finetune and Export sections are controllers of their own
(:mod:`.sections`).

Written for both PythonQt (3D Slicer) and PySide6 (the test harness): it uses setter
calls, reads ambiguous properties through ``property(name)`` and connects signals with
``signal.connect(slot)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import slicer
import vtk
from slicer.util import VTKObservationMixin

from .logic import DEVICE_TITLES, SegmentationLogic, TaskStatus, describe_model
from .messages import _, error_message
from .parameters import Parameters, get_parameter_node
from .sections import ExportSection, FinetuneSection, RefineSection
from .volumes import input_volumes

__all__ = ["SegmentPanel"]

log = logging.getLogger(__name__)


class SegmentPanel(VTKObservationMixin):
    """Controller of the panel widgets in ``ui`` (from ``slicer.util.childWidgetVariables``).

    Args:
        ui: the named widgets of the loaded ``.ui`` file.
        logic: the segmentation logic that talks to the worker.
        requirements: ``requirements.txt`` for the first-use installer (None: no installer).
        poll_ms: timer interval while a job runs.
    """

    def __init__(
        self, ui: Any, logic: SegmentationLogic, requirements: Optional[str] = None, poll_ms: int = 100
    ) -> None:
        VTKObservationMixin.__init__(self)
        import qt

        self.ui = ui
        self.logic = logic
        self.requirements = requirements
        self.parameters: Optional[Parameters] = None
        self._updating = False
        self._entries: list[Any] = []
        self._devices: list[str] = []
        self._job_active = False
        self.timer = qt.QTimer()
        self.timer.setInterval(poll_ms)
        self.timer.timeout.connect(self.poll)
        for selector in (ui.inputVolumeSelector, ui.outputSegmentationSelector, ui.regionSelector):
            selector.currentNodeChanged.connect(self.update_parameter_node_from_gui)
        ui.modelSelector.currentIndexChanged.connect(self._on_model_changed)
        ui.deviceSelector.currentIndexChanged.connect(self.update_parameter_node_from_gui)
        ui.fastCheckBox.toggled.connect(self.update_parameter_node_from_gui)
        ui.segmentButton.clicked.connect(self.on_segment_clicked)
        self.refine = RefineSection(self)
        self.finetune = FinetuneSection(self)
        self.export = ExportSection(self)
        scene = slicer.mrmlScene
        self.addObserver(scene, scene.NodeAddedEvent, self._on_nodes_changed)
        self.addObserver(scene, scene.NodeRemovedEvent, self._on_nodes_changed)
        self.addObserver(scene, scene.StartCloseEvent, self._on_scene_start_close)
        self.addObserver(scene, scene.EndCloseEvent, self._on_scene_changed)
        self.addObserver(scene, scene.EndImportEvent, self._on_scene_changed)
        self.refresh_devices()
        self.refresh_models()
        self.show_status(TaskStatus("idle", _("Choose an input volume and a model, then click Segment.")))

    # -- parameter node ----------------------------------------------------------------
    def initialize_parameter_node(self) -> None:
        """Bind the scene's parameter node, choosing the first volume if none is chosen yet."""
        parameters = Parameters(get_parameter_node(slicer.mrmlScene))
        if parameters.input_volume is None:
            candidates = input_volumes(slicer.mrmlScene)
            if candidates:
                parameters.input_volume = candidates[0]
        if not parameters.model_id and self._entries:
            parameters.model_id = self._entries[0].card.id
        self.set_parameter_node(parameters.node)

    def set_parameter_node(self, node: Optional[Any]) -> None:
        if self.parameters is not None:
            self.removeObserver(self.parameters.node, vtk.vtkCommand.ModifiedEvent, self._on_modified)
        self.parameters = Parameters(node) if node is not None else None
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self._on_modified)
        self.update_gui_from_parameter_node()
        self.finetune.schedule_refresh()

    def _on_modified(self, caller: Any = None, event: Any = None) -> None:
        self.update_gui_from_parameter_node()

    @property
    def updating(self) -> bool:
        """True while the widgets are being set from the parameter node."""
        return self._updating

    @staticmethod
    def _scene_busy() -> bool:
        scene = slicer.mrmlScene
        return bool(scene.IsImporting() or scene.IsClosing() or scene.IsBatchProcessing())

    def update_gui_from_parameter_node(self) -> None:
        if self.parameters is None or self._updating or self._scene_busy():
            self._update_enabled()
            return
        p = self.parameters
        self._updating = True
        try:
            self.ui.inputVolumeSelector.setCurrentNode(p.input_volume)
            self.ui.outputSegmentationSelector.setCurrentNode(p.output_segmentation)
            self.ui.regionSelector.setCurrentNode(p.region)
            index = self.ui.modelSelector.findData(p.model_id)
            if index >= 0:
                self.ui.modelSelector.setCurrentIndex(index)
            index = self.ui.deviceSelector.findData(p.device)
            self.ui.deviceSelector.setCurrentIndex(index if index >= 0 else self.ui.deviceSelector.findData("auto"))
            self.ui.fastCheckBox.setChecked(p.fast)
            self.refine.update_gui(p)
            self.finetune.update_gui(p)
            self.export.update_gui(p)
        finally:
            self._updating = False
        self._update_model_info()
        self._update_enabled()

    def update_parameter_node_from_gui(self, *args: Any) -> None:
        if self.parameters is None or self._updating or self._scene_busy():
            return
        p = self.parameters
        was_modifying = p.node.StartModify()
        try:
            p.input_volume = self.ui.inputVolumeSelector.currentNode()
            p.output_segmentation = self.ui.outputSegmentationSelector.currentNode()
            p.region = self.ui.regionSelector.currentNode()
            entry = self.current_entry()
            if entry is not None:
                p.model_id = entry.card.id
            device = self.ui.deviceSelector.itemData(self.ui.deviceSelector.property("currentIndex"))
            if device:
                p.device = device
            p.fast = self.ui.fastCheckBox.isChecked()
            self.refine.update_parameters(p)
            self.finetune.update_parameters(p)
            self.export.update_parameters(p)
        finally:
            p.node.EndModify(was_modifying)

    # -- models and devices --------------------------------------------------------------
    @property
    def entries(self) -> list[Any]:
        """The models listed in the model selector, in its order."""
        return list(self._entries)

    def current_entry(self) -> Optional[Any]:
        index = self.ui.modelSelector.property("currentIndex")
        return self._entries[index] if index is not None and 0 <= index < len(self._entries) else None

    def refresh_models(self) -> None:
        """List the installed models again (e.g. after importing one)."""
        self._entries = self.logic.models()
        self._updating = True
        try:
            self.ui.modelSelector.clear()
            for entry in self._entries:
                card = entry.card
                title = f"{card.name}: {card.id}" if card.parent else card.name
                self.ui.modelSelector.addItem(f"{title} ({card.dims}D)", card.id)
            self.refine.refresh(self._entries)
            self.finetune.refresh(self._entries)
        finally:
            self._updating = False
        if self.parameters is not None:
            if self.ui.modelSelector.findData(self.parameters.model_id) < 0 and self._entries:
                self.parameters.model_id = self._entries[0].card.id
            refiners = self.refine.entries
            if self.ui.refineModelSelector.findData(self.parameters.refine_model_id) < 0 and refiners:
                self.parameters.refine_model_id = refiners[0].card.id
            self.update_gui_from_parameter_node()
        self._update_model_info()
        self._update_enabled()

    def refresh_devices(self) -> None:
        devices = self.logic.devices()
        if devices == self._devices:
            return
        self._devices = devices
        self._updating = True
        try:
            self.ui.deviceSelector.clear()
            for name in devices:
                self.ui.deviceSelector.addItem(DEVICE_TITLES.get(name, name), name)
        finally:
            self._updating = False
        self.update_gui_from_parameter_node()

    def _on_model_changed(self, *args: Any) -> None:
        self._update_model_info()
        self.update_parameter_node_from_gui()
        self._update_enabled()

    def _update_model_info(self) -> None:
        entry = self.current_entry()
        if entry is None:
            problems = " ".join(self.logic.problems)
            self.ui.modelInfoLabel.setText(
                problems or _("No models are installed. Import one with <i>medsegsuite models import FILE</i>.")
            )
            self.ui.fastCheckBox.setEnabled(False)
            return
        text = describe_model(entry.card)
        if self.logic.problems:  # broken model folders are skipped: say which, or they vanish without a word
            from html import escape

            text += (
                "<br><br>"
                + _("<b>Not listed</b> (fix or remove these models):")
                + " "
                + "; ".join(escape(problem) for problem in self.logic.problems)
            )
        self.ui.modelInfoLabel.setText(text)
        has_fast = bool(entry.card.inference.fast)
        self.ui.fastCheckBox.setEnabled(has_fast and not self.logic.busy)
        self.ui.fastCheckBox.setToolTip(
            _("Use the model card's quicker settings (for example less window overlap).")
            if has_fast
            else _("This model has no fast mode.")
        )

    # -- running -------------------------------------------------------------------------
    def update_enabled(self) -> None:
        """Enable the widgets that make sense now (after a choice changed or a job started or ended)."""
        self._update_enabled()

    def _update_enabled(self) -> None:
        running = self.logic.busy
        segmenting = running and self.logic.job_kind == "segment"
        for widget in (
            self.ui.inputVolumeSelector,
            self.ui.outputSegmentationSelector,
            self.ui.regionSelector,
            self.ui.modelSelector,
            self.ui.deviceSelector,
        ):
            widget.setEnabled(not running)
        entry = self.current_entry()
        self.ui.fastCheckBox.setEnabled(not running and entry is not None and bool(entry.card.inference.fast))
        has_input = self.ui.inputVolumeSelector.currentNode() is not None
        ready = has_input and entry is not None and not running
        install = has_input and entry is None and self.logic.packages_missing and not running
        self.ui.segmentButton.setEnabled(segmenting or ready or install)
        self.ui.segmentButton.setText(_("Cancel") if segmenting else _("Segment"))
        if segmenting:
            tip = _("Stop the running segmentation; the scene stays as it is.")
        elif running:
            tip = _("Wait for the running job to end.")
        elif install:
            tip = _("MedSegSuite's Python packages are missing: click to install them.")
        elif ready:
            tip = _("Segment the input volume with the chosen model (runs in the background).")
        else:
            tip = _("Choose an input volume and a model first.")
        self.ui.segmentButton.setToolTip(tip)
        self.refine.update_enabled()
        self.finetune.update_enabled()
        self.export.update_enabled()

    def ensure_dependencies(self) -> bool:
        """Install MedSegSuite's Python packages first if they are missing (after asking); False if not there."""
        return self._ensure_dependencies()

    def _ensure_dependencies(self) -> bool:
        if not self.requirements or not Path(self.requirements).is_file():
            return True
        from .dependencies import DependencyInstaller

        try:
            installer = DependencyInstaller(self.requirements)
            if installer.missing():
                self.show_status(TaskStatus("idle", _("Installing Python packages...")))
                slicer.app.processEvents()
            if not installer.ensure():
                self.show_status(TaskStatus("idle", _("MedSegSuite needs its Python packages; nothing was installed.")))
                return False
        except Exception as error:  # an InstallError, or whatever pip or the PyTorch extension raised
            self.show_status(TaskStatus("failed", error_message(error, _("Installing Python packages"))))
            self._update_enabled()
            return False
        if self.logic.packages_missing:
            self.refresh_models()
        return True

    def on_segment_clicked(self) -> None:
        """Start a segmentation, or cancel the running one."""
        if self.logic.busy:
            if self.logic.job_kind == "segment":
                self.logic.cancel()
                self.show_status(self.logic.status)
            return
        if not self._ensure_dependencies():
            return
        entry = self.current_entry()
        if entry is None:
            self.show_status(TaskStatus("idle", _("Choose a model, then click Segment.")))
            return
        try:
            status = self.logic.start(
                self.ui.inputVolumeSelector.currentNode(),
                entry,
                device=self.parameters.device if self.parameters is not None else "auto",
                region_node=self.ui.regionSelector.currentNode(),
                output_node=self.ui.outputSegmentationSelector.currentNode(),
                fast=self.ui.fastCheckBox.isEnabled() and self.ui.fastCheckBox.isChecked(),
            )
        except Exception as error:  # nothing was sent: the scene is unchanged
            self.show_status(TaskStatus("failed", error_message(error, _("Segmentation"))))
            self._update_enabled()
            return
        self.job_started(status)

    def job_started(self, status: TaskStatus) -> None:
        """A job was sent to the worker: show it and poll until it ends."""
        self._job_active = True
        self.show_status(status)
        self._update_enabled()
        self.timer.start()

    def poll(self) -> None:
        """Timer slot: process worker messages and update the panel; never raises.

        An unexpected error here ends the running job (:meth:`.logic.SegmentationLogic.fail`):
        the panel goes idle with one sentence on the status line.
        """
        try:
            self._poll()
        except Exception as error:
            self.logic.fail(error)
            self._job_active = False
            self.timer.stop()
            try:
                self.show_status(self.logic.status)
                self._update_enabled()
            except Exception:  # the widgets themselves fail: the log has it, the timer is stopped
                log.exception("the MedSegSuite panel could not show the end of a job")

    def _poll(self) -> None:
        status = self.logic.poll()
        self.refresh_devices()
        if status.running:
            self.show_status(status)
            return
        if self._job_active:
            self._job_active = False
            if status.state == "done" and status.output_node_id and status.kind == "segment":
                output = slicer.mrmlScene.GetNodeByID(status.output_node_id)
                self.ui.outputSegmentationSelector.setCurrentNode(output)
                if self.parameters is not None:
                    self.parameters.output_segmentation = output
            if status.kind in ("finetune", "timing"):
                self.finetune.job_ended(status)
            self.show_status(status)
            self._update_enabled()
        client = self.logic.client
        if not (client.alive and client.ready is None):  # keep polling until a new worker has said ready
            self.timer.stop()

    def enter(self) -> None:
        """The module was shown: start the worker early so that the first job and the device list are ready."""
        if not self.logic.busy and not self.logic.client.alive:
            from .dependencies import DependencyInstaller

            requirements = self.requirements
            if requirements and Path(requirements).is_file() and DependencyInstaller(requirements).missing():
                return
            self.logic.warm_up()
            self.timer.start()

    def show_status(self, status: TaskStatus) -> None:
        self.ui.statusLabel.setText(status.message)
        if status.kind == "finetune":
            self.finetune.show_latest()
        bar = self.ui.progressBar
        if status.running and status.total > 1:
            bar.setRange(0, status.total)
            bar.setValue(status.done)
            bar.setFormat(f"%v / %m {status.unit}".rstrip())
        elif status.running:
            bar.setRange(0, 0)
        else:
            bar.setRange(0, 100)
            bar.setValue(100 if status.state == "done" else 0)
            bar.setFormat("%p%")

    # -- scene events ----------------------------------------------------------------------
    def _on_scene_start_close(self, caller: Any = None, event: Any = None) -> None:
        if self.logic.busy:
            self.logic.cancel()
        self.logic.forget()
        self.set_parameter_node(None)

    def _on_scene_changed(self, caller: Any = None, event: Any = None) -> None:
        self.initialize_parameter_node()

    def _on_nodes_changed(self, caller: Any = None, event: Any = None) -> None:
        if not self._scene_busy():
            self.finetune.schedule_refresh()

    def cleanup(self) -> None:
        """Stop polling and observing; the panel ignores its widgets from now on."""
        self.timer.stop()
        self.finetune.cleanup()
        self.removeObservers()
        self.parameters = None
