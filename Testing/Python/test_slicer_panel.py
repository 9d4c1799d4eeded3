"""The panel (real .ui, PySide6 offscreen) with a fake worker: parameter node sync, Segment/Cancel, Refine/Undo,
Export, devices, screenshot.

Writes Testing/output/panel_running.png and panel.png (test stand-ins) on every run; the
extension's screenshot, Resources/Screenshots/panel.png, is made by Testing/Python/screenshots.py
from the bundled model on the bundled sample.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import slicer_harness
from conftest import HIDIFF_CARD, OUTPUT_DIR, UNET2D_CARD, UNET3D_CARD, install_card
from slicer_harness.fake_worker import FakeWorkerFactory
from slicer_harness.fixtures import slicer_api  # noqa: F401 - a fixture

from MedSegSuiteLib.worker.client import WorkerClient

DEMO_CARD = dict(
    UNET3D_CARD,
    name="Demo ball finder (U-Net lite)",
    resources={"ram_gb": 1, "cpu_seconds": 5},
    weights={"file": "model.safetensors"},
)


@pytest.fixture
def panel(home, tmp_path, slicer_api):  # noqa: F811 - the fixture imported above
    """The module widget over a fresh scene, with two listed models and a fake worker; once per Slicer API
    generation (5.8, current)."""
    install_card(home, DEMO_CARD)
    install_card(home, dict(UNET2D_CARD, weights={"file": "model.safetensors"}))
    install_card(home, HIDIFF_CARD)
    factory = FakeWorkerFactory(hold=True)
    widget = slicer_harness.open_module_widget(WorkerClient(process_factory=factory, temp_root=str(tmp_path)))
    widget.factory = factory
    yield widget
    widget.logic.shutdown()
    slicer_harness.unload_modules()
    import slicer

    slicer.mrmlScene.Clear(0)


def _ball(name="CT"):
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    return add_ball_volume(name, shape=(12, 24, 24), radius=5.0)[0]


def _text(widget) -> str:
    return widget.property("text")


def test_choices_go_to_the_parameter_node_and_back(panel):
    from MedSegSuiteLib.slicer.parameters import Parameters, get_parameter_node

    ui = panel.ui
    volume = _ball()
    parameters = Parameters(get_parameter_node())
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.modelSelector.setCurrentIndex(ui.modelSelector.findData("test-unet2d"))
    ui.deviceSelector.setCurrentIndex(ui.deviceSelector.findData("cpu"))
    assert parameters.input_volume is volume and parameters.model_id == "test-unet2d" and parameters.device == "cpu"
    parameters.model_id = "test-unet3d"
    parameters.device = "auto"
    parameters.fast = True
    assert ui.modelSelector.itemData(ui.modelSelector.property("currentIndex")) == "test-unet3d"
    assert ui.deviceSelector.itemData(ui.deviceSelector.property("currentIndex")) == "auto"
    assert ui.fastCheckBox.isChecked() and ui.fastCheckBox.isEnabled()  # the 3D card has a fast mode
    assert "Demo ball finder" in _text(ui.modelInfoLabel) and "Labels: Ball" in _text(ui.modelInfoLabel)


def test_choices_survive_saving_and_reloading_the_scene(panel):
    import slicer

    from MedSegSuiteLib.slicer.parameters import get_parameter_node
    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node
    from MedSegSuiteLib.slicer.testing import save_and_reload_scene

    ui = panel.ui
    _ball("First")
    second = _ball("Second")
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    ui.inputVolumeSelector.setCurrentNode(second)
    ui.outputSegmentationSelector.setCurrentNode(create_segmentation_node(second, name="Result"))
    ui.regionSelector.setCurrentNode(roi)
    ui.modelSelector.setCurrentIndex(ui.modelSelector.findData("test-unet2d"))
    ui.deviceSelector.setCurrentIndex(ui.deviceSelector.findData("cpu"))
    save_and_reload_scene()
    assert ui.inputVolumeSelector.currentNode().GetName() == "Second"
    assert ui.outputSegmentationSelector.currentNode().GetName() == "Result"
    assert ui.regionSelector.currentNode().GetName() == "Box"
    assert ui.modelSelector.itemData(ui.modelSelector.property("currentIndex")) == "test-unet2d"
    assert ui.deviceSelector.itemData(ui.deviceSelector.property("currentIndex")) == "cpu"
    nodes = slicer.util.getNodesByClass("vtkMRMLScriptedModuleNode")
    assert [n.GetSingletonTag() for n in nodes] == ["MedSegSuite"] and nodes[0] is get_parameter_node()
    slicer.mrmlScene.Clear(0)
    assert ui.inputVolumeSelector.currentNode() is None and ui.outputSegmentationSelector.currentNode() is None


def test_segment_needs_an_input_and_becomes_cancel_while_running(panel):
    from MedSegSuiteLib.slicer.testing import wait_until

    ui = panel.ui
    assert not ui.segmentButton.isEnabled()
    ui.inputVolumeSelector.setCurrentNode(_ball())
    assert ui.segmentButton.isEnabled() and _text(ui.segmentButton) == "Segment"
    ui.segmentButton.click()
    assert wait_until(lambda: panel.logic.status.stage == "segmenting", 10)
    assert _text(ui.segmentButton) == "Cancel" and not ui.modelSelector.isEnabled()
    assert ui.progressBar.maximum() == 4 and ui.progressBar.value() == 1
    assert ui.progressBar.format() == "%v / %m windows"
    assert _text(ui.statusLabel) == "Segmenting: 1 / 4 windows"
    ui.segmentButton.click()  # Cancel
    assert wait_until(lambda: not panel.logic.busy, 10)
    assert _text(ui.segmentButton) == "Segment" and ui.modelSelector.isEnabled()
    assert _text(ui.statusLabel) == "Cancelled; nothing was changed."


def test_a_finished_job_selects_its_segmentation_for_the_next_run(panel):
    from MedSegSuiteLib.slicer.parameters import Parameters, get_parameter_node
    from MedSegSuiteLib.slicer.testing import wait_until

    ui = panel.ui
    ui.inputVolumeSelector.setCurrentNode(_ball())
    ui.segmentButton.click()
    assert wait_until(lambda: panel.factory.last.held, 10)
    panel.factory.last.finish()
    assert wait_until(lambda: not panel.logic.busy, 10)
    output = ui.outputSegmentationSelector.currentNode()
    assert output is not None and output.GetName() == "CT segmentation"
    assert Parameters(get_parameter_node()).output_segmentation is output
    assert _text(ui.statusLabel).startswith("Done in") and ui.progressBar.value() == 100


def test_missing_packages_leave_segment_clickable_to_install_them(panel, monkeypatch):
    from MedSegSuiteLib.slicer.dependencies import DependencyInstaller

    ui = panel.ui
    ui.inputVolumeSelector.setCurrentNode(_ball())
    monkeypatch.setitem(sys.modules, "MedSegSuiteLib.models.registry", None)  # as if torch were missing
    panel.refreshModels()
    assert ui.modelSelector.count() == 0 and "not installed yet" in _text(ui.modelInfoLabel)
    assert ui.segmentButton.isEnabled() and "install" in ui.segmentButton.property("toolTip")
    installs = []
    monkeypatch.setattr(DependencyInstaller, "ensure", lambda self: installs.append(self) or True)
    monkeypatch.delitem(sys.modules, "MedSegSuiteLib.models.registry")  # the packages are there now
    ui.segmentButton.click()
    assert installs and installs[0].requirements_path.name == "requirements.txt"
    assert ui.modelSelector.count() == 3 and panel.logic.busy


def test_cuda_is_offered_only_when_the_worker_reports_it(panel, tmp_path):
    from MedSegSuiteLib.slicer.testing import wait_until

    ui = panel.ui
    items = lambda: [ui.deviceSelector.itemData(i) for i in range(ui.deviceSelector.count())]  # noqa: E731
    panel.enter()  # starts the (fake, CPU-only) worker early
    assert wait_until(lambda: panel.logic.client.ready is not None, 10)
    assert items() == ["auto", "cpu"]
    panel.logic.shutdown()
    gpu_worker = FakeWorkerFactory(devices=("cpu", "cuda"))
    panel.logic._client = WorkerClient(process_factory=gpu_worker, temp_root=str(tmp_path))
    panel.enter()
    assert wait_until(lambda: "cuda" in items(), 10)
    assert ui.deviceSelector.itemText(ui.deviceSelector.findData("cuda")) == "CUDA GPU"


def test_many_qt_calls_do_not_use_up_the_references_to_none(panel):
    """PySide6 6.12 on CPython 3.11 takes a reference from None per void call; the harness compensates."""
    before = sys.getrefcount(None)
    for _ in range(20000):
        panel.ui.statusLabel.setText("")
    assert sys.getrefcount(None) > 1_000_000, (before, sys.getrefcount(None))


def test_sections_collapse_and_expand(panel):
    section = panel.ui.segmentCollapsibleButton
    assert not section.collapsed and panel.ui.segmentButton.isVisibleTo(section)
    section.click()
    assert section.collapsed and not panel.ui.segmentButton.isVisibleTo(section)
    section.click()
    assert not section.collapsed and panel.ui.segmentButton.isVisibleTo(section)


def _discs_with_segmentation(name="Discs"):
    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume, add_painted_segmentation

    volume, discs = add_disc_stack_volume(name)
    segmentation = add_painted_segmentation(volume, {"Disc": (discs, (250, 200, 40))}, name=f"{name} segmentation")
    return volume, segmentation, discs


def _disc_mask(segmentation, volume):
    from MedSegSuiteLib.slicer.segmentations import segment_mask

    return segment_mask(segmentation, segmentation.GetSegmentation().GetSegmentIdBySegmentName("Disc"), volume)


def test_refine_section_offers_hidiff_models_with_their_step_range(panel):
    ui = panel.ui
    assert [ui.refineModelSelector.itemData(i) for i in range(ui.refineModelSelector.count())] == ["demo-hidiff"]
    assert ui.refineStepsSpinBox.minimum() == 1 and ui.refineStepsSpinBox.maximum() == 8  # the card's num_steps
    assert ui.refineStepsSpinBox.value() == 1 and ui.keepEditsCheckBox.isChecked()  # the benchmark's best
    scopes = [ui.refineScopeSelector.itemData(i) for i in range(ui.refineScopeSelector.count())]
    assert scopes == ["volume", "slice", "neighbours", "roi"]
    assert ui.refineScopeSelector.currentData() == "neighbours"
    assert ui.refineEnsembleSpinBox.minimum() == 1 and ui.refineEnsembleSpinBox.maximum() == 8
    assert ui.refineEnsembleSpinBox.value() == 1 and ui.refineSpreadSpinBox.value() == 0.5
    assert 0.0 == ui.refineSpreadSpinBox.minimum() < ui.refineSpreadSpinBox.maximum() == 1.0
    assert not ui.refineButton.isEnabled() and not ui.oneStepButton.isEnabled() and not ui.undoRefineButton.isEnabled()
    assert ui.refineButton.property("toolTip") == "Choose the input volume first."
    volume, segmentation, _ = _discs_with_segmentation()
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.outputSegmentationSelector.setCurrentNode(segmentation)
    assert ui.refineButton.isEnabled() and ui.oneStepButton.isEnabled() and not ui.undoRefineButton.isEnabled()
    assert "Nothing to undo" in ui.undoRefineButton.property("toolTip")


def test_refine_runs_in_the_background_can_be_cancelled_and_undone(panel):
    from MedSegSuiteLib.slicer.testing import wait_until

    ui = panel.ui
    volume, segmentation, discs = _discs_with_segmentation()
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.outputSegmentationSelector.setCurrentNode(segmentation)
    ui.refineScopeSelector.setCurrentIndex(ui.refineScopeSelector.findData("volume"))
    ui.refineStepsSpinBox.setValue(3)
    ui.refineButton.click()
    assert wait_until(lambda: panel.logic.status.stage == "refining", 10)
    assert _text(ui.refineButton) == "Cancel" and ui.refineButton.isEnabled()
    assert not ui.segmentButton.isEnabled() and not ui.oneStepButton.isEnabled()
    assert ui.progressBar.format() == "%v / %m slices" and _text(ui.statusLabel) == "Refining: 1 / 4 slices"
    sent = panel.factory.last.received[-1]
    assert sent["kind"] == "refine" and sent["params"]["steps"] == 3 and sent["params"]["model"].endswith("demo-hidiff")
    ui.refineButton.click()  # Cancel
    assert wait_until(lambda: not panel.logic.busy, 10)
    assert _text(ui.refineButton) == "Refine" and _text(ui.statusLabel) == "Cancelled; nothing was changed."
    assert np.array_equal(_disc_mask(segmentation, volume), discs) and not ui.undoRefineButton.isEnabled()

    ui.oneStepButton.click()
    assert wait_until(lambda: panel.factory.last.held, 10)
    assert panel.factory.last.received[-1]["params"]["steps"] == 1
    panel.factory.last.finish()
    assert wait_until(lambda: not panel.logic.busy, 10)
    assert _text(ui.statusLabel).startswith("Refined 3 slice(s) with 1 step(s)"), _text(ui.statusLabel)
    assert not np.array_equal(_disc_mask(segmentation, volume), discs)
    assert ui.undoRefineButton.isEnabled() and ui.outputSegmentationSelector.currentNode() is segmentation
    ui.undoRefineButton.click()
    assert np.array_equal(_disc_mask(segmentation, volume), discs)
    assert not ui.undoRefineButton.isEnabled() and _text(ui.statusLabel).startswith("Undid the last refinement")


def test_refine_scope_picks_the_region_or_the_current_slice(panel):
    import slicer

    from MedSegSuiteLib.slicer.testing import wait_until

    ui = panel.ui
    volume, segmentation, _ = _discs_with_segmentation()
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.outputSegmentationSelector.setCurrentNode(segmentation)
    assert not ui.refineRegionSelector.isEnabled()
    ui.refineScopeSelector.setCurrentIndex(ui.refineScopeSelector.findData("roi"))
    assert ui.refineRegionSelector.isEnabled() and not ui.refineButton.isEnabled()
    assert ui.refineButton.property("toolTip") == "Choose the ROI to refine inside."
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    roi.SetCenter(*volume.GetOrigin())
    roi.SetSize(0.1, 0.1, 0.1)
    ui.refineRegionSelector.setCurrentNode(roi)
    assert ui.refineButton.isEnabled()
    ui.refineButton.click()
    assert wait_until(lambda: panel.factory.last.held, 10)
    assert panel.factory.last.received[-1]["params"]["roi"] == [0, 0, 0, 1, 1, 1]
    panel.factory.last.finish()
    assert wait_until(lambda: not panel.logic.busy, 10)

    ui.refineScopeSelector.setCurrentIndex(ui.refineScopeSelector.findData("slice"))
    assert not ui.refineRegionSelector.isEnabled()
    ui.oneStepButton.click()  # the harness has no slice views: the middle axial slice
    assert wait_until(lambda: panel.factory.last.held, 10)
    assert panel.factory.last.received[-1]["params"]["slice"] == 1
    assert "no slice view: axial slice 1" in _text(ui.statusLabel)
    panel.factory.last.finish()
    assert wait_until(lambda: not panel.logic.busy, 10)


def test_refine_tooltips_say_in_plain_words_what_steps_scope_spread_and_ensemble_do(panel):
    ui = panel.ui
    steps = ui.refineStepsSpinBox.property("toolTip")
    assert steps.startswith("Each step lets the model change the mask a little more, starting from your mask")
    assert "1-3 steps stay close to it, 8 redraw it almost from scratch" in steps  # the card's num_steps
    assert "Your edits never change when Keep my edits is on." in steps
    assert "that slice and 2 slice(s) on either side of it" in ui.refineScopeSelector.property("toolTip")
    assert "up to 2 slice(s) away" in ui.refineSpreadSpinBox.property("toolTip")
    ensemble = ui.refineEnsembleSpinBox.property("toolTip")
    assert "the segment 'Uncertain (refinement)'" in ensemble and "voxels above 0.2 are marked" in ensemble
    assert "from 0 (all agree) to 0.5 (half say inside, half outside)" in ensemble
    panel.panel.parameters.refine_neighbours = 3  # no control: a parameter-node value
    assert "that slice and 3 slice(s) on either side of it" in ui.refineScopeSelector.property("toolTip")
    assert ui.refineSpreadSpinBox.isEnabled()
    ui.keepEditsCheckBox.setChecked(False)  # without kept edits there is nothing to spread
    assert not ui.refineSpreadSpinBox.isEnabled()


def test_refine_sends_neighbours_spread_and_ensemble_and_shows_where_the_chains_disagree(panel):
    from MedSegSuiteLib.slicer.segmentations import segment_mask
    from MedSegSuiteLib.slicer.testing import wait_until

    ui = panel.ui
    volume, segmentation, discs = _discs_with_segmentation()
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.outputSegmentationSelector.setCurrentNode(segmentation)
    ui.refineScopeSelector.setCurrentIndex(ui.refineScopeSelector.findData("neighbours"))
    ui.refineSpreadSpinBox.setValue(0.5)
    ui.refineEnsembleSpinBox.setValue(3)
    parameters = panel.panel.parameters
    assert (parameters.refine_scope, parameters.refine_spread, parameters.refine_ensemble) == ("neighbours", 0.5, 3)
    parameters.refine_neighbours = 1
    ui.refineButton.click()  # the harness has no slice views: the middle axial slice
    assert wait_until(lambda: panel.factory.last.held, 10)
    assert not ui.refineEnsembleSpinBox.isEnabled() and not ui.refineSpreadSpinBox.isEnabled()
    sent = panel.factory.last.received[-1]["params"]
    assert (sent["scope"], sent["slice"], sent["neighbours"]) == ("neighbours", 1, 1)
    assert (sent["spread"], sent["ensemble"]) == (0.5, 3) and "uncertainty" in sent
    assert "no slice view: axial slice 1" in _text(ui.statusLabel)
    panel.factory.last.finish()
    assert wait_until(lambda: not panel.logic.busy, 10)
    segments = segmentation.GetSegmentation()
    uncertain = segments.GetSegmentIdBySegmentName("Uncertain (refinement)")
    assert uncertain, [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
    disagree = _disc_mask(segmentation, volume) & ~discs.astype(bool)
    assert disagree.any() and np.array_equal(segment_mask(segmentation, uncertain, volume), disagree)
    assert f"disagree (uncertainty above 0.2) at {int(disagree.sum())} voxel(s)" in _text(ui.statusLabel)
    ui.undoRefineButton.click()
    assert not segments.GetSegmentIdBySegmentName("Uncertain (refinement)")
    assert np.array_equal(_disc_mask(segmentation, volume), discs)


def test_refine_and_export_choices_survive_saving_and_reloading_the_scene(panel, tmp_path):
    import slicer

    from MedSegSuiteLib.slicer.testing import save_and_reload_scene

    ui = panel.ui
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    ui.refineStepsSpinBox.setValue(5)
    ui.refineEnsembleSpinBox.setValue(4)
    ui.refineSpreadSpinBox.setValue(0.3)
    ui.keepEditsCheckBox.setChecked(False)
    ui.refineScopeSelector.setCurrentIndex(ui.refineScopeSelector.findData("roi"))
    ui.refineRegionSelector.setCurrentNode(roi)
    ui.exportFormatSelector.setCurrentIndex(ui.exportFormatSelector.findData("nrrd"))
    ui.exportPathLineEdit.setText(str(tmp_path / "case.nrrd"))
    ui.exportOverwriteCheckBox.setChecked(True)
    save_and_reload_scene()
    assert ui.refineStepsSpinBox.value() == 5 and not ui.keepEditsCheckBox.isChecked()
    assert ui.refineEnsembleSpinBox.value() == 4 and ui.refineSpreadSpinBox.value() == 0.3
    assert ui.refineScopeSelector.itemData(ui.refineScopeSelector.currentIndex()) == "roi"
    assert ui.refineRegionSelector.currentNode().GetName() == "Box"
    assert ui.refineModelSelector.itemData(ui.refineModelSelector.currentIndex()) == "demo-hidiff"
    assert ui.exportFormatSelector.itemData(ui.exportFormatSelector.currentIndex()) == "nrrd"
    assert ui.exportPathLineEdit.text() == str(tmp_path / "case.nrrd") and ui.exportOverwriteCheckBox.isChecked()


def test_export_writes_the_chosen_format_and_reports_on_the_status_line(panel, tmp_path):
    from MedSegSuiteLib.export import read_segmentation

    ui = panel.ui
    volume, segmentation, discs = _discs_with_segmentation()
    ui.inputVolumeSelector.setCurrentNode(volume)
    assert not ui.exportButton.isEnabled() and ui.exportButton.property("toolTip") == "Choose a segmentation first."
    ui.outputSegmentationSelector.setCurrentNode(segmentation)
    assert not ui.exportButton.isEnabled() and ui.exportButton.property("toolTip") == "Choose the file to write."
    ui.exportPathLineEdit.setText(str(tmp_path / "discs.seg.nrrd"))
    assert ui.exportButton.isEnabled()
    ui.exportFormatSelector.setCurrentIndex(ui.exportFormatSelector.findData("nifti"))
    assert ui.exportPathLineEdit.text() == str(tmp_path / "discs.nii.gz")  # the suffix follows the format
    ui.exportButton.click()
    assert _text(ui.statusLabel).startswith(f"Exported 'Discs segmentation' to {tmp_path / 'discs.nii.gz'} and ")
    back = read_segmentation(tmp_path / "discs.nii.gz")
    assert [(s.name, s.color) for s in back.segments] == [("Disc", (250, 200, 40))]
    assert np.array_equal(back.mask(back.segments[0]), discs.astype(bool))
    ui.exportButton.click()
    assert _text(ui.statusLabel).startswith("Export failed:") and "already exists" in _text(ui.statusLabel)
    ui.exportOverwriteCheckBox.setChecked(True)
    ui.exportButton.click()
    assert _text(ui.statusLabel).startswith("Exported")


def test_browse_fills_in_the_file_with_the_format_suffix(panel, tmp_path, monkeypatch):
    import qt

    ui = panel.ui
    existing = tmp_path / "old.nrrd"
    existing.write_bytes(b"")
    asked = []

    def dialog(*args):
        asked.append(args)
        return (str(tmp_path / "new"), "") if len(asked) == 1 else (str(existing), "")

    monkeypatch.setattr(qt.QFileDialog, "getSaveFileName", staticmethod(dialog))
    ui.exportFormatSelector.setCurrentIndex(ui.exportFormatSelector.findData("nrrd"))
    ui.exportBrowseButton.click()
    assert ui.exportPathLineEdit.text() == str(tmp_path / "new.nrrd") and not ui.exportOverwriteCheckBox.isChecked()
    assert asked[0][2] == "segmentation.nrrd" and asked[0][3] == "NRRD label map + JSON table (.nrrd) (*.nrrd)"
    ui.exportBrowseButton.click()  # the dialog asked before choosing an existing file
    assert ui.exportPathLineEdit.text() == str(existing) and ui.exportOverwriteCheckBox.isChecked()


def test_dicom_seg_is_offered_only_for_volumes_loaded_from_dicom(panel, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import slicer

    ui = panel.ui
    volume, segmentation, _ = _discs_with_segmentation()
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.outputSegmentationSelector.setCurrentNode(segmentation)
    item = ui.exportFormatSelector.model().item(ui.exportFormatSelector.findData("dicom"))
    assert not item.isEnabled() and "was not loaded from DICOM" in item.toolTip()
    ui.exportFormatSelector.setCurrentIndex(ui.exportFormatSelector.findData("dicom"))  # a script may still try it
    assert ui.exportFormatSelector.itemData(ui.exportFormatSelector.currentIndex()) == "seg.nrrd"
    dicom_file = tmp_path / "slice.dcm"
    dicom_file.write_bytes(b"")
    monkeypatch.setattr(
        slicer, "dicomDatabase", SimpleNamespace(fileForInstance=lambda uid: str(dicom_file)), raising=False
    )
    ct, _, _ = _discs_with_segmentation("CT")
    ct.SetAttribute("DICOM.instanceUIDs", "1.2.3.4")  # what Slicer's DICOM loader sets
    ui.inputVolumeSelector.setCurrentNode(ct)
    assert item.isEnabled() and "references the input's series" in item.toolTip()


PANEL_SIZE = (420, 880)


def _render(name: str) -> Path:
    import slicer
    from PySide6.QtGui import QImage

    width, height = PANEL_SIZE
    representation = slicer.modules.medsegsuite.widgetRepresentation()
    representation.resize(width, height)
    representation.show()
    slicer_harness.process_events()
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    target = OUTPUT_DIR / name
    assert representation.grab().save(str(target))
    representation.hide()
    image = QImage(str(target))
    assert (image.width(), image.height()) == PANEL_SIZE
    colours = {image.pixel(x, y) for x in range(0, width, 7) for y in range(0, height, 7)}
    assert len(colours) > 20  # text and widgets were drawn, not a blank rectangle
    return target


def test_panel_renders_offscreen_to_png_files(panel):
    """A run in progress (panel_running.png) and the finished panel (panel.png), in Testing/output only."""
    from MedSegSuiteLib.slicer.testing import wait_until

    ui = panel.ui
    ui.inputVolumeSelector.setCurrentNode(_ball("Abdomen CT"))
    ui.modelSelector.setCurrentIndex(ui.modelSelector.findData("test-unet3d"))
    ui.segmentButton.click()
    assert wait_until(lambda: panel.factory.last.held, 10)
    panel.factory.last.emit(
        {"type": "progress", "job": "job-1", "done": 24, "total": 64, "stage": "segmenting", "unit": "windows"}
    )
    assert wait_until(lambda: panel.logic.status.done == 24, 10)
    _render("panel_running.png")
    panel.factory.last.finish()
    assert wait_until(lambda: not panel.logic.busy, 10)
    ui.exportPathLineEdit.setText("/data/exports/Abdomen CT segmentation.seg.nrrd")
    assert ui.refineButton.isEnabled() and ui.exportButton.isEnabled()
    _render("panel.png")


def test_panel_texts_go_through_slicers_translation_function(panel, monkeypatch):
    """Texts are looked up with ``_`` (``slicer.i18n.tr`` in Slicer) when shown, so a translation changes them."""
    from MedSegSuiteLib.slicer import finetuning, logic, sections
    from MedSegSuiteLib.slicer import panel as panel_module
    from MedSegSuiteLib.slicer.testing import add_faint_ball_case, set_checked_items, wait_until

    def marked(text):
        return f"\u00ab{text}\u00bb"

    for module in (finetuning, logic, sections, panel_module):
        monkeypatch.setattr(module, "_", marked)
    ui = panel.ui
    panel.panel.update_enabled()
    assert ui.segmentButton.property("toolTip") == "\u00abChoose an input volume and a model first.\u00bb"
    assert ui.exportButton.property("toolTip") == "\u00abChoose a segmentation first.\u00bb"
    ui.inputVolumeSelector.setCurrentNode(_ball())
    ui.modelSelector.setCurrentIndex(ui.modelSelector.findData("test-unet3d"))
    ui.segmentButton.click()
    assert _text(ui.statusLabel) == "\u00abStarting Demo ball finder (U-Net lite)...\u00bb"
    assert _text(ui.segmentButton) == "\u00abCancel\u00bb"
    ui.segmentButton.click()  # Cancel
    assert wait_until(lambda: not panel.logic.busy, 10)
    assert _text(ui.statusLabel) == "\u00abCancelled; nothing was changed.\u00bb"
    assert _text(ui.segmentButton) == "\u00abSegment\u00bb"
    # the Finetune section: Start and its tooltips, the time estimate and its duration words
    finetune = panel.panel.finetune
    ui.finetuneCollapsibleButton.setCollapsed(False)
    finetune.update_enabled()
    assert _text(ui.finetuneStartButton) == "\u00abStart\u00bb"
    assert _text(ui.finetuneEstimateButton) == "\u00abEstimate time\u00bb"
    assert ui.finetuneStartButton.property("toolTip") == (
        "\u00abCheck at least one labelled case (a volume with its segmentation) to learn from.\u00bb"
    )
    _volume, segmentation, _mask = add_faint_ball_case("Faint", "Ball", seed=0, shape=(10, 20, 20), radius=3.0)
    finetune.refresh_cases()
    set_checked_items(ui.finetuneLabelledList, [segmentation.GetID()])
    assert finetune.pairs()
    assert ui.finetuneStartButton.property("toolTip") == (
        "\u00abFinetune a new model on the checked cases (in the background).\u00bb"
    )
    assert _text(ui.finetuneEstimateLabel).startswith("\u00abNo time estimate yet")
    key = panel.logic.finetune_key(
        finetune.current_entry(), finetune.pairs(), finetune.unlabelled(), finetune.folder(), finetune._device()
    )
    panel.logic.finetune_timing = finetuning.FinetuneTiming(
        key, "cpu", per_iteration=0.5, per_validation=2.0, setup=1.0
    )
    ui.finetuneIterationsSpinBox.setValue(200)  # 1 s set-up + (1 + 5 validations) x 2 s + 200 x 0.5 s = 113 s
    finetune.update_estimate()
    assert _text(ui.finetuneEstimateLabel) == (
        "\u00abAbout \u00ab2 min\u00bb on CPU (timed in the worker on these cases: 0.50 s per iteration, "
        "up to \u00ab2 s\u00bb per validation).\u00bb"
    )


def test_volume_lists_offer_an_rgb_volume_once_and_never_diffusion_volumes(panel):
    import slicer

    from MedSegSuiteLib.slicer.parameters import Parameters, get_parameter_node
    from MedSegSuiteLib.slicer.volumes import add_volume_node
    from MedSegSuiteLib.volume import Volume

    ui = panel.ui
    slicer.mrmlScene.Clear(0)
    dwi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode", "DWI")
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLDiffusionTensorVolumeNode", "DTI")
    rgb = add_volume_node(Volume(np.zeros((3, 1, 8, 8), np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), "Photo")
    parameters = Parameters(get_parameter_node())
    parameters.input_volume = None
    panel.panel.initialize_parameter_node()
    assert parameters.input_volume is rgb and parameters.input_volume is not dwi  # the first image, not the DWI
    assert [ui.inputVolumeSelector.itemText(i) for i in range(ui.inputVolumeSelector.count())] == ["Photo"]
    ui.finetuneCollapsibleButton.setCollapsed(False)
    panel.panel.finetune.refresh_cases()
    unlabelled = ui.finetuneUnlabelledList
    assert [unlabelled.item(row).text() for row in range(unlabelled.count())] == ["Photo"]
