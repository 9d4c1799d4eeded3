"""The Finetune section (real .ui, PySide6 offscreen, real MRML) with a fake worker: labelled cases from the
scene, label matching, Start / Cancel / Resume, the loss curve, the time estimate and the new model.

The fake worker (slicer_harness.fake_worker) answers "finetune" jobs like the real one: a
loss record per step, a checkpoint folder on cancel, a registered ``<parent>-ft-<n>``
card on finish, made-up timings when measuring.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import slicer_harness
from conftest import OUTPUT_DIR, UNET3D_CARD, install_card
from slicer_harness.fake_worker import FakeWorkerFactory

from MedSegSuiteLib.io import read_image
from MedSegSuiteLib.worker.client import WorkerClient

PARENT_CARD = dict(UNET3D_CARD, weights={"file": "model.safetensors"})


@pytest.fixture
def panel(home, tmp_path):
    """The module widget over a fresh scene, the test U-Net card installed, a fake worker that holds jobs."""
    install_card(home, PARENT_CARD)
    factory = FakeWorkerFactory(hold=True)
    widget = slicer_harness.open_module_widget(WorkerClient(process_factory=factory, temp_root=str(tmp_path)))
    widget.factory = factory
    widget.ui.finetuneCollapsibleButton.setCollapsed(False)
    yield widget
    widget.logic.shutdown()
    slicer_harness.unload_modules()
    import slicer

    slicer.mrmlScene.Clear(0)


def _text(widget) -> str:
    return widget.property("text")


def _items(list_widget) -> list[tuple[str, str, bool]]:
    import qt

    items = [list_widget.item(row) for row in range(list_widget.count())]
    return [(item.text(), item.data(qt.Qt.UserRole), item.checkState() == qt.Qt.Checked) for item in items]


def _cases(count=2, label="Ball"):
    """``count`` labelled faint-ball cases and one unlabelled volume, listed by the panel."""
    from MedSegSuiteLib.slicer.testing import add_faint_ball_case

    cases = [add_faint_ball_case(f"Faint {i}", label, seed=i, shape=(10, 20, 20), radius=3.0) for i in range(count)]
    unlabelled, _, _ = add_faint_ball_case("Spare", None, seed=9, shape=(10, 20, 20), radius=3.0)
    slicer_harness.process_events()  # the lists follow the scene once the nodes are set up
    return cases, unlabelled


def _choose(panel, cases, unlabelled=(), iterations=10):
    from MedSegSuiteLib.slicer.testing import set_checked_items

    ui = panel.ui
    set_checked_items(ui.finetuneLabelledList, [segmentation.GetID() for _, segmentation, _ in cases])
    set_checked_items(ui.finetuneUnlabelledList, [node.GetID() for node in unlabelled])
    ui.finetuneIterationsSpinBox.setValue(iterations)


def _wait(panel, predicate, timeout=10):
    from MedSegSuiteLib.slicer.testing import wait_until

    assert wait_until(predicate, timeout), panel.logic.status


def test_labelled_cases_are_segmentations_listed_with_their_reference_volume(panel):
    import slicer

    from MedSegSuiteLib.slicer.parameters import Parameters, get_parameter_node
    from MedSegSuiteLib.slicer.testing import save_and_reload_scene

    ui = panel.ui
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Loose")  # no reference volume: not a case
    (first, first_seg, _), (second, second_seg, _) = _cases()[0]
    assert [(text, checked) for text, _, checked in _items(ui.finetuneLabelledList)] == [
        ("Faint 0 + Faint 0 segmentation", False),
        ("Faint 1 + Faint 1 segmentation", False),
    ]
    assert [text for text, _, _ in _items(ui.finetuneUnlabelledList)] == ["Faint 0", "Faint 1", "Spare"]
    assert "Segments: Ball \u2192 Ball" in ui.finetuneLabelledList.item(0).toolTip()
    assert not ui.finetuneStartButton.isEnabled() and not ui.finetuneResumeButton.isEnabled()
    assert "Check at least one labelled case" in ui.finetuneStartButton.property("toolTip")
    assert ui.finetuneModelSelector.currentData() == "test-unet3d" and ui.finetuneIterationsSpinBox.value() == 200

    import qt

    ui.finetuneLabelledList.item(1).setCheckState(qt.Qt.Checked)  # what a click on the box does
    assert Parameters(get_parameter_node()).finetune_labelled == [second_seg]
    assert ui.finetuneStartButton.isEnabled() and ui.finetuneEstimateButton.isEnabled()
    assert not ui.finetuneResumeButton.isEnabled()  # nothing to resume yet
    ui.finetuneIterationsSpinBox.setValue(50)
    save_and_reload_scene()
    slicer_harness.process_events()
    assert [(text, checked) for text, _, checked in _items(ui.finetuneLabelledList)] == [
        ("Faint 0 + Faint 0 segmentation", False),
        ("Faint 1 + Faint 1 segmentation", True),
    ]
    assert ui.finetuneIterationsSpinBox.value() == 50


def test_start_sends_label_maps_in_the_parents_values_and_the_run_fills_the_curve(panel):
    import slicer

    ui = panel.ui
    cases, spare = _cases()
    (first, _, first_mask), (second, _, second_mask) = cases
    _choose(panel, cases, unlabelled=[spare, first])  # a labelled case's volume is not sent twice
    ui.finetuneStartButton.click()
    _wait(panel, lambda: panel.factory.last.held)
    sent = panel.factory.last.received[-1]
    params = sent["params"]
    assert sent["kind"] == "finetune" and params["iterations"] == 10 and params["resume"] is False
    assert params["parent"].endswith("test-unet3d") and params["measure"] == 0
    assert [case["id"] for case in params["labelled"]] == ["Faint 0", "Faint 1"]
    assert [case["id"] for case in params["unlabelled"]] == ["Spare"]
    label = read_image(params["labelled"][1]["label"])
    assert np.array_equal(label.array, second_mask) and label.array.max() == 1  # Ball is label value 1
    assert read_image(params["labelled"][1]["image"]).grid.same_as(read_image(params["unlabelled"][0]["image"]).grid)

    _wait(panel, lambda: panel.logic.status.stage == "training")
    assert _text(ui.finetuneStartButton) == "Cancel" and ui.finetuneStartButton.isEnabled()
    assert not ui.finetuneResumeButton.isEnabled() and not ui.finetuneEstimateButton.isEnabled()
    assert not ui.segmentButton.isEnabled() and not ui.finetuneLabelledList.isEnabled()
    assert _text(ui.statusLabel) == "Finetuning: 1 / 10 iterations" and ui.progressBar.maximum() == 10
    assert _text(ui.finetuneLossLabel) == "Loss 0.9000 at iteration 1"
    job = sent["job"]
    for iteration in (2, 3):
        panel.factory.last.emit(
            {"type": "log", "job": job, "record": {"iteration": iteration, "loss": 1.0 / iteration}}
        )
    panel.factory.last.emit({"type": "log", "job": job, "record": {"iteration": 3, "val_dice": 0.5, "val_hd95": 4.0}})
    panel.factory.last.emit(
        {"type": "progress", "job": job, "done": 3, "total": 10, "stage": "training", "unit": "iterations"}
    )
    _wait(panel, lambda: panel.logic.status.done == 3)
    assert _text(ui.finetuneLossLabel) == "Loss 0.3333 at iteration 3; validation Dice 0.500 at iteration 3"
    _render_finetune_section(panel)

    parameters = panel.panel.parameters
    chart = parameters.finetune_chart
    assert chart is not None and chart.GetNumberOfPlotSeriesNodes() == 2
    series = [chart.GetNthPlotSeriesNode(i) for i in range(2)]
    assert [s.GetTableNode() for s in series] == [parameters.finetune_loss_table, parameters.finetune_validation_table]
    assert [s.GetYColumnName() for s in series] == ["Loss", "Validation Dice"]
    from MedSegSuiteLib.slicer.finetuning import FinetuneCurve

    curve = FinetuneCurve(parameters.finetune_loss_table, parameters.finetune_validation_table, chart)
    assert curve.rows("loss") == [(1.0, 0.9), (2.0, 0.5), (3.0, pytest.approx(1 / 3))]
    assert curve.rows("validation") == [(3.0, 0.5, 4.0)]

    panel.factory.last.finish()
    _wait(panel, lambda: not panel.logic.busy)
    status = _text(ui.statusLabel)
    assert status.startswith("Finetuned Test ball finder (3D U-Net) into test-unet3d-ft-1 in "), status
    assert status.endswith(
        "Better than Test ball finder (3D U-Net) on the 1 held-back case: Dice 0.410 \u2192 0.860 (+0.450). "
        "Segment uses the new model now."
    ), status
    assert ui.modelSelector.currentData() == "test-unet3d-ft-1"  # better on the held-back case: Segment uses it
    assert _text(ui.finetuneLossLabel).startswith("<b>Better than Test ball finder (3D U-Net)")
    assert "Finetuned from test-unet3d: Dice 0.410 before, 0.860 after" in _text(ui.modelInfoLabel)
    assert ui.finetuneModelSelector.findData("test-unet3d-ft-1") >= 0
    assert ui.finetuneModelSelector.currentData() == "test-unet3d"  # the parent stays chosen
    assert _text(ui.finetuneStartButton) == "Start" and not ui.finetuneResumeButton.isEnabled()
    assert ui.segmentButton.isEnabled()
    assert curve.rows("loss")[-1] == (10.0, 0.3) and curve.rows("validation")[-1][:2] == (10.0, 0.86)
    assert np.isnan(curve.rows("validation")[-1][2])  # no HD95: the worker sends null
    assert slicer.mrmlScene.GetNodeByID(chart.GetID()) is chart


def test_a_model_worse_than_its_parent_is_reported_as_such_and_segment_keeps_the_parent(home, tmp_path):
    install_card(home, PARENT_CARD)
    factory = FakeWorkerFactory(hold=True, finetune_dice=(0.83, 0.80))
    widget = slicer_harness.open_module_widget(WorkerClient(process_factory=factory, temp_root=str(tmp_path)))
    try:
        ui = widget.ui
        ui.finetuneCollapsibleButton.setCollapsed(False)
        cases, _ = _cases()
        _choose(widget, cases)
        ui.finetuneStartButton.click()
        _wait(widget, lambda: factory.last.held)
        factory.last.finish()
        _wait(widget, lambda: not widget.logic.busy)
        words = (
            "Worse than Test ball finder (3D U-Net) on the 1 held-back case: Dice 0.830 \u2192 0.800. "
            "Segment keeps Test ball finder (3D U-Net); choose test-unet3d-ft-1 in the model list to use it anyway."
        )
        assert _text(ui.statusLabel).endswith(words), _text(ui.statusLabel)
        assert _text(ui.finetuneLossLabel).startswith(f"<b>{words}</b>")
        assert ui.modelSelector.currentData() == "test-unet3d"  # not selected
        assert ui.modelSelector.findData("test-unet3d-ft-1") >= 0  # but listed: the user may still choose it
        ui.modelSelector.setCurrentIndex(ui.modelSelector.findData("test-unet3d-ft-1"))
        assert "Dice 0.830 before, 0.800 after" in _text(ui.modelInfoLabel)
        assert "<b>not better, not selected</b>" in _text(ui.modelInfoLabel)
    finally:
        widget.logic.shutdown()
        slicer_harness.unload_modules()
        import slicer

        slicer.mrmlScene.Clear(0)


def test_cancel_keeps_a_checkpoint_and_resume_continues_that_run(panel, home):
    ui = panel.ui
    cases, _ = _cases()
    _choose(panel, cases)
    ui.finetuneStartButton.click()
    _wait(panel, lambda: panel.logic.status.stage == "training")
    ui.finetuneStartButton.click()  # Cancel
    _wait(panel, lambda: not panel.logic.busy)
    assert _text(ui.statusLabel) == (
        "Finetuning cancelled at iteration 1 of 10; the checkpoint of test-unet3d-ft-1 is kept: "
        "click Resume to continue."
    )
    assert (home / "models" / "test-unet3d-ft-1.training" / "checkpoint.pt").is_file()
    assert ui.finetuneResumeButton.isEnabled() and _text(ui.finetuneStartButton) == "Start"
    assert "unfinished run test-unet3d-ft-1 (logged up to iteration 1)" in ui.finetuneResumeButton.property("toolTip")
    assert ui.modelSelector.findData("test-unet3d-ft-1") < 0  # nothing registered yet

    ui.finetuneResumeButton.click()
    _wait(panel, lambda: panel.factory.last.held)
    assert panel.factory.last.received[-1]["params"]["resume"] is True
    assert not ui.finetuneResumeButton.isEnabled() and _text(ui.finetuneStartButton) == "Cancel"
    panel.factory.last.finish()
    _wait(panel, lambda: not panel.logic.busy)
    assert "into test-unet3d-ft-1" in _text(ui.statusLabel)
    assert not (home / "models" / "test-unet3d-ft-1.training").exists()
    assert not ui.finetuneResumeButton.isEnabled() and ui.modelSelector.currentData() == "test-unet3d-ft-1"
    loss = panel.panel.parameters.finetune_loss_table.GetTable()
    assert [loss.GetValue(r, 0).ToDouble() for r in range(loss.GetNumberOfRows())] == [1.0, 1.0, 10.0]


def test_labels_that_do_not_match_the_parent_are_refused_before_anything_is_sent(panel):
    from MedSegSuiteLib.slicer.testing import add_faint_ball_case

    ui = panel.ui
    volume, segmentation, _ = add_faint_ball_case("Liver case", "Liver", shape=(10, 20, 20), radius=3.0)
    slicer_harness.process_events()
    assert _items(ui.finetuneLabelledList)[0][0] == "Liver case + Liver case segmentation  (labels do not match)"
    assert "'Liver' (no label of Test ball finder (3D U-Net) matches it)" in ui.finetuneLabelledList.item(0).toolTip()
    _choose(panel, [(volume, segmentation, None)])
    ui.finetuneStartButton.click()
    assert _text(ui.statusLabel) == (
        "The labels of 'Liver case segmentation' do not match Test ball finder (3D U-Net)'s label table (Ball): "
        "'Liver' (no label of Test ball finder (3D U-Net) matches it); rename or remove those segments before "
        "finetuning."
    )
    assert not panel.logic.busy and not panel.factory.processes  # no worker was even started
    segment = segmentation.GetSegmentation().GetNthSegment(0)
    segment.SetName("ball")  # names match case-insensitively
    ui.finetuneStartButton.click()
    _wait(panel, lambda: panel.factory.last.held)
    assert panel.factory.last.received[-1]["kind"] == "finetune"


def _coarse_copy(volume, mask, name, shift_mm=(0.0, 0.0, 0.0)):
    """A segmentation of ``mask`` painted on a grid twice as coarse over the same region as ``volume``
    (moved by ``shift_mm`` LPS), whose reference volume is ``volume``; returns (segmentation, coarse mask)."""
    import slicer

    from MedSegSuiteLib.slicer.testing import add_painted_segmentation
    from MedSegSuiteLib.slicer.volumes import add_volume_node, grid_from_node
    from MedSegSuiteLib.volume import Volume

    fine = grid_from_node(volume)
    spacing = np.array(fine.spacing) * 2
    origin = np.array(fine.origin) + np.array(fine.spacing) / 2 + np.array(shift_mm)  # same outer edges
    coarse_mask = mask[::2, ::2, ::2]
    coarse = add_volume_node(Volume(coarse_mask.astype(np.float32), tuple(spacing), tuple(origin)), f"{name} grid")
    segmentation = add_painted_segmentation(coarse, {"Ball": (coarse_mask, (230, 60, 40))}, name=name)
    segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), volume.GetID())
    slicer.mrmlScene.RemoveNode(coarse)
    slicer_harness.process_events()
    return segmentation, coarse_mask


def test_a_segmentation_on_another_grid_over_the_same_region_is_resampled_only_when_the_user_agrees(panel, monkeypatch):
    import slicer

    ui = panel.ui
    cases, _ = _cases(count=1)
    volume, painted, mask = cases[0]
    slicer.mrmlScene.RemoveNode(painted)
    segmentation, coarse_mask = _coarse_copy(volume, mask, "Coarse")
    assert [text for text, _, _ in _items(ui.finetuneLabelledList)] == ["Faint 0 + Coarse"]
    questions, answers = [], [False, True]
    monkeypatch.setattr(
        slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: questions.append(text) or answers.pop(0)
    )
    _choose(panel, [(volume, segmentation, None)])
    ui.finetuneStartButton.click()
    assert len(questions) == 1 and not panel.factory.processes  # declined: nothing was sent
    assert "'Coarse' was drawn on another voxel grid than 'Faint 0', over the same region" in questions[0]
    assert "spacing" in questions[0] and questions[0].endswith("Resample it onto the volume and continue?")
    assert _text(ui.statusLabel).startswith("Not started: 'Coarse' was drawn on another voxel grid")

    ui.finetuneStartButton.click()  # this time the user agrees
    _wait(panel, lambda: panel.factory.last.held)
    assert len(questions) == 2
    label = read_image(panel.factory.last.received[-1]["params"]["labelled"][0]["label"])
    expected = coarse_mask.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    assert label.grid.same_as(read_image(panel.factory.last.received[-1]["params"]["labelled"][0]["image"]).grid)
    assert np.array_equal(label.array, expected)  # nearest neighbour onto the volume's grid


def test_a_segmentation_of_another_region_is_refused_without_asking(panel, monkeypatch):
    import slicer

    ui = panel.ui
    cases, _ = _cases(count=1)
    volume, painted, mask = cases[0]
    slicer.mrmlScene.RemoveNode(painted)
    segmentation, _ = _coarse_copy(volume, mask, "Elsewhere", shift_mm=(0.0, 0.0, 40.0))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: pytest.fail("must not ask"))
    _choose(panel, [(volume, segmentation, None)])
    ui.finetuneStartButton.click()
    status = _text(ui.statusLabel)
    assert status.startswith("'Elsewhere' was not drawn on 'Faint 0': it covers another region"), status
    assert "reach outside the volume" in status and "Specify geometry" in status
    assert not panel.logic.busy and not panel.factory.processes


def _set_cropped_labelmap(segmentation, segment_id, volume, mask, shift_ijk=(0.0, 0.0, 0.0)):
    """Store ``mask`` cropped to its bounding box (as Slicer keeps edited segments), on ``volume``'s lattice
    moved by ``shift_ijk`` voxels."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    ks, js, is_ = (np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    box = mask[ks[0] : ks[-1] + 1, js[0] : js[-1] + 1, is_[0] : is_[-1] + 1].astype(np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(is_[0], is_[-1], js[0], js[-1], ks[0], ks[-1])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = box.ravel()
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    moved = [sum(matrix.GetElement(r, c) * shift_ijk[c] for c in range(3)) for r in range(3)]
    for r in range(3):
        matrix.SetElement(r, 3, matrix.GetElement(r, 3) + moved[r])
    image.SetImageToWorldMatrix(matrix)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, segmentation, segment_id)


