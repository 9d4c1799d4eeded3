"""`medsegsuite evaluate` tells the truth: missing predictions, labels absent on both sides, two files, 0/255 masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli as run
from PIL import Image

from MedSegSuiteLib.io import write_image
from MedSegSuiteLib.volume import Volume

SHAPE = (6, 16, 16)


def labels(*boxes: tuple[int, slice]) -> np.ndarray:
    array = np.zeros(SHAPE, np.uint8)
    for value, where in boxes:
        array[where] = value
    return array


BOX1 = (slice(1, 4), slice(2, 8), slice(2, 8))
BOX2 = (slice(2, 5), slice(9, 14), slice(9, 14))


def save(folder: Path, name: str, array: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_image(Volume(array, (1.0, 1.0, 2.0)), folder / f"{name}.nii.gz")


def test_reference_cases_without_prediction_are_named_and_not_averaged(capsys, tmp_path):
    for case in ("c1", "c2", "c3"):
        save(tmp_path / "ref", case, labels((1, BOX1)))
    for case in ("c1", "c2"):
        save(tmp_path / "pred", case, labels((1, BOX1)))
    save(tmp_path / "pred", "stray", labels((1, BOX1)))
    code, out, err = run(capsys, "evaluate", tmp_path / "pred", tmp_path / "ref", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "1 reference case(s) have no prediction" in err and "c3" in err
    assert "1 prediction(s) have no reference: stray" in err
    assert "mean Dice 1.0000 over 2 case(s)" in out and "1 reference case(s) without prediction" in out
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["missing_predictions"] == ["c3"] and report["predictions_without_reference"] == ["stray"]
    assert report["mean"]["missing"] == 1 and set(report["cases"]) == {"c1", "c2"}


def test_a_label_absent_from_prediction_and_reference_is_not_a_perfect_dice(capsys, tmp_path):
    # case a: label 2 present in the reference and missed by the prediction (Dice 0);
    # case b: label 2 in neither (it says nothing about the model, so it must not count as 1).
    save(tmp_path / "ref", "a", labels((1, BOX1), (2, BOX2)))
    save(tmp_path / "pred", "a", labels((1, BOX1)))
    save(tmp_path / "ref", "b", labels((1, BOX1)))
    save(tmp_path / "pred", "b", labels((1, BOX1)))
    code, out, err = run(capsys, "evaluate", tmp_path / "pred", tmp_path / "ref", "--json", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["per_label"]["2"]["dice"] == pytest.approx(0.0)  # not (0 + 1) / 2
    assert report["cases"]["b"]["2"]["absent"] is True and report["cases"]["b"]["2"]["dice"] is None
    assert report["mean"]["dice"] == pytest.approx(2 / 3)  # labels 1 (a), 2 (a), 1 (b): 1, 0, 1
    assert "absent" in out and "mean Dice 0.6667" in out


def test_only_absent_labels_give_no_mean_rather_than_a_perfect_one(capsys, tmp_path):
    save(tmp_path / "ref", "a", labels())
    save(tmp_path / "pred", "a", labels())
    code, out, err = run(capsys, "evaluate", tmp_path / "pred", tmp_path / "ref", "--labels", "1")
    assert code == 0, err
    assert "mean Dice n/a" in out and "1.0000" not in out


@pytest.mark.parametrize("which", ["pred", "ref", "both"])
def test_two_files_instead_of_two_folders_says_so(capsys, tmp_path, which):
    pred = save(tmp_path / "pred", "a", labels((1, BOX1)))
    ref = save(tmp_path / "ref", "a", labels((1, BOX1)))
    args = [pred if which in ("pred", "both") else pred.parent, ref if which in ("ref", "both") else ref.parent]
    code, out, err = run(capsys, "evaluate", *args)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert "is a file: evaluate compares two folders" in lines[0]


def test_0_255_masks_are_accepted_as_references_and_predictions(capsys, tmp_path):
    mask = labels((1, BOX1))
    save(tmp_path / "ref", "vol", mask * 255)  # a NIfTI mask written as 0/255
    save(tmp_path / "pred", "vol", mask)
    (tmp_path / "ref2").mkdir()
    (tmp_path / "pred2").mkdir()
    disc = np.zeros((32, 32), np.uint8)
    disc[8:20, 10:24] = 255
    Image.fromarray(disc).save(tmp_path / "ref2" / "photo.png")
    Image.fromarray(disc // 255).save(tmp_path / "pred2" / "photo.png")
    for pred, ref in (("pred", "ref"), ("pred2", "ref2"), ("ref", "pred")):
        code, out, err = run(capsys, "evaluate", tmp_path / pred, tmp_path / ref, "--json", tmp_path / f"{ref}.json")
        assert code == 0, err
        report = json.loads((tmp_path / f"{ref}.json").read_text(encoding="utf-8"))
        assert list(report["per_label"]) == ["1"] and report["mean"]["dice"] == pytest.approx(1.0), (pred, ref)


def test_export_reads_a_0_255_label_map_as_one_segment(capsys, tmp_path):
    path = save(tmp_path, "mask", labels((1, BOX1)) * 255)
    code, _, err = run(capsys, "export", path, "-o", tmp_path / "mask.seg.nrrd")
    assert code == 0, err
    from MedSegSuiteLib.io.seg_nrrd import read_seg_nrrd

    segmentation = read_seg_nrrd(tmp_path / "mask.seg.nrrd")
    assert [s.value for s in segmentation.segments] == [1]
    assert int(segmentation.layers.sum()) == int(labels((1, BOX1)).sum())
