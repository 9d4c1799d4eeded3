"""DICOM SEG export from a synthetic CT series: references, frame of reference, codes, colours, voxels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import UNET3D_CARD, write_dicom_series
from scipy.spatial.transform import Rotation

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.export import export, import_labels
from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.io.label_table import write_label_table
from MedSegSuiteLib.io.seg_nrrd import write_seg_nrrd
from MedSegSuiteLib.io.segmentation import Segment, Segmentation
from MedSegSuiteLib.models.card import Label
from MedSegSuiteLib.volume import Grid, Volume

hd = pytest.importorskip("highdicom", reason="DICOM SEG needs highdicom")
pydicom = pytest.importorskip("pydicom")

SERIES_UID = "1.2.826.0.1.3680043.8.498.7"
FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.8.498.7.99"
TABLE = (
    Label(
        1,
        "Liver",
        (221, 130, 101),
        {
            "category": ["SCT", "123037004", "Anatomical Structure"],
            "type": ["SCT", "10200004", "Liver"],
            "region": ["SCT", "818981001", "Abdomen"],
            "region_modifier": ["SCT", "255503000", "Entire"],
        },
    ),
    Label(
        2,
        "Mass",
        (230, 60, 40),
        {
            "category": ["SCT", "49755003", "Morphologically Altered Structure"],
            "type": ["SCT", "4147007", "Mass"],
            "modifier": ["SCT", "24028007", "Right"],
        },
    ),
    Label(3, "Vessel", (0, 151, 206), None),
)


@pytest.fixture
def ct(tmp_path) -> tuple[Path, Volume, list]:
    """An oblique 6-slice CT series on disk (with a Frame of Reference UID), its volume and its file datasets."""
    rng = np.random.default_rng(3)
    direction = Rotation.from_euler("xz", (10, 25), degrees=True).as_matrix()
    volume = Volume((rng.random((6, 12, 10)) * 200 - 100).astype(np.int16), (0.7, 0.8, 2.0), (5, -3, 12), direction)
    folder = tmp_path / "series"
    files = write_dicom_series(volume, folder, SERIES_UID)
    datasets = []
    for path in files:
        dataset = pydicom.dcmread(path)
        dataset.FrameOfReferenceUID = FRAME_OF_REFERENCE
        # Converters do not always set this to the slice distance (GDCM writes 1 after a series was read);
        # the SEG must follow the slice positions instead.
        dataset.SpacingBetweenSlices = "1"
        dataset.save_as(path)
        datasets.append(dataset)
    return folder, volume, datasets


def seg_masks(shape):
    liver = np.zeros(shape, bool)
    liver[1:4, 2:8, 2:7] = True
    mass = np.zeros(shape, bool)
    mass[2:5, 6:10, 5:9] = True  # overlaps the liver
    return liver, mass


def test_dicom_seg_references_the_source_series_and_round_trips(ct, tmp_path):
    folder, volume, datasets = ct
    grid = read_image(folder).grid
    liver, mass = seg_masks(grid.shape)
    segments = [Segment(f"Segment_{t.value}", t.name, t.color, t.terminology, value=t.value) for t in TABLE]
    seg = Segmentation.from_masks(grid, [liver, mass, np.zeros(grid.shape, bool)], segments)
    source = write_seg_nrrd(seg, tmp_path / "in.seg.nrrd")
    out = export(source, tmp_path / "out.dcm", dicom_series=folder)[0]

    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
    assert ds.FrameOfReferenceUID == FRAME_OF_REFERENCE
    assert ds.StudyInstanceUID == datasets[0].StudyInstanceUID and ds.PatientID == "TEST001"
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == SERIES_UID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == {
        d.SOPInstanceUID for d in datasets
    }
    frame_sources = {
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in ds.PerFrameFunctionalGroupsSequence
    }
    assert frame_sources <= {d.SOPInstanceUID for d in datasets} and len(frame_sources) == 4  # empty slices omitted
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(2.0)  # the positions', not the sources' 1
    described = ds.SegmentSequence
    assert [item.SegmentLabel for item in described] == ["Liver", "Mass", "Vessel"]
    assert described[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "4147007"
    assert described[1].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == (
        "24028007"
    )
    assert described[0].AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeValue == "255503000"
    assert described[2].SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Tissue"  # no codes: Tissue
    assert described[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "MedSegSuite"

    parsed = hd.seg.segread(out)
    assert parsed.get_segment_description(2).segmented_property_category.value == "49755003"
    back = import_labels(out, TABLE, read_image(folder), overlap="first")
    assert np.array_equal(back.array == 1, liver) and np.array_equal(back.array == 2, mass & ~liver)

    from MedSegSuiteLib.io.dicom_seg import read_dicom_seg

    again = read_dicom_seg(out, reference=grid)
    alone = read_dicom_seg(out)  # no reference: the SEG's own frames (slices 1-4), placed by highdicom
    assert again.grid.same_as(grid) and alone.shape == (4,) + grid.shape[1:]
    np.testing.assert_allclose(alone.grid.direction[:, :2], grid.direction[:, :2], atol=1e-5)
    slices = [round(grid.physical_to_index(alone.grid.index_to_physical((0, 0, k)))[2], 3) for k in range(4)]
    assert sorted(slices) == [1, 2, 3, 4]
    for original, read, own in zip(seg.segments, again.segments, alone.segments):
        assert (read.name, read.color) == (original.name, original.color)
        assert read.terminology == (original.terminology or read.terminology)
        assert np.array_equal(again.mask(read), seg.mask(original))
        assert np.array_equal(alone.mask(own), seg.mask(original)[[int(k) for k in slices]])
    # A reference on the same voxels but another axis order (here i reversed) gets the voxels moved exactly.
    flipped_direction = grid.direction * np.array([-1.0, 1.0, 1.0])
    flipped = Grid(
        grid.shape, grid.spacing, tuple(grid.index_to_physical((grid.shape[2] - 1, 0, 0))), flipped_direction
    )
    moved = read_dicom_seg(out, reference=flipped)
    for original, read in zip(seg.segments, moved.segments):
        assert np.array_equal(moved.mask(read), seg.mask(original)[:, :, ::-1])


def test_dicom_seg_names_the_model_and_takes_labels_from_its_card(ct, tmp_path, home):
    folder, volume, _ = ct
    model_dir = home / "models" / "test-unet3d"
    model_dir.mkdir(parents=True)
    (model_dir / "card.json").write_text(json.dumps({**UNET3D_CARD, "weights": {"file": "model.safetensors"}}))
    labels = np.zeros(volume.shape, np.uint8)
    labels[1:5, 3:9, 2:8] = 1
    path = write_image(volume.with_array(labels), tmp_path / "labels.nii.gz")
    out = export(path, tmp_path / "model.dcm", dicom_series=folder, labels="test-unet3d")[0]
    segment = pydicom.dcmread(out).SegmentSequence[0]
    assert segment.SegmentLabel == "Ball" and segment.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "MedSegSuite test-unet3d" and algorithm.AlgorithmVersion == "1.0.0"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Mass"
    assert pydicom.dcmread(out).ManufacturerModelName == "test-unet3d"


def test_dicom_seg_refuses_other_grids_and_series_without_frame_of_reference(ct, tmp_path):
    folder, volume, _ = ct
    labels = np.zeros((6, 12, 10), np.uint8)
    labels[2, 3:6, 3:6] = 1
    other = write_image(Volume(labels, (0.7, 0.8, 2.0), (50, 0, 0)), tmp_path / "other.nrrd")
    with pytest.raises(InputError, match="grid differs.*--resample"):
        export(other, tmp_path / "x.dcm", dicom_series=folder)
    assert not (tmp_path / "x.dcm").exists()
    bare = tmp_path / "bare"
    for path in write_dicom_series(volume, bare, "1.2.826.0.1.3680043.8.498.8"):
        dataset = pydicom.dcmread(path)
        del dataset.FrameOfReferenceUID  # a series from a converter that left it out
        dataset.save_as(path)
    same = write_image(volume.with_array(labels), tmp_path / "same.nrrd")
    with pytest.raises(InputError, match="no Frame of Reference UID"):
        export(same, tmp_path / "y.dcm", dicom_series=bare)
    table = write_label_table(TABLE[:1], tmp_path / "t.json")
    out = export(same, tmp_path / "z.dcm", dicom_series=folder, labels=str(table))[0]
    assert pydicom.dcmread(out).SegmentSequence[0].SegmentLabel == "Liver"
