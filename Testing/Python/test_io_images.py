"""Reading and writing images: every supported format, DICOM series, and bad files."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_dicom_series
from scipy.spatial.transform import Rotation

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.io import atomic_output, read_image, write_image
from MedSegSuiteLib.volume import Volume


@pytest.fixture
def oblique_volume() -> Volume:
    rng = np.random.default_rng(0)
    return Volume(
        rng.integers(-1000, 2000, (5, 7, 9)).astype(np.int16),
        (0.7, 0.9, 2.5),
        (-12.5, 30.0, 7.25),
        Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix(),
    )


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_volume_formats_round_trip_voxels_and_oblique_geometry(tmp_path, oblique_volume, suffix):
    path = write_image(oblique_volume, tmp_path / f"image{suffix}")
    back = read_image(path)
    assert np.array_equal(back.array, oblique_volume.array) and back.array.dtype == np.int16
    np.testing.assert_allclose(back.spacing, oblique_volume.spacing, atol=1e-6)
    np.testing.assert_allclose(back.origin, oblique_volume.origin, atol=1e-5)
    np.testing.assert_allclose(back.direction, oblique_volume.direction, atol=1e-6)


def test_rgb_volume_round_trips_as_channels(tmp_path):
    rgb = Volume(np.random.default_rng(1).integers(0, 255, (3, 2, 4, 5)).astype(np.uint8))
    back = read_image(write_image(rgb, tmp_path / "rgb.nrrd"))
    assert back.channels == 3 and np.array_equal(back.array, rgb.array)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif", ".bmp"])
def test_2d_rgb_images_become_one_slice_three_channel_volumes(tmp_path, suffix):
    pixels = np.random.default_rng(2).integers(0, 255, (20, 30, 3)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(tmp_path / f"photo{suffix}"))
    volume = read_image(tmp_path / f"photo{suffix}")
    assert volume.array.shape == (3, 1, 20, 30) and volume.is_2d
    if suffix != ".jpg":
        assert np.array_equal(volume.array[:, 0], np.moveaxis(pixels, -1, 0))


def test_2d_grey_png_and_gif(tmp_path):
    from PIL import Image

    pixels = (np.arange(12 * 16).reshape(12, 16) % 256).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "grey.png")
    Image.fromarray(pixels).save(tmp_path / "mask.gif")
    for name in ("grey.png", "mask.gif"):
        volume = read_image(tmp_path / name)
        assert volume.array.shape == (1, 12, 16)
        assert np.array_equal(volume.array[0], pixels)


def test_label_map_of_a_2d_image_can_be_written_as_png(tmp_path):
    labels = Volume(np.eye(6, dtype=np.uint8)[None])
    back = read_image(write_image(labels, tmp_path / "labels.png"))
    assert np.array_equal(back.array, labels.array)
    with pytest.raises(InputError, match="holds one slice"):
        write_image(Volume(np.zeros((2, 3, 3), np.uint8)), tmp_path / "x.png")


def test_dicom_series_folder_and_single_file_read_with_geometry(tmp_path, oblique_volume):
    files = write_dicom_series(oblique_volume, tmp_path / "series")
    for source in (tmp_path / "series", files[2]):
        volume = read_image(source)
        assert np.array_equal(volume.array, oblique_volume.array)
        np.testing.assert_allclose(volume.origin, oblique_volume.origin, atol=1e-4)
        np.testing.assert_allclose(volume.direction, oblique_volume.direction, atol=1e-5)
        np.testing.assert_allclose(volume.spacing, oblique_volume.spacing, atol=1e-4)


def test_folder_with_two_series_asks_which_one(tmp_path, oblique_volume):
    write_dicom_series(oblique_volume, tmp_path / "mixed", series_uid="1.2.3.4.1")
    write_dicom_series(oblique_volume, tmp_path / "mixed", series_uid="1.2.3.4.2")
    with pytest.raises(InputError, match="holds 2 DICOM series"):
        read_image(tmp_path / "mixed")
    assert read_image(tmp_path / "mixed", series_uid="1.2.3.4.2").shape == oblique_volume.shape
    with pytest.raises(InputError, match="is not in"):
        read_image(tmp_path / "mixed", series_uid="9.9")


def test_empty_folder_is_not_a_dicom_series(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path / "empty")


def test_missing_unreadable_truncated_empty_and_unsupported_files(tmp_path, oblique_volume):
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "garbage.nrrd").write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="cannot read"):
        read_image(tmp_path / "garbage.nrrd")
    full = write_image(oblique_volume, tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_image(tmp_path / "cut.nii.gz")
    raw = write_image(oblique_volume, tmp_path / "full.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:-10])
    with pytest.raises(InputError, match="is truncated: its header describes"):
        read_image(tmp_path / "cut.nii")
    nrrd = write_image(oblique_volume, tmp_path / "full.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(nrrd[: len(nrrd) * 2 // 3])
    with pytest.raises(InputError, match="cannot read"):
        read_image(tmp_path / "cut.nrrd")
    (tmp_path / "zero.nii").write_bytes(b"")
    with pytest.raises(InputError, match="is empty"):
        read_image(tmp_path / "zero.nii")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="unsupported file type"):
        read_image(tmp_path / "notes.txt")


def test_1d_image_is_refused_with_a_reason(tmp_path):
    header = b"NRRD0004\ntype: float\ndimension: 1\nsizes: 10\nencoding: raw\nendian: little\n\n"
    (tmp_path / "line.nrrd").write_bytes(header + np.arange(10, dtype=np.float32).tobytes())
    with pytest.raises(InputError, match="line.nrrd is a 1D image"):
        read_image(tmp_path / "line.nrrd")


def test_4d_image_is_refused_with_a_reason(tmp_path):
    image = sitk.JoinSeries([sitk.Image([6, 5, 4], sitk.sitkFloat32)] * 3)
    assert image.GetDimension() == 4
    sitk.WriteImage(image, str(tmp_path / "series4d.nii.gz"))
    with pytest.raises(InputError, match="4D image"):
        read_image(tmp_path / "series4d.nii.gz")


def test_writes_are_atomic_and_never_overwrite_unasked(tmp_path, oblique_volume):
    target = write_image(oblique_volume, tmp_path / "out.nrrd")
    before = target.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        write_image(oblique_volume, target)
    write_image(Volume(np.zeros((1, 2, 2), np.uint8)), target, overwrite=True)
    assert target.read_bytes() != before
    with pytest.raises(RuntimeError, match="disk full"), atomic_output(tmp_path / "half.nrrd") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nrrd"]
    with pytest.raises(InputError, match="does not exist"):
        write_image(oblique_volume, tmp_path / "no" / "such" / "dir.nrrd")


def test_written_files_get_ordinary_permissions_not_temp_file_ones(tmp_path, oblique_volume):
    import os

    umask = os.umask(0o022)
    try:
        path = write_image(oblique_volume, tmp_path / "shared.nrrd")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
