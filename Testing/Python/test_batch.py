"""``medsegsuite segment`` over many cases: folders, lists and CSVs, failures that do not stop the others,
resume, model comparison, sharding and merging."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import UNET3D_CARD, sphere_volume, write_dicom_series

from MedSegSuiteLib.batch import find_cases, parse_shard, select_shard
from MedSegSuiteLib.cli import main
from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.volume import Volume


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _ball(path: Path, seed: int, radius: float = 5.0) -> Path:
    image, _ = sphere_volume((20, 36, 36), (10, 18, 16), radius, seed=seed)
    return write_image(Volume(image, (1.0, 1.0, 1.0)), path)


@pytest.fixture
def cohort(tmp_path) -> Path:
    """Three ball volumes, a DICOM series folder, a truncated NIfTI and a 2D photo a 3D model refuses."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    for i in range(3):
        _ball(folder / f"case{i}.nii.gz", seed=i)
    image, _ = sphere_volume((20, 36, 36), (10, 18, 16), 5.0, seed=7)
    write_dicom_series(Volume((image * 10).astype(np.int16), (1.0, 1.0, 1.0)), folder / "dicom_case")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI")
    from PIL import Image

    Image.fromarray(np.full((24, 24), 90, np.uint8)).save(folder / "photo.png")
    return folder


def _summary(folder: Path, name: str = "summary") -> tuple[list[dict], dict]:
    with open(folder / f"{name}.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows, json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))


def test_a_folder_of_mixed_cases_segments_the_good_ones_and_reports_the_bad(cohort, tmp_path, capsys, unet3d_dir):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "segment", cohort, "-m", unet3d_dir, "-o", out)
    assert code == 2, "a failed case makes the run exit 2 at the end"
    rows, document = _summary(out)
    status = {row["case"]: row["status"] for row in rows}
    assert status == {
        "broken": "failed",
        "case0": "done",
        "case1": "done",
        "case2": "done",
        "dicom_case": "done",
        "photo": "failed",
    }
    assert [row["case"] for row in rows] == sorted(status), "cases in a stable (name) order"
    assert document["counts"] == {"done": 4, "skipped": 0, "failed": 2}
    by_id = {record["id"]: record for record in document["cases"]}
    assert "2D" in by_id["photo"]["error"] or "3D" in by_id["photo"]["error"]
    assert by_id["broken"]["error"] and "Traceback" not in by_id["broken"]["error"]
    assert "case broken failed" in stderr and "case photo failed" in stderr
    for case in ("case0", "case1", "case2", "dicom_case"):
        record = by_id[case]
        labels = read_image(out / f"{case}.nii.gz").array
        assert record["voxels"]["test-unet3d"]["Ball"] == int((labels == 1).sum()) > 100
        assert record["seconds"] > 0 and record["outputs"]["test-unet3d"] == str(out / f"{case}.nii.gz")
        assert (out / f"{case}.labels.json").is_file()
        assert read_image(out / f"{case}.nii.gz").shape == read_image(Path(record["input"])).shape
    assert not [p for p in out.iterdir() if ".partial" in p.name], "no temporary file is left behind"
    assert "4 case(s) segmented, 0 already complete, 2 failed" in stdout


def test_a_rerun_skips_complete_cases_and_redoes_missing_or_partial_ones(cohort, tmp_path, capsys, unet3d_dir):
    out = tmp_path / "out"
    for bad in ("broken.nii.gz", "photo.png"):
        (cohort / bad).unlink()
    assert run(capsys, "segment", cohort, "-m", unet3d_dir, "-o", out, "-q")[0] == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    # a crash: one output never written, a temporary file of a killed writer left beside it
    (out / "case1.nii.gz").unlink()
    (out / ".case1.999999.abc.partial.nii.gz").write_bytes(b"half a file")
    code, stdout, _ = run(capsys, "segment", cohort, "-m", unet3d_dir, "-o", out)
    assert code == 0
    rows, _ = _summary(out)
    assert {row["case"]: row["status"] for row in rows} == {
        "case0": "skipped",
        "case1": "done",
        "case2": "skipped",
        "dicom_case": "skipped",
    }
    assert "1 case(s) segmented, 3 already complete" in stdout
    assert {row["case"]: row["voxels"] for row in rows}["case0"].startswith("Ball="), "skipped cases keep their counts"
    assert (out / "case0.nii.gz").stat().st_mtime_ns == first["case0.nii.gz"]
    assert (out / "case1.nii.gz").is_file()
    assert run(capsys, "segment", cohort, "-m", unet3d_dir, "-o", out, "-q", "--overwrite")[0] == 0
    rows, _ = _summary(out)
    assert {row["status"] for row in rows} == {"done"}
    assert (out / "case0.nii.gz").stat().st_mtime_ns != first["case0.nii.gz"]


