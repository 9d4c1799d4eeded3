"""Headers and archives that lie or reach outside themselves, through the CLI.

* NaN or infinite spacing, origin or direction in NIfTI, NRRD and MetaImage headers is
  refused like a zero spacing (ITK would silently put 1 or 0 in their place).
* A header whose data file lies outside the header's folder, or is not a regular
  file, is refused (MetaImage ``ElementDataFile``, detached NRRD ``data file``).
* An imported model whose card names weights outside its folder is refused; zip
  archives have a size, member-count and inflation-ratio limit.
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
import torch
from conftest import UNET3D_CARD
from conftest import one_error_line as one_line
from conftest import run_cli as run

from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.volume import Volume

SHAPE = (4, 5, 6)
RAW = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE).tobytes()


def nrrd(path: Path, fields: str, data: bytes = RAW) -> Path:
    header = f"NRRD0004\ntype: short\ndimension: 3\nsizes: 6 5 4\nencoding: raw\nendian: little\n{fields}\n\n"
    path.write_bytes(header.encode() + data)
    return path


def meta(path: Path, fields: str, data_file: str = "LOCAL", data: bytes = RAW) -> Path:
    header = f"ObjectType = Image\nNDims = 3\n{fields}DimSize = 6 5 4\nElementType = MET_SHORT\n"
    path.write_bytes((header + f"ElementDataFile = {data_file}\n").encode() + (data if data_file == "LOCAL" else b""))
    return path


def nifti(path: Path, offset: int, fmt: str, value: float) -> Path:
    write_image(Volume(np.zeros(SHAPE, np.int16), (1.0, 1.0, 2.0)), path)
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path


def segment_refuses(capsys, image: Path, tmp_path: Path, *words: str) -> str:
    out = tmp_path / "out.nrrd"
    code, stdout, err = run(capsys, "segment", image, "-m", "any-model", "-o", out)
    assert code == 2 and stdout == "", err
    line = one_line(err)
    for word in words:
        assert word in line, line
    assert not out.exists()
    return line


# -- NaN / infinite geometry --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("spacings.nrrd", "spacings: nan 1 1"),
        (
            "directions.nrrd",
            "space: left-posterior-superior\nspace directions: (inf,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)",
        ),
        (
            "origin.nrrd",
            "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,-NaN,0)",
        ),
    ],
)
def test_nrrd_with_a_non_finite_geometry_is_refused(capsys, tmp_path, name, fields):
    segment_refuses(capsys, nrrd(tmp_path / name, fields), tmp_path, "impossible geometry", name)


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("spacing.mha", "ElementSpacing = nan 1 1\n"),
        ("offset.mha", "Offset = inf 0 0\n"),
        ("matrix.mha", "TransformMatrix = 1 0 0 0 nan 0 0 0 1\n"),
    ],
)
def test_metaimage_with_a_non_finite_geometry_is_refused(capsys, tmp_path, name, fields):
    segment_refuses(capsys, meta(tmp_path / name, fields), tmp_path, "impossible geometry", name)


@pytest.mark.parametrize(
    ("what", "offset", "value"),
    [
        ("pixdim", 80, float("nan")),
        ("qoffset", 268, float("inf")),
        ("quatern", 256, float("nan")),
        ("srow", 280, float("-inf")),
    ],
)
def test_nifti_with_a_non_finite_geometry_is_refused(capsys, tmp_path, what, offset, value):
    path = nifti(tmp_path / f"{what}.nii", offset, "<f", value)
    line = segment_refuses(capsys, path, tmp_path, "impossible geometry")
    assert ("NaN" if np.isnan(value) else "infinite") in line


def test_finite_headers_still_read_with_their_geometry(tmp_path):
    volume = read_image(
        nrrd(
            tmp_path / "ok.nrrd",
            "space: left-posterior-superior\nspace directions: (0.5,0,0) (0,0.7,0) (0,0,2)\nspace origin: (1,2,3)",
        )
    )
    assert volume.spacing == pytest.approx((0.5, 0.7, 2.0)) and volume.origin == pytest.approx((1, 2, 3))
    volume = read_image(meta(tmp_path / "ok.mha", "ElementSpacing = 0.5 0.7 2\nOffset = 1 2 3\n"))
    assert volume.spacing == pytest.approx((0.5, 0.7, 2.0)) and np.array_equal(
        volume.array, np.frombuffer(RAW, np.int16).reshape(SHAPE)
    )
    path = write_image(Volume(np.zeros(SHAPE, np.int16), (0.5, 0.7, 2.0), (1, 2, 3)), tmp_path / "ok.nii.gz")
    assert read_image(path).origin == pytest.approx((1, 2, 3))


# -- data files outside the header ------------------------------------------------------------------
def test_detached_headers_may_not_reach_outside_their_folder(capsys, tmp_path):
    secret = tmp_path / "elsewhere" / "voxels.raw"
    secret.parent.mkdir()
    secret.write_bytes(RAW)
    headers = tmp_path / "headers"
    headers.mkdir()
    cases = [
        nrrd(headers / "up.nhdr", "data file: ../elsewhere/voxels.raw", data=b""),
        nrrd(headers / "absolute.nhdr", f"data file: {secret}", data=b""),
        meta(headers / "up.mhd", "", data_file="../elsewhere/voxels.raw"),
        meta(headers / "absolute.mhd", "", data_file=str(secret)),
    ]
    (headers / "link.raw").symlink_to(secret)
    cases.append(meta(headers / "link.mhd", "", data_file="link.raw"))
    for header in cases:
        segment_refuses(capsys, header, tmp_path, "outside its own folder", header.name)


def test_a_data_file_that_is_not_a_regular_file_is_refused(capsys, tmp_path):
    (tmp_path / "voxels").mkdir()
    segment_refuses(capsys, meta(tmp_path / "dir.mhd", "", data_file="voxels"), tmp_path, "not a regular file")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.raw")  # reading it would block forever
        segment_refuses(capsys, nrrd(tmp_path / "pipe.nhdr", "data file: pipe.raw", data=b""), tmp_path, "regular")


def test_detached_headers_with_their_data_beside_them_still_read(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "voxels.raw").write_bytes(RAW)
    expected = np.frombuffer(RAW, np.int16).reshape(SHAPE)
    assert np.array_equal(read_image(meta(tmp_path / "a.mhd", "", data_file="sub/voxels.raw")).array, expected)
    assert np.array_equal(read_image(nrrd(tmp_path / "a.nhdr", "data file: sub/voxels.raw", data=b"")).array, expected)


# -- models that reach outside their folder; archive limits ---------------------------------------------
@pytest.fixture
def model_folder(tmp_path, home) -> Path:
    from MedSegSuiteLib import networks
    from MedSegSuiteLib.models import save_model

    torch.manual_seed(0)
    network = networks.create("unet", "lite", spatial_dims=3, in_channels=1, out_channels=2)
    (tmp_path / "src").mkdir()
    save_model(tmp_path / "src" / "model", network, UNET3D_CARD)
    return tmp_path / "src" / "model"


def _point_card_at(folder: Path, name: str) -> None:
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    card["weights"] = {"file": name}
    (folder / "card.json").write_text(json.dumps(card), encoding="utf-8")


def test_imported_cards_naming_weights_outside_their_folder_are_refused(capsys, tmp_path, model_folder, home):
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(model_folder / "model.safetensors", outside)
    for name in ("../outside.safetensors", str(outside), "link.safetensors"):
        if name == "link.safetensors":
            (model_folder / name).symlink_to(outside)
        _point_card_at(model_folder, name)
        code, _, err = run(capsys, "models", "import", model_folder, "--id", "sneaky")
        assert code == 2 and "outside the model folder" in one_line(err), name
    _point_card_at(model_folder, "model.safetensors")
    (model_folder / "link.safetensors").unlink()
    code, _, err = run(capsys, "models", "import", model_folder, "--id", "honest")
    assert code == 0, err
    assert [p.name for p in (home / "models").iterdir() if not p.name.startswith(".")] == ["honest"]


def test_an_installed_model_whose_weights_link_elsewhere_does_not_load(capsys, tmp_path, model_folder, home):
    target = home / "models" / "linked"
    target.mkdir(parents=True)
    shutil.copyfile(model_folder / "card.json", target / "card.json")
    _point_card_at(target, "model.safetensors")
    card = json.loads((target / "card.json").read_text(encoding="utf-8"))
    card["id"] = "linked"
    (target / "card.json").write_text(json.dumps(card), encoding="utf-8")
    (target / "model.safetensors").symlink_to(model_folder / "model.safetensors")
    image = write_image(Volume(np.zeros((8, 16, 16), np.float32)), tmp_path / "img.nii.gz")
    code, _, err = run(capsys, "segment", image, "-m", "linked", "-o", tmp_path / "o.nrrd")
    assert code == 2 and "outside the model folder" in one_line(err)


def test_zip_archives_have_size_and_ratio_limits(capsys, tmp_path, model_folder, home, monkeypatch):
    import MedSegSuiteLib.models.registry as registry

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(model_folder / "card.json", "model/card.json")
        archive.writestr("model/model.safetensors", b"\0" * (64 << 20))  # 64 MB of zeros deflate ~1000x
    assert bomb.stat().st_size < 1 << 20
    code, _, err = run(capsys, "models", "import", bomb)
    assert code == 2 and "inflate" in one_line(err)

    honest = tmp_path / "honest.zip"
    with zipfile.ZipFile(honest, "w", zipfile.ZIP_DEFLATED) as archive:
        for item in model_folder.iterdir():
            archive.write(item, f"model/{item.name}")
    monkeypatch.setattr(registry, "ZIP_MAX_BYTES", 1000)
    code, _, err = run(capsys, "models", "import", honest)
    assert code == 2 and "unpack to" in one_line(err)
    monkeypatch.setattr(registry, "ZIP_MAX_BYTES", 8 << 30)
    monkeypatch.setattr(registry, "ZIP_MAX_MEMBERS", 1)
    code, _, err = run(capsys, "models", "import", honest)
    assert code == 2 and "members" in one_line(err)
    monkeypatch.setattr(registry, "ZIP_MAX_MEMBERS", 1000)
    assert not (home / "models").exists() or not list((home / "models").iterdir())
    code, out, err = run(capsys, "models", "import", honest)
    assert code == 0 and "imported test-unet3d" in out, err
