"""Reliability of every write through the CLI: a full disk, Ctrl-C, several outputs, existing files, races.

A full disk is a real one where possible: a 64 kB tmpfs mounted for the test (root
only; skipped elsewhere), filled up. Where a writer cannot be made to
fail for real, it is made to fail the way it does on a full disk (ITK writers leave
an empty file and report success).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_error_line as one_line
from conftest import run_cli as run
from conftest import sphere_volume

import MedSegSuiteLib.io.images as images_module
from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.volume import Volume

SHAPE = (12, 24, 24)


def visible(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture
def ball(tmp_path) -> tuple[Path, Path]:
    image, mask = sphere_volume(SHAPE, (6, 12, 12), 4)
    folder = tmp_path / "in"
    folder.mkdir()
    return (
        write_image(Volume(image, (1.0, 1.0, 2.0)), folder / "ball.nii.gz"),
        write_image(Volume(mask, (1.0, 1.0, 2.0)), folder / "mask.nii.gz"),
    )


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A folder on a real file system with no free space left (new empty files can still be created)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        with open(mount / ".fill", "wb", buffering=0) as fill:
            try:
                while True:
                    fill.write(b"\0" * 1024)
            except OSError:
                pass  # full
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# -- a full disk -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["labels.nrrd", "labels.nii.gz", "labels.mha", "labels.nii"])
def test_segment_onto_a_full_disk_fails_with_one_line_and_leaves_no_file(capsys, model3d, ball, full_disk, name):
    code, out, err = run(capsys, "segment", ball[0], "-m", model3d, "-o", full_disk / name, "--device", "cpu")
    assert code == 2 and out == ""
    line = one_line(err)
    assert str(full_disk / name) in line and ("full" in line or "space" in line), line
    assert visible(full_disk) == {".fill"}


def test_scores_onto_a_full_disk_leave_neither_the_labels_nor_the_scores(capsys, model3d, ball, full_disk, tmp_path):
    labels = tmp_path / "labels.nii.gz"
    code, _, err = run(
        capsys, "segment", ball[0], "-m", model3d, "-o", labels, "--scores", full_disk / "s.nii.gz", "--device", "cpu"
    )
    assert code == 2 and "s.nii.gz" in one_line(err)
    assert not labels.exists() and visible(full_disk) == {".fill"}
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


@pytest.mark.parametrize("name", ["seg.seg.nrrd", "map.nii.gz", "map.nrrd"])
def test_export_onto_a_full_disk_leaves_neither_label_map_nor_table(capsys, ball, full_disk, name):
    code, out, err = run(capsys, "export", ball[1], "-o", full_disk / name)
    assert code == 2 and out == ""
    assert name in one_line(err)
    assert visible(full_disk) == {".fill"}


def test_model_import_into_a_full_home_fails_and_lists_nothing(capsys, model3d, full_disk, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSEGSUITE_HOME", str(full_disk / "home"))
    monkeypatch.setenv("MEDSEGSUITE_RESOURCES", str(tmp_path / "resources"))
    (tmp_path / "resources" / "Models").mkdir(parents=True)
    code, _, err = run(capsys, "models", "import", model3d, "--id", "copied")
    assert code == 2 and "copied" in one_line(err)
    code, out, err = run(capsys, "models")
    assert code == 0 and "copied" not in out and err == ""
    assert not list((full_disk / "home" / "models").glob("*copied*"))


def test_a_checkpoint_onto_a_full_disk_is_a_one_line_error(full_disk):
    """torch.save reports a full disk as a RuntimeError of its own; the atomic write names it."""
    from MedSegSuiteLib.errors import InputError
    from MedSegSuiteLib.io.atomic import atomic_output

    with pytest.raises(InputError, match="No space left"), atomic_output(full_disk / "checkpoint.pt") as tmp:
        torch.save({"weights": torch.zeros(100_000)}, tmp)
    assert visible(full_disk) == {".fill"}


def test_a_writer_that_reports_success_but_leaves_an_empty_file_is_caught(capsys, model3d, ball, tmp_path, monkeypatch):
    """Without root: make ITK behave as it does on a full disk (empty file, no error)."""
    import SimpleITK as sitk

    def silent_failure(image, path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        Path(path).write_bytes(b"")

    monkeypatch.setattr(sitk, "WriteImage", silent_failure)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run(capsys, "segment", ball[0], "-m", model3d, "-o", out_dir / "l.nrrd", "--device", "cpu")
    assert code == 2 and "nothing was written" in one_line(err)
    assert visible(out_dir) == set()


def test_a_truncated_write_is_caught_by_reading_it_back(ball, tmp_path, monkeypatch):
    import SimpleITK as sitk

    from MedSegSuiteLib.errors import InputError

    real = sitk.WriteImage

    def cut(image, path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        real(image, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(sitk, "WriteImage", cut)
    volume = read_image(ball[0])
    for name in ("a.nrrd", "a.nii.gz", "a.nii", "a.mha"):
        with pytest.raises(InputError, match="incomplete|does not read back"):
            write_image(volume, tmp_path / name)
        assert not (tmp_path / name).exists()


# -- all or nothing -----------------------------------------------------------------------------
def test_ctrl_c_between_the_two_outputs_of_segment_leaves_neither(capsys, model3d, ball, tmp_path, monkeypatch):
    real = images_module.write_image
    calls = []

    def interrupted_second(volume, path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(volume, path, *args, **kwargs)

    monkeypatch.setattr("MedSegSuiteLib.io.write_image", interrupted_second)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(
        capsys, "segment", ball[0], "-m", model3d, "-o", out / "l.nii.gz", "--scores", out / "s.nii.gz", "--device=cpu"
    )
    assert code == 130 and "nothing was written" in err
    assert len(calls) == 2 and visible(out) == set()


def test_failing_options_are_refused_before_any_work(capsys, model3d, tmp_path):
    missing_input = tmp_path / "not-read.nii.gz"  # never read: each option is refused first
    cases = [
        (
            [
                "refine",
                missing_input,
                "--mask",
                missing_input,
                "-m",
                model3d,
                "--steps",
                "2",
                "-o",
                tmp_path / "r.nrrd",
                "--uncertainty",
                tmp_path / "u.nrrd",
            ],
            "--ensemble",
        ),
        (["segment", missing_input, "-m", model3d, "-o", tmp_path / "l.nrrd", "--batch-size", "0"], "--batch-size"),
        (["segment", missing_input, "-m", model3d, "-o", tmp_path / "l.nrrd", "--overlap", "1.5"], "--overlap"),
        (
            [
                "refine",
                missing_input,
                "--mask",
                missing_input,
                "-m",
                model3d,
                "--steps",
                "2",
                "-o",
                tmp_path / "r.nrrd",
                "--ensemble",
                "100000",
            ],
            "--ensemble",
        ),
        (["segment", missing_input, "-m", model3d, "-o", tmp_path / "no" / "l.nrrd"], "does not exist"),
        (
            ["segment", missing_input, "-m", model3d, "-o", tmp_path / "l.nrrd", "--scores", tmp_path / "l.nrrd"],
            "two outputs",
        ),
    ]
    for argv, expected in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and expected in one_line(err), (argv, err)
        assert "not-read" not in err
    assert visible(tmp_path) == set()


def test_a_read_only_output_folder_is_refused_before_the_work(capsys, model3d, ball, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, err = run(capsys, "segment", ball[0], "-m", model3d, "-o", folder / "l.nrrd", "--device", "cpu")
    finally:
        folder.chmod(0o755)
    assert code == 2 and "does not take new files" in one_line(err)


# -- never replace without --overwrite ----------------------------------------------------------------
def test_evaluate_json_and_saved_predictions_are_not_replaced_without_overwrite(capsys, model3d, ball, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    image, mask = read_image(ball[0]), read_image(ball[1])
    write_image(image, data / "images" / "c1.nii.gz")
    write_image(mask, data / "labels" / "c1.nii.gz")
    report = tmp_path / "report.json"
    report.write_text("keep me", encoding="utf-8")
    saved = tmp_path / "pred"
    saved.mkdir()
    (saved / "c1.nii.gz").write_bytes(b"old")
    argv = ["evaluate", "-m", model3d, "--data", data, "--device", "cpu", "-q"]
    code, _, err = run(capsys, *argv, "--json", report)
    assert code == 2 and "report.json" in one_line(err) and "--overwrite" in err
    code, _, err = run(capsys, *argv, "--save-predictions", saved)
    assert code == 2 and "c1.nii.gz" in one_line(err) and "--overwrite" in err
    assert report.read_text(encoding="utf-8") == "keep me" and (saved / "c1.nii.gz").read_bytes() == b"old"
    code, out, err = run(capsys, *argv, "--json", report, "--save-predictions", saved, "--overwrite")
    assert code == 0, err
    assert "mean" in json.loads(report.read_text(encoding="utf-8"))
    assert read_image(saved / "c1.nii.gz").shape == image.shape


def test_an_output_written_meanwhile_by_another_command_is_not_replaced(capsys, model3d, ball, tmp_path, monkeypatch):
    """Two commands race for one output: the one that finishes second fails and leaves the other's file."""
    from MedSegSuiteLib.inference import Predictor

    target = tmp_path / "out" / "labels.nii.gz"
    target.parent.mkdir()
    real = Predictor.predict

    def other_command_wins(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        result = real(self, *args, **kwargs)
        target.write_bytes(b"the other command's result")
        return result

    monkeypatch.setattr(Predictor, "predict", other_command_wins)
    code, _, err = run(capsys, "segment", ball[0], "-m", model3d, "-o", target, "--device", "cpu")
    assert code == 2 and "already exists" in one_line(err)
    assert target.read_bytes() == b"the other command's result"
    assert visible(target.parent) == {"labels.nii.gz"}


def test_two_real_commands_racing_for_one_output_leave_exactly_one_complete_file(model3d, ball, tmp_path):
    target = tmp_path / "labels.nrrd"
    argv = [sys.executable, "-m", "MedSegSuiteLib", "segment", str(ball[0]), "-m", str(model3d), "-o", str(target)]
    env = {**os.environ, "MEDSEGSUITE_THREADS": "1"}
    processes = [subprocess.Popen([*argv, "--device", "cpu", "-q"], env=env, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 2], [0, 0]), results  # [0, 0] only if the second began after the first had finished
    if codes == [0, 2]:
        assert "already exists" in next(err for code, err in results if code == 2)
    assert read_image(target).shape == SHAPE
    assert visible(tmp_path) - {"in"} == {"labels.nrrd", "labels.labels.json"}


# -- permissions --------------------------------------------------------------------------------------
def test_outputs_and_label_tables_get_ordinary_permissions(capsys, ball, tmp_path):
    previous = os.umask(0o022)
    try:
        code, _, err = run(capsys, "export", ball[1], "-o", tmp_path / "map.nii.gz")
        assert code == 0, err
        code, _, err = run(capsys, "export", ball[1], "-o", tmp_path / "seg.seg.nrrd")
        assert code == 0, err
    finally:
        os.umask(previous)
    for name in ("map.nii.gz", "map.labels.json", "seg.seg.nrrd"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_segment_output_is_complete_and_readable(capsys, model3d, ball, tmp_path):
    code, _, err = run(capsys, "segment", ball[0], "-m", model3d, "-o", tmp_path / "l.nrrd", "--device", "cpu", "-q")
    assert code == 0, err
    labels = read_image(tmp_path / "l.nrrd")
    assert labels.shape == SHAPE and set(np.unique(labels.array)) <= {0, 1}


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write_even_when_nested(tmp_path):
    """A writer killed inside a write of a temporary (``..case.<pid>...``) leaves nothing the next write keeps."""
    import subprocess
    import sys

    from MedSegSuiteLib.io.atomic import remove_stale_partials

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "case.nrrd"
    plain = tmp_path / f".case.{dead.pid}.abc.partial.nrrd"
    nested = tmp_path / f"..case.{dead.pid}.abc.partial.{dead.pid}.def.partial.nrrd"
    alive = tmp_path / f".case.{os.getpid()}.ghi.partial.nrrd"
    other = tmp_path / f".other.{dead.pid}.jkl.partial.nrrd"
    for path in (plain, nested, alive, other):
        path.write_bytes(b"x")
    remove_stale_partials(target, ".nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name])
