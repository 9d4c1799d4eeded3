"""Whatever goes wrong inside a job ends it cleanly: a failing PyTorch installation, and an exception of a type
nobody expected in each of the panel's job callbacks (starting, progress, log records, results of Segment,
Refine, Finetune and Estimate time, the polling itself, Export, Undo).

Each time the panel ends idle (buttons back to Segment / Refine / Start, no timer), the status line holds one
plain sentence (no traceback), the scene is as it was before the failing step (no half-made node, an existing
segmentation keeps its voxels), and the next job works. Runs on Slicer 5.8's API.
"""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest
import slicer_harness
from conftest import HIDIFF_CARD, UNET3D_CARD, install_card
from slicer_harness.fake_worker import FakeWorkerFactory
from slicer_harness.generations import api_generation

from MedSegSuiteLib.worker.client import WorkerClient


class Unexpected(Exception):
    """An error type the module cannot know."""


@pytest.fixture
def panel(home, tmp_path):
    """The module widget with a 3D model and a HiDiff model and a fake worker that holds jobs, on Slicer 5.8's API
    (the stricter generation; the panel tests cover both)."""
    install_card(home, dict(UNET3D_CARD, weights={"file": "model.safetensors"}))
    install_card(home, HIDIFF_CARD)
    slicer_harness.install()
    with api_generation("5.8"):
        factory = FakeWorkerFactory(hold=True)
        widget = slicer_harness.open_module_widget(WorkerClient(process_factory=factory, temp_root=str(tmp_path)))
        widget.factory = factory
        yield widget
        widget.logic.shutdown()
        slicer_harness.unload_modules()
        import slicer

        slicer.mrmlScene.Clear(0)


def _text(widget) -> str:
    return widget.property("text")


def _wait(predicate, timeout=10.0):
    from MedSegSuiteLib.slicer.testing import wait_until

    assert wait_until(predicate, timeout)


def _scene_state():
    """Every node of the scene, and every segment's voxels (on its own geometry)."""
    import slicer
    from vtk.util import numpy_support

    scene = slicer.mrmlScene
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    state = [(node.GetID(), node.GetName()) for node in nodes]
    for node in nodes:
        if node.IsA("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segment_id = segmentation.GetNthSegmentID(index)
                image = slicer.vtkOrientedImageData()
                slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
                    node, segment_id, image, False
                )
                scalars = image.GetPointData().GetScalars()
                voxels = numpy_support.vtk_to_numpy(scalars).tobytes() if scalars is not None else b""
                state.append((node.GetID(), segment_id, tuple(image.GetExtent()), voxels))
    return state


def _assert_ended_cleanly(panel, before, words):
    ui, logic = panel.ui, panel.logic
    slicer_harness.process_events()
    assert not logic.busy and not panel.panel.timer.isActive()
    assert _text(ui.segmentButton) == "Segment" and _text(ui.refineButton) == "Refine"
    assert _text(ui.finetuneStartButton) == "Start" and _text(ui.finetuneEstimateButton) == "Estimate time"
    message = _text(ui.statusLabel)
    assert words in message, message
    assert "\n" not in message and "Traceback" not in message and message[0].isupper() and message.endswith(".")
    assert _scene_state() == before


def _next_segmentation_works(panel, volume):
    ui = panel.ui
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.outputSegmentationSelector.setCurrentNode(None)
    ui.modelSelector.setCurrentIndex(ui.modelSelector.findData("test-unet3d"))
    ui.segmentButton.click()
    _wait(lambda: panel.factory.last.held)
    panel.factory.last.finish()
    _wait(lambda: not panel.logic.busy)
    assert panel.logic.status.state == "done", panel.logic.status.message
    assert _text(ui.statusLabel).startswith("Done in")


def _ball(name="CT"):
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    return add_ball_volume(name, shape=(12, 24, 24), radius=5.0)[0]


# -- the PyTorch installation --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "error",
    [
        subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", "torch"]),
        ImportError("libcudnn.so.9: cannot open shared object file"),
        Unexpected("the disk is full"),
    ],
    ids=["CalledProcessError", "ImportError", "unexpected"],
)
def test_a_failing_pytorch_installation_ends_with_a_plain_status(panel, monkeypatch, error):
    from MedSegSuiteLib.slicer import dependencies

    calls = []

    class Logic:
        def installTorch(self, **options):  # noqa: N802 - the PyTorch extension's name
            calls.append(options)
            raise error

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))
    monkeypatch.setattr(dependencies, "satisfied", lambda requirement: not requirement.startswith("torch"))
    volume = _ball()
    panel.ui.inputVolumeSelector.setCurrentNode(volume)
    before = _scene_state()
    panel.ui.segmentButton.click()
    assert calls and calls[0]["askConfirmation"] is False
    _assert_ended_cleanly(panel, before, f"PyTorch could not be installed ({type(error).__name__}")
    assert not any(m.get("kind") for process in panel.factory.processes for m in process.received)  # no job sent
    monkeypatch.setattr(dependencies, "satisfied", lambda requirement: True)  # installed by hand meanwhile
    _next_segmentation_works(panel, volume)


