"""Exporting a segmentation node from the module logic: .seg.nrrd, label map + JSON table, DICOM SEG.

Files are read back with MedSegSuite's own readers: names, colours, terminology,
label values, voxels and geometry must match the node and its volume.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import UNET3D_CARD, write_dicom_series

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.export import read_segmentation
from MedSegSuiteLib.models.card import card_from_dict
from MedSegSuiteLib.volume import Volume

SERIES_UID = "1.2.826.0.1.3680043.8.498.11"


@pytest.fixture
def result(scene):
    """A volume on an oblique grid and a model-made segmentation with a Ball and an (overlap-free) Rim segment."""
    from MedSegSuiteLib.models.card import Label
    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node, write_labels
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    volume, ball = add_ball_volume("CT", shape=(10, 20, 18), radius=4.0)
    labels = ball.copy()
    labels[2, 1:4, 1:5] = 2
    card = card_from_dict(dict(UNET3D_CARD, weights={"file": "m"}))
    table = list(card.labels) + [Label(2, "Rim", (20, 120, 220), None)]
    node = create_segmentation_node(volume, name="Result")
    write_labels(node, labels, volume, table, model_tag="test-unet3d 1.0.0")
    return volume, node, labels, table


def _logic():
    from MedSegSuiteLib.slicer.logic import SegmentationLogic

    return SegmentationLogic()


def test_export_to_seg_nrrd_keeps_names_colours_terminology_and_geometry(result, tmp_path):
    from MedSegSuiteLib.slicer.volumes import grid_from_node

    volume, node, labels, table = result
    status = _logic().export(node, tmp_path / "out.seg.nrrd", reference_node=volume)
    assert status.state == "done" and status.message.startswith(f"Exported 'Result' to {tmp_path / 'out.seg.nrrd'}")
    back = read_segmentation(tmp_path / "out.seg.nrrd")
    assert back.grid.same_as(grid_from_node(volume), atol=1e-4)
    assert [(s.name, s.color) for s in back.segments] == [(label.name, tuple(label.color)) for label in table]
    assert back.segments[0].terminology["type"] == ["SCT", "4147007", "Mass"]
    assert back.segments[0].tags["MedSegSuite.model"] == "test-unet3d 1.0.0"
    for segment, label in zip(back.segments, table):
        assert np.array_equal(back.mask(segment), labels == label.value)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_export_to_a_label_map_writes_its_json_table_beside_it(result, tmp_path, suffix):
    from MedSegSuiteLib.io import read_image
    from MedSegSuiteLib.slicer.volumes import grid_from_node

    volume, node, labels, table = result
    target = tmp_path / f"case{suffix}"
    status = _logic().export(node, target, reference_node=volume)
    table_file = tmp_path / "case.labels.json"
    assert status.message.startswith(f"Exported 'Result' to {target} and {table_file}")
    image = read_image(target)
    assert image.grid.same_as(grid_from_node(volume), atol=1e-4)
    assert np.array_equal(image.array, labels)
    entries = json.loads(table_file.read_text(encoding="utf-8"))["labels"]
    assert [(e["value"], e["name"], e["color"]) for e in entries] == [
        (1, "Ball", [230, 60, 40]),
        (2, "Rim", [20, 120, 220]),
    ]
    back = read_segmentation(target)
    assert [(s.name, s.color, s.export_value) for s in back.segments] == [
        ("Ball", (230, 60, 40), 1),
        ("Rim", (20, 120, 220), 2),
    ]


def test_export_refuses_to_replace_files_unless_asked_and_names_the_reason(result, tmp_path):
    volume, node, _, _ = result
    logic = _logic()
    target = tmp_path / "out.seg.nrrd"
    logic.export(node, target, reference_node=volume)
    with pytest.raises(InputError, match="already exists; tick 'Replace existing files' to replace it"):
        logic.export(node, target, reference_node=volume)
    assert logic.export(node, target, reference_node=volume, overwrite=True).state == "done"
    with pytest.raises(InputError, match="choose a file name ending in .seg.nrrd, .nii.gz, .nrrd or .dcm"):
        logic.export(node, tmp_path / "out.png", reference_node=volume)
    with pytest.raises(InputError, match="choose the segmentation to export"):
        logic.export(None, target)
    with pytest.raises(InputError, match="was not loaded from DICOM"):
        logic.export(node, tmp_path / "out.dcm", reference_node=volume)
    assert not (tmp_path / "out.dcm").exists()


def test_a_segmentation_on_another_grid_is_exported_on_the_volume_grid(result, scene, tmp_path):
    import slicer

    from MedSegSuiteLib.io import read_image
    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node
    from MedSegSuiteLib.slicer.volumes import grid_from_node

    volume, _, labels, _ = result
    painted = create_segmentation_node(volume, name="Painted")  # no reference geometry: Slicer picks its own
    segment_id = painted.GetSegmentation().AddEmptySegment("Ball", "Ball", [1.0, 0.0, 0.0])
    slicer.util.updateSegmentBinaryLabelmapFromArray((labels == 1).astype(np.uint8), painted, segment_id, volume)
    _logic().export(painted, tmp_path / "painted.nii.gz", reference_node=volume)
    image = read_image(tmp_path / "painted.nii.gz")
    assert image.grid.same_as(grid_from_node(volume), atol=1e-4)
    assert np.array_equal(image.array, (labels == 1).astype(np.uint8))


def test_dicom_seg_needs_a_dicom_volume_and_references_its_series(scene, tmp_path, monkeypatch):
    pytest.importorskip("highdicom", reason="DICOM SEG needs highdicom")
    import pydicom
    import slicer

    from MedSegSuiteLib.io import read_image
    from MedSegSuiteLib.io.dicom_seg import read_dicom_seg
    from MedSegSuiteLib.slicer.exporting import dicom_unavailable_reason
    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node, write_labels
    from MedSegSuiteLib.slicer.volumes import add_volume_node

    rng = np.random.default_rng(5)
    ct = Volume((rng.random((5, 12, 10)) * 200).astype(np.int16), (0.7, 0.8, 2.0), (5.0, -3.0, 12.0))
    files = write_dicom_series(ct, tmp_path / "series", SERIES_UID)
    volume = add_volume_node(read_image(tmp_path / "series"), "CT")
    labels = np.zeros(ct.shape, np.uint8)
    labels[1:4, 3:8, 2:6] = 1
    node = create_segmentation_node(volume, name="Result")
    write_labels(node, labels, volume, card_from_dict(dict(UNET3D_CARD, weights={"file": "m"})).labels)

    assert "was not loaded from DICOM" in dicom_unavailable_reason(volume)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    assert "not in the DICOM database" in dicom_unavailable_reason(volume)
    by_uid = dict(zip(uids, map(str, files)))
    monkeypatch.setattr(slicer, "dicomDatabase", SimpleNamespace(fileForInstance=by_uid.get), raising=False)
    assert dicom_unavailable_reason(volume) == ""

    logic = _logic()
    logic.export(node, tmp_path / "from-database.dcm", reference_node=volume)
    logic.export(node, tmp_path / "from-folder.dcm", reference_node=volume, dicom_folder=tmp_path / "series")
    for name in ("from-database.dcm", "from-folder.dcm"):
        dataset = pydicom.dcmread(tmp_path / name)
        assert dataset.Modality == "SEG"
        assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID
        back = read_dicom_seg(tmp_path / name, reference=read_image(tmp_path / "series").grid)
        assert [s.name for s in back.segments] == ["Ball"]
        assert np.array_equal(back.mask(back.segments[0]), labels == 1)


def test_overlapping_segments_go_to_seg_nrrd_but_not_to_a_label_map(scene, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_ball_volume, add_painted_segmentation

    volume, ball = add_ball_volume("CT", shape=(8, 16, 16), radius=4.0, study=None)
    box = np.zeros_like(ball)
    box[3:5, 6:10, 6:10] = 1  # inside the ball
    node = add_painted_segmentation(volume, {"Ball": (ball, (200, 0, 0)), "Box": (box, (0, 0, 200))})
    logic = _logic()
    logic.export(node, tmp_path / "both.seg.nrrd", reference_node=volume)
    back = read_segmentation(tmp_path / "both.seg.nrrd")
    assert [int(back.mask(s).sum()) for s in back.segments] == [int(ball.sum()), int(box.sum())]
    with pytest.raises(InputError, match="segments overlap .* or remove the overlap in Segment Editor"):
        logic.export(node, tmp_path / "both.nii.gz", reference_node=volume)
    assert not (tmp_path / "both.nii.gz").exists() and not (tmp_path / "both.labels.json").exists()
