"""Export formats: terminology strings, JSON label tables, .seg.nrrd and label-map round trips, overlaps, grids."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.export import export, import_labels, read_segmentation, table_path_for
from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.io.label_table import (
    labels_from_json,
    parse_terminology,
    read_label_table,
    terminology_string,
    write_label_table,
)
from MedSegSuiteLib.io.seg_nrrd import read_seg_nrrd, write_seg_nrrd
from MedSegSuiteLib.io.segmentation import Segment, Segmentation, match_labels
from MedSegSuiteLib.models.card import Label
from MedSegSuiteLib.volume import Grid, Volume

LIVER = {
    "category": ["SCT", "123037004", "Anatomical Structure"],
    "type": ["SCT", "10200004", "Liver"],
}
TUMOR = {
    "category": ["SCT", "49755003", "Morphologically Altered Structure"],
    "type": ["SCT", "4147007", "Mass"],
    "modifier": ["SCT", "7771000", "Left"],
    "region": ["SCT", "818981001", "Abdomen"],
    "region_modifier": ["SCT", "255503000", "Entire"],
}
TABLE = (
    Label(1, "Liver", (221, 130, 101), LIVER),
    Label(2, "Tumor", (230, 60, 40), TUMOR),
    Label(3, "Vessel", (0, 151, 206), None),
)


def oblique_grid(shape=(7, 9, 8)) -> Grid:
    direction = Rotation.from_euler("xyz", (20, -15, 30), degrees=True).as_matrix()
    return Grid(shape, (0.8, 0.9, 2.5), (-10.5, 20.25, 30.0), direction)


def label_array(shape=(7, 9, 8)) -> np.ndarray:
    array = np.zeros(shape, np.uint8)
    array[1:5, 2:7, 1:6] = 1
    array[2:4, 3:5, 2:4] = 2
    array[5:7, 0:3, 5:8] = 3
    return array


def overlapping(grid: Grid) -> Segmentation:
    liver = np.zeros(grid.shape, bool)
    liver[1:5, 2:7, 1:6] = True
    tumor = np.zeros(grid.shape, bool)
    tumor[3:6, 5:9, 4:8] = True  # overlaps the liver
    segments = [
        Segment("liver", "Liver", (221, 130, 101), LIVER, value=1),
        Segment("tumor", "Tumor", (230, 60, 40), TUMOR, value=2, tags={"MedSegSuite.model": "demo"}),
        Segment("empty", "Empty", (10, 20, 30), None, value=3),
    ]
    return Segmentation.from_masks(grid, [liver, tumor, np.zeros(grid.shape, bool)], segments)


def assert_same_grid(a: Grid, b: Grid, atol: float = 1e-5) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=atol)


# -- terminology and label tables ---------------------------------------------------------
def test_terminology_string_has_slicers_seven_fields_and_parses_back():
    text = terminology_string(TABLE[1])
    assert text == (
        "Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered Structure"
        "~SCT^4147007^Mass~SCT^7771000^Left~Anatomic codes - DICOM master list~SCT^818981001^Abdomen"
        "~SCT^255503000^Entire"
    )
    assert parse_terminology(text) == TUMOR
    assert parse_terminology(terminology_string(LIVER)) == LIVER
    assert terminology_string(TABLE[2]) == "" and parse_terminology("") == {}
    slicer_default = (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~SCT^85756007^Tissue"
        "~^^~Anatomic codes - DICOM master list~^^~^^"
    )
    parsed = parse_terminology(slicer_default)
    assert parsed["type"] == ["SCT", "85756007", "Tissue"] and "modifier" not in parsed
    assert terminology_string(parsed) == slicer_default  # non-default context names survive
    with pytest.raises(InputError, match="7"):
        parse_terminology("SCT^1^A~SCT^2^B")


def test_label_table_json_round_trip_and_validation(tmp_path):
    path = write_label_table(TABLE, tmp_path / "t.labels.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "medsegsuite-label-table" and data["labels"][1]["terminology_string"].count("~") == 6
    assert read_label_table(path) == TABLE
    with pytest.raises(InputError, match="already exists"):
        write_label_table(TABLE, path)
    assert labels_from_json([{"value": 4, "name": "X", "color": [1, 2, 3]}])[0] == Label(4, "X", (1, 2, 3), None)
    for bad, message in [
        ([{"value": 0, "name": "X", "color": [1, 2, 3]}], "1-65535"),
        ([{"value": 1, "name": "X", "color": [1, 2, 300]}], "0-255"),
        ([{"value": 1, "name": "X"}, {"value": 1, "name": "Y"}], "twice"),
        ([{"value": 1, "name": "X", "terminology": {"type": ["SCT", "1"]}}], "terminology"),
    ]:
        with pytest.raises(InputError, match=message):
            labels_from_json(bad)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        read_label_table(tmp_path / "bad.json")


def test_labels_match_by_name_then_type_code_then_value_of_unnamed_segments():
    card = (
        Label(1, "Liver", (1, 1, 1), LIVER),
        Label(2, "Lesion", (2, 2, 2), {"category": TUMOR["category"], "type": TUMOR["type"]}),
        Label(3, "Vessel", (3, 3, 3)),
        Label(4, "Kidney", (4, 4, 4)),
    )
    segments = [
        Segment("a", "LIVER ", value=7),  # name, case-insensitive
        Segment("b", "Tumour", terminology=TUMOR, value=1),  # type code
        Segment("c", "Segment_3", value=3),  # generated name: value
    ]
    matches = match_labels(segments, card)
    assert [(m.label.value, m.how) for m in matches] == [(1, "name"), (2, "type code"), (3, "value")]
    with pytest.raises(
        InputError, match=r"segment\(s\) 'Spleen' and label value\(s\) 9 match .*1:Liver, 2:Lesion, 3:Vessel, 4:Kidney"
    ):
        match_labels([Segment("s", "Spleen", value=4), Segment("n", "Segment_9", value=9)], card)
    assert match_labels([Segment("s", "Spleen", value=4)], card, by_value="always")[0].label.name == "Kidney"
    with pytest.raises(InputError, match="both match"):
        match_labels([Segment("a", "liver"), Segment("b", "Liver", value=2)], card)


# -- seg.nrrd --------------------------------------------------------------------------------
def test_seg_nrrd_round_trip_keeps_layers_overlaps_codes_and_oblique_geometry(tmp_path):
    grid = oblique_grid()
    seg = overlapping(grid)
    assert seg.layers.shape[0] == 2 and seg.overlaps()[0][:2] == ("Liver", "Tumor")
    path = write_seg_nrrd(seg, tmp_path / "x.seg.nrrd")
    back = read_seg_nrrd(path)
    assert_same_grid(back.grid, grid, atol=1e-9)
    assert np.array_equal(back.layers, seg.layers)
    for a, b in zip(seg.segments, back.segments):
        assert (a.id, a.name, a.color, a.terminology, a.layer, a.value) == (b.id, b.name, b.color, b.terminology,
                                                                             b.layer, b.value)  # fmt: skip
        assert np.array_equal(seg.mask(a), back.mask(b))
    assert back.segments[1].tags == {"MedSegSuite.model": "demo"}


def test_seg_nrrd_header_is_the_layout_slicer_writes(tmp_path):
    path = write_seg_nrrd(overlapping(oblique_grid()), tmp_path / "x.seg.nrrd", compress=False)
    header = path.read_bytes().split(b"\n\n")[0].decode().splitlines()
    fields = dict(line.split(": ", 1) for line in header[1:] if ": " in line and ":=" not in line)
    keys = dict(line.split(":=", 1) for line in header if ":=" in line)
    assert fields["dimension"] == "4" and fields["sizes"] == "2 8 9 7"
    assert fields["kinds"] == "list domain domain domain"
    assert fields["space"] == "left-posterior-superior" and fields["space directions"].startswith("none (")
    assert fields["type"] == "unsigned char" and fields["encoding"] == "raw"
    expected = {"Color", "ColorAutoGenerated", "Extent", "ID", "LabelValue", "Layer", "Name", "NameAutoGenerated"}
    expected.add("Tags")
    assert {k.split("_", 1)[1] for k in keys if k.startswith("Segment1_")} == expected
    assert keys["Segment1_Layer"] == "1" and keys["Segment1_Extent"] == "0 7 0 8 0 6"
    assert keys["Segment1_Tags"].startswith("MedSegSuite.labelValue:2|MedSegSuite.model:demo|TerminologyEntry:")
    assert keys["Segment1_Tags"].endswith("~SCT^255503000^Entire|")
    assert keys["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert keys["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert keys["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    assert "Reference image geometry|" in keys["Segmentation_ConversionParameters"]
    assert list(keys) == sorted(keys)
    one = write_seg_nrrd(Segmentation.from_label_map(Volume(label_array())), tmp_path / "one.seg.nrrd")
    with open(one, "rb") as handle:
        text = handle.read(4096).split(b"\n\n")[0].decode()
    assert "dimension: 3" in text and "kinds: domain domain domain" in text and "encoding: gzip" in text


def test_seg_nrrd_reader_refuses_broken_files(tmp_path):
    path = write_seg_nrrd(overlapping(oblique_grid()), tmp_path / "x.seg.nrrd")
    blob = path.read_bytes()
    (tmp_path / "cut.seg.nrrd").write_bytes(blob[: len(blob) - 40])
    with pytest.raises(InputError, match="truncated|corrupt"):
        read_seg_nrrd(tmp_path / "cut.seg.nrrd")
    write_image(Volume(np.zeros((2, 3, 4), np.uint8)), tmp_path / "plain.nrrd")
    (tmp_path / "plain.seg.nrrd").write_bytes((tmp_path / "plain.nrrd").read_bytes())
    with pytest.raises(InputError, match="not a Slicer segmentation"):
        read_seg_nrrd(tmp_path / "plain.seg.nrrd")
    with gzip.open(tmp_path / "junk.seg.nrrd", "wb") as handle:
        handle.write(b"junk")
    with pytest.raises(InputError, match="not a NRRD"):
        read_seg_nrrd(tmp_path / "junk.seg.nrrd")


# -- label maps ------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_label_map_round_trip_through_every_format(tmp_path, suffix):
    grid = oblique_grid()
    labels = write_image(Volume.on_grid(label_array(), grid), tmp_path / "in.nrrd")
    reference = write_image(Volume.on_grid(np.zeros(grid.shape, np.int16), grid), tmp_path / "ct.nii.gz")
    seg_path = export(labels, tmp_path / "x.seg.nrrd", reference=reference, labels=list(TABLE))[0]
    written = export(seg_path, tmp_path / f"out{suffix}", reference=reference)
    assert written == [tmp_path / f"out{suffix}", tmp_path / "out.labels.json"]
    back = read_image(written[0])
    assert_same_grid(back.grid, grid, atol=1e-4)
    assert np.array_equal(back.array, label_array())
    assert read_label_table(written[1]) == TABLE
    again = read_segmentation(written[0])  # picks up the table beside it
    assert [(s.name, s.color, s.terminology) for s in again.segments] == [
        (t.name, t.color, t.terminology) for t in TABLE
    ]


def test_label_map_without_table_names_segments_from_values(tmp_path):
    path = write_image(Volume(label_array()), tmp_path / "in.nii.gz")
    seg = read_seg_nrrd(export(path, tmp_path / "x.seg.nrrd")[0])
    assert [s.name for s in seg.segments] == ["Segment_1", "Segment_2", "Segment_3"]
    assert all(s.name_auto and s.color_auto for s in seg.segments)
    with pytest.raises(InputError, match=r"value\(s\) 3 that its label table does not list"):
        export(path, tmp_path / "y.seg.nrrd", labels=list(TABLE[:2]))


def test_overlapping_segments_are_refused_or_layered_in_label_maps(tmp_path):
    seg = overlapping(oblique_grid())
    path = write_seg_nrrd(seg, tmp_path / "x.seg.nrrd")
    with pytest.raises(InputError, match=r"'Liver' and 'Tumor' share \d+ voxels.*--overlap first\|last"):
        export(path, tmp_path / "refused.nii.gz")
    assert not (tmp_path / "refused.nii.gz").exists() and not (tmp_path / "refused.labels.json").exists()
    liver, tumor = seg.mask("liver"), seg.mask("tumor")
    first = read_image(export(path, tmp_path / "first.nrrd", overlap="first")[0]).array
    last = read_image(export(path, tmp_path / "last.nrrd", overlap="last")[0]).array
    assert np.all(first[liver] == 1) and np.all(first[tumor & ~liver] == 2)
    assert np.all(last[tumor] == 2) and np.all(last[liver & ~tumor] == 1)
    assert read_label_table(tmp_path / "last.labels.json")[1].name == "Tumor"


def test_grid_mismatch_is_refused_unless_resampling_the_same_region(tmp_path):
    grid = oblique_grid((8, 10, 12))
    reference = write_image(Volume.on_grid(np.zeros(grid.shape, np.int16), grid), tmp_path / "ct.nrrd")
    fine = Grid((16, 20, 24), tuple(s / 2 for s in grid.spacing), tuple(grid.index_to_physical((-0.25,) * 3)),
                grid.direction)  # fmt: skip
    coarse = np.zeros(grid.shape, np.uint8)
    coarse[2:6, 3:7, 4:9] = 1
    fine_labels = np.repeat(np.repeat(np.repeat(coarse, 2, 0), 2, 1), 2, 2)
    labels = write_image(Volume.on_grid(fine_labels, fine), tmp_path / "fine.nii.gz")
    with pytest.raises(InputError, match=r"grid differs.*shape \(z,y,x\)=\(16, 20, 24\).*\(8, 10, 12\).*--resample"):
        export(labels, tmp_path / "out.seg.nrrd", reference=reference)
    out = export(labels, tmp_path / "out.seg.nrrd", reference=reference, resample=True)[0]
    back = read_seg_nrrd(out)
    assert_same_grid(back.grid, grid, atol=1e-4)
    assert np.array_equal(back.layers[0], coarse)
    shifted = Grid(grid.shape, grid.spacing, tuple(np.asarray(grid.origin) + 30.0), grid.direction)
    moved = write_image(Volume.on_grid(coarse, shifted), tmp_path / "moved.nii.gz")
    with pytest.raises(InputError, match="does not cover the same region"):
        export(moved, tmp_path / "moved.seg.nrrd", reference=reference, resample=True)


def test_two_d_rgb_image_segmentation_round_trips(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    mask = np.zeros((1, 20, 24), np.uint8)
    mask[0, 4:12, 5:15] = 1
    mask[0, 14:18, 2:6] = 2
    image = read_image(tmp_path / "photo.png")
    assert image.channels == 3 and image.is_2d
    labels = write_image(Volume.on_grid(mask, image.grid), tmp_path / "mask.nrrd")
    table = write_label_table(TABLE[:2], tmp_path / "table.json")
    seg_path = export(labels, tmp_path / "photo.seg.nrrd", reference=tmp_path / "photo.png", labels=str(table))[0]
    seg = read_seg_nrrd(seg_path)
    assert seg.shape == (1, 20, 24) and [s.name for s in seg.segments] == ["Liver", "Tumor"]
    for suffix in (".nii.gz", ".nrrd"):
        out = export(seg_path, tmp_path / f"back{suffix[:4]}{suffix}", reference=tmp_path / "photo.png")[0]
        assert np.array_equal(read_image(out).array, mask)
        assert read_label_table(table_path_for(out)) == TABLE[:2]
    card = (Label(5, "tumor", (1, 2, 3)), Label(6, "liver", (4, 5, 6)))
    imported = import_labels(seg_path, card, image)
    assert imported.grid.same_as(image.grid) and set(np.unique(imported.array)) == {0, 5, 6}
    assert np.array_equal(imported.array == 6, mask == 1)


def test_import_labels_matches_names_and_refuses_unknown_segments_before_resampling(tmp_path):
    grid = oblique_grid()
    volume = Volume.on_grid(np.zeros(grid.shape, np.int16), grid)
    seg_path = write_seg_nrrd(overlapping(grid), tmp_path / "x.seg.nrrd")
    card = (Label(1, "Tumor", (1, 1, 1)), Label(2, "Empty", (2, 2, 2)), Label(3, "Liver", (3, 3, 3), LIVER))
    out = import_labels(seg_path, card, volume, overlap="last")
    assert out.grid.same_as(grid) and np.array_equal(out.array == 1, overlapping(grid).mask("tumor"))
    with pytest.raises(InputError, match=r"'Empty' match no label of the model \(1:Tumor, 3:Liver\)"):
        import_labels(seg_path, (card[0], card[2]), Grid((2, 2, 2)))  # matching fails before the grid check
    unnamed = write_image(Volume.on_grid(label_array(), grid), tmp_path / "plain.nii.gz")
    by_value = import_labels(unnamed, card, volume)
    assert np.array_equal(by_value.array, label_array())
