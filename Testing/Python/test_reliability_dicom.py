"""DICOM series that are not one regular volume: refused with the reason, or (slightly uneven) resampled and said so."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli as run
from conftest import write_dicom_series

from MedSegSuiteLib.io import read_image
from MedSegSuiteLib.volume import Volume

pydicom = pytest.importorskip("pydicom")

SHAPE = (8, 12, 10)
STEP = 2.5
UID = "1.2.826.0.1.3680043.8.498.77"


@pytest.fixture
def series(tmp_path) -> tuple[Path, list[Path]]:
    """A CT series whose voxel values are 100 x the slice's height in mm (so positions can be checked)."""
    z = np.arange(SHAPE[0], dtype=np.float64) * STEP
    array = np.broadcast_to((100 * z)[:, None, None], SHAPE).astype(np.int16)
    volume = Volume(array, (0.8, 0.8, STEP), (-5.0, 3.0, 0.0))
    folder = tmp_path / "series"
    return folder, write_dicom_series(volume, folder, UID)


def edit(path: Path, **changes) -> None:
    dataset = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(dataset, key, value)
    dataset.save_as(path)


def position(path: Path) -> list[float]:
    return [float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient]


def refused(capsys, folder: Path, tmp_path: Path, *words: str) -> str:
    out = tmp_path / "labels.nrrd"
    code, stdout, err = run(capsys, "segment", folder, "-m", "any", "-o", out)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and stdout == "" and len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()
    return lines[0]


def test_a_complete_even_series_reads_unchanged(series):
    folder, _ = series
    volume = read_image(folder)
    assert volume.shape == SHAPE and volume.spacing == pytest.approx((0.8, 0.8, STEP))
    assert np.array_equal(volume.array[:, 0, 0], (100 * np.arange(SHAPE[0]) * STEP).astype(np.int16))


def test_missing_slices_are_refused_with_how_many(capsys, series, tmp_path):
    folder, files = series
    files[3].unlink()
    files[4].unlink()
    refused(capsys, folder, tmp_path, "missing 2 slice(s)", "2.5 mm apart")


def test_duplicate_positions_are_refused(capsys, series, tmp_path):
    folder, files = series
    edit(files[5], ImagePositionPatient=position(files[4]))
    refused(capsys, folder, tmp_path, "duplicate slice position")


def test_pixel_spacing_or_orientation_changing_between_slices_is_refused(capsys, series, tmp_path):
    folder, files = series
    edit(files[2], PixelSpacing=[0.9, 0.9])
    refused(capsys, folder, tmp_path, "change pixel spacing", files[2].name)
    edit(files[2], PixelSpacing=[0.8, 0.8])
    edit(files[6], ImageOrientationPatient=[1, 0, 0, 0, 0.9950042, 0.0998334])
    refused(capsys, folder, tmp_path, "change orientation")


def test_very_uneven_and_sheared_stacks_are_refused(capsys, series, tmp_path):
    folder, files = series
    x, y, z = position(files[4])
    edit(files[4], ImagePositionPatient=[x, y, z + 0.9])  # 36 % of a step
    refused(capsys, folder, tmp_path, "unevenly spaced")
    edit(files[4], ImagePositionPatient=[x, y, z])
    for index, path in enumerate(files):  # a gantry tilt: each slice shifted 0.5 mm along y
        px, py, pz = position(path)
        edit(path, ImagePositionPatient=[px, py + 0.5 * index, pz])
    refused(capsys, folder, tmp_path, "shifted within their plane")


def test_slightly_uneven_slices_are_resampled_onto_a_uniform_grid_and_said(series, caplog):
    folder, files = series
    dataset = pydicom.dcmread(files[3])
    x, y, z = (float(v) for v in dataset.ImagePositionPatient)
    shift = 0.2  # 8 % of a step: slice 3 really lies at z + 0.2 mm and its voxels say so
    dataset.ImagePositionPatient = [x, y, z + shift]
    pixels = dataset.pixel_array.copy()
    pixels[...] = int(round(100 * (z + shift)))
    dataset.PixelData = pixels.tobytes()
    dataset.save_as(files[3])
    with caplog.at_level(logging.WARNING):
        volume = read_image(folder)
    assert "unevenly spaced" in caplog.text and "resampled" in caplog.text
    assert volume.shape == SHAPE and volume.spacing[2] == pytest.approx(STEP)
    # The uniform grid's slice 3 is at z = 7.5 mm: values 750, not the 770 stored at 7.7 mm.
    assert np.abs(volume.array[:, 5, 5].astype(float) - 100 * np.arange(SHAPE[0]) * STEP).max() <= 1


def test_shuffled_file_names_are_put_in_order_of_position(series, tmp_path):
    folder, files = series
    for index, path in enumerate(reversed(files)):
        path.rename(folder / f"z{index:02d}.dcm")
    volume = read_image(folder)
    assert np.all(np.diff(volume.array[:, 0, 0].astype(int)) > 0)
