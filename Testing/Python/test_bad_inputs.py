"""Bad inputs through the command line: exit status 2, one specific line on stderr, nothing written.

Complements the cases in test_cli.py (missing, corrupt, 4D, multi-channel, NaN,
constant, ROI, unknown model, device, tampered and lying models) and
test_export_cli.py with the rest of the issue's matrix: 1D files, impossible
spacings and direction matrices in headers, images larger than free memory,
unreadable files, foreign and truncated weights, escaping archives and code-running
pickles on import, unknown labels and mismatched or empty masks for refinement,
finetuning and export.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import grey_disc, sphere_volume
from PIL import Image

from MedSegSuiteLib.cli import main
from MedSegSuiteLib.io import write_image
from MedSegSuiteLib.models.weights import sha256_file
from MedSegSuiteLib.volume import Volume

BALL, BALL_MASK = sphere_volume((16, 32, 32), (8, 16, 16), 5.0, seed=5)


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_refused(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medsegsuite: error: "), err
    assert pattern in lines[0], lines[0]


def _no_partials(*folders: Path) -> None:
    for folder in folders:
        if folder.is_dir():
            assert not [p.name for p in folder.rglob("*") if ".partial" in p.name]


def _raw_nrrd(path: Path, header_lines: str) -> Path:
    header = f"NRRD0004\ntype: float\n{header_lines}encoding: raw\nendian: little\n\n".encode()
    path.write_bytes(header + BALL.astype("<f4").tobytes())
    return path


def _meta_image(path: Path, spacing: str) -> Path:
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\nElementSpacing = {spacing}\n"
        "DimSize = 32 32 16\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + BALL.astype("<f4").tobytes())
    return path


def _nifti_with_pixdim(path: Path, axis: int, value: float) -> Path:
    write_image(Volume(BALL), path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<f", data, 76 + 4 * axis, value)  # pixdim[axis] of a NIfTI-1 header
    path.write_bytes(bytes(data))
    return path


def _image_1d(path: Path) -> Path:
    header = b"NRRD0004\ntype: float\ndimension: 1\nsizes: 10\nencoding: raw\nendian: little\n\n"
    path.write_bytes(header + np.arange(10, dtype="<f4").tobytes())
    return path


_SPACE = "dimension: 3\nspace: left-posterior-superior\nsizes: 32 32 16\nspace origin: (0,0,0)\n"
IMAGE_CASES = {
    "1D image": (lambda d: _image_1d(d / "line.nrrd"), "line.nrrd is a 1D image (size (10,))"),
    "zero spacing (NRRD)": (
        lambda d: _raw_nrrd(d / "flat.nrrd", _SPACE + "space directions: (1,0,0) (0,0,0) (0,0,1)\n"),
        "has an impossible geometry: its header gives a zero voxel spacing",
    ),
    "zero spacing (MetaImage)": (
        lambda d: _meta_image(d / "flat.mha", "1 0 1"),
        "has an impossible geometry: its header gives a zero voxel spacing",
    ),
    "zero spacing (NIfTI)": (
        lambda d: _nifti_with_pixdim(d / "flat.nii", 3, 0.0),
        "its header gives axis k a voxel spacing of 0 mm (pixdim[3]); spacing must be positive",
    ),
    "negative spacing (NIfTI)": (
        lambda d: _nifti_with_pixdim(d / "mirror.nii", 2, -2.0),
        "its header gives axis j a voxel spacing of -2 mm (pixdim[2]); spacing must be positive",
    ),
    "sheared direction matrix": (
        lambda d: _raw_nrrd(d / "sheared.nrrd", _SPACE + "space directions: (1,0,0) (0.5,1,0) (0,0,1)\n"),
        "direction matrix is not orthonormal",
    ),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_images_with_impossible_headers_are_refused(home, capsys, unet3d_dir, tmp_path, case):
    make, pattern = IMAGE_CASES[case]
    source = make(tmp_path)
    out = tmp_path / "labels.nrrd"
    code, _, err = _run(capsys, "segment", source, "-m", unet3d_dir, "-o", out)
    _assert_refused(code, err, pattern)
    assert not out.exists()
    _no_partials(tmp_path)


def test_negative_metaimage_spacing_is_read_as_a_mirrored_axis_at_the_same_positions(tmp_path):
    """ITK turns a negative MetaImage spacing into a flipped axis; every voxel keeps its position."""
    from MedSegSuiteLib.io import read_image

    volume = read_image(_meta_image(tmp_path / "mirror.mha", "1 -2 1"))
    assert volume.spacing == (1.0, 2.0, 1.0)
    np.testing.assert_allclose(volume.grid.index_to_physical((3, 5, 7)), (3.0, -10.0, 7.0))


def test_an_image_larger_than_free_memory_is_refused_before_reading_with_the_amount(
    home, capsys, unet3d_dir, tmp_path, monkeypatch
):
    from MedSegSuiteLib import memory

    source = write_image(Volume(BALL), tmp_path / "ball.nrrd")
    monkeypatch.setattr(memory, "available_bytes", lambda: 50_000)
    out = tmp_path / "labels.nrrd"
    code, _, err = _run(capsys, "segment", source, "-m", unet3d_dir, "-o", out)
    _assert_refused(code, err, "reading ball.nrrd (32 x 32 x 16 voxels) needs about 128.0 kB of memory")
    assert "only 48.8 kB is free" in err and not out.exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_refused_with_the_reason(home, capsys, unet3d_dir, tmp_path):
    source = write_image(Volume(BALL), tmp_path / "secret.nii.gz")
    source.chmod(0)
    try:
        code, _, err = _run(capsys, "segment", source, "-m", unet3d_dir, "-o", tmp_path / "labels.nrrd")
    finally:
        source.chmod(0o644)
    _assert_refused(code, err, f"cannot read {source}: Permission denied")


@pytest.fixture
def ball_file(tmp_path) -> Path:
    return write_image(Volume(BALL), tmp_path / "ball.nrrd")


def _model_with_weights(folder: Path, card_dir: Path, weights: bytes) -> Path:
    """``card_dir``'s card beside other weights, its sha256 and size updated so only the content can be wrong."""
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(weights)
    card = json.loads((card_dir / "card.json").read_text(encoding="utf-8"))
    card["weights"].update(sha256=sha256_file(folder / "model.safetensors"), bytes=len(weights))
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def test_weights_of_another_network_are_refused(home, capsys, unet3d_dir, unet2d_dir, ball_file, tmp_path):
    foreign = _model_with_weights(tmp_path / "foreign", unet3d_dir, (unet2d_dir / "model.safetensors").read_bytes())
    out = tmp_path / "labels.nrrd"
    code, _, err = _run(capsys, "segment", ball_file, "-m", foreign, "-o", out)
    _assert_refused(code, err, "do not fit the network the model card describes")
    assert not out.exists()
    code, _, err = _run(capsys, "models", "import", foreign, "--id", "foreign")
    _assert_refused(code, err, "do not fit the network")
    assert not (home / "models" / "foreign").exists()