def test_segments_cropped_on_the_volumes_grid_are_taken_as_they_are_and_a_shifted_grid_asks(panel):
    from MedSegSuiteLib.slicer.finetuning import GridQuestion, case_geometry, parent_label_map

    cases, _ = _cases(count=1)
    volume, segmentation, mask = cases[0]
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    card = panel.panel.finetune.current_entry().card
    _set_cropped_labelmap(segmentation, segment_id, volume, mask)
    assert case_geometry(segmentation, volume) == ""
    assert np.array_equal(parent_label_map(segmentation, volume, card), mask)

    _set_cropped_labelmap(segmentation, segment_id, volume, mask, shift_ijk=(0.5, 0.0, 0.0))  # half a voxel
    assert "was drawn on another voxel grid than 'Faint 0', over the same region" in case_geometry(segmentation, volume)
    with pytest.raises(GridQuestion):
        parent_label_map(segmentation, volume, card)
    assert parent_label_map(segmentation, volume, card, resample=True).sum() > 0


def test_a_segmentation_without_a_reference_volume_pairs_with_the_one_volume_of_its_grid(panel):
    import slicer

    from MedSegSuiteLib.slicer.testing import add_faint_ball_case

    ui = panel.ui
    cases, spare = _cases(count=1)
    volume, segmentation, _ = cases[0]
    slicer.mrmlScene.RemoveNode(spare)  # it has the same grid
    segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), None)  # as if loaded
    add_faint_ball_case("Other grid", shape=(12, 20, 20))
    panel.panel.finetune.refresh_cases()
    assert [text for text, _, _ in _items(ui.finetuneLabelledList)] == ["Faint 0 + Faint 0 segmentation"]
    add_faint_ball_case("Same grid", seed=5, shape=(10, 20, 20), radius=3.0)
    panel.panel.finetune.refresh_cases()
    assert _items(ui.finetuneLabelledList) == []  # two volumes on its grid: which one is unknown


