"""Label maps -> segmentation nodes: names, colours, terminology, tags, geometry, hierarchy, display; on real MRML."""

from __future__ import annotations

import numpy as np
import pytest
import vtk
from slicer_harness.fixtures import slicer_api  # noqa: F401 - a fixture

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.models.card import Label

LABELS = (
    Label(
        1,
        "Liver",
        (221, 130, 101),
        {
            "category": ["SCT", "123037004", "Anatomical Structure"],
            "type": ["SCT", "10200004", "Liver"],
        },
    ),
    Label(
        2,
        "Tumour",
        (240, 20, 20),
        {
            "category": ["SCT", "49755003", "Morphologically Altered Structure"],
            "type": ["SCT", "108369006", "Neoplasm"],
            "region": ["SCT", "10200004", "Liver"],
        },
    ),
    Label(3, "Vessel", (0, 151, 206)),
)


@pytest.fixture
def ball(scene):
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    node, mask = add_ball_volume("Ball", shape=(12, 20, 16), radius=4.0)
    labels = mask.astype(np.uint8)
    labels[0:2, 0:3, 0:4] = 2
    return node, labels


def test_terminology_strings_follow_slicers_seven_field_format():
    from MedSegSuiteLib.io.label_table import terminology_string

    assert terminology_string(LABELS[0].terminology) == (
        "Segmentation category and type - DICOM master list"
        "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
        "~Anatomic codes - DICOM master list~^^~^^"
    )
    assert terminology_string(LABELS[1].terminology).split("~")[5] == "SCT^10200004^Liver"
    assert terminology_string(None) == ""


@pytest.mark.usefixtures("slicer_api")
def test_labels_become_named_coloured_coded_segments_on_the_input_geometry(ball, scene):
    from MedSegSuiteLib.slicer.segmentations import (
        TAG_LABEL_VALUE,
        TAG_MODEL,
        create_segmentation_node,
        geometry_matches,
        segment_terminology,
        write_labels,
    )
    from MedSegSuiteLib.slicer.testing import segment_array

    volume, labels = ball
    node = create_segmentation_node(volume)
    assert node.GetName() == "Ball segmentation"
    ids = write_labels(node, labels, volume, LABELS, model_tag="liver-dnet 1.2.0")
    segmentation = node.GetSegmentation()
    assert ids == ["Liver", "Tumour", "Vessel"] and segmentation.GetNumberOfSegments() == 3
    for label in LABELS:
        segment = segmentation.GetSegment(label.name)
        assert segment.GetName() == label.name
        assert [round(c * 255) for c in segment.GetColor()] == list(label.color)
        assert np.array_equal(segment_array(node, label.name, volume), labels == label.value)
        tag = vtk.reference("")
        assert segment.GetTag(TAG_MODEL, tag) and tag.get() == "liver-dnet 1.2.0"
        assert segment.GetTag(TAG_LABEL_VALUE, tag) and tag.get() == str(label.value)
    terms = {name: segment_terminology(segmentation.GetSegment(name)) for name in ("Liver", "Tumour", "Vessel")}
    assert "SCT^108369006^Neoplasm" in terms["Tumour"] and terms["Vessel"] != terms["Liver"]
    assert node.GetAttribute(TAG_MODEL) == "liver-dnet 1.2.0"
    assert geometry_matches(node, volume)
    display = node.GetDisplayNode()
    assert display is not None and display.GetVisibility() and display.GetVisibility2D()


@pytest.mark.usefixtures("slicer_api")
def test_terminology_and_names_survive_a_seg_nrrd_round_trip(ball, scene, tmp_path):
    import slicer

    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node, segment_terminology, write_labels

    volume, labels = ball
    node = create_segmentation_node(volume)
    write_labels(node, labels, volume, LABELS)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "result.seg.nrrd"))
    assert storage.WriteData(node)
    loaded = slicer.modules.segmentations.logic().LoadSegmentationFromFile(str(tmp_path / "result.seg.nrrd"), False)
    segment = loaded.GetSegmentation().GetSegment(loaded.GetSegmentation().GetSegmentIdBySegmentName("Tumour"))
    assert "SCT^108369006^Neoplasm" in segment_terminology(segment)


def test_a_rerun_replaces_the_content_and_touches_no_other_node(ball, scene):
    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node, write_labels
    from MedSegSuiteLib.slicer.testing import segment_array

    volume, labels = ball
    other = create_segmentation_node(volume, name="Manual")
    other.GetSegmentation().AddEmptySegment("mine", "Mine", [0.1, 0.2, 0.3])
    node = create_segmentation_node(volume)
    node.GetSegmentation().AddEmptySegment("old", "Old edit", [1, 1, 1])
    write_labels(node, labels, volume, LABELS)
    nodes_before = scene.GetNumberOfNodes()
    write_labels(node, (labels == 1).astype(np.uint8) * 3, volume, LABELS)
    assert scene.GetNumberOfNodes() == nodes_before
    assert node.GetSegmentation().GetSegmentIdBySegmentName("Old edit") == ""
    assert segment_array(node, "Liver", volume).sum() == 0
    assert np.array_equal(segment_array(node, "Vessel", volume), labels == 1)
    assert other.GetSegmentation().GetNumberOfSegments() == 1 and other.GetSegmentation().GetSegment("mine")


def test_a_result_of_the_wrong_shape_is_refused_before_anything_changes(ball, scene):
    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node, write_labels

    volume, labels = ball
    node = create_segmentation_node(volume)
    write_labels(node, labels, volume, LABELS)
    with pytest.raises(InputError, match="does not match volume"):
        write_labels(node, labels[:-1], volume, LABELS)
    assert node.GetSegmentation().GetNumberOfSegments() == 3


def test_result_follows_the_input_transform_and_sits_in_its_study(ball, scene):
    import slicer

    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node, place_next_to, write_labels

    volume, labels = ball
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    node = create_segmentation_node(volume)
    write_labels(node, labels, volume, LABELS)
    assert node.GetTransformNodeID() == transform.GetID()
    assert place_next_to(node, volume)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.GetItemParent(sh.GetItemByDataNode(volume))
    assert sh.GetItemLevel(study) == "Study"
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study


def test_a_volume_outside_any_study_leaves_the_hierarchy_alone(scene):
    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node, place_next_to
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    volume, _ = add_ball_volume("Loose", shape=(4, 6, 6), radius=2.0, study=None)
    assert not place_next_to(create_segmentation_node(volume), volume)