def test_list_files_and_csvs_name_cases_relative_to_themselves(tmp_path, capsys, unet3d_dir):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        _ball(data / f"scan{i}.nii.gz", seed=10 + i)
    (tmp_path / "cases.txt").write_text("# my cases\ndata/scan2.nii.gz\n\ndata/scan0.nii.gz\n", encoding="utf-8")
    (tmp_path / "cases.csv").write_text("id,image\npatient-b,data/scan1.nii.gz\npatient-a,data/scan0.nii.gz\n", "utf-8")
    assert [c.id for c in find_cases(tmp_path / "cases.txt")] == ["scan2", "scan0"]
    assert [c.id for c in find_cases(tmp_path / "cases.csv")] == ["patient-b", "patient-a"]
    code, _, _ = run(capsys, "segment", tmp_path / "cases.csv", "-m", unet3d_dir, "-o", tmp_path / "out", "-q")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["patient-a.nii.gz", "patient-b.nii.gz"]
    code, _, _ = run(capsys, "segment", tmp_path / "cases.txt", "-m", unet3d_dir, "-o", tmp_path / "out.v2", "-q")
    assert code == 0 and (tmp_path / "out.v2" / "scan2.nii.gz").is_file(), "a folder name may hold a dot"
    (tmp_path / "dup.csv").write_text("id,image\nx,data/scan1.nii.gz\nx,data/scan2.nii.gz\n", encoding="utf-8")
    code, _, err = run(capsys, "segment", tmp_path / "dup.csv", "-m", unet3d_dir, "-o", tmp_path / "o2")
    assert code == 2 and "two cases are called 'x'" in err and not (tmp_path / "o2").exists()
    code, _, err = run(capsys, "segment", tmp_path / "cases.txt", "-m", unet3d_dir, "-o", tmp_path / "o.nii.gz")
    assert code == 2 and "name a folder" in err