# -- unexpected errors in the job callbacks -------------------------------------------------------------------------
def _run_segment(panel, volume, output=None):
    ui = panel.ui
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.outputSegmentationSelector.setCurrentNode(output)
    ui.modelSelector.setCurrentIndex(ui.modelSelector.findData("test-unet3d"))
    ui.segmentButton.click()
    _wait(lambda: panel.factory.last.held)


def _fail_after(monkeypatch, module, name):
    """Make ``module.name`` do its work and then raise :class:`Unexpected` (a half-done step)."""
    real = getattr(module, name)

    def half_done(*args, **kwargs):
        real(*args, **kwargs)
        raise Unexpected(f"{name} broke after changing things")

    monkeypatch.setattr(module, name, half_done)


@pytest.mark.parametrize("into", ["new segmentation", "existing segmentation"])
def test_an_unexpected_error_while_writing_a_segmentation_leaves_the_scene_as_it_was(panel, monkeypatch, into):
    from MedSegSuiteLib.slicer import logic as logic_module
    from MedSegSuiteLib.slicer.testing import add_painted_segmentation

    volume = _ball()
    output = None
    if into == "existing segmentation":
        mine = np.zeros((12, 24, 24), np.uint8)
        mine[3:6, 4:9, 5:10] = 1
        output = add_painted_segmentation(volume, {"Mine": (mine, (10, 200, 30))}, name="Mine")
    _fail_after(monkeypatch, logic_module, "write_labels")
    _run_segment(panel, volume, output)
    before = _scene_state()
    panel.factory.last.finish()
    _wait(lambda: not panel.logic.busy)
    _assert_ended_cleanly(panel, before, "Segmentation stopped by an unexpected error (Unexpected: write_labels")
    monkeypatch.undo()
    _next_segmentation_works(panel, volume)


@pytest.mark.parametrize("step", ["progress", "client poll", "panel update"])
def test_an_unexpected_error_while_a_job_runs_cancels_it(panel, monkeypatch, step):
    from MedSegSuiteLib.slicer import logic as logic_module

    volume = _ball()
    before = _scene_state()
    if step == "progress":
        monkeypatch.setattr(logic_module, "_stage_title", lambda stage: (_ for _ in ()).throw(Unexpected("no title")))
    _run_segment(panel, volume)
    worker = panel.factory.last
    _wait(lambda: panel.logic.client.ready is not None or not panel.logic.busy)  # the worker said it is ready
    if step == "client poll":
        monkeypatch.setattr(panel.logic.client, "poll", lambda: (_ for _ in ()).throw(Unexpected("pipe")))
    elif step == "panel update":
        monkeypatch.setattr(panel.panel, "refresh_devices", lambda: (_ for _ in ()).throw(Unexpected("widgets")))
    _wait(lambda: not panel.logic.busy)
    _assert_ended_cleanly(panel, before, "Segmentation stopped by an unexpected error (Unexpected:")
    assert worker.received[-1]["type"] == "cancel"  # the worker was told to stop
    monkeypatch.undo()
    if worker.held:
        worker.finish()  # a late result of the stopped job changes nothing
    panel.logic.poll()
    assert _scene_state() == before
    _next_segmentation_works(panel, volume)


def test_an_unexpected_error_while_applying_a_refinement_puts_the_segmentation_back(panel, monkeypatch):
    from MedSegSuiteLib.slicer import logic as logic_module
    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    ui = panel.ui
    volume, _ = add_disc_stack_volume("Discs")
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.modelSelector.setCurrentIndex(ui.modelSelector.findData("demo-hidiff"))
    ui.segmentButton.click()
    _wait(lambda: panel.factory.last.held)
    panel.factory.last.finish()
    _wait(lambda: not panel.logic.busy)
    assert panel.logic.status.state == "done", panel.logic.status.message
    _fail_after(monkeypatch, logic_module, "apply_refinement")
    ui.refineButton.click()
    _wait(lambda: panel.factory.last.held)
    before = _scene_state()
    panel.factory.last.finish()
    _wait(lambda: not panel.logic.busy)
    _assert_ended_cleanly(panel, before, "Refinement stopped by an unexpected error (Unexpected: apply_refinement")
    assert not ui.undoRefineButton.isEnabled()  # nothing was refined, so nothing to undo
    monkeypatch.undo()
    ui.refineButton.click()
    _wait(lambda: panel.factory.last.held)
    panel.factory.last.finish()
    _wait(lambda: not panel.logic.busy)
    assert panel.logic.status.state == "done" and _text(ui.statusLabel).startswith("Refined")


