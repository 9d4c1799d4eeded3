"""The medsegsuite command line: models, segment, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import dice, disc_image, sphere_volume, write_dicom_series
from scipy.spatial.transform import Rotation

from MedSegSuiteLib.cli import main
from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.volume import Volume


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ball_file(tmp_path) -> tuple[Path, np.ndarray, Volume]:
    image, mask = sphere_volume((34, 40, 36), (12, 22, 14), 5.0, seed=11)
    volume = Volume(image, (0.9, 1.1, 1.0), (5, -3, 12), Rotation.from_euler("z", 25, degrees=True).as_matrix())
    return write_image(volume, tmp_path / "ball.nii.gz"), mask, volume


def test_models_lists_and_prints_json(home, capsys, unet3d_dir, unet2d_dir):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "no models installed" in out
    assert run(capsys, "models", "import", unet3d_dir)[0] == 0
    assert run(capsys, "models", "import", unet2d_dir / "model.safetensors", "--id", "discs")[0] == 0
    code, out, _ = run(capsys, "models")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "VERSION", "NETWORK", "DIMS"]
    assert any(line.startswith("test-unet3d") and "Ball" in line and "CC0-1.0" in line for line in lines)
    assert any(line.startswith("discs") and " 2 " in line for line in lines)
    code, out, _ = run(capsys, "models", "--json")
    cards = json.loads(out)
    assert {c["id"] for c in cards} == {"test-unet3d", "discs"} and all("weights" in c for c in cards)
    code, out, _ = run(capsys, "models", "show", "discs")
    assert json.loads(out)["network"] == "unet"


def test_segment_writes_labels_on_exactly_the_input_grid(home, capsys, unet3d_dir, ball_file, tmp_path):
    path, mask, volume = ball_file
    code, out, err = run(capsys, "segment", path, "-m", unet3d_dir, "-o", tmp_path / "labels.nrrd", "--device", "cpu")
    assert code == 0, err
    labels = read_image(tmp_path / "labels.nrrd")
    assert labels.shape == volume.shape and labels.array.dtype == np.uint8
    np.testing.assert_allclose(labels.direction, volume.direction, atol=1e-6)
    np.testing.assert_allclose(labels.origin, volume.origin, atol=1e-5)
    assert dice(labels.array == 1, mask) > 0.85
    assert "Ball:" in out


def test_segment_by_registered_id_with_roi_and_scores(home, capsys, unet3d_dir, ball_file, tmp_path):
    path, mask, _ = ball_file
    run(capsys, "models", "import", unet3d_dir)
    code, _, err = run(
        capsys,
        "segment",
        path,
        "-m",
        "test-unet3d",
        "-o",
        tmp_path / "roi.nii.gz",
        "--roi",
        "2,8,0,28,36,26",
        "--scores",
        tmp_path / "scores.nrrd",
        "--fast",
    )
    assert code == 0, err
    labels = read_image(tmp_path / "roi.nii.gz").array
    assert not labels[26:].any() and dice(labels, mask) > 0.8
    assert read_image(tmp_path / "scores.nrrd").channels == 2


def test_segment_2d_rgb_png_and_dicom_series(home, capsys, unet2d_dir, unet3d_dir, tmp_path):
    image, mask = disc_image(72, (40, 30), 13, seed=4)
    sitk.WriteImage(sitk.GetImageFromArray(np.moveaxis(image[:, 0], 0, -1), isVector=True), str(tmp_path / "photo.png"))
    assert run(capsys, "segment", tmp_path / "photo.png", "-m", unet2d_dir, "-o", tmp_path / "photo-labels.png")[0] == 0
    assert dice(read_image(tmp_path / "photo-labels.png").array, mask) > 0.8
    ball, ball_mask = sphere_volume((34, 40, 36), (12, 22, 14), 5.0, seed=3)
    write_dicom_series(Volume(np.round(ball).astype(np.int16), (0.8, 0.8, 1.5), (0, 0, 0)), tmp_path / "dicom")
    code, _, err = run(capsys, "segment", tmp_path / "dicom", "-m", unet3d_dir, "-o", tmp_path / "ct.nrrd")
    assert code == 0, err
    assert dice(read_image(tmp_path / "ct.nrrd").array, ball_mask) > 0.85


def _one_line_error(code, err, pattern):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medsegsuite: error: "), err
    assert pattern in lines[0], lines[0]


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(home, capsys, unet3d_dir, ball_file, tmp_path):
    path, _, volume = ball_file
    out = tmp_path / "out.nrrd"
    write_image(Volume(np.random.default_rng(0).random((2, 3, 4, 5), np.float32)), tmp_path / "multi.nrrd")
    sitk.WriteImage(sitk.JoinSeries([sitk.Image([5, 4, 3], sitk.sitkFloat32)] * 2), str(tmp_path / "four_d.nii.gz"))
    nan = volume.array.copy()
    nan[3, 4, 5] = np.nan
    write_image(volume.with_array(nan), tmp_path / "nan.nrrd")
    write_image(volume.with_array(np.full(volume.shape, 7, np.int16)), tmp_path / "flat.nrrd")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    cases = [
        ((tmp_path / "missing.nii.gz", "-m", unet3d_dir), "does not exist"),
        ((tmp_path / "broken.nii.gz", "-m", unet3d_dir), "truncated or corrupt"),
        ((tmp_path / "four_d.nii.gz", "-m", unet3d_dir), "4D image"),
        ((tmp_path / "multi.nrrd", "-m", unet3d_dir), "expects 1-channel images but this image has 2"),
        ((tmp_path / "nan.nrrd", "-m", unet3d_dir), "NaN or infinite"),
        ((tmp_path / "flat.nrrd", "-m", unet3d_dir), "constant"),
        ((path, "-m", unet3d_dir, "--roi", "0,0,0,99,10,10"), "outside the image"),
        ((path, "-m", "no-such-model"), "no model with id 'no-such-model'"),
        ((path, "-m", unet3d_dir, "--device", "tpu"), "unknown device 'tpu'"),
    ]
    for args, pattern in cases:
        code, _, err = run(capsys, "segment", *args, "-o", out)
        _one_line_error(code, err, pattern)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_tampered_weights_and_lying_card_are_refused(home, capsys, unet3d_dir, ball_file, tmp_path):
    path, _, _ = ball_file
    tampered = tmp_path / "tampered"
    shutil.copytree(unet3d_dir, tampered)
    data = bytearray((tampered / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (tampered / "model.safetensors").write_bytes(bytes(data))
    code, _, err = run(capsys, "segment", path, "-m", tampered, "-o", tmp_path / "a.nrrd")
    _one_line_error(code, err, "does not match its model card")
    lying = tmp_path / "lying"
    shutil.copytree(unet3d_dir, lying)
    card = json.loads((lying / "card.json").read_text(encoding="utf-8"))
    card["config"]["out_channels"] = 3
    (lying / "card.json").write_text(json.dumps(card))
    code, _, err = run(capsys, "segment", path, "-m", lying, "-o", tmp_path / "b.nrrd")
    _one_line_error(code, err, "do not fit the network the model card describes")
    code, _, err = run(capsys, "models", "import", lying)
    _one_line_error(code, err, "do not fit the network")


def test_existing_output_needs_overwrite(home, capsys, unet3d_dir, ball_file, tmp_path):
    path, _, _ = ball_file
    (tmp_path / "taken.nrrd").write_text("keep me")
    code, _, err = run(capsys, "segment", path, "-m", unet3d_dir, "-o", tmp_path / "taken.nrrd")
    _one_line_error(code, err, "already exists; pass --overwrite")
    assert (tmp_path / "taken.nrrd").read_text(encoding="utf-8") == "keep me"
    assert run(capsys, "segment", path, "-m", unet3d_dir, "-o", tmp_path / "taken.nrrd", "--overwrite", "-q")[0] == 0


def test_installed_command_shows_a_progress_bar_on_a_terminal(home, unet3d_dir, ball_file, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    path, _, _ = ball_file
    script = Path(sys.executable).with_name("medsegsuite")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "MedSegSuiteLib"]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    done = subprocess.run(
        [*command, "segment", str(path), "-m", str(unet3d_dir), "-o", str(tmp_path / "cli.nrrd")],
        stdout=subprocess.PIPE,
        stderr=follower,
        timeout=300,
    )
    os.close(follower)
    terminal = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        terminal += chunk
    os.close(leader)
    assert done.returncode == 0, terminal.decode(errors="replace")
    assert b"segmenting" in terminal and b"/" in terminal
    assert (tmp_path / "cli.nrrd").is_file()
    bad = subprocess.run(
        [*command, "segment", "nope.nii", "-m", "x", "-o", "y.nrrd"],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
    )
    assert bad.returncode == 2 and bad.stderr.strip() == "medsegsuite: error: nope.nii does not exist"


def test_shared_options_work_after_the_command_and_models_list_is_models(home, capsys, unet3d_dir):
    assert run(capsys, "models", "import", unet3d_dir)[0] == 0
    assert run(capsys, "models", "list")[1] == run(capsys, "models")[1]
    assert json.loads(run(capsys, "models", "list", "--json")[1]) == json.loads(run(capsys, "models", "--json")[1])
    assert json.loads(run(capsys, "models", "--json", "list")[1])[0]["id"] == "test-unet3d"
    # --debug after the command shows the traceback (the error propagates), as before it.
    for argv in (["--debug", "models", "show", "nothing"], ["models", "show", "nothing", "--debug"]):
        with pytest.raises(Exception, match="nothing"):
            main([str(a) for a in argv])
    code, _, err = run(capsys, "models", "show", "nothing", "-v")
    assert code == 2 and "nothing" in err and "Traceback" not in err


def test_segment_summary_counts_pixels_for_photos_and_voxels_for_volumes(home, capsys, unet2d_dir, tmp_path):
    image, _ = disc_image(48, (24, 24), 9, seed=5)
    sitk.WriteImage(sitk.GetImageFromArray(np.moveaxis(image[:, 0], 0, -1), isVector=True), str(tmp_path / "p.png"))
    code, out, _ = run(capsys, "segment", tmp_path / "p.png", "-m", unet2d_dir, "-o", tmp_path / "p-labels.png")
    assert code == 0 and "Disc: " in out and " pixels" in out and "voxels" not in out
