"""Finding cases, loading labels, and splitting train/validation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.io import write_image
from MedSegSuiteLib.training.datasets import discover_cases, load_case, split_cases
from MedSegSuiteLib.volume import Volume


def _pairs(root, count=4, label_dir="labels"):
    (root / "images").mkdir(parents=True)
    (root / label_dir).mkdir()
    for i in range(count):
        write_image(
            Volume(np.random.default_rng(i).random((4, 5, 6)).astype(np.float32)), root / "images" / f"c{i}.nii.gz"
        )
        write_image(Volume((np.arange(120).reshape(4, 5, 6) % 3).astype(np.uint8)), root / label_dir / f"c{i}.nii.gz")


def test_image_and_label_folders_pair_by_name(tmp_path):
    _pairs(tmp_path / "a")
    cases = discover_cases(tmp_path / "a")
    assert [c.id for c in cases] == ["c0", "c1", "c2", "c3"] and all(c.labelled for c in cases)
    image, label = load_case(cases[0])
    assert image.shape == label.shape and set(np.unique(label.array)) == {0, 1, 2}


def test_missing_labels_are_listed(tmp_path):
    _pairs(tmp_path / "a")
    (tmp_path / "a" / "labels" / "c2.nii.gz").unlink()
    with pytest.raises(InputError, match="1 image\\(s\\) in .* have no label of the same name .*c2.nii.gz"):
        discover_cases(tmp_path / "a")
    assert not [c for c in discover_cases(tmp_path / "a", require_labels=False) if c.id == "c2"][0].labelled


def test_list_file_and_unlabelled_folder(tmp_path):
    _pairs(tmp_path / "a")
    (tmp_path / "list.txt").write_text("# cases\na/images/c0.nii.gz,a/labels/c0.nii.gz\na/images/c1.nii.gz\n")
    cases = discover_cases(tmp_path / "list.txt", require_labels=False)
    assert [c.labelled for c in cases] == [True, False]
    with pytest.raises(InputError, match="has no label"):
        discover_cases(tmp_path / "list.txt")
    assert len(discover_cases(tmp_path / "a" / "images", require_labels=False)) == 4


def test_hdf5_cases_are_transposed_from_xyz(tmp_path):
    h5py = pytest.importorskip("h5py")
    (tmp_path / "h5").mkdir()
    image = np.random.default_rng(0).random((7, 6, 5)).astype(np.float32)  # x, y, z
    with h5py.File(tmp_path / "h5" / "case1.h5", "w") as handle:
        handle["image"] = image
        handle["label"] = (image > 0.5).astype(np.uint8)
    case = discover_cases(tmp_path)[0]
    volume, label = load_case(case, spacing=(0.625, 0.625, 0.625))
    assert volume.shape == (5, 6, 7) and volume.spacing == (0.625, 0.625, 0.625)
    np.testing.assert_array_equal(volume.array, image.transpose(2, 1, 0))
    np.testing.assert_array_equal(label.array, (image > 0.5).transpose(2, 1, 0))


def test_jpeg_masks_are_binarised_and_bad_labels_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / "images" / "x.jpg")
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "x.jpg", quality=70)
    _, label = load_case(discover_cases(tmp_path)[0])
    assert set(np.unique(label.array)) == {0, 1} and label.array.sum() == 16
    for name in ("a", "b", "c"):
        write_image(Volume(np.zeros((2, 3, 4), np.float32)), tmp_path / f"{name}.nrrd")
    write_image(Volume(np.full((2, 3, 4), 0.5, np.float32)), tmp_path / "frac.nrrd")
    write_image(Volume(np.zeros((2, 3, 5), np.uint8)), tmp_path / "shape.nrrd")
    write_image(Volume(np.zeros((2, 3, 4), np.uint8), (2, 2, 2)), tmp_path / "grid.nrrd")
    (tmp_path / "list.txt").write_text("a.nrrd,frac.nrrd\nb.nrrd,shape.nrrd\nc.nrrd,grid.nrrd\n")
    frac, shape, grid = discover_cases(tmp_path / "list.txt")
    with pytest.raises(InputError, match="whole numbers"):
        load_case(frac)
    with pytest.raises(InputError, match="label shape"):
        load_case(shape)
    with pytest.raises(InputError, match="geometry differs"):
        load_case(grid)


def test_split_is_seeded_and_keeps_both_sides_non_empty(tmp_path):
    _pairs(tmp_path / "a", count=10)
    cases = discover_cases(tmp_path / "a")
    train, val = split_cases(cases, 0.2, seed=3)
    assert len(val) == 2 and not {c.id for c in train} & {c.id for c in val}
    assert split_cases(cases, 0.2, seed=3) == (train, val)
    assert [c.id for c in split_cases(cases, val_ids=["c1"])[1]] == ["c1"]
    with pytest.raises(InputError, match="at least two labelled cases"):
        split_cases(cases[:1])


@pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"real data absent: {SHARED_DATA} does not exist (put the data folder beside the clone as ../shared/data, "
    "or set MEDSEGSUITE_DATA to where it is)",
)
def test_shared_datasets_are_discovered():
    assert len(discover_cases(SHARED_DATA / "kvasir_seg")) == 900
    assert len(discover_cases(SHARED_DATA / "msd_hippocampus")) == 208
    assert len(discover_cases(SHARED_DATA / "la_mri_2018")) == 40


def test_photo_masks_follow_their_image_pixel_by_pixel_whatever_the_dpi(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((8, 10, 3), 100, np.uint8)).save(tmp_path / "images" / "p.jpg", dpi=(102, 102))
    mask = np.zeros((8, 10), np.uint8)
    mask[2:5, 3:7] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "p.png")
    image, label = load_case(discover_cases(tmp_path)[0])
    assert image.spacing[0] != 1.0, "the JPEG's DPI gives it a pixel spacing"
    assert label.grid.same_as(image.grid, atol=0) and label.array.sum() == 12
