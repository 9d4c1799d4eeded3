"""Bad inputs through the panel: each is answered on the status line, the scene stays as it was, the panel stays usable.

The panel (real .ui, PySide6 offscreen) talks to a real worker process, shared by the
module, with the small trained 3D U-Net copied into an isolated MEDSEGSUITE_HOME. Some
checks live in the worker (non-finite and constant images, memory, weights), others
in the panel before any job is sent (2D images for a 3D model, ROIs beside the volume,
refinement of empty or unknown segments, export targets and geometry). The
refinement cases are refused before the worker, so a HiDiff model card without
weights is enough. Complements test_bad_inputs.py (the same matrix through the CLI).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import slicer_harness
from conftest import HIDIFF_CARD, TEST_THREADS, install_card

from MedSegSuiteLib.models.weights import sha256_file
from MedSegSuiteLib.worker.client import WorkerClient, popen_factory

THREADS = str(TEST_THREADS)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """One real worker process for the module's jobs (the panels borrow it; none of them ends it)."""
    client = WorkerClient(env={"MEDSEGSUITE_THREADS": THREADS}, temp_root=str(tmp_path_factory.mktemp("worker")))
    yield client
    client.close()


def _install_model(home, source, model_id, weights=None):
    """Copy the model folder ``source`` into the user model folder as ``model_id`` (with other ``weights``)."""
    folder = home / "models" / model_id
    shutil.copytree(source, folder)
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    card.update(id=model_id, name=f"{card['name']} ({model_id})")
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
        card["weights"].update(sha256=sha256_file(folder / "model.safetensors"), bytes=len(weights))
    (folder / "card.json").write_text(json.dumps(card))
    return folder


@pytest.fixture
def panel(home, tmp_path, unet3d_dir, worker):
    """The module widget over a fresh scene, the 3D U-Net and a HiDiff card installed, and the shared worker."""
    _install_model(home, unet3d_dir, "test-unet3d")
    install_card(home, HIDIFF_CARD)
    widget = slicer_harness.open_module_widget(worker)
    yield widget
    if widget.logic.busy:
        widget.logic.cancel()
        widget.logic.wait(60)
    widget.logic._client = None  # the worker outlives the panel
    slicer_harness.unload_modules()
    import slicer

    slicer.mrmlScene.Clear(0)


def _text(widget) -> str:
    return widget.property("text")


def _ball(name="CT"):
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    return add_ball_volume(name, shape=(12, 24, 24), radius=5.0)


