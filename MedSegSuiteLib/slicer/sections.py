"""The Refine, Finetune and Export sections of the MedSegSuite panel (controllers used by :class:`.panel.SegmentPanel`).

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
from .logic import REFINE_MAX_ENSEMBLE, REFINE_SCOPES, SLICE_SCOPES, TaskStatus, diffusion_steps, is_refiner
from .messages import _, error_message
from .parameters import DEFAULTS, REFINE_NEIGHBOURS
from .refinement import UNCERTAIN_THRESHOLD
from .volumes import input_volumes

if TYPE_CHECKING:
    from .panel import SegmentPanel
    from .parameters import Parameters

__all__ = ["ExportSection", "FinetuneSection", "RefineSection"]

log = logging.getLogger(__name__)


def _sentence(text: str) -> str:
    text = str(text).strip()
    return (text[0].upper() + text[1:]) if text else text


class RefineSection:
    """HiDiff model, steps, keep-my-edits, scope, spread, ensemble, **Refine** / **One step** (Cancel while
    running) and **Undo**.

    The scope "neighbours" reaches the parameter node's ``RefineNeighbours`` slices on
    either side (no control of its own); so does spread.
    """

    def __init__(self, panel: SegmentPanel) -> None:
        self.panel = panel
        self.ui = ui = panel.ui
        self._entries: list[Any] = []
        self._neighbours = int(DEFAULTS[REFINE_NEIGHBOURS])  # the parameter node's value once one is bound
        for key, title in REFINE_SCOPES.items():
            ui.refineScopeSelector.addItem(_(title), key)
        ui.refineEnsembleSpinBox.setRange(1, REFINE_MAX_ENSEMBLE)
        ui.refineSpreadSpinBox.setRange(0.0, 1.0)
        self._update_tooltips()
        ui.refineModelSelector.currentIndexChanged.connect(self._on_changed)
        ui.refineStepsSpinBox.valueChanged.connect(self._on_changed)
        ui.keepEditsCheckBox.toggled.connect(self._on_changed)
        ui.refineScopeSelector.currentIndexChanged.connect(self._on_changed)
        ui.refineSpreadSpinBox.valueChanged.connect(self._on_changed)
        ui.refineEnsembleSpinBox.valueChanged.connect(self._on_changed)
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
            _("The HiDiff model whose diffusion steps refine the current segmentation.")
            if self._entries
            else _("No HiDiff model is installed: import one with medsegsuite models import FILE.")
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
        ui.refineSpreadSpinBox.setValue(p.refine_spread)
        ui.refineEnsembleSpinBox.setValue(min(p.refine_ensemble, REFINE_MAX_ENSEMBLE))
        self._neighbours = p.refine_neighbours
        self._update_tooltips()

    def update_parameters(self, p: Parameters) -> None:
        entry = self.current_entry()
        if entry is not None:
            p.refine_model_id = entry.card.id
        p.refine_steps = int(self.ui.refineStepsSpinBox.property("value"))
        p.keep_edits = self.ui.keepEditsCheckBox.isChecked()
        p.refine_scope = self.scope()
        p.refine_region = self.ui.refineRegionSelector.currentNode()
        p.refine_spread = self.spread()
        p.refine_ensemble = self.ensemble()

    def spread(self) -> float:
        """The spread the panel shows (0 to 1)."""
        return float(self.ui.refineSpreadSpinBox.property("value"))

    def ensemble(self) -> int:
        """The number of chains the panel shows (1 to :data:`.logic.REFINE_MAX_ENSEMBLE`)."""
        return int(self.ui.refineEnsembleSpinBox.property("value"))

    def _on_changed(self, *args: Any) -> None:
        self._update_step_limit()
        self.panel.update_parameter_node_from_gui()
        self.update_enabled()

    def _update_step_limit(self) -> None:
        entry = self.current_entry()
        limit = diffusion_steps(entry.card) if entry is not None else 10
        self.ui.refineStepsSpinBox.setMaximum(limit)
        self.ui.refineStepsSpinBox.setToolTip(
            _(
                "Each step lets the model change the mask a little more, starting from your mask: 1-3 steps "
                "stay close to it, {limit} redraw it almost from scratch. Your edits never change when "
                "Keep my edits is on."
            ).format(limit=limit)
        )

    def _update_tooltips(self) -> None:
        """Scope, spread and ensemble say in plain words what they do (with the current neighbour count)."""
        ui, n = self.ui, self._neighbours
        ui.refineScopeSelector.setToolTip(
            _(
                "Which slices to refine: every slice that holds the segmentation; only the axial slice shown in "
                "the Red view; that slice and {n} slice(s) on either side of it; or only inside an ROI. "
                "Everything else stays as it is."
            ).format(n=n)
        )
        ui.refineSpreadSpinBox.setToolTip(
            _(
                "How strongly a slice you corrected guides the slices beside it, up to {n} slice(s) away: "
                "0 = not at all, 1 = the next slice starts from your corrected slice. A slice d slices away "
                "takes your slice at weight spread to the power d (0.5: a half for the next slice, a quarter "
                "for the one after). Needs Keep my edits: your edits are what spreads."
            ).format(n=n)
        )
        ui.refineEnsembleSpinBox.setToolTip(
            _(
                "How many times to run the refinement, each with other random draws; the result is their "
                "average (1 = one run; each extra run takes as long as the first). With 2 or more, the voxels "
                "where the runs disagree go into the segment {segment}: uncertainty is how far the runs' answers "
                "spread, from 0 (all agree) to 0.5 (half say inside, half outside), and voxels above {threshold} "
                "are marked. That segment is not a label: refinement, finetuning and export leave it out."
            ).format(segment=repr(_("Uncertain (refinement)")), threshold=UNCERTAIN_THRESHOLD)
        )

    # -- state -----------------------------------------------------------------------------
    def _why_not(self) -> str:
        ui = self.ui
        if self.current_entry() is None:
            return _("Install a HiDiff model to refine segmentations.")
        if ui.inputVolumeSelector.currentNode() is None:
            return _("Choose the input volume first.")
        if ui.outputSegmentationSelector.currentNode() is None:
            return _("Choose a segmentation (segment first, or paint one in Segment Editor).")
        if self.scope() == "roi" and ui.refineRegionSelector.currentNode() is None:
            return _("Choose the ROI to refine inside.")
        return ""

    def update_enabled(self) -> None:
        ui, logic = self.ui, self.panel.logic
        running = logic.busy
        refining = running and logic.job_kind == "refine"
        for widget in (
            ui.refineModelSelector,
            ui.refineStepsSpinBox,
            ui.keepEditsCheckBox,
            ui.refineScopeSelector,
            ui.refineEnsembleSpinBox,
        ):
            widget.setEnabled(not running)
        ui.refineRegionSelector.setEnabled(not running and self.scope() == "roi")
        ui.refineSpreadSpinBox.setEnabled(not running and ui.keepEditsCheckBox.isChecked())
        problem = self._why_not()
        ready = not running and not problem
        ui.refineButton.setEnabled(ready or refining)
        ui.refineButton.setText(_("Cancel") if refining else _("Refine"))
        ui.oneStepButton.setEnabled(ready)
        if refining:
            tip = _("Stop the running refinement; the segmentation stays as it is.")
        elif running:
            tip = _("Wait for the running job to end.")
        else:
            tip = problem or _(
                "Run the chosen number of diffusion steps on the current segmentation (in the background)."
            )
        ui.refineButton.setToolTip(tip)
        ui.oneStepButton.setToolTip(problem or _("Run a single diffusion step; click again for another."))
        segmentation = ui.outputSegmentationSelector.currentNode()
        can_undo = logic.can_undo(segmentation)
        ui.undoRefineButton.setEnabled(can_undo)
        ui.undoRefineButton.setToolTip(
            _("Put the segmentation back as it was before the last refinement.")
            if can_undo
            else _("Nothing to undo: no refinement of this segmentation yet.")
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
        if scope in SLICE_SCOPES:
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
                ensemble=self.ensemble(),
                neighbours=panel.parameters.refine_neighbours if panel.parameters is not None else None,
                spread=self.spread(),
            )
        except Exception as error:  # nothing was sent: the scene is unchanged
            panel.show_status(TaskStatus("failed", error_message(error, _("Refinement"))))
            panel.update_enabled()
            return
        if note:
            status.message = status.message.rstrip(".") + note + "..."
        panel.job_started(status)

    def on_undo_clicked(self) -> None:
        logic, panel = self.panel.logic, self.panel
        try:
            status = logic.undo_refinement(self.ui.outputSegmentationSelector.currentNode())
        except Exception as error:
            status = TaskStatus("failed", error_message(error, _("Undo")))
        panel.show_status(status)
        panel.update_enabled()


class ExportSection:
    """Format, output file, overwrite and **Export** of the current segmentation (runs in the GUI process)."""

    def __init__(self, panel: SegmentPanel) -> None:
        self.panel = panel
        self.ui = ui = panel.ui
        self._dicom_check: tuple[Any, str] = (None, "")
        for key, (_ext, title) in FORMATS.items():
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
            fits = _("A DICOM SEG that references the input's series.")
            item.setToolTip(_sentence(problem) + "." if problem else fits)
        if problem and self.format() == "dicom":
            selector.setCurrentIndex(selector.findData("seg.nrrd"))
        segmentation = ui.outputSegmentationSelector.currentNode()
        path = self.path()
        ready = False
        if segmentation is None:
            tip = _("Choose a segmentation first.")
        elif not path:
            tip = _("Choose the file to write.")
        elif format_of(path) is None:
            endings = ", ".join(ext for ext, _title in FORMATS.values())
            tip = _("The file name must end in {endings}.").format(endings=endings)
        else:
            tip = _("Write {segmentation} to {path}.").format(segmentation=repr(segmentation.GetName()), path=path)
            ready = True
        ui.exportButton.setEnabled(ready)
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
        panel.show_status(TaskStatus("running", _("Exporting...")))
        slicer.app.processEvents()
        try:
            status = panel.logic.export(
                ui.outputSegmentationSelector.currentNode(),
                self.path(),
                reference_node=ui.inputVolumeSelector.currentNode(),
                overwrite=ui.exportOverwriteCheckBox.isChecked(),
            )
        except (MedSegSuiteError, OSError) as error:
            status = TaskStatus("failed", _("Export failed: {error}.").format(error=str(error).rstrip(".")))
        except Exception as error:  # exporting writes files only: the scene is unchanged
            status = TaskStatus("failed", error_message(error, _("Export")))
        if panel.logic.busy:  # a job runs: its progress owns the bar, the export result the line
            panel.ui.statusLabel.setText(status.message)
        else:
            panel.show_status(status)


class FinetuneSection:
    """Starting model, labelled cases, unlabelled volumes and folder, iterations with a time estimate,
    **Start** (Cancel while running), **Resume**, the latest loss and the loss / validation Dice curve.

    The labelled cases are the scene's segmentations that have a reference volume,
    listed with it and checked by the user; the checks are node references of the
    parameter node. Runs go to the worker (:meth:`.logic.SegmentationLogic.start_finetune`);
    a finished run's model is added to the model lists and chosen for **Segment**.
    """

    TIMED_ITERATIONS = 3

    def __init__(self, panel: SegmentPanel) -> None:
        import qt

        self.panel = panel
        self.ui = ui = panel.ui
        self._entries: list[Any] = []
        self._filling = False
        self._refresh_timer = qt.QTimer()
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(0)
        self._refresh_timer.timeout.connect(self.refresh_cases)
        ui.finetuneModelSelector.currentIndexChanged.connect(self._on_model_changed)
        ui.finetuneLabelledList.itemChanged.connect(self._on_checks_changed)
        ui.finetuneUnlabelledList.itemChanged.connect(self._on_checks_changed)
        ui.finetuneFolderLineEdit.textChanged.connect(self._on_changed)
        ui.finetuneIterationsSpinBox.valueChanged.connect(self._on_changed)
        ui.finetuneFolderBrowseButton.clicked.connect(self.on_browse_clicked)
        ui.finetuneEstimateButton.clicked.connect(self.on_estimate_clicked)
        ui.finetuneStartButton.clicked.connect(self.on_start_clicked)
        ui.finetuneResumeButton.clicked.connect(self.on_resume_clicked)
        ui.finetuneCollapsibleButton.contentsCollapsed.connect(self._on_collapsed)

    # -- models ----------------------------------------------------------------------------
    def refresh(self, entries: list[Any]) -> None:
        """List the installed models as starting points."""
        self._entries = list(entries)
        selector = self.ui.finetuneModelSelector
        selector.blockSignals(True)
        try:
            selector.clear()
            for entry in self._entries:
                card = entry.card
                selector.addItem(f"{card.name}: {card.id}" if card.parent else card.name, card.id)
        finally:
            selector.blockSignals(False)
        self._update_model_tip()

    def current_entry(self) -> Optional[Any]:
        index = self.ui.finetuneModelSelector.property("currentIndex")
        return self._entries[index] if index is not None and 0 <= index < len(self._entries) else None

    def _update_model_tip(self) -> None:
        entry = self.current_entry()
        if entry is None:
            tip = _("No model is installed: import one with medsegsuite models import FILE.")
        else:
            labels = ", ".join(label.name for label in entry.card.labels)
            tip = _(
                "{model} is never changed: the result is a new model {id}-ft-<n>. "
                "Its labels: {labels} (segments are matched to them by name, terminology code or label value)."
            ).format(model=entry.card.name, id=entry.card.id, labels=labels)
        self.ui.finetuneModelSelector.setToolTip(tip)

    # -- cases -----------------------------------------------------------------------------
    def schedule_refresh(self) -> None:
        """List the scene's cases again once the current event is handled (nodes are often set up after adding)."""
        self._refresh_timer.start()

    def refresh_cases(self) -> None:
        """Rebuild the labelled and unlabelled lists from the scene, checked as the parameter node says."""
        import qt

        from .finetuning import candidate_pairs

        p = self.panel.parameters
        scene = slicer.mrmlScene
        if scene.IsImporting() or scene.IsClosing() or scene.IsBatchProcessing():
            return
        checked = {node.GetID() for node in (p.finetune_labelled if p is not None else [])}
        checked_volumes = {node.GetID() for node in (p.finetune_unlabelled if p is not None else [])}
        entry = self.current_entry()
        volumes = input_volumes(scene)
        self._filling = True
        try:
            for widget, rows in (
                (self.ui.finetuneLabelledList, [self._pair_row(s, v, entry, checked) for s, v in candidate_pairs()]),
                (
                    self.ui.finetuneUnlabelledList,
                    [(node.GetID(), node.GetName(), "", node.GetID() in checked_volumes) for node in volumes],
                ),
            ):
                widget.blockSignals(True)
                try:
                    widget.clear()
                    for node_id, text, tip, on in rows:
                        item = qt.QListWidgetItem(text)
                        item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                        item.setCheckState(qt.Qt.Checked if on else qt.Qt.Unchecked)
                        item.setData(qt.Qt.UserRole, node_id)
                        if tip:
                            item.setToolTip(tip)
                        widget.addItem(item)
                finally:
                    widget.blockSignals(False)
        finally:
            self._filling = False
        self.update_enabled()

    @staticmethod
    def _pair_row(segmentation: Any, volume: Any, entry: Optional[Any], checked: set) -> tuple[str, str, str, bool]:
        from .refinement import match_segments

        text = f"{volume.GetName()} + {segmentation.GetName()}"
        tip = _("Segmentation {segmentation} on volume {volume}.").format(
            segmentation=repr(segmentation.GetName()), volume=repr(volume.GetName())
        )
        if entry is not None:
            matches, unknown = match_segments(segmentation, entry.card)
            if unknown or not matches:
                text += "  " + _("(labels do not match)")
                tip += " " + _("Not usable with {model}: {reasons}.").format(
                    model=entry.card.name, reasons="; ".join(unknown) or _("it has no segments")
                )
            else:
                tip += " " + _("Segments: {matches}.").format(
                    matches=", ".join(f"{m.name} \u2192 {m.label.name}" for m in matches)
                )
        return segmentation.GetID(), text, tip, segmentation.GetID() in checked

    @staticmethod
    def _checked_ids(widget: Any) -> list[str]:
        import qt

        ids = []
        for row in range(int(widget.property("count"))):
            item = widget.item(row)
            if item.checkState() == qt.Qt.Checked:
                ids.append(str(item.data(qt.Qt.UserRole)))
        return ids

    def _on_checks_changed(self, *args: Any) -> None:
        p = self.panel.parameters
        if self._filling or p is None or self.panel.updating:
            return
        scene = slicer.mrmlScene
        was_modifying = p.node.StartModify()
        try:
            p.finetune_labelled = [scene.GetNodeByID(i) for i in self._checked_ids(self.ui.finetuneLabelledList)]
            p.finetune_unlabelled = [scene.GetNodeByID(i) for i in self._checked_ids(self.ui.finetuneUnlabelledList)]
        finally:
            p.node.EndModify(was_modifying)
        self.update_enabled()

    def _sync_checks(self, p: Parameters) -> None:
        import qt

        for widget, nodes in (
            (self.ui.finetuneLabelledList, p.finetune_labelled),
            (self.ui.finetuneUnlabelledList, p.finetune_unlabelled),
        ):
            wanted = {node.GetID() for node in nodes}
            widget.blockSignals(True)
            try:
                for row in range(int(widget.property("count"))):
                    item = widget.item(row)
                    on = str(item.data(qt.Qt.UserRole)) in wanted
                    item.setCheckState(qt.Qt.Checked if on else qt.Qt.Unchecked)
            finally:
                widget.blockSignals(False)

    def pairs(self) -> list[tuple[Any, Any]]:
        """The checked labelled cases as ``(segmentation, reference volume)``."""
        from .finetuning import reference_volume

        p = self.panel.parameters
        found = [(node, reference_volume(node)) for node in (p.finetune_labelled if p is not None else [])]
        return [(segmentation, volume) for segmentation, volume in found if volume is not None]

    def unlabelled(self) -> list[Any]:
        p = self.panel.parameters
        return list(p.finetune_unlabelled) if p is not None else []

    def folder(self) -> str:
        return str(self.ui.finetuneFolderLineEdit.property("text") or "").strip()

    def iterations(self) -> int:
        return int(self.ui.finetuneIterationsSpinBox.property("value"))

    # -- parameter node --------------------------------------------------------------------
    def update_gui(self, p: Parameters) -> None:
        ui = self.ui
        index = ui.finetuneModelSelector.findData(p.finetune_model_id or p.model_id)
        if index >= 0:
            ui.finetuneModelSelector.setCurrentIndex(index)
        ui.finetuneIterationsSpinBox.setValue(p.finetune_iterations)
        if self.folder() != p.finetune_folder:
            ui.finetuneFolderLineEdit.setText(p.finetune_folder)
        self._sync_checks(p)
        self._update_model_tip()

    def update_parameters(self, p: Parameters) -> None:
        entry = self.current_entry()
        if entry is not None:
            p.finetune_model_id = entry.card.id
        p.finetune_iterations = self.iterations()
        p.finetune_folder = self.folder()

    def _on_changed(self, *args: Any) -> None:
        self.panel.update_parameter_node_from_gui()
        self.update_enabled()

    def _on_model_changed(self, *args: Any) -> None:
        self._update_model_tip()
        self._on_changed()
        self.schedule_refresh()  # the lists say which segmentations match the model's labels

    def _on_collapsed(self, collapsed: bool) -> None:
        if not collapsed:
            self.refresh_cases()

    # -- state -----------------------------------------------------------------------------
    def _why_not(self) -> str:
        if self.current_entry() is None:
            return _("Install a model to finetune.")
        if not self.pairs():
            return _("Check at least one labelled case (a volume with its segmentation) to learn from.")
        return ""

    def _device(self) -> str:
        p = self.panel.parameters
        return p.device if p is not None else "auto"

    def update_enabled(self) -> None:
        ui, logic = self.ui, self.panel.logic
        running = logic.busy
        finetuning = running and logic.job_kind == "finetune"
        timing = running and logic.job_kind == "timing"
        for widget in (
            ui.finetuneModelSelector,
            ui.finetuneLabelledList,
            ui.finetuneUnlabelledList,
            ui.finetuneFolderLineEdit,
            ui.finetuneFolderBrowseButton,
            ui.finetuneIterationsSpinBox,
        ):
            widget.setEnabled(not running)
        problem = self._why_not()
        ready = not running and not problem
        ui.finetuneStartButton.setEnabled(ready or finetuning)
        ui.finetuneStartButton.setText(_("Cancel") if finetuning else _("Start"))
        if finetuning:
            tip = _("Stop the run; its last checkpoint is kept, so Resume can continue it.")
        elif running:
            tip = _("Wait for the running job to end.")
        else:
            tip = problem or _("Finetune a new model on the checked cases (in the background).")
        ui.finetuneStartButton.setToolTip(tip)
        entry = self.current_entry()
        unfinished = logic.unfinished_finetune(entry) if entry is not None and not running else None
        ui.finetuneResumeButton.setEnabled(ready and unfinished is not None)
        if unfinished is not None:
            tip = _(
                "Continue the unfinished run {model} (logged up to iteration {iteration}) on the checked "
                "cases, up to the chosen number of iterations."
            ).format(model=unfinished[0], iteration=unfinished[1])
        else:
            tip = _("Nothing to resume: no unfinished finetuning of this model.")
        ui.finetuneResumeButton.setToolTip(problem if problem and unfinished is not None else tip)
        ui.finetuneEstimateButton.setEnabled(ready or timing)
        ui.finetuneEstimateButton.setText(_("Cancel") if timing else _("Estimate time"))
        ui.finetuneEstimateButton.setToolTip(
            _("Stop timing.")
            if timing
            else problem
            or _("Time {count} iterations (after a warm-up one) on the checked cases in the background.").format(
                count=self.TIMED_ITERATIONS
            )
        )
        self.update_estimate()

    def update_estimate(self) -> None:
        """Show the expected duration of a run for the chosen iterations, from the last timing of this choice."""
        from .finetuning import describe_duration, estimate_seconds

        logic = self.panel.logic
        timing = logic.finetune_timing
        entry = self.current_entry()
        pairs = self.pairs()
        if entry is None or not pairs:
            text = ""
        elif timing is None:
            text = _("No time estimate yet: click Estimate time to time a few iterations on these cases.")
        elif timing.key != logic.finetune_key(entry, pairs, self.unlabelled(), self.folder(), self._device()):
            text = _("The last timing was for another model, other cases or device: click Estimate time again.")
        else:
            device = timing.device.replace("cpu", "CPU")
            text = _(
                "About {duration} on {device} "
                "(timed in the worker on these cases: {per_iteration} s per iteration, "
                "up to {per_validation} per validation)."
            ).format(
                duration=describe_duration(estimate_seconds(timing, self.iterations())),
                device=device,
                per_iteration=f"{timing.per_iteration:.2f}",
                per_validation=describe_duration(timing.per_validation),
            )
        self.ui.finetuneEstimateLabel.setText(text)

    def show_latest(self) -> None:
        """Show the latest loss and validation Dice of the current (or last) run."""
        latest = self.panel.logic.finetune_latest
        parts = []
        if "loss" in latest:
            parts.append(
                _("Loss {loss} at iteration {iteration}").format(
                    loss=f"{latest['loss']:.4f}", iteration=latest.get("iteration")
                )
            )
        if "val_dice" in latest:
            parts.append(
                _("validation Dice {dice} at iteration {iteration}").format(
                    dice=f"{latest['val_dice']:.3f}", iteration=latest.get("val_iteration")
                )
            )
        text = "; ".join(parts)
        if latest.get("outcome"):  # the held-back check of the finished run, in bold above its curve's numbers
            from html import escape

            text = "<br>".join([f"<b>{escape(latest['outcome'], False)}</b>"] + ([escape(text, False)] if text else []))
        self.ui.finetuneLossLabel.setText(text)

    # -- actions ---------------------------------------------------------------------------
    def _curve(self) -> Any:
        from .finetuning import FinetuneCurve

        p = self.panel.parameters
        if p is None:
            return None
        tables = (p.finetune_loss_table, p.finetune_validation_table, p.finetune_chart)
        if FinetuneCurve.usable(*tables):
            return FinetuneCurve(*tables)
        curve = FinetuneCurve.create(slicer.mrmlScene, _("MedSegSuite finetuning"))
        was_modifying = p.node.StartModify()
        try:
            p.finetune_loss_table = curve.loss_table
            p.finetune_validation_table = curve.validation_table
            p.finetune_chart = curve.chart
        finally:
            p.node.EndModify(was_modifying)
        return curve

    def on_start_clicked(self) -> None:
        """Start a new run, or cancel the running one."""
        logic = self.panel.logic
        if logic.busy:
            if logic.job_kind == "finetune":
                logic.cancel()
                self.panel.show_status(logic.status)
            return
        self.start()

    def on_resume_clicked(self) -> None:
        if not self.panel.logic.busy:
            self.start(resume=True)

    def on_estimate_clicked(self) -> None:
        logic = self.panel.logic
        if logic.busy:
            if logic.job_kind == "timing":
                logic.cancel()
                self.panel.show_status(logic.status)
            return
        self.start(measure=self.TIMED_ITERATIONS)

    def start(self, resume: bool = False, measure: int = 0) -> None:
        """Send a finetuning (``resume``: continue the unfinished one; ``measure``: only time it) to the worker."""
        panel = self.panel
        if not panel.ensure_dependencies():
            return
        problem = self._why_not()
        if problem:
            panel.show_status(TaskStatus("idle", problem))
            return
        from .finetuning import GridQuestion

        undo_curve = self._curve_undo()
        resample = False
        while True:
            try:
                status = panel.logic.start_finetune(
                    self.current_entry(),
                    self.pairs(),
                    self.unlabelled(),
                    self.folder(),
                    iterations=self.iterations(),
                    device=self._device(),
                    resume=resume,
                    measure=measure,
                    curve=None if measure else self._curve(),
                    resample=resample,
                )
            except GridQuestion as question:
                text = _sentence(str(question)) + ".\n\n" + _("Resample it onto the volume and continue?")
                title = _("MedSegSuite: finetune")
                if resample or not slicer.util.confirmOkCancelDisplay(text, windowTitle=title):
                    undo_curve()
                    panel.show_status(
                        TaskStatus("idle", _("Not started: {reason}.").format(reason=_sentence(str(question))))
                    )
                    return
                resample = True
                continue
            except Exception as error:  # nothing was sent; a curve made for this run goes again
                undo_curve()
                panel.show_status(TaskStatus("failed", error_message(error, _("Finetuning"))))
                panel.update_enabled()
                return
            break
        panel.job_started(status)

    def _curve_undo(self) -> Any:
        """A function that removes the curve nodes a run about to start adds, and restores the parameter node."""
        scene = slicer.mrmlScene
        known = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        p = self.panel.parameters
        tables = (p.finetune_loss_table, p.finetune_validation_table, p.finetune_chart) if p is not None else None

        def undo() -> None:
            added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
            curve_classes = ("vtkMRMLTableNode", "vtkMRMLPlotSeriesNode", "vtkMRMLPlotChartNode")
            for node in reversed([node for node in added if node.GetID() not in known]):
                if any(node.IsA(cls) for cls in curve_classes):
                    scene.RemoveNode(node)
            if p is not None and tables is not None:
                was_modifying = p.node.StartModify()
                try:
                    p.finetune_loss_table, p.finetune_validation_table, p.finetune_chart = tables
                finally:
                    p.node.EndModify(was_modifying)

        return undo

    def job_ended(self, status: TaskStatus) -> None:
        """A finetuning or timing ended: list a new model, and choose it for Segment only when it beat its parent."""
        if status.kind == "finetune":
            self.panel.refresh_models()
            new = status.info.get("model") if status.state == "done" and status.info.get("selected") else None
            if new and self.panel.parameters is not None and self.ui.modelSelector.findData(new) >= 0:
                self.panel.parameters.model_id = new
        self.show_latest()
        self.update_enabled()

    def on_browse_clicked(self) -> None:
        import qt

        chosen = qt.QFileDialog.getExistingDirectory(None, _("Folder of unlabelled images"), self.folder())
        if chosen:
            self.ui.finetuneFolderLineEdit.setText(str(chosen))

    def cleanup(self) -> None:
        self._refresh_timer.stop()