def test_estimate_times_a_few_iterations_and_scales_with_the_iterations(panel):
    ui = panel.ui
    cases, _ = _cases(count=1)
    _choose(panel, cases, iterations=200)
    assert _text(ui.finetuneEstimateLabel).startswith("No time estimate yet")
    ui.finetuneEstimateButton.click()
    _wait(panel, lambda: panel.factory.last.held)
    assert panel.factory.last.received[-1]["params"]["measure"] == 3
    _wait(panel, lambda: panel.logic.status.stage == "timing")
    assert _text(ui.finetuneEstimateButton) == "Cancel" and not ui.finetuneStartButton.isEnabled()
    assert _text(ui.statusLabel) == "Timing iterations: 1 / 4 iterations"
    panel.factory.last.finish()
    _wait(panel, lambda: not panel.logic.busy)
    # 1 s set-up + (1 + 5 validations) x 2 s + 200 x 0.5 s = 113 s
    assert _text(ui.statusLabel) == (
        "Timed on CPU: 0.50 s per iteration, about 2 s per validation; 200 iterations take about 2 min."
    )
    assert _text(ui.finetuneEstimateLabel) == (
        "About 2 min on CPU (timed in the worker on these cases: 0.50 s per iteration, up to 2 s per validation)."
    )
    ui.finetuneIterationsSpinBox.setValue(1000)  # 1 + 12 + 500 s
    assert _text(ui.finetuneEstimateLabel).startswith("About 9 min on CPU")
    assert _text(ui.finetuneEstimateButton) == "Estimate time" and ui.finetuneStartButton.isEnabled()
    ui.deviceSelector.setCurrentIndex(ui.deviceSelector.findData("cpu"))  # was "auto"
    assert _text(ui.finetuneEstimateLabel).startswith("The last timing was for another model")
    assert panel.panel.parameters.finetune_chart is None  # timing draws no curve


