"""Volumes under a translated and rotated linear transform: Segment, Refine with keep-my-edits, Finetune label
extraction and Export give the same voxels as without the transform (real MRML, fake worker).

A result follows its volume: the segmentation gets the volume's parent transform. Voxels are compared on the
volume's own grid, and checked independently with Slicer's transform-aware
``slicer.util.arrayFromSegmentBinaryLabelmap`` / ``updateSegmentBinaryLabelmapFromArray``. Before the module
named the coordinate frame explicitly, ``GetSegmentBinaryLabelmapRepresentation`` returned world
coordinates by default and every step here read shifted, rotated voxels.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HIDIFF_CARD, UNET3D_CARD
from slicer_harness.fake_worker import fake_logic, wait_idle
from slicer_harness.fixtures import slicer_api  # noqa: F401 - a fixture

from MedSegSuiteLib.models.card import card_from_dict
from MedSegSuiteLib.models.registry import ModelEntry


def _moved(scene, volume):
    """Put ``volume`` under a transform that rotates by 35 degrees about an oblique axis and shifts by centimetres."""
    import vtk

    transform = vtk.vtkTransform()
    transform.Translate(31.0, -17.5, 12.25)
    transform.RotateWXYZ(35.0, 0.3, -1.0, 0.6)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Moved")
    node.SetMatrixTransformToParent(transform.GetMatrix())
    volume.SetAndObserveTransformNodeID(node.GetID())
    return node


def _slicer_array(segmentation, name, volume):
    """The segment on the volume's grid as Slicer itself exports it (through both nodes' transforms)."""
    import slicer

    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume).astype(bool)


def _mask(segmentation, name, volume):
    from MedSegSuiteLib.slicer.segmentations import segment_mask

    return segment_mask(segmentation, segmentation.GetSegmentation().GetSegmentIdBySegmentName(name), volume)


@pytest.fixture
def segmenter(tmp_path):
    return ModelEntry(card_from_dict(dict(UNET3D_CARD, weights={"file": "model.safetensors"})), tmp_path, "user")


def _segment(scene, volume, entry, tmp_path):
    tmp_path.mkdir()
    logic, _ = fake_logic(tmp_path)
    logic.start(volume, entry)
    status = wait_idle(logic)
    logic.shutdown()
    assert status.state == "done", status.message
    return scene.GetNodeByID(status.output_node_id)


@pytest.mark.usefixtures("slicer_api")
def test_segment_results_follow_a_moved_volume_voxel_for_voxel(scene, segmenter, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    plain, ball = add_ball_volume("Plain", shape=(12, 24, 24), radius=5.0)
    expected = _mask(_segment(scene, plain, segmenter, tmp_path / "a"), "Ball", plain)
    assert expected.sum() > 100 and (expected == ball.astype(bool)).mean() > 0.97

    moved, _ = add_ball_volume("Moved", shape=(12, 24, 24), radius=5.0)
    transform = _moved(scene, moved)
    segmentation = _segment(scene, moved, segmenter, tmp_path / "b")
    assert segmentation.GetTransformNodeID() == transform.GetID()  # the result follows its volume
    assert np.array_equal(_mask(segmentation, "Ball", moved), expected)
    assert np.array_equal(_slicer_array(segmentation, "Ball", moved), expected)


def _keep_edits_run(scene, volume, tmp_path):
    """Segment, paint and erase a few voxels (with Slicer's own function), refine keeping the edits; returns
    ``(edited mask, refined mask, keep mask sent)``."""
    import slicer

    from MedSegSuiteLib.io import read_image

    tmp_path.mkdir()
    entry = ModelEntry(card_from_dict(HIDIFF_CARD), tmp_path, "user")
    logic, factory = fake_logic(tmp_path)
    logic.start(volume, entry)  # the fake labels voxels brighter than its threshold as Disc: an AI result
    status = wait_idle(logic)
    assert status.state == "done", status.message
    segmentation = scene.GetNodeByID(status.output_node_id)
    ai = _mask(segmentation, "Disc", volume)
    edited = ai.copy()
    edited[1, 2:5, 2:5] = True
    edited[0][tuple(np.argwhere(ai[0])[:4].T)] = False
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Disc")
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), segmentation, segment_id, volume)
    assert np.array_equal(_mask(segmentation, "Disc", volume), edited)
    logic.start_refine(segmentation, volume, entry, steps=2, keep_edits=True)
    keep = read_image(factory.last.received[-1]["params"]["keep"]).array.astype(bool)
    status = wait_idle(logic)
    assert status.state == "done", status.message
    logic.shutdown()
    refined = _mask(segmentation, "Disc", volume)
    assert np.array_equal(_slicer_array(segmentation, "Disc", volume), refined)
    return edited, refined, keep, ai


def test_refine_keeps_my_edits_on_a_moved_volume_exactly_as_on_a_plain_one(scene, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    plain, _ = add_disc_stack_volume("Plain")
    expected = _keep_edits_run(scene, plain, tmp_path / "a")
    moved, _ = add_disc_stack_volume("Moved")
    _moved(scene, moved)
    found = _keep_edits_run(scene, moved, tmp_path / "b")
    for name, a, b in zip(("edited", "refined", "keep", "ai"), expected, found):
        assert np.array_equal(a, b), name
    edited, refined, keep, ai = found
    assert np.array_equal(keep, edited != ai) and np.array_equal(refined[keep], edited[keep])
    assert not np.array_equal(refined, edited)


def _painted(scene, volume, mask, transform_id):
    """A segmentation of ``mask`` on ``volume``'s voxels, under ``transform_id`` (None: world coordinates).

    Painted with Slicer's ``updateSegmentBinaryLabelmapFromArray`` when the segmentation shares the volume's
    frame; across frames (that function leaves such a segment empty in slicer-core 5.13) with the module's
    ``set_segment_mask``, checked by Slicer's own transform-aware reader.
    """
    import slicer

    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node, same_frame, set_segment_mask

    node = create_segmentation_node(volume, name="Painted")
    node.SetAndObserveTransformNodeID(transform_id)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = node.GetSegmentation().AddEmptySegment("Ball", "Ball", [0.9, 0.2, 0.1])
    if same_frame(node, volume):
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segment_id, volume)
    else:
        set_segment_mask(node, segment_id, mask.astype(bool), volume)
    assert np.array_equal(_slicer_array(node, "Ball", volume), mask.astype(bool))
    return node


def test_finetune_labels_of_a_moved_volume_are_its_own_voxels(scene):
    from MedSegSuiteLib.slicer.finetuning import case_geometry, parent_label_map
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    card = card_from_dict(dict(UNET3D_CARD, weights={"file": "model.safetensors"}))
    volume, ball = add_ball_volume("Moved", shape=(10, 20, 20), radius=4.0, study=None)
    expected = parent_label_map(_painted(scene, volume, ball, None), volume, card)
    assert np.array_equal(expected, ball)
    transform = _moved(scene, volume)
    for transform_id in (transform.GetID(), None):  # following the volume, or left in world coordinates
        segmentation = _painted(scene, volume, ball, transform_id)
        assert case_geometry(segmentation, volume) == ""  # not "another region"
        assert np.array_equal(parent_label_map(segmentation, volume, card), expected), transform_id


@pytest.mark.parametrize("suffix", [".seg.nrrd", ".nii.gz"])
def test_export_onto_a_moved_volume_writes_its_own_grid_and_voxels(scene, tmp_path, suffix):
    from MedSegSuiteLib.export import read_segmentation
    from MedSegSuiteLib.slicer.exporting import export_segmentation
    from MedSegSuiteLib.slicer.testing import add_ball_volume
    from MedSegSuiteLib.slicer.volumes import grid_from_node

    volume, ball = add_ball_volume("Moved", shape=(10, 20, 20), radius=4.0, study=None)
    plain = export_segmentation(_painted(scene, volume, ball, None), tmp_path / f"plain{suffix}", volume)[0]
    transform = _moved(scene, volume)
    for n, transform_id in enumerate((transform.GetID(), None)):
        written = export_segmentation(_painted(scene, volume, ball, transform_id), tmp_path / f"m{n}{suffix}", volume)
        back, before = read_segmentation(written[0]), read_segmentation(plain)
        assert back.grid.same_as(grid_from_node(volume), atol=1e-4) and back.grid.same_as(before.grid, atol=1e-4)
        assert np.array_equal(back.mask(back.segments[0]), ball.astype(bool)), transform_id