def test_truncated_weights_are_named_truncated(home, capsys, unet3d_dir, ball_file, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(unet3d_dir, damaged)
    weights = damaged / "model.safetensors"
    full = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: full // 3])
    out = tmp_path / "labels.nrrd"
    code, _, err = _run(capsys, "segment", ball_file, "-m", damaged, "-o", out)
    _assert_refused(code, err, f"is truncated: it holds {full // 3} bytes, its model card says {full}")
    assert not out.exists()
    # Without a size to compare with, the safetensors header gives it away.
    cut = _model_with_weights(tmp_path / "cut", unet3d_dir, (unet3d_dir / "model.safetensors").read_bytes()[:-100])
    code, _, err = _run(capsys, "segment", ball_file, "-m", cut, "-o", out)
    _assert_refused(code, err, "is truncated or corrupt")


def test_import_refuses_an_archive_that_escapes_its_folder(home, capsys, unet3d_dir, tmp_path):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(unet3d_dir / "card.json", "m/card.json")
        handle.write(unet3d_dir / "model.safetensors", "m/model.safetensors")
        handle.writestr("m/../../../planted.txt", "boo")
    code, _, err = _run(capsys, "models", "import", archive)
    _assert_refused(code, err, "member 'm/../../../planted.txt' would be written outside its folder")
    assert not list(tmp_path.parent.rglob("planted.txt"))
    assert not (home / "models").is_dir() or not list((home / "models").iterdir())


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_import_refuses_a_checkpoint_whose_pickle_would_run_code(home, capsys, unet3d_dir, tmp_path):
    import torch

    from MedSegSuiteLib.models.weights import read_weights

    marker = tmp_path / "ran"
    state = read_weights(unet3d_dir / "model.safetensors")
    torch.save({"state_dict": state, "extra": _RunsCode(marker)}, tmp_path / "best.pth")
    code, _, err = _run(capsys, "models", "import", tmp_path / "best.pth", "--card", unet3d_dir / "card.json")
    _assert_refused(code, err, "could run code")
    assert not marker.exists()
    assert not (home / "models").is_dir() or not list((home / "models").iterdir())


@pytest.fixture
def disc_case(tmp_path) -> tuple[Path, Path]:
    image, mask = grey_disc(32, (16, 15), 6, seed=3)
    Image.fromarray(image).save(tmp_path / "disc.png")
    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "mask.png")
    return tmp_path / "disc.png", tmp_path / "mask.png"