def _scene_state(reference) -> dict:
    """Every node (but the panel's parameter node) with its class and name, voxels and segments on ``reference``."""
    import slicer

    from MedSegSuiteLib.slicer.segmentations import segment_ids, segment_mask

    scene = slicer.mrmlScene
    state = {}
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if node.IsA("vtkMRMLScriptedModuleNode"):
            continue
        entry = [node.GetClassName(), node.GetName()]
        if node.IsA("vtkMRMLVolumeNode") and node.GetImageData() is not None:
            entry.append(hashlib.sha1(slicer.util.arrayFromVolume(node).tobytes()).hexdigest())
        if node.IsA("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            for segment_id in segment_ids(node):
                mask = segment_mask(node, segment_id, reference)
                name = segmentation.GetSegment(segment_id).GetName()
                entry.append((segment_id, name, hashlib.sha1(np.packbits(mask).tobytes()).hexdigest()))
        state[node.GetID()] = entry
    return state


def _assert_usable(panel, done=False) -> None:
    """No job runs, Segment is there to click and the choices can be changed; the bar is empty after a failure."""
    ui = panel.ui
    assert not panel.logic.busy
    assert ui.segmentButton.isEnabled() and _text(ui.segmentButton) == "Segment"
    for widget in (ui.inputVolumeSelector, ui.outputSegmentationSelector, ui.modelSelector, ui.deviceSelector):
        assert widget.isEnabled()
    assert ui.progressBar.value() == (100 if done else 0)


def _segment(panel, volume, model_id="test-unet3d", region=None, output=None) -> str:
    """Click Segment with these choices, wait for the job to end and return the status line."""
    from MedSegSuiteLib.slicer.testing import wait_until

    ui = panel.ui
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.outputSegmentationSelector.setCurrentNode(output)
    ui.regionSelector.setCurrentNode(region)
    ui.modelSelector.setCurrentIndex(ui.modelSelector.findData(model_id))
    ui.segmentButton.click()
    assert wait_until(lambda: not panel.logic.busy, 120)
    slicer_harness.process_events()
    return _text(ui.statusLabel)


def _with_voxels(values):
    def make():
        import slicer

        node, _ = _ball()
        array = slicer.util.arrayFromVolume(node)
        array[6, 12, 10 : 10 + len(values)] = values
        slicer.util.arrayFromVolumeModified(node)
        return node

    return make


def _constant():
    import slicer

    node, _ = _ball()
    slicer.util.arrayFromVolume(node)[:] = 7.0
    slicer.util.arrayFromVolumeModified(node)
    return node


def _single_slice():
    from MedSegSuiteLib.slicer.volumes import add_volume_node
    from MedSegSuiteLib.volume import Volume

    return add_volume_node(Volume(np.random.default_rng(0).normal(100, 20, (1, 24, 24)).astype(np.float32)), "Slice")


def _channels(count, name=None):
    """A maker of a ``count``-channel (vector) volume node."""

    def make():
        from MedSegSuiteLib.slicer.volumes import add_volume_node
        from MedSegSuiteLib.volume import Volume

        echoes = np.random.default_rng(0).normal(100, 20, (count, 12, 24, 24)).astype(np.float32)
        words = {2: "Two", 3: "Three", 5: "Five"}
        return add_volume_node(Volume(echoes), name or f"{words.get(count, count)} echoes")

    return make


SEGMENT_CASES = {
    "NaN voxels": (
        _with_voxels([np.nan] * 3),
        "Segmentation failed: the image has 3 voxel(s) that are NaN or infinite; replace them (e.g. with the minimum) "
        "first",
    ),
    "infinite voxels": (_with_voxels([np.inf, -np.inf]), "the image has 2 voxel(s) that are NaN or infinite"),
    "constant volume": (
        _constant,
        "Segmentation failed: the image is constant (every voxel is 7.0): there is nothing to segment",
    ),
    "single 2D slice for a 3D model": (
        _single_slice,
        "segments 3D volumes and 'Slice' is a single 2D image: choose a 2D model.",
    ),
    "two channels for a one-channel model": (
        _channels(2),
        "Test ball finder (3D U-Net) (test-unet3d) expects 1-channel images but volume 'Two echoes' has 2 channels, "
        "and only grey to RGB and RGB to grey are converted: choose a model for 2-channel images, or a grey or RGB "
        "volume (Vector to Scalar Volume makes a one-channel copy).",
    ),
    "five channels for a one-channel model": (
        _channels(5),
        "expects 1-channel images but volume 'Five echoes' has 5 channels, and only grey to RGB and RGB to grey are "
        "converted: choose a model for 5-channel images",
    ),
}


@pytest.mark.parametrize("case", list(SEGMENT_CASES))
def test_images_the_model_cannot_segment_are_refused_on_the_status_line(panel, worker, case):
    """The earlier result chosen as output keeps its segment; no node is added; the job's files are gone."""
    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node

    make, expected = SEGMENT_CASES[case]
    volume = make()
    earlier = create_segmentation_node(volume, name="Earlier")
    earlier.GetSegmentation().AddEmptySegment("Ball", "Ball", [1.0, 0.0, 0.0])
    before = _scene_state(volume)
    assert expected in _segment(panel, volume, output=earlier)
    assert _scene_state(volume) == before
    _assert_usable(panel)
    assert not list(worker.temp_dir.iterdir())


def test_after_a_refused_image_the_same_worker_segments_the_next_one(panel, worker):
    bad = _with_voxels([np.nan])()
    assert "NaN or infinite" in _segment(panel, bad)
    pid = worker.pid
    good, mask = _ball("Good")
    status = _segment(panel, good)
    assert status.startswith("Done in") and "Ball in 'Good segmentation'" in status, status
    assert worker.pid == pid
    _assert_usable(panel, done=True)


def test_channel_refusals_happen_before_any_job_and_mapped_channels_are_segmented(panel, worker, monkeypatch):
    """Refused channels send nothing to the worker; an RGB volume given to a grey model is segmented (luminance)."""
    sent = []
    submit = panel.logic.client.submit
    monkeypatch.setattr(panel.logic.client, "submit", lambda kind, params: sent.append(kind) or submit(kind, params))
    status = _segment(panel, _channels(2)())
    assert "has 2 channels" in status and sent == []
    status = _segment(panel, _channels(3, "Colour")())
    assert sent == ["segment"]
    assert status.startswith("Done in") and "in 'Colour segmentation'" in status, status
    _assert_usable(panel, done=True)


def _fitting_model(home, unet3d_dir, model_id, inputs):
    """The 3D U-Net installed as ``model_id`` with ``inputs`` as the profile of what it was trained on."""
    folder = _install_model(home, unet3d_dir, model_id)
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    card["training"] = {**card.get("training", {}), "inputs": inputs}
    (folder / "card.json").write_text(json.dumps(card), encoding="utf-8")
    return folder


def test_fit_warnings_follow_the_result_on_the_status_line_and_in_the_node(panel, worker, home, unet3d_dir):
    """A ball volume of 22 x 19 x 14 mm for a model trained on crops of at most 8 mm: the result comes with the
    warning and a hint to choose a Region; with a Region that fits, the same node is rewritten without it."""
    import slicer

    from MedSegSuiteLib.slicer.segmentations import TAG_INPUT_WARNINGS

    _fitting_model(
        home, unet3d_dir, "small-crops", {"dims": 3, "channels": 1, "fov_mm": {"min": [4] * 3, "max": [8] * 3}}
    )
    panel.refreshModels()
    volume, _ = _ball()
    status = _segment(panel, volume, model_id="small-crops")
    warning = (
        "this image covers 22 x 19 x 14 mm, far more than the 8 x 8 x 8 mm (at most) small-crops was trained on: "
        "it may find the structure in the wrong place; segment an ROI around it (choose it as Region)"
    )
    assert status.startswith("Done in") and status.endswith(f" Check the result: {warning}."), status
    output = slicer.mrmlScene.GetNodeByID(panel.logic.status.output_node_id)
    assert output.GetAttribute(TAG_INPUT_WARNINGS) == warning
    assert panel.logic.status.info["warnings"] == [warning]
    _assert_usable(panel, done=True)

    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Around the ball")
    matrix = _ijk_to_ras(volume)
    roi.SetCenter(*[matrix.MultiplyPoint((11.5, 11.5, 5.5, 1.0))[r] for r in range(3)])
    roi.SetSize(7.0, 7.0, 7.0)
    status = _segment(panel, volume, model_id="small-crops", region=roi, output=output)
    assert status.startswith("Done in") and "Check the result" not in status, status
    assert panel.logic.status.output_node_id == output.GetID() and output.GetAttribute(TAG_INPUT_WARNINGS) is None


def _ijk_to_ras(volume):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return matrix


def test_a_large_volume_for_the_bundled_hippocampus_model_gets_the_roi_warning(panel, worker, home):
    """The bundled card's training profile (hippocampus crops of at most 43 x 58 x 46 mm) against a 96 x 60 x 46 mm
    MRI-like volume: the status line suggests a Region."""
    from conftest import REPO

    from MedSegSuiteLib.slicer.volumes import add_volume_node
    from MedSegSuiteLib.volume import Volume

    bundled = REPO / "Resources" / "Models" / "hippocampus-dnet-lite"
    if not (bundled / "model.safetensors").is_file():
        pytest.skip("the bundled models are not installed")
    shutil.copytree(bundled, home / "models" / "hippocampus-dnet-lite")
    panel.refreshModels()
    head = np.random.default_rng(3).normal(30000, 8000, (46, 60, 96)).astype(np.float32)
    volume = add_volume_node(Volume(head, (1.0, 1.0, 1.0)), "Head")
    status = _segment(panel, volume, model_id="hippocampus-dnet-lite")
    assert status.startswith("Done in"), status
    assert (
        "Check the result: this image covers 96 x 60 x 46 mm, far more than the 43 x 58 x 46 mm (at most) "
        "hippocampus-dnet-lite was trained on: it may find the structure in the wrong place; segment an ROI around "
        "it (choose it as Region)." in status
    ), status


def test_a_region_beside_the_volume_is_refused_before_any_job(panel, worker):
    import slicer

    volume, _ = _ball()
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Far box")
    roi.SetCenter(400.0, 400.0, 400.0)
    roi.SetSize(10.0, 10.0, 10.0)
    before = _scene_state(volume)
    status = _segment(panel, volume, region=roi)
    assert status == "The region 'Far box' does not overlap volume 'CT'; move it onto the image or choose no region."
    assert _scene_state(volume) == before
    _assert_usable(panel)


def test_a_volume_larger_than_free_memory_is_refused_with_the_amount(panel, tmp_path):
    """A worker that sees 20 kB free memory (its check is patched before it starts) refuses a 27 kB volume."""

    def low_memory(argv, env, cwd):
        code = (
            "import runpy, MedSegSuiteLib.memory as memory; memory.available_bytes = lambda: 20_000; "
            "runpy.run_module('MedSegSuiteLib.worker', run_name='__main__')"
        )
        return popen_factory([argv[0], "-c", code, *argv[3:]], env, cwd)

    client = WorkerClient(process_factory=low_memory, env={"MEDSEGSUITE_THREADS": THREADS}, temp_root=str(tmp_path))
    panel.logic._client = client
    try:
        volume, _ = _ball()
        before = _scene_state(volume)
        status = _segment(panel, volume)
        assert not list(client.temp_dir.iterdir())
    finally:
        panel.logic._client = None
        client.close()
    assert status == (
        "Segmentation failed: reading volume 'CT' (24 x 24 x 12 voxels) needs about 54.0 kB of memory but only "
        "19.5 kB is free; crop or downsample it first, or use a machine with more memory"
    )
    assert _scene_state(volume) == before
    _assert_usable(panel)


def _foreign(home, unet3d_dir, unet2d_dir):
    return _install_model(home, unet3d_dir, "foreign", (unet2d_dir / "model.safetensors").read_bytes())


def _truncated(home, unet3d_dir, unet2d_dir):
    folder = _install_model(home, unet3d_dir, "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return folder


MODEL_CASES = {
    "weights of another network": (
        _foreign,
        "do not fit the network the model card describes: 23 with other shapes (e.g. conv_0.conv_0.conv.weight: "
        "network (8, 1, 3, 3, 3) vs file (8, 3, 3, 3)",
    ),
    "truncated weights": (_truncated, "is truncated: it holds 1000 bytes, its model card says"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_broken_weights_in_the_user_model_folder_fail_the_job_with_the_reason(
    panel, worker, home, unet3d_dir, unet2d_dir, case
):
    make, expected = MODEL_CASES[case]
    folder = make(home, unet3d_dir, unet2d_dir)
    panel.refreshModels()
    volume, _ = _ball()
    before = _scene_state(volume)
    status = _segment(panel, volume, model_id=folder.name)
    assert status.startswith("Segmentation failed: weights ") and str(folder / "model.safetensors") in status
    assert expected in status, status
    assert status.endswith(("re-install or re-import the model", "the card's network/preset/config is wrong."))
    assert _scene_state(volume) == before
    _assert_usable(panel)


def test_broken_model_cards_are_named_under_the_model_and_the_others_stay_usable(panel, home):
    ui = panel.ui
    broken = home / "models" / "broken"
    broken.mkdir()
    (broken / "card.json").write_text("{not json")
    lying = home / "models" / "lying"
    lying.mkdir()
    (lying / "card.json").write_text(json.dumps({"id": "lying", "network": "nonsense"}))
    (lying / "model.safetensors").write_bytes(b"not weights")
    panel.refreshModels()
    assert [ui.modelSelector.itemData(i) for i in range(ui.modelSelector.count())] == ["demo-hidiff", "test-unet3d"]
    info = _text(ui.modelInfoLabel)
    assert "<b>Not listed</b> (fix or remove these models): model card " in info
    assert f"{broken / 'card.json'} is not valid JSON" in info and f"{lying / 'card.json'}: version is missing" in info
    ui.modelSelector.setCurrentIndex(ui.modelSelector.findData("test-unet3d"))
    assert "Labels: Ball" in _text(ui.modelInfoLabel) and "Not listed" in _text(ui.modelInfoLabel)
    ui.inputVolumeSelector.setCurrentNode(_ball()[0])
    _assert_usable(panel)
    shutil.rmtree(broken)
    shutil.rmtree(lying)
    panel.refreshModels()
    assert "Not listed" not in _text(ui.modelInfoLabel)


def _discs(segments):
    """A disc stack and a segmentation with ``segments`` (name -> "discs" or "empty")."""
    import slicer

    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node
    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    volume, discs = add_disc_stack_volume("Discs")
    node = create_segmentation_node(volume, name="Painted")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name, content in segments.items():
        segment_id = node.GetSegmentation().AddEmptySegment(name, name, [0.9, 0.7, 0.1])
        if content == "discs":
            slicer.util.updateSegmentBinaryLabelmapFromArray(discs, node, segment_id, volume)
    return volume, node


REFINE_CASES = {
    "empty segment": ({"Disc": "empty"}, "'Disc' is empty: segment or paint first, then refine."),
    "segment the model does not know": (
        {"Tumour": "discs"},
        "No segment of 'Painted' matches a label of Demo disc refiner (HiDiff lite) (Disc); rename the segment to "
        "refine to one of these names.",
    ),
}


@pytest.mark.parametrize("case", list(REFINE_CASES))
def test_refinement_of_empty_or_unknown_segments_is_refused_before_any_job(panel, worker, case):
    from MedSegSuiteLib.slicer.testing import wait_until

    segments, expected = REFINE_CASES[case]
    ui = panel.ui
    volume, segmentation = _discs(segments)
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.outputSegmentationSelector.setCurrentNode(segmentation)
    before = _scene_state(volume)
    for button in (ui.refineButton, ui.oneStepButton):
        ui.statusLabel.setText("")
        button.click()
        assert wait_until(lambda: not panel.logic.busy, 10)
        assert _text(ui.statusLabel) == expected
        assert _scene_state(volume) == before
        assert ui.refineButton.isEnabled() and _text(ui.refineButton) == "Refine" and ui.oneStepButton.isEnabled()
        assert not ui.undoRefineButton.isEnabled()
    _assert_usable(panel)


def _unwritable(tmp_path):
    if os.name == "posix" and os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    if os.path.isdir("/proc/self"):  # root may write anywhere but in /proc
        return Path("/proc")
    pytest.skip("no folder here refuses new files")


EXPORT_CASES = {
    "missing folder": (lambda tmp: tmp / "missing" / "out.seg.nrrd", "{folder} does not exist."),
    "folder that is a file": (lambda tmp: tmp / "notes.txt" / "out.nii.gz", "{folder} is a file, not a folder."),
    "folder that takes no files": (
        lambda tmp: _unwritable(tmp) / "out.nii.gz",
        "{folder} does not take new files ({reason}); choose another folder.",
    ),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_to_a_folder_that_cannot_take_the_file_writes_nothing(panel, tmp_path, case):
    ui = panel.ui
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    make, expected = EXPORT_CASES[case]
    target = make(tmp_path)
    volume, segmentation = _discs({"Disc": "discs"})
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.outputSegmentationSelector.setCurrentNode(segmentation)
    ui.exportPathLineEdit.setText(str(target))
    files = sorted(tmp_path.rglob("*"))
    before = _scene_state(volume)
    assert ui.exportButton.isEnabled()
    ui.exportButton.click()
    status = _text(ui.statusLabel)
    reason = status.rpartition("(")[2].partition(")")[0] if "{reason}" in expected else ""
    assert reason in ("", "Permission denied", "No such file or directory")  # /proc takes no new names
    assert status == f"Export failed: cannot write {target}: folder " + expected.format(
        folder=target.parent, reason=reason
    ), status
    assert sorted(tmp_path.rglob("*")) == files and not target.exists()
    assert _scene_state(volume) == before
    assert ui.exportButton.isEnabled()
    _assert_usable(panel)


def test_export_of_a_segmentation_beside_the_input_volume_is_refused(panel, tmp_path):
    """A segmentation made on another volume that does not overlap the input would be exported empty."""
    from MedSegSuiteLib.slicer.testing import add_painted_segmentation
    from MedSegSuiteLib.slicer.volumes import add_volume_node
    from MedSegSuiteLib.volume import Volume

    ui = panel.ui
    volume, _ = _ball()
    elsewhere = add_volume_node(Volume(np.zeros((8, 10, 10), np.float32), (1.0, 1.0, 1.0), (500.0, 500.0, 500.0)))
    far = add_painted_segmentation(elsewhere, {"Ball": (np.ones((8, 10, 10), np.uint8), (230, 60, 40))}, name="Far")
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.outputSegmentationSelector.setCurrentNode(far)
    before = _scene_state(elsewhere)
    (tmp_path / "out").mkdir()
    for name in ("far.seg.nrrd", "far.nii.gz"):
        ui.exportPathLineEdit.setText(str(tmp_path / "out" / name))
        ui.exportButton.click()
        assert _text(ui.statusLabel) == (
            "Export failed: segment(s) 'Ball' of 'Far' lie outside volume 'CT': choose the volume the segmentation "
            "was made on as the input volume."
        )
    assert not list((tmp_path / "out").iterdir())
    assert _scene_state(elsewhere) == before
    _assert_usable(panel)
    ui.inputVolumeSelector.setCurrentNode(elsewhere)  # the volume it was made on
    ui.exportButton.click()
    assert _text(ui.statusLabel).startswith(f"Exported 'Far' to {tmp_path / 'out' / 'far.nii.gz'} and ")
