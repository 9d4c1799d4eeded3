"""Inputs users have: Slicer/DICOM segmentations as masks (cropped ones padded back), `.seg.nrrd` results and
label tables, folders of several series, 16-bit photos and EXIF-rotated JPEGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import UNET2D_CARD, UNET3D_CARD, grey_disc, write_dicom_series
from conftest import one_error_line as one_line
from conftest import run_cli as run
from conftest import untrained_model as untrained
from PIL import Image, ImageOps

from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.io.photos import from_upright, to_upright
from MedSegSuiteLib.io.seg_nrrd import read_seg_nrrd, write_seg_nrrd
from MedSegSuiteLib.io.segmentation import Segmentation
from MedSegSuiteLib.models.card import card_from_dict
from MedSegSuiteLib.volume import Volume


@pytest.fixture(scope="module")
def model2d(tmp_path_factory) -> Path:
    return untrained(tmp_path_factory, UNET2D_CARD, spatial_dims=2, in_channels=3, out_channels=2)


def cropped_seg_nrrd(mask: np.ndarray, image: Volume, path: Path, name: str = "Disc") -> Path:
    """``mask`` (on ``image``'s grid) written as a .seg.nrrd cropped to its segment on the image's lattice."""
    zs, ys, xs = np.nonzero(mask)
    lo = np.array([zs.min(), ys.min(), xs.min()])
    hi = np.array([zs.max(), ys.max(), xs.max()]) + 1
    crop = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.uint8)
    origin = image.grid.index_to_physical(lo[::-1])
    card = {**UNET2D_CARD, "labels": [{"value": 1, "name": name, "color": [1, 2, 3]}], "weights": {"file": "w"}}
    labels = card_from_dict(card).labels
    segmentation = Segmentation.from_label_map(Volume(crop, image.spacing, origin, image.direction), labels)
    return write_seg_nrrd(segmentation, path)


# -- masks and segmentations ---------------------------------------------------------------------
def test_refine_takes_a_cropped_seg_nrrd_a_0_255_mask_and_names_a_wrong_segment(capsys, tmp_path, hidiff_dir):
    pixels, disc = grey_disc(32, (14, 17), 6, seed=5)
    image = Volume(pixels[None].astype(np.float32), (0.7, 0.7, 1.0), (10.0, -4.0, 2.0))
    image_path = write_image(image, tmp_path / "disc.nrrd")
    mask = disc[None].astype(np.uint8)
    seg = cropped_seg_nrrd(mask, image, tmp_path / "mask.seg.nrrd")
    assert read_seg_nrrd(seg).grid.shape != image.shape  # really cropped
    common = ["-m", hidiff_dir, "--steps", "2", "--device", "cpu"]
    code, _, err = run(capsys, "refine", image_path, "--mask", seg, *common, "-o", tmp_path / "r1.nrrd")
    assert code == 0, err
    refined = read_image(tmp_path / "r1.nrrd")
    assert refined.shape == image.shape and refined.grid.same_as(image.grid)
    overlap = 2 * np.sum((refined.array > 0) & (mask > 0)) / (np.sum(refined.array > 0) + mask.sum())
    assert overlap > 0.7, overlap  # on the disc, not shifted to the crop's corner

    write_image(image.with_array(mask * 255), tmp_path / "mask255.nrrd")
    mask255 = tmp_path / "mask255.nrrd"
    code, _, err = run(capsys, "refine", image_path, "--mask", mask255, *common, "-o", tmp_path / "r2.nrrd")
    assert code == 0, err
    assert np.array_equal(read_image(tmp_path / "r2.nrrd").array, refined.array)

    wrong = cropped_seg_nrrd(mask, image, tmp_path / "liver.seg.nrrd", name="Liver")
    code, _, err = run(capsys, "refine", image_path, "--mask", wrong, *common, "-o", tmp_path / "r3.nrrd")
    assert code == 2 and "Liver" in one_line(err) and not (tmp_path / "r3.nrrd").exists()


def test_export_pads_a_cropped_seg_nrrd_back_onto_the_reference(capsys, tmp_path):
    image = Volume(np.zeros((6, 20, 18), np.int16), (0.8, 0.9, 2.0), (5.0, 6.0, -7.0))
    mask = np.zeros(image.shape, np.uint8)
    mask[2:4, 5:9, 10:15] = 1
    seg = cropped_seg_nrrd(mask, image, tmp_path / "crop.seg.nrrd")
    reference = write_image(image, tmp_path / "ref.nrrd")
    code, _, err = run(capsys, "export", seg, "-o", tmp_path / "full.nii.gz", "--reference", reference)
    assert code == 0, err
    full = read_image(tmp_path / "full.nii.gz")
    assert full.grid.same_as(image.grid, atol=1e-4) and np.array_equal(full.array, mask)
    # a segmentation reaching beyond the reference is not a crop of it: still refused
    shifted = Volume(mask, image.spacing, image.grid.index_to_physical((4, 0, 0)), image.direction)
    source = write_image(shifted, tmp_path / "shifted.nrrd")
    code, _, err = run(capsys, "export", source, "-o", tmp_path / "x.nii.gz", "--reference", reference)
    assert code == 2 and "grid differs" in one_line(err)


# -- segment outputs ------------------------------------------------------------------------------
def test_segment_writes_seg_nrrd_with_names_colours_terminology_and_label_tables_beside_label_maps(
    capsys, tmp_path, model3d
):
    rng = np.random.default_rng(0)
    image = write_image(Volume(rng.random((12, 24, 24), dtype=np.float32)), tmp_path / "img.nii.gz")
    code, _, err = run(capsys, "segment", image, "-m", model3d, "-o", tmp_path / "r.seg.nrrd", "--device", "cpu")
    assert code == 0, err
    segment = read_seg_nrrd(tmp_path / "r.seg.nrrd").segments[0]
    assert segment.name == "Ball" and tuple(segment.color) == (230, 60, 40)
    assert segment.terminology["type"][1] == "4147007"
    assert not list(tmp_path.glob("*.labels.json"))  # a .seg.nrrd carries its names itself

    code, _, err = run(capsys, "segment", image, "-m", model3d, "-o", tmp_path / "r.nii.gz", "--device", "cpu")
    assert code == 0, err
    table = json.loads((tmp_path / "r.labels.json").read_text(encoding="utf-8"))
    assert [(e["value"], e["name"]) for e in table["labels"]] == [(1, "Ball")]
    code, _, err = run(capsys, "export", tmp_path / "r.nii.gz", "-o", tmp_path / "again.seg.nrrd")
    assert code == 0, err
    assert [s.name for s in read_seg_nrrd(tmp_path / "again.seg.nrrd").segments] == ["Ball"]
    # the table is one of the command's outputs: an existing one is not replaced without --overwrite
    code, _, err = run(capsys, "segment", image, "-m", model3d, "-o", tmp_path / "r.nii.gz", "--device", "cpu")
    assert code == 2 and "already exists" in one_line(err)


# -- DICOM folders ------------------------------------------------------------------------------
def test_a_folder_of_several_series_lists_each_and_never_offers_a_seg(capsys, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    volume = Volume(np.arange(4 * 8 * 6, dtype=np.int16).reshape(4, 8, 6), (1.0, 1.0, 2.0))
    folder = tmp_path / "study"
    write_dicom_series(volume, folder, "1.2.826.0.1.3680043.8.498.31", modality="CT")
    seg_files = write_dicom_series(volume, folder, "1.2.826.0.1.3680043.8.498.32", modality="SEG")
    for path in seg_files:
        dataset = pydicom.dcmread(path)
        dataset.SeriesDescription = "Segmentation"
        dataset.save_as(path)
    # one image series and a SEG: the image series is the only choice
    assert read_image(folder).shape == volume.shape
    mr = write_dicom_series(volume, folder, "1.2.826.0.1.3680043.8.498.33", modality="MR")
    for path in mr:
        dataset = pydicom.dcmread(path)
        dataset.SeriesDescription = "T1 axial"
        dataset.save_as(path)
    code, _, err = run(capsys, "segment", folder, "-m", "any", "-o", tmp_path / "o.nrrd")
    line = one_line(err)
    assert code == 2 and "holds 2 DICOM series" in line and "--series-uid" in line
    assert "CT, 4 images" in line and "MR, 'T1 axial', 4 images" in line
    assert ".32" not in line and "SEG" not in line


# -- photos ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_match_pillow_and_are_undone(tmp_path, orientation):
    stored = np.arange(3 * 5 * 7, dtype=np.uint8).reshape(3, 1, 5, 7)
    picture = Image.fromarray(np.moveaxis(stored[:, 0], 0, -1))
    exif = picture.getexif()
    exif[0x0112] = orientation
    picture.save(tmp_path / "p.tif", exif=exif)
    with Image.open(tmp_path / "p.tif") as opened:
        upright = np.asarray(ImageOps.exif_transpose(opened))
    volume = Volume(stored)
    turned = to_upright(volume, orientation)
    assert np.array_equal(np.moveaxis(turned.array[:, 0], 0, -1), upright)
    assert np.array_equal(from_upright(turned, volume, orientation).array, stored)


def test_an_exif_rotated_jpeg_is_segmented_upright_and_the_result_fits_the_stored_pixels(
    capsys, tmp_path, model2d, monkeypatch
):
    from MedSegSuiteLib.inference import Predictor

    rng = np.random.default_rng(1)
    stored = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)  # 56 wide, 40 high as stored
    picture = Image.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: 40 wide, 56 high
    picture.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    seen = []
    real = Predictor.predict

    def record(self, volume, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        seen.append(volume.shape)
        return real(self, volume, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict", record)
    code, _, err = run(capsys, "segment", tmp_path / "photo.jpg", "-m", model2d, "-o", tmp_path / "m.png")
    assert code == 0, err
    assert seen == [(1, 56, 40)]  # the network saw it upright
    assert read_image(tmp_path / "m.png").shape == (1, 40, 56)  # the mask fits the file's pixels
    assert "EXIF orientation (6)" in err


def test_a_16_bit_photo_is_scaled_by_its_own_range(capsys, tmp_path, model2d):
    import SimpleITK as sitk

    rng = np.random.default_rng(2)
    eight = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    eight[0, 0], eight[0, 1] = 0, 255  # the full 8-bit range, so scaling 16 bits by its range gives it back
    sitk.WriteImage(sitk.GetImageFromArray(eight, isVector=True), str(tmp_path / "eight.png"))
    sixteen = eight.astype(np.uint16) * 257
    sitk.WriteImage(sitk.GetImageFromArray(sixteen, isVector=True), str(tmp_path / "sixteen.png"))
    assert read_image(tmp_path / "sixteen.png").array.dtype == np.uint16
    for name in ("eight", "sixteen"):
        code, _, err = run(capsys, "segment", tmp_path / f"{name}.png", "-m", model2d, "-o", tmp_path / f"{name}-m.png")
        assert code == 0, err
        if name == "sixteen":
            assert "16-bit photo by its own range" in err
    assert np.array_equal(read_image(tmp_path / "eight-m.png").array, read_image(tmp_path / "sixteen-m.png").array)


def test_finetuning_takes_cropped_seg_nrrd_labels(capsys, tmp_path, model3d, home):
    from conftest import sphere_volume

    data = tmp_path / "cases"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    for index in range(3):
        pixels, mask = sphere_volume((16, 32, 32), (8, 12 + 2 * index, 16), 5, seed=index)
        image = Volume(pixels, (1.0, 1.0, 2.0), (3.0, 4.0, 5.0))
        write_image(image, data / "images" / f"c{index}.nii.gz")
        labels = card_from_dict(UNET3D_CARD | {"weights": {"file": "w"}}).labels
        zs, ys, xs = np.nonzero(mask)
        lo = np.array([zs.min(), ys.min(), xs.min()])
        crop = mask[lo[0] : zs.max() + 1, lo[1] : ys.max() + 1, lo[2] : xs.max() + 1]
        origin = image.grid.index_to_physical(lo[::-1])
        segmentation = Segmentation.from_label_map(Volume(crop, image.spacing, origin), labels)
        write_seg_nrrd(segmentation, data / "labels" / f"c{index}.seg.nrrd")
    options = ["--iterations", "2", "--held-out", "1", "--device", "cpu", "-q"]
    code, out, err = run(capsys, "finetune", "-m", model3d, "--labelled", data, *options)
    assert code == 0, err
    assert "test-unet3d-ft" in out


def test_refine_takes_a_dicom_seg_as_the_mask(capsys, tmp_path, hidiff_dir):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    pixels, disc = grey_disc(32, (15, 16), 6, seed=7)
    volume = Volume(pixels[None].astype(np.int16), (0.7, 0.7, 1.0))
    files = write_dicom_series(volume, tmp_path / "series", "1.2.826.0.1.3680043.8.498.61")
    for path in files:
        dataset = pydicom.dcmread(path)
        dataset.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.61.1"
        dataset.save_as(path)
    labels = write_image(volume.with_array(disc[None].astype(np.uint8)), tmp_path / "disc.nrrd")
    code, _, err = run(
        capsys,
        "export",
        labels,
        "-o",
        tmp_path / "disc.dcm",
        "--dicom-series",
        tmp_path / "series",
        "--labels",
        hidiff_dir,
    )
    assert code == 0, err
    code, _, err = run(
        capsys,
        "refine",
        tmp_path / "series",
        "--mask",
        tmp_path / "disc.dcm",
        "-m",
        hidiff_dir,
        "--steps",
        "2",
        "--device",
        "cpu",
        "-o",
        tmp_path / "refined.nrrd",
    )
    assert code == 0, err
    refined = read_image(tmp_path / "refined.nrrd").array > 0
    assert refined.shape == (1, 32, 32) and 2 * np.sum(refined & disc[None]) / (refined.sum() + disc.sum()) > 0.7