@pytest.mark.parametrize(
    ("problem", "pattern"),
    [
        ("empty", "the mask is empty"),
        ("unknown label", "label value(s) [7]"),
        ("other grid", "grid"),
    ],
)
def test_refinement_refuses_bad_masks(home, capsys, hidiff_dir, disc_case, tmp_path, problem, pattern):
    image, mask = disc_case
    pixels = np.asarray(Image.open(mask))
    if problem == "empty":
        Image.fromarray(np.zeros_like(pixels)).save(mask)
    elif problem == "unknown label":
        Image.fromarray(pixels * 7).save(mask)
    else:
        Image.fromarray(np.pad(pixels, ((0, 4), (0, 0)))).save(mask)
    out = tmp_path / "refined.png"
    code, _, err = _run(capsys, "refine", image, "--mask", mask, "-m", hidiff_dir, "--steps", "2", "-o", out)
    _assert_refused(code, err, pattern)
    assert not out.exists()
    _no_partials(tmp_path)


@pytest.mark.parametrize(
    ("problem", "pattern"),
    [
        ("unknown label", "label value(s) 3 match no label of the model (1:Ball)"),
        ("other grid", "a.nrrd's grid differs from the reference volume's"),
    ],
)
def test_finetuning_refuses_unknown_labels_and_mismatched_segmentations(
    home, capsys, unet3d_dir, tmp_path, problem, pattern
):
    data = tmp_path / "cases"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    write_image(Volume(BALL), data / "images" / "a.nrrd")
    if problem == "unknown label":
        write_image(Volume(BALL_MASK * 3), data / "labels" / "a.nrrd")
    else:
        write_image(Volume(BALL_MASK, (1.0, 1.0, 1.0), (4.0, 0.0, 0.0)), data / "labels" / "a.nrrd")
    code, _, err = _run(
        capsys, "finetune", "-m", unet3d_dir, "--labelled", data, "--iterations", "2", "--device", "cpu"
    )
    _assert_refused(code, err, pattern)
    assert not (home / "models").is_dir() or not list((home / "models").iterdir())


def test_export_refuses_label_values_its_model_does_not_know(home, capsys, unet3d_dir, tmp_path):
    segmentation = write_image(Volume(BALL_MASK * 7), tmp_path / "seg.nii.gz")
    for target in ("out.seg.nrrd", "out.nii.gz"):
        code, _, err = _run(capsys, "export", segmentation, "-o", tmp_path / target, "--labels", unet3d_dir)
        _assert_refused(code, err, "holds value(s) 7 that its label table does not list (it lists 1)")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["seg.nii.gz"]


@pytest.mark.parametrize(
    "content, pattern",
    [(None, "cannot read the label table"), ("{not json", "is not valid JSON"), ('{"1": "Ball"}', "a JSON list")],
)
def test_train_refuses_a_label_table_it_cannot_use(home, capsys, tmp_path, content, pattern):
    table = tmp_path / "labels.json"
    if content is not None:
        table.write_text(content)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    write_image(Volume(BALL), data / "images" / "a.nrrd")
    write_image(Volume(BALL_MASK), data / "labels" / "a.nrrd")
    code, _, err = _run(capsys, "train", "--network", "unet", "--data", data, "-o", tmp_path / "m", "--labels", table)
    _assert_refused(code, err, pattern)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "network, option, pattern",
    [
        (
            "dnet",
            ["--patch", "48,32,32"],
            "--patch 48,32,32 does not suit this network: D-Net needs every spatial size",
        ),
        ("unet", ["--recipe", "augment={'flip_axes':'xa'}"], "flip_axes takes some of x, y and z"),
        ("unet", ["--recipe", "augment={'tilt':3}"], "--recipe augment= takes a dict of augmentation settings"),
    ],
)
def test_train_refuses_a_patch_or_augmentation_it_cannot_use(home, capsys, tmp_path, network, option, pattern):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    for case in ("a", "b"):
        write_image(Volume(BALL), data / "images" / f"{case}.nrrd")
        write_image(Volume(BALL_MASK), data / "labels" / f"{case}.nrrd")
    code, _, err = _run(
        capsys, "train", "--network", network, "--data", data, "-o", tmp_path / "m", "--iterations", "1", *option
    )
    _assert_refused(code, err, pattern)
    assert not (tmp_path / "m").exists()
