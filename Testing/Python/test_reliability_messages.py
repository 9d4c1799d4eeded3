"""Every failure through the CLI is exit 2 with one line that says what to do; global flags on either side
of the sub-command; a closed pipe is quiet; files get ordinary permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_error_line as one_line
from conftest import run_cli as run

from MedSegSuiteLib.io import write_image
from MedSegSuiteLib.volume import Volume


def command(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDSEGSUITE_THREADS": "1", **kwargs.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-m", "MedSegSuiteLib", *map(str, args)], capture_output=True, text=True, env=env, **kwargs
    )


@pytest.fixture
def image(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    return write_image(Volume(rng.random((12, 24, 24), dtype=np.float32)), tmp_path / "img.nii.gz")


def test_a_file_as_medsegsuite_home_is_named_with_what_to_do(capsys, tmp_path, model3d, monkeypatch):
    home = tmp_path / "home-is-a-file"
    home.write_text("oops", encoding="utf-8")
    monkeypatch.setenv("MEDSEGSUITE_HOME", str(home))
    code, _, err = run(capsys, "models", "import", model3d)
    line = one_line(err)
    assert code == 2 and f"MEDSEGSUITE_HOME={home}" in line and "point it at" in line


def test_a_read_only_medsegsuite_home_is_named_with_what_to_do(capsys, tmp_path, model3d, monkeypatch):
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a read-only file system needs root to mount (and root ignores folder modes)")
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setenv("MEDSEGSUITE_HOME", str(mount / "home"))
        code, _, err = run(capsys, "models", "import", model3d)
        line = one_line(err)
        assert code == 2 and "Read-only file system" in line and "MEDSEGSUITE_HOME" in line
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_hostile_inputs_all_fail_in_one_line_with_exit_2(capsys, tmp_path, model3d, image):
    (tmp_path / "garbage.nii.gz").write_text("hello", encoding="utf-8")
    (tmp_path / "garbage.png").write_text("hello", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    cases = [
        ("segment", tmp_path / "garbage.nii.gz", "-m", model3d, "-o", tmp_path / "o.nrrd"),
        ("segment", tmp_path / "garbage.png", "-m", model3d, "-o", tmp_path / "o.nrrd"),
        ("segment", tmp_path / "empty", "-m", model3d, "-o", tmp_path / "o.nrrd"),
        ("segment", image, "-m", model3d, "-o", tmp_path / "empty"),
        ("segment", image, "-m", model3d, "-o", "/proc/o.nrrd"),
        ("segment", image, "-m", tmp_path / "empty", "-o", tmp_path / "o.nrrd"),
        ("evaluate", tmp_path / "nope", tmp_path / "empty"),
        ("evaluate", tmp_path / "empty", tmp_path / "empty"),
        ("export", tmp_path / "garbage.nii.gz", "-o", tmp_path / "o.seg.nrrd"),
        ("export", image, "-o", tmp_path / "o.mha"),
        ("models", "import", tmp_path / "garbage.png"),
        ("models", "show", "no-such-model"),
        ("refine", image, "--mask", tmp_path / "garbage.png", "-m", model3d, "--steps", "1", "-o", tmp_path / "r.nrrd"),
    ]
    for argv in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "", (argv, err)
        line = one_line(err)
        assert "sitk" not in line and "Exception thrown" not in line and ".cxx" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "garbage.nii.gz", "garbage.png", "img.nii.gz"]


def test_an_itk_folder_warning_does_not_add_a_line(tmp_path, image):
    (tmp_path / "empty").mkdir()
    done = command("export", image, "-o", tmp_path / "o.seg.nrrd", "--reference", tmp_path / "empty")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "holds no DICOM series" in done.stderr


def test_verbose_and_debug_work_after_the_sub_command_too(tmp_path, model3d, image):
    for argv in (["-v", "segment"], ["segment", "-v"]):
        out = tmp_path / f"o{len(argv[0])}.nrrd"
        done = command(*argv, image, "-m", model3d, "-o", out, "--device", "cpu", "-q")
        assert done.returncode == 0 and "INFO" in done.stderr and "segmenting" in done.stderr, done.stderr
    done = command("segment", image, "-m", model3d, "-o", tmp_path / "x.mha.txt", "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr and "InputError" in done.stderr
    done = command("segment", image, "-m", model3d, "-o", tmp_path / "x.mha.txt")
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_a_closed_pipe_is_quiet(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "MedSegSuiteLib", "models", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # like `| head` that has already exited
    code = process.wait(timeout=120)
    err = process.stderr.read().decode()
    assert err == "" and code in (0, 141), (code, err)
    pipeline = f"{sys.executable} -m MedSegSuiteLib models path --debug | head -c 3"
    done = subprocess.run(pipeline, shell=True, capture_output=True, text=True)
    assert done.stderr == "" and done.stdout == "bun"


def test_imported_model_files_get_ordinary_permissions(capsys, tmp_path, model3d, monkeypatch):
    monkeypatch.setenv("MEDSEGSUITE_HOME", str(tmp_path / "home"))
    previous = os.umask(0o022)
    try:
        code, _, err = run(capsys, "models", "import", model3d, "--id", "copy")
    finally:
        os.umask(previous)
    assert code == 0, err
    folder = tmp_path / "home" / "models" / "copy"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
