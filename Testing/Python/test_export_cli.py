"""`medsegsuite export`: outputs, one-line errors with exit status 2, and atomic writes that never clobber."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from MedSegSuiteLib.cli import main
from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.export import export
from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.io.label_table import read_label_table
from MedSegSuiteLib.io.seg_nrrd import read_seg_nrrd
from MedSegSuiteLib.volume import Volume


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def case(tmp_path) -> tuple[Path, Path, np.ndarray]:
    """A labelled oblique volume on disk: (label map path, image path, labels)."""
    direction = Rotation.from_euler("yz", (15, -30), degrees=True).as_matrix()
    image = Volume(np.zeros((5, 8, 7), np.int16), (0.9, 1.1, 2.0), (3, -4, 10), direction)
    labels = np.zeros(image.shape, np.uint8)
    labels[1:4, 2:6, 1:5] = 1
    labels[3:5, 5:8, 4:7] = 2
    return (
        write_image(image.with_array(labels), tmp_path / "labels.nii.gz"),
        write_image(image, tmp_path / "image.nrrd"),
        labels,
    )


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_cli_exports_every_format(capsys, tmp_path, case):
    labels, image, array = case
    code, out, err = run(capsys, "export", labels, "-o", tmp_path / "x.seg.nrrd", "--reference", image)
    assert code == 0, err
    assert out.strip() == f"wrote {tmp_path / 'x.seg.nrrd'}"
    seg = read_seg_nrrd(tmp_path / "x.seg.nrrd")
    assert [s.name for s in seg.segments] == ["Segment_1", "Segment_2"] and np.array_equal(seg.layers[0], array)
    code, out, err = run(capsys, "export", tmp_path / "x.seg.nrrd", "-o", tmp_path / "y.nrrd", "-q")
    assert code == 0 and out == "", err
    assert np.array_equal(read_image(tmp_path / "y.nrrd").array, array)
    assert [label.name for label in read_label_table(tmp_path / "y.labels.json")] == ["Segment_1", "Segment_2"]


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing", "missing.nii.gz does not exist"),
        ("grid", "grid differs from the reference volume's.*--resample"),
        ("model", "no model with id 'no-such-model'"),
        ("dicom", "--dicom-series DIR"),
        ("suffix", "cannot export to .mha"),
        ("exists", "already exists; pass --overwrite"),
        ("table", "label table .*nope.json does not exist"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(capsys, tmp_path, case, home, problem, message):
    labels, image, array = case
    output = tmp_path / "out.seg.nrrd"
    args = [labels, "-o", output]
    if problem == "missing":
        args[0] = tmp_path / "missing.nii.gz"
    elif problem == "grid":
        other = write_image(Volume(np.zeros((5, 8, 9), np.int16)), tmp_path / "other.nrrd")
        args += ["--reference", other]
    elif problem == "model":
        args += ["--labels", "no-such-model"]
    elif problem == "dicom":
        args[2] = tmp_path / "out.dcm"
    elif problem == "suffix":
        args[2] = tmp_path / "out.mha"
    elif problem == "exists":
        output.write_bytes(b"precious")
    elif problem == "table":
        args += ["--labels", tmp_path / "nope.json"]
    code, out, err = run(capsys, "export", *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medsegsuite: error: ")
    import re

    assert re.search(message, lines[0]), lines[0]
    if problem == "exists":
        assert output.read_bytes() == b"precious"
    else:
        assert not output.exists()
    assert not [name for name in files_in(tmp_path) if ".partial" in name]


def test_existing_outputs_are_kept_without_overwrite_and_replaced_with_it(tmp_path, case):
    labels, image, array = case
    (tmp_path / "out.labels.json").write_text("mine")
    with pytest.raises(InputError, match="out.labels.json already exists"):
        export(labels, tmp_path / "out.nii.gz")
    assert (
        not (tmp_path / "out.nii.gz").exists() and (tmp_path / "out.labels.json").read_text(encoding="utf-8") == "mine"
    )
    export(labels, tmp_path / "out.nii.gz", overwrite=True)
    assert read_label_table(tmp_path / "out.labels.json")[0].value == 1


def test_failed_seg_nrrd_write_leaves_no_file(tmp_path, case, monkeypatch):
    labels, image, _ = case

    def broken(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(gzip.GzipFile, "write", broken)
    before = files_in(tmp_path)
    with pytest.raises(InputError, match="disk full"):
        export(labels, tmp_path / "x.seg.nrrd")
    assert files_in(tmp_path) == before


def test_label_map_and_table_are_committed_together_or_not_at_all(tmp_path, case, monkeypatch):
    labels, image, array = case
    real_replace, real_link = os.replace, os.link
    calls = []

    def second_commit_fails(real):
        def commit(src, dst):
            calls.append(Path(dst).name)
            if Path(dst).name == "out.labels.json" and Path(src).name.endswith(".partial.json"):
                raise OSError("disk full")
            return real(src, dst)

        return commit

    # without overwrite a file is committed by an exclusive hard link, with it by a rename
    monkeypatch.setattr(os, "replace", second_commit_fails(real_replace))
    monkeypatch.setattr(os, "link", second_commit_fails(real_link))
    before = files_in(tmp_path)
    with pytest.raises(InputError, match="disk full"):
        export(labels, tmp_path / "out.nrrd")
    assert "out.nrrd" in calls  # the label map had been renamed into place, then was taken back
    assert files_in(tmp_path) == before
    # With --overwrite, a failed commit restores the files it was replacing.
    (tmp_path / "out.nrrd").write_bytes(b"old map")
    (tmp_path / "out.labels.json").write_text("old table")
    with pytest.raises(InputError, match="disk full"):
        export(labels, tmp_path / "out.nrrd", overwrite=True)
    assert (tmp_path / "out.nrrd").read_bytes() == b"old map"
    assert (tmp_path / "out.labels.json").read_text(encoding="utf-8") == "old table"
    assert files_in(tmp_path) == before | {"out.nrrd", "out.labels.json"}


def test_failed_dicom_seg_write_leaves_no_file(tmp_path, monkeypatch):
    hd = pytest.importorskip("highdicom")
    pydicom = pytest.importorskip("pydicom")
    from conftest import write_dicom_series

    volume = Volume(np.zeros((3, 6, 5), np.int16), (1.0, 1.0, 2.0))
    files = write_dicom_series(volume, tmp_path / "series", "1.2.826.0.1.3680043.8.498.9")
    for path in files:
        dataset = pydicom.dcmread(path)
        dataset.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.9.1"
        dataset.save_as(path)
    labels = np.zeros(volume.shape, np.uint8)
    labels[1, 2:4, 2:4] = 1
    labels_path = write_image(volume.with_array(labels), tmp_path / "labels.nrrd")

    def half_written(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"DICM partial")
        raise OSError("disk full")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", half_written)
    before = files_in(tmp_path)
    with pytest.raises(InputError, match="disk full"):
        export(labels_path, tmp_path / "seg.dcm", dicom_series=tmp_path / "series")
    assert files_in(tmp_path) == before


def test_a_refinement_uncertainty_segment_is_not_a_label_anywhere(capsys, tmp_path, case):
    """The panel's 'Uncertain (refinement)' segment (tag MedSegSuite.role = uncertainty) overlaps the labels:
    a .seg.nrrd saved from Slicer with it still exports, refines and trains as the labels alone."""
    from MedSegSuiteLib.io.seg_nrrd import write_seg_nrrd
    from MedSegSuiteLib.io.segmentation import Segment, Segmentation

    labels_path, image, array = case
    grid = read_image(image).grid
    layers = np.stack([array, (array > 0).astype(np.uint8)])  # layer 1: an overlapping "uncertain" region
    segments = (
        Segment("s1", "Anterior", layer=0, value=1),
        Segment("s2", "Posterior", layer=0, value=2),
        Segment("u", "Uncertain (refinement)", layer=1, value=1, tags={"MedSegSuite.role": "uncertainty"}),
    )
    write_seg_nrrd(Segmentation(grid, layers, segments), tmp_path / "saved.seg.nrrd")
    assert [s.name for s in read_seg_nrrd(tmp_path / "saved.seg.nrrd").segments] == ["Anterior", "Posterior"]
    code, _, err = run(capsys, "export", tmp_path / "saved.seg.nrrd", "-o", tmp_path / "out.nii.gz")
    assert code == 0, err
    assert np.array_equal(read_image(tmp_path / "out.nii.gz").array, array)