@pytest.mark.parametrize("step", ["finetune result", "finetune log record", "timing result"])
def test_an_unexpected_error_in_a_finetuning_or_timing_ends_it(panel, monkeypatch, step):
    from MedSegSuiteLib.slicer import finetuning
    from MedSegSuiteLib.slicer.logic import SegmentationLogic
    from MedSegSuiteLib.slicer.testing import add_faint_ball_case, set_checked_items

    ui = panel.ui
    ui.finetuneCollapsibleButton.setCollapsed(False)
    volume, segmentation, _ = add_faint_ball_case("Faint", "Ball", seed=1, shape=(10, 20, 20), radius=3.0)
    slicer_harness.process_events()
    ui.finetuneModelSelector.setCurrentIndex(ui.finetuneModelSelector.findData("test-unet3d"))
    set_checked_items(ui.finetuneLabelledList, [segmentation.GetID()])
    ui.finetuneIterationsSpinBox.setValue(10)
    boom = Unexpected("broken on purpose")
    if step == "finetune result":
        monkeypatch.setattr(SegmentationLogic, "_apply_finetune", lambda *args: (_ for _ in ()).throw(boom))
    elif step == "finetune log record":
        monkeypatch.setattr(SegmentationLogic, "_finetune_record", lambda *args: (_ for _ in ()).throw(boom))
    else:
        monkeypatch.setattr(finetuning.FinetuneTiming, "from_info", lambda *args: (_ for _ in ()).throw(boom))
    button = ui.finetuneEstimateButton if step == "timing result" else ui.finetuneStartButton
    button.click()
    _wait(lambda: panel.factory.last.held or not panel.logic.busy)
    before = _scene_state()
    if panel.logic.busy:
        panel.factory.last.finish()
    _wait(lambda: not panel.logic.busy)
    title = "Timing" if step == "timing result" else "Finetuning"
    _assert_ended_cleanly(panel, before, f"{title} stopped by an unexpected error (Unexpected: broken on purpose)")
    monkeypatch.undo()
    _next_segmentation_works(panel, volume)


@pytest.mark.parametrize("action", ["segment", "refine", "finetune", "estimate", "export", "undo"])
def test_an_unexpected_error_when_starting_leaves_the_panel_idle(panel, monkeypatch, action, tmp_path):
    from MedSegSuiteLib.slicer import sections
    from MedSegSuiteLib.slicer.logic import SegmentationLogic
    from MedSegSuiteLib.slicer.testing import add_faint_ball_case, set_checked_items

    ui = panel.ui
    volume, segmentation, _ = add_faint_ball_case("Faint", "Ball", seed=1, shape=(10, 20, 20), radius=3.0)
    slicer_harness.process_events()
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.outputSegmentationSelector.setCurrentNode(segmentation)
    ui.finetuneModelSelector.setCurrentIndex(ui.finetuneModelSelector.findData("test-unet3d"))
    set_checked_items(ui.finetuneLabelledList, [segmentation.GetID()])
    ui.exportPathLineEdit.setText(str(tmp_path / "out.seg.nrrd"))
    boom = lambda *args, **kwargs: (_ for _ in ()).throw(Unexpected("broken on purpose"))  # noqa: E731
    target, button, words = {
        "segment": ("start", ui.segmentButton, "Segmentation failed"),
        "refine": ("start_refine", ui.refineButton, "Refinement failed"),
        "finetune": ("start_finetune", ui.finetuneStartButton, "Finetuning failed"),
        "estimate": ("start_finetune", ui.finetuneEstimateButton, "Finetuning failed"),
        "export": ("export", ui.exportButton, "Export failed"),
        "undo": ("undo_refinement", ui.undoRefineButton, "Undo failed"),
    }[action]
    monkeypatch.setattr(SegmentationLogic, target, boom)
    if action == "undo":
        monkeypatch.setattr(SegmentationLogic, "can_undo", lambda *args: True)
        panel.panel.update_enabled()
    if action == "refine":
        monkeypatch.setattr(sections.RefineSection, "_why_not", lambda self: "")
        panel.panel.update_enabled()
    before = _scene_state()
    assert button.isEnabled(), button.property("toolTip")
    button.click()
    _assert_ended_cleanly(panel, before, f"{words} because of an unexpected error (Unexpected: broken on purpose)")
    monkeypatch.undo()
    _next_segmentation_works(panel, volume)