def test_shards_cover_every_case_once_and_merge_into_one_summary(tmp_path, capsys, unet3d_dir):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        _ball(data / f"c{i}.nii.gz", seed=20 + i)
    (data / "c5.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    code, _, err = run(capsys, "merge", out)
    assert code == 2 and "not a folder" in err
    assert run(capsys, "segment", data, "-m", unet3d_dir, "-o", out, "--shard", "0/3", "-q")[0] == 0
    code, _, err = run(capsys, "merge", out)
    assert code == 2 and "1/3, 2/3" in err, "missing shards are named"
    assert run(capsys, "segment", data, "-m", unet3d_dir, "-o", out, "--shard", "2/3", "-q")[0] == 2  # holds c5
    assert run(capsys, "segment", data, "-m", unet3d_dir, "-o", out, "--shard", "1/3", "-q")[0] == 0
    shard0, _ = _summary(out, "summary-shard-0-of-3")
    assert [row["case"] for row in shard0] == ["c0", "c3"]
    code, stdout, _ = run(capsys, "merge", out)
    assert code == 2 and "6 case(s) (5 segmented, 0 already complete, 1 failed)" in stdout
    rows, document = _summary(out)
    assert [row["case"] for row in rows] == [f"c{i}" for i in range(6)], "merged in the common case order"
    assert document["merged_shards"] == 3 and document["counts"]["failed"] == 1
    assert sorted(p.name for p in out.glob("c*.nii.gz")) == [f"c{i}.nii.gz" for i in range(5)]


def test_shard_arithmetic_and_bad_shards():
    cases = list(range(10))
    shards = [select_shard(cases, i, 4) for i in range(4)]
    assert shards[1] == [1, 5, 9] and sorted(sum(shards, [])) == cases
    assert parse_shard("3/4") == (3, 4)
    for text in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(InputError, match="I/N"):
            parse_shard(text)


def test_several_models_write_their_own_folders_with_pairwise_dice_and_a_disagreement_map(tmp_path, capsys, unet3d_dir):
    from MedSegSuiteLib import networks
    from MedSegSuiteLib.models import save_model

    torch.manual_seed(5)
    other = tmp_path / "other-model"
    network = networks.create("unet", "lite", spatial_dims=3, in_channels=1, out_channels=2)  # untrained
    save_model(other, network, {**UNET3D_CARD, "id": "untrained-unet3d"})
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        _ball(data / f"k{i}.nii.gz", seed=30 + i)
    out = tmp_path / "out"
    args = ("segment", data, "-m", unet3d_dir, "-m", unet3d_dir, "-o", out)
    code, _, err = run(capsys, *args)
    assert code == 2 and "named twice" in err
    code, _, _ = run(capsys, "segment", data, "-m", unet3d_dir, "-m", other, "-o", out, "-q")
    assert code == 0
    _, document = _summary(out)
    for record in document["cases"]:
        a = read_image(out / "test-unet3d" / f"{record['id']}.nii.gz").array
        b = read_image(out / "untrained-unet3d" / f"{record['id']}.nii.gz").array
        differ = read_image(out / "disagreement" / f"{record['id']}.nii.gz").array
        np.testing.assert_array_equal(differ, (a != b).astype(differ.dtype))
        x, y = a == 1, b == 1
        expected = 2 * (x & y).sum() / (x.sum() + y.sum()) if x.sum() + y.sum() else None
        assert record["dice"]["test-unet3d vs untrained-unet3d"] == pytest.approx(expected)
        assert record["voxels"]["disagreement"]["Models disagree"] == int(differ.sum())
    assert (
        run(capsys, "segment", data / "k0.nii.gz", "-m", unet3d_dir, "-m", other, "-o", tmp_path / "one", "-q")[0] == 0
    )
    _, single = _summary(tmp_path / "one")
    assert [r["id"] for r in single["cases"]] == ["k0"], "one image with several models is a batch of one"


def test_batch_refuses_single_image_options(tmp_path, capsys, unet3d_dir, cohort):
    code, _, err = run(capsys, "segment", cohort, "-m", unet3d_dir, "-o", tmp_path / "o", "--roi", "0,0,0,4,4,4")
    assert code == 2 and "--roi applies to one image" in err
    code, _, err = run(capsys, "segment", cohort, "-m", unet3d_dir, "-o", tmp_path / "o", "--shard", "2/2")
    assert code == 2 and "I/N" in err


def test_inputs_that_do_not_fit_the_model_are_warned_about_in_the_summary(tmp_path, capsys):
    from MedSegSuiteLib import networks
    from MedSegSuiteLib.models import save_model

    model = tmp_path / "crop-model"
    network = networks.create("unet", "lite", spatial_dims=3, in_channels=1, out_channels=2)
    inputs = {"dims": 3, "channels": 1, "fov_mm": {"min": [5, 5, 5], "max": [10, 10, 8]}}
    save_model(model, network, {**UNET3D_CARD, "id": "crop-model", "training": {"inputs": inputs}})
    data = tmp_path / "data"
    data.mkdir()
    _ball(data / "big.nii.gz", seed=1)
    assert run(capsys, "segment", data, "-m", model, "-o", tmp_path / "out", "-q")[0] == 0
    rows, document = _summary(tmp_path / "out")
    assert "far more than" in rows[0]["warnings"] and "--roi" in document["cases"][0]["warnings"][0]
    table = json.loads((tmp_path / "out" / "big.labels.json").read_text(encoding="utf-8"))
    assert "far more than" in json.dumps(table), "the warning travels with the result"


def test_ctrl_c_keeps_finished_cases_and_the_next_run_does_the_rest(tmp_path, capsys, unet3d_dir, monkeypatch):
    from MedSegSuiteLib.batch import BatchSegmenter

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        _ball(data / f"n{i}.nii.gz", seed=40 + i)
    real = BatchSegmenter.segment_case

    def interrupted_at_the_second(self, case):
        if case.id == "n1":
            raise KeyboardInterrupt
        return real(self, case)

    monkeypatch.setattr(BatchSegmenter, "segment_case", interrupted_at_the_second)
    code, _, err = run(capsys, "segment", data, "-m", unet3d_dir, "-o", tmp_path / "out", "-q")
    assert code == 130 and "interrupted after 1 of 3 case(s)" in err
    rows, _ = _summary(tmp_path / "out")
    assert [(row["case"], row["status"]) for row in rows] == [("n0", "done")]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["n0.nii.gz"]
    monkeypatch.setattr(BatchSegmenter, "segment_case", real)
    assert run(capsys, "segment", data, "-m", unet3d_dir, "-o", tmp_path / "out", "-q")[0] == 0
    rows, _ = _summary(tmp_path / "out")
    assert [(row["case"], row["status"]) for row in rows] == [("n0", "skipped"), ("n1", "done"), ("n2", "done")]


def test_a_folder_of_photos_gets_png_label_maps(tmp_path, capsys, unet2d_dir):
    from conftest import disc_image
    from PIL import Image

    data = tmp_path / "photos"
    data.mkdir()
    for i in range(2):
        image, _ = disc_image(48, (20 + i, 24), 8, seed=60 + i)
        Image.fromarray(np.moveaxis(image[:, 0], 0, -1)).save(data / f"p{i}.png")
    assert run(capsys, "segment", data, "-m", unet2d_dir, "-o", tmp_path / "out", "-q")[0] == 0
    _, document = _summary(tmp_path / "out")
    for record in document["cases"]:
        labels = read_image(tmp_path / "out" / f"{record['id']}.png")
        assert labels.shape[-2:] == (48, 48) and record["status"] == "done"
        counts = next(iter(record["voxels"].values()))
        assert counts == {"Disc": int((labels.array == 1).sum())} and counts["Disc"] > 50


def test_photos_turned_by_exif_or_stored_in_16_bits_give_the_same_files_in_a_batch_as_one_by_one(
    tmp_path, capsys, unet2d_dir, monkeypatch
):
    """A JPEG displayed turned (EXIF orientation 6) and a 16-bit PNG: the network sees the same upright, 0-255
    pixels in a batch as with ``segment``, and the label maps (on the stored pixels) and label tables are the same."""
    import SimpleITK as sitk
    from conftest import disc_image
    from PIL import Image

    from MedSegSuiteLib.inference import Predictor

    photos = tmp_path / "photos"
    photos.mkdir()
    image, _ = disc_image(56, (16, 38), 9, seed=70)
    stored = np.ascontiguousarray(np.moveaxis(image[:, 0, :40], 0, -1))  # 56 wide, 40 high as stored
    picture = Image.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: 40 wide, 56 high
    picture.save(photos / "turned.jpg", exif=exif, quality=95)
    image, _ = disc_image(48, (30, 20), 8, seed=71)
    sixteen = np.moveaxis(image[:, 0], 0, -1).astype(np.uint16) * 200 + 1000  # 1000..52000: no 8-bit range
    sitk.WriteImage(sitk.GetImageFromArray(sixteen, isVector=True), str(photos / "deep.png"))
    seen: dict[str, list] = {"segment": [], "batch": []}
    real = Predictor.predict

    def record(self, volume, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        seen[mode].append((volume.shape, float(volume.array.max())))
        return real(self, volume, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict", record)
    mode = "batch"
    code, _, err = run(capsys, "segment", photos, "-m", unet2d_dir, "-o", tmp_path / "batch", "-q")
    assert code == 0, err
    mode = "segment"
    (tmp_path / "one").mkdir()
    for source in ("deep.png", "turned.jpg"):
        target = tmp_path / "one" / f"{Path(source).stem}.png"
        code, _, err = run(capsys, "segment", photos / source, "-m", unet2d_dir, "-o", target, "-q")
        assert code == 0, err
    assert sorted(seen["batch"]) == sorted(seen["segment"])
    assert sorted(shape for shape, _ in seen["batch"]) == [(1, 48, 48), (1, 56, 40)]  # upright (Volume.shape: z, y, x)
    assert all(top < 255.01 for _, top in seen["batch"]), seen  # 16 bits scaled onto the 8-bit range
    _, document = _summary(tmp_path / "batch")
    notes = {record["id"]: record["warnings"] for record in document["cases"]}
    assert any("EXIF orientation (6)" in note for note in notes["turned"])
    assert any("16-bit photo by its own range" in note for note in notes["deep"])
    for name, shape in (("turned", (1, 40, 56)), ("deep", (1, 48, 48))):
        batch, one = read_image(tmp_path / "batch" / f"{name}.png"), read_image(tmp_path / "one" / f"{name}.png")
        assert batch.shape == shape and np.array_equal(batch.array, one.array), name
        assert batch.grid.same_as(one.grid)
        assert (batch.array == 1).sum() > 20, "a disc was found, so equal files say something"
        tables = [
            json.loads((tmp_path / f / f"{name}.labels.json").read_text(encoding="utf-8")) for f in ("batch", "one")
        ]
        assert tables[0] == tables[1]
