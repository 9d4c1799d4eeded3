"""The module logic with an injected fake worker: results, failures, cancel and crashes never corrupt the scene."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import UNET2D_CARD, UNET3D_CARD
from slicer_harness.fake_worker import fake_logic, wait_idle

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.models.card import card_from_dict
from MedSegSuiteLib.models.registry import ModelEntry


@pytest.fixture
def entry(tmp_path):
    return ModelEntry(card_from_dict(dict(UNET3D_CARD, weights={"file": "model.safetensors"})), tmp_path, "user")


def test_a_result_becomes_a_new_segmentation_next_to_the_input(scene, entry, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_ball_volume, dice, segment_array

    volume, mask = add_ball_volume("CT", shape=(12, 24, 24), radius=5.0)
    logic, factory = fake_logic(tmp_path)
    assert logic.start(volume, entry, device="cpu").running
    sent = factory.last.received[-1]
    assert sent["kind"] == "segment" and sent["params"]["model"] == str(tmp_path) and sent["params"]["device"] == "cpu"
    status = wait_idle(logic)
    assert status.state == "done", status.message
    output = scene.GetNodeByID(status.output_node_id)
    assert output.GetName() == "CT segmentation" and "Ball" in status.message
    assert dice(segment_array(output, "Ball", volume), mask) > 0.9
    assert not list(logic.client.temp_dir.iterdir())  # the job's files are gone
    logic.shutdown()


def test_a_rerun_writes_into_the_chosen_segmentation(scene, entry, tmp_path):
    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    volume, _ = add_ball_volume("CT", shape=(12, 24, 24), radius=5.0)
    chosen = create_segmentation_node(volume, name="Mine")
    logic, _ = fake_logic(tmp_path)
    logic.start(volume, entry, output_node=chosen)
    nodes = scene.GetNumberOfNodes()
    status = wait_idle(logic)
    assert status.output_node_id == chosen.GetID() and scene.GetNumberOfNodes() == nodes
    assert chosen.GetSegmentation().GetSegment("Ball") is not None
    logic.shutdown()


def test_the_region_is_sent_as_a_voxel_box(scene, entry, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    volume, _ = add_ball_volume("CT", shape=(12, 24, 24), radius=5.0, study=None)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    roi.SetCenter(*volume.GetOrigin())
    roi.SetSize(0.1, 0.1, 0.1)
    logic, factory = fake_logic(tmp_path)
    logic.start(volume, entry, region_node=roi)
    assert factory.last.received[-1]["params"]["roi"] == [0, 0, 0, 1, 1, 1]
    wait_idle(logic)
    logic.shutdown()


def test_a_crash_during_a_job_leaves_the_scene_unchanged_and_the_next_job_gets_a_new_worker(scene, entry, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    volume, _ = add_ball_volume("CT", shape=(12, 24, 24), radius=5.0)
    logic, factory = fake_logic(tmp_path, hold=True)
    logic.start(volume, entry)
    nodes = scene.GetNumberOfNodes()
    logic.poll()
    factory.last.die(-9)
    status = wait_idle(logic)
    assert status.state == "failed"
    assert status.message == (
        "The MedSegSuite worker stopped unexpectedly (exit code -9, possibly out of memory); your scene is unchanged; "
        "the next job starts a new worker."
    )
    assert scene.GetNumberOfNodes() == nodes
    logic.start(volume, entry)
    assert len(factory.processes) == 2
    factory.last.finish()
    assert wait_idle(logic).state == "done"
    logic.shutdown()


def test_cancel_discards_even_a_result_that_arrives_afterwards(scene, entry, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    volume, _ = add_ball_volume("CT", shape=(12, 24, 24), radius=5.0)
    logic, factory = fake_logic(tmp_path, hold=True)
    logic.start(volume, entry)
    nodes = scene.GetNumberOfNodes()
    held = dict(factory.last.held)
    factory.last.held.clear()  # the fake ignores the cancel...
    logic.cancel()
    assert logic.status.message == "Cancelling..."
    factory.last.finish(message=next(iter(held.values())))  # ...and delivers a result anyway
    status = wait_idle(logic)
    assert status.state == "cancelled" and status.message == "Cancelled; nothing was changed."
    assert scene.GetNumberOfNodes() == nodes
    logic.shutdown()


def test_worker_errors_and_a_removed_input_are_reported_without_changing_the_scene(scene, entry, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    volume, _ = add_ball_volume("CT", shape=(12, 24, 24), radius=5.0)
    logic, _ = fake_logic(tmp_path, error=("OutOfMemory", "not enough memory for this job; try a smaller region"))
    logic.start(volume, entry)
    nodes = scene.GetNumberOfNodes()
    status = wait_idle(logic)
    assert status.state == "failed" and status.message.endswith("not enough memory for this job; try a smaller region")
    assert scene.GetNumberOfNodes() == nodes
    logic.shutdown()

    logic, factory = fake_logic(tmp_path, hold=True)
    logic.start(volume, entry)
    scene.RemoveNode(volume)
    nodes = scene.GetNumberOfNodes()
    factory.last.finish()
    status = wait_idle(logic)
    assert status.state == "failed" and "input volume was removed" in status.message
    assert scene.GetNumberOfNodes() == nodes
    logic.shutdown()


def test_impossible_requests_are_refused_before_any_worker_starts(scene, entry, tmp_path):
    from MedSegSuiteLib.slicer.volumes import add_volume_node
    from MedSegSuiteLib.volume import Volume

    photo = add_volume_node(Volume(np.zeros((3, 1, 8, 8), np.uint8)), "photo")
    logic, factory = fake_logic(tmp_path)
    with pytest.raises(InputError, match="segments 3D volumes"):
        logic.start(photo, entry)
    with pytest.raises(InputError, match="choose an input volume"):
        logic.start(None, entry)
    assert factory.processes == []
    entry2d = ModelEntry(card_from_dict(dict(UNET2D_CARD, weights={"file": "m.safetensors"})), tmp_path, "user")
    logic.start(photo, entry2d)
    with pytest.raises(InputError, match="already running"):
        logic.start(photo, entry2d)
    logic.shutdown()


def test_an_rgb_image_goes_to_the_worker_and_its_result_lands_on_the_image(scene, tmp_path):
    from MedSegSuiteLib.io import read_image
    from MedSegSuiteLib.slicer.segmentations import geometry_matches
    from MedSegSuiteLib.slicer.testing import segment_array
    from MedSegSuiteLib.slicer.volumes import add_volume_node
    from MedSegSuiteLib.volume import Volume

    rgb = np.zeros((3, 1, 16, 20), np.uint8)
    rgb[:, :, 4:9, 5:12] = 220
    photo = add_volume_node(Volume(rgb, (0.2, 0.2, 1.0), (5.0, 6.0, 0.0)), "photo")
    entry2d = ModelEntry(card_from_dict(dict(UNET2D_CARD, weights={"file": "m.safetensors"})), tmp_path, "user")
    logic, factory = fake_logic(tmp_path, hold=True)
    logic.start(photo, entry2d)
    sent = read_image(factory.last.received[-1]["params"]["input"])
    assert sent.array.shape == (3, 1, 16, 20) and np.array_equal(sent.array, rgb)
    factory.last.finish()
    status = wait_idle(logic)
    assert status.state == "done", status.message
    output = scene.GetNodeByID(status.output_node_id)
    assert geometry_matches(output, photo)
    assert np.array_equal(segment_array(output, "Disc", photo), rgb[0] > 150)
    logic.shutdown()


def test_devices_offer_cuda_only_when_the_worker_has_it(scene, tmp_path):
    logic, _ = fake_logic(tmp_path)
    assert logic.devices() == ["auto", "cpu"]
    logic.warm_up()
    logic.poll()
    assert logic.devices() == ["auto", "cpu"]
    logic.shutdown()
    logic, _ = fake_logic(tmp_path, devices=("cpu", "cuda"))
    logic.warm_up()
    deadline = time.monotonic() + 5
    while logic.client.ready is None and time.monotonic() < deadline:
        logic.poll()
    assert logic.devices() == ["auto", "cpu", "cuda"]
    logic.shutdown()


def test_model_summary_shows_the_measured_cpu_time_of_a_bundled_model():
    from MedSegSuiteLib.slicer.logic import describe_model

    resources = {"cpu_seconds_per_case": 2.32, "cpu_threads": 2, "ram_gb": 0.9, "weights_dtype": "float16"}
    card = card_from_dict(dict(UNET3D_CARD, weights={"file": "m.safetensors"}, resources=resources))
    text = describe_model(card)
    assert "about 2.32 s per image on 2 CPU threads" in text and "RAM about 0.9 GB" in text
    assert "float16" not in text


def test_model_summary_shows_network_labels_licence_and_hardware_hint():
    from MedSegSuiteLib.slicer.logic import describe_model

    card = card_from_dict(
        dict(
            UNET3D_CARD,
            weights={"file": "m.safetensors"},
            resources={"ram_gb": 4, "vram_gb": 6, "cpu_seconds": 90, "gpu_seconds": 5, "device": "gpu"},
            metrics=[{"name": "dice", "value": 0.912, "split": "test"}],
        )
    )
    text = describe_model(card)
    for expected in (
        "unet (lite), 3D",
        "Labels: Ball",
        "Licence: CC0-1.0",
        "a GPU is recommended",
        "RAM about 4 GB",
        "GPU memory about 6 GB",
        "about 90 s on CPU, 5 s on GPU",
        "dice 0.912 (test)",
    ):
        assert expected in text, expected
