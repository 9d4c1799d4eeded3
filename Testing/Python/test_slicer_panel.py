"""The panel (real .ui, PySide6 offscreen) with a fake worker: parameter node sync, Segment/Cancel, devices, screenshot.

Writes Testing/output/panel.png on every run; with MEDSEGSUITE_UPDATE_SCREENSHOT=1 it
also rewrites Resources/Screenshots/panel.png (the extension's screenshot).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import slicer_harness
from conftest import OUTPUT_DIR, REPO, UNET2D_CARD, UNET3D_CARD
from slicer_harness.fake_worker import FakeWorkerFactory

from MedSegSuiteLib.worker.client import WorkerClient

DEMO_CARD = dict(
    UNET3D_CARD,
    name="Demo ball finder (U-Net lite)",
    resources={"ram_gb": 1, "cpu_seconds": 5},
    weights={"file": "model.safetensors"},
)


def _install_card(home: Path, card: dict) -> None:
    folder = home / "models" / card["id"]
    folder.mkdir(parents=True)
    (folder / "card.json").write_text(json.dumps(card))


@pytest.fixture
def panel(home, tmp_path):
    """The module widget over a fresh scene, with two listed models and a fake worker."""
    _install_card(home, DEMO_CARD)
    _install_card(home, dict(UNET2D_CARD, weights={"file": "model.safetensors"}))
    slicer_harness.install()
    import slicer

    slicer.mrmlScene.Clear(0)
    slicer_harness.load_module()
    widget = slicer.util.getModuleWidget("MedSegSuite")
    widget.refreshModels()
    factory = FakeWorkerFactory(hold=True)
    widget.logic._client = WorkerClient(process_factory=factory, temp_root=str(tmp_path))
    widget.factory = factory
    yield widget
    widget.logic.shutdown()
    slicer_harness.unload_modules()
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
    assert ui.modelSelector.count() == 2 and panel.logic.busy


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


def test_sections_collapse_and_expand(panel):
    section = panel.ui.segmentCollapsibleButton
    assert not section.collapsed and panel.ui.segmentButton.isVisibleTo(section)
    section.click()
    assert section.collapsed and not panel.ui.segmentButton.isVisibleTo(section)
    section.click()
    assert not section.collapsed and panel.ui.segmentButton.isVisibleTo(section)


def _render(name: str) -> Path:
    import slicer
    from PySide6.QtGui import QImage

    representation = slicer.modules.medsegsuite.widgetRepresentation()
    representation.resize(420, 480)
    representation.show()
    slicer_harness.process_events()
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    target = OUTPUT_DIR / name
    assert representation.grab().save(str(target))
    representation.hide()
    image = QImage(str(target))
    assert (image.width(), image.height()) == (420, 480)
    colours = {image.pixel(x, y) for x in range(0, 420, 7) for y in range(0, 480, 7)}
    assert len(colours) > 20  # text and widgets were drawn, not a blank rectangle
    return target


def test_panel_renders_offscreen_to_png_files(panel):
    """A run in progress (panel_running.png) and the finished panel (panel.png, the extension's screenshot)."""
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
    target = _render("panel.png")
    if os.environ.get("MEDSEGSUITE_UPDATE_SCREENSHOT") == "1":
        screenshot = REPO / "Resources" / "Screenshots" / "panel.png"
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, screenshot)
