"""medsegsuite evaluate: folders of label maps, and a model on labelled cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import sphere_volume

from MedSegSuiteLib.cli import main
from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.evaluation import evaluate_folders
from MedSegSuiteLib.io import write_image
from MedSegSuiteLib.volume import Volume


def _label_folders(root):
    (root / "pred").mkdir(parents=True)
    (root / "gt" / "images").mkdir(parents=True)
    (root / "gt" / "labels").mkdir()
    for i in range(3):
        truth = np.zeros((4, 10, 10), np.uint8)
        truth[:, :5] = 1
        truth[:, 5:] = 2
        prediction = truth.copy()
        prediction[:, 5:] = 1 if i == 0 else 2  # case 0 misses label 2 entirely
        spacing = (0.5, 0.5, 2.0)
        write_image(Volume(prediction, spacing), root / "pred" / f"c{i}.nii.gz")
        write_image(Volume(truth, spacing), root / "gt" / "labels" / f"c{i}.nii.gz")
        write_image(Volume(truth.astype(np.float32), spacing), root / "gt" / "images" / f"c{i}.nii.gz")


def test_folders_are_paired_by_name_and_scored_per_label(tmp_path):
    _label_folders(tmp_path)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert result.values == [1, 2]
    assert result.cases["c0"][2]["dice"] == 0.0 and result.cases["c0"][2]["hd95"] is None
    assert result.cases["c1"][1]["dice"] == 1.0 and result.cases["c1"][1]["hd95"] == 0.0
    mean = result.mean()
    assert mean["per_label"][2]["dice"] == pytest.approx(2 / 3)
    assert mean["per_label"][1]["dice"] == pytest.approx((2 * 50 / 150 + 2) / 3)
    assert "MEAN" in result.table()


def test_cli_evaluate_folders_writes_json(tmp_path, capsys):
    _label_folders(tmp_path)
    args = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt" / "labels"), "--json", str(tmp_path / "m.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "c0" in out and "mean Dice" in out
    data = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert set(data["cases"]) == {"c0", "c1", "c2"} and data["per_label"]["2"]["dice"] == pytest.approx(2 / 3)


def test_cli_evaluate_a_model_on_labelled_cases(tmp_path, capsys, unet3d_dir):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "labels").mkdir()
    for i in range(2):
        image, mask = sphere_volume((34, 40, 36), (12 + i, 20, 14), 5.0, seed=50 + i)
        write_image(Volume(image), tmp_path / "data" / "images" / f"b{i}.nii.gz")
        write_image(Volume(mask), tmp_path / "data" / "labels" / f"b{i}.nii.gz")
    code = main(
        [
            "evaluate",
            "-m",
            str(unet3d_dir),
            "--data",
            str(tmp_path / "data"),
            "--device",
            "cpu",
            "--save-predictions",
            str(tmp_path / "pred"),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 0
    data = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert data["mean"]["dice"] > 0.8 and data["per_label"]["1"]["name"] == "Ball"
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["b0.nii.gz", "b1.nii.gz"]


def test_mismatched_grids_and_missing_pairs_are_refused(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    write_image(Volume(np.ones((2, 3, 4), np.uint8)), tmp_path / "p" / "a.nrrd")
    write_image(Volume(np.ones((2, 3, 5), np.uint8)), tmp_path / "g" / "a.nrrd")
    with pytest.raises(InputError, match="grid"):
        evaluate_folders(tmp_path / "p", tmp_path / "g")
    write_image(Volume(np.ones((2, 3, 4), np.uint8)), tmp_path / "g" / "a.nrrd", overwrite=True)
    (tmp_path / "p" / "a.nrrd").rename(tmp_path / "p" / "b.nrrd")
    with pytest.raises(InputError, match="no file in"):
        evaluate_folders(tmp_path / "p", tmp_path / "g")