def test_estimates_count_validations_like_the_finetuning_does():
    from MedSegSuiteLib.slicer.finetuning import FinetuneTiming, describe_duration, estimate_seconds, validation_count

    assert [validation_count(n) for n in (1, 4, 5, 7, 10, 200, 201)] == [1, 4, 5, 7, 5, 5, 6]
    timing = FinetuneTiming((), "cpu", per_iteration=0.5, per_validation=2.0, setup=1.0)
    assert estimate_seconds(timing, 200) == 1.0 + 6 * 2.0 + 100.0
    assert [describe_duration(s) for s in (0.2, 40, 113, 5400, 7300)] == [
        "1 s",
        "40 s",
        "2 min",
        "1 h 30 min",
        "2 h 2 min",
    ]


def _render_finetune_section(panel) -> Path:
    """Testing/output/panel_finetune.png: the panel during a run, the Finetune section open."""
    import slicer

    ui = panel.ui
    for name in ("dataCollapsibleButton", "segmentCollapsibleButton", "refineCollapsibleButton"):
        getattr(ui, name).setCollapsed(True)
    representation = slicer.modules.medsegsuite.widgetRepresentation()
    representation.resize(420, 760)
    representation.show()
    slicer_harness.process_events()
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    target = OUTPUT_DIR / "panel_finetune.png"
    assert representation.grab().save(str(target))
    representation.hide()
    for name in ("dataCollapsibleButton", "segmentCollapsibleButton", "refineCollapsibleButton"):
        getattr(ui, name).setCollapsed(False)
    return target
