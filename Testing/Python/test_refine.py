"""Refinement steps from a corrected mask: keep, steps = 0, seeds, scopes, and moving towards the truth."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import grey_disc

from MedSegSuiteLib.cli import main
from MedSegSuiteLib.errors import InputError, ModelError
from MedSegSuiteLib.geometry import Box
from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.models import load_model
from MedSegSuiteLib.refine.refinement import Refiner, axial_index
from MedSegSuiteLib.refine.simulated_user import correct_once, foreground_dice
from MedSegSuiteLib.volume import Volume


def _dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def refiner(hidiff_dir):
    return Refiner(load_model(hidiff_dir), device="cpu")


@pytest.fixture(scope="module")
def defective():
    """Three axial slices of discs; the mask has a hole and a spur on every slice."""
    images, truths, masks = [], [], []
    for k, centre in enumerate([(16, 15), (15, 17), (17, 16)]):
        image, truth = grey_disc(32, centre, 7.5, seed=40 + k)
        yy, xx = np.mgrid[:32, :32]
        mask = truth.copy()
        mask[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= 2.5**2] = False  # a hole
        mask[centre[0] - 1 : centre[0] + 1, centre[1] + 8 : centre[1] + 14] = True  # a spur
        images.append(image)
        truths.append(truth)
        masks.append(mask)
    spacing, origin = (0.8, 0.8, 2.0), (5.0, -3.0, 10.0)
    return (
        Volume(np.stack(images).astype(np.float32), spacing, origin),
        Volume(np.stack(masks).astype(np.uint8), spacing, origin),
        np.stack(truths),
    )


def test_refinement_moves_a_mask_with_a_hole_and_a_spur_towards_the_truth(refiner, defective):
    image, mask, truth = defective
    before = _dice(mask.array, truth)
    result = refiner.refine(image, mask, steps=3, ensemble=4, seed=0)
    after = _dice(result.labels.array, truth)
    assert after > before + 0.01, (before, after)
    assert result.labels.grid.same_as(mask.grid, atol=0) and result.labels.array.dtype == np.uint8
    assert (
        result.uncertainty is not None and 0 <= result.uncertainty.array.min() <= result.uncertainty.array.max() <= 0.5
    )


def test_steps_zero_returns_the_mask(refiner, defective):
    image, mask, _ = defective
    assert np.array_equal(refiner.refine(image, mask, steps=0).labels.array, mask.array)


@pytest.mark.parametrize("steps", [1, 5, 10])
def test_kept_voxels_never_change(refiner, defective, steps):
    image, mask, truth = defective
    keep = np.random.default_rng(steps).random(mask.shape) < 0.3
    keep |= mask.array != truth  # including every voxel the refiner would like to fix
    result = refiner.refine(image, mask, steps=steps, keep=mask.with_array(keep.astype(np.uint8)), seed=steps)
    assert np.array_equal(result.labels.array[keep], mask.array[keep])


def test_same_seed_same_result(refiner, defective):
    image, mask, _ = defective
    a = refiner.refine(image, mask, steps=5, seed=11).labels.array
    b = refiner.refine(image, mask, steps=5, seed=11).labels.array
    assert np.array_equal(a, b)
    others = [refiner.refine(image, mask, steps=10, seed=s).labels.array for s in (1, 2, 3)]
    assert any(not np.array_equal(others[0], o) for o in others[1:]), "the sampler should be stochastic across seeds"


def test_slice_and_roi_scopes_change_only_their_part(refiner, defective):
    image, mask, _ = defective
    one = refiner.refine(image, mask, steps=5, scope="slice", slice_index=1, seed=0)
    assert one.slices == (1,)
    assert np.array_equal(one.labels.array[[0, 2]], mask.array[[0, 2]])
    assert axial_index(image, image.grid.index_to_physical((3, 4, 2))) == 2
    box = Box((4, 4, 0), (28, 28, 2))
    part = refiner.refine(image, mask, steps=5, scope="roi", roi=box, seed=0)
    outside = np.ones(mask.shape, bool)
    outside[box.numpy_slices()] = False
    assert np.array_equal(part.labels.array[outside], mask.array[outside])


def test_neighbours_scope_refines_the_slice_and_its_neighbours_only(refiner, defective):
    image, mask, _ = defective
    stacked = Volume(np.concatenate([image.array] * 3), image.spacing, image.origin)  # nine slices: 0-8
    labels = stacked.with_array(np.concatenate([mask.array] * 3))
    near = refiner.refine(stacked, labels, steps=5, scope="neighbours", slice_index=4, neighbours=1, seed=0)
    assert near.slices == (3, 4, 5)
    assert np.array_equal(near.labels.array[[0, 1, 2, 6, 7, 8]], labels.array[[0, 1, 2, 6, 7, 8]])
    edge = refiner.refine(stacked, labels, steps=5, scope="neighbours", slice_index=0, seed=0)
    assert edge.slices == (0, 1, 2)


def test_spread_carries_an_edited_slice_to_the_slices_beside_it(refiner, defective):
    image, mask, truth = defective
    stacked = Volume(np.concatenate([image.array] * 3), image.spacing, image.origin)
    labels = np.concatenate([truth] * 3).astype(np.uint8)
    labels[5:7] = 0  # the segmentor missed the structure on slices 5 and 6
    keep = np.zeros_like(labels)
    keep[4] = 1  # the clinician corrected slice 4
    plain = refiner.refine(stacked, stacked.with_array(labels), 1, stacked.with_array(keep), seed=0)
    assert 5 not in plain.slices and not plain.labels.array[5:7].any()
    spread = refiner.refine(
        stacked, stacked.with_array(labels), 1, stacked.with_array(keep), seed=0, spread=0.9, neighbours=2
    )
    assert {5, 6} <= set(spread.slices)
    assert _dice(spread.labels.array[5], truth[2]) > 0.6  # from nothing to most of the disc
    assert np.array_equal(spread.labels.array[4], labels[4])


def test_bad_requests_are_refused(refiner, defective, unet3d_dir):
    image, mask, _ = defective
    with pytest.raises(InputError, match="spread must be between 0 and 1"):
        refiner.refine(image, mask, steps=3, spread=1.5)
    with pytest.raises(InputError, match="the mask is empty"):
        refiner.refine(image, mask.with_array(np.zeros_like(mask.array)), steps=3)
    with pytest.raises(InputError, match="label value\\(s\\) \\[7\\]"):
        refiner.refine(image, mask.with_array(mask.array * 7), steps=3)
    with pytest.raises(InputError, match="grid"):
        refiner.refine(image, Volume(mask.array), steps=3)
    with pytest.raises(InputError, match="steps must be between 0 and 10"):
        refiner.refine(image, mask, steps=11)
    with pytest.raises(ModelError, match="refinement steps need a HiDiff model"):
        Refiner(load_model(unet3d_dir), device="cpu")


def test_cli_refine_writes_labels_and_uncertainty(hidiff_dir, defective, tmp_path, capsys):
    image, mask, truth = defective
    write_image(image, tmp_path / "image.nrrd")
    write_image(mask, tmp_path / "mask.nrrd")
    code = main(
        [
            "refine",
            str(tmp_path / "image.nrrd"),
            "--mask",
            str(tmp_path / "mask.nrrd"),
            "-m",
            str(hidiff_dir),
            "--steps",
            "3",
            "--ensemble",
            "2",
            "--uncertainty",
            str(tmp_path / "unc.nrrd"),
            "-o",
            str(tmp_path / "refined.nrrd"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "voxel(s) changed on 3 slice(s)" in capsys.readouterr().out
    assert read_image(tmp_path / "refined.nrrd").shape == mask.shape
    assert read_image(tmp_path / "unc.nrrd").array.dtype == np.float32
    code = main(
        [
            "refine",
            str(tmp_path / "image.nrrd"),
            "--mask",
            str(tmp_path / "mask.nrrd"),
            "-m",
            str(hidiff_dir),
            "--steps",
            "3",
            "-o",
            str(tmp_path / "refined.nrrd"),
        ]
    )
    assert code == 2


def test_hidiff_model_segments_like_any_model(hidiff_dir, defective):
    from MedSegSuiteLib.inference import Predictor

    image, _, truth = defective
    model = load_model(hidiff_dir)
    full = Predictor(model, device="cpu").predict(image).labels.array
    assert _dice(full, truth) > 0.6
    assert np.array_equal(full, Predictor(model, device="cpu").predict(image).labels.array), "seeded sampling"


def test_a_banet_segmentor_gives_hidiff_its_foreground_log_odds():
    """A two-class BA-Net in a one-channel HiDiff: sigmoid of HiDiff's logits is BA-Net's softmax foreground."""
    import torch

    from MedSegSuiteLib import networks

    banet = networks.create("banet", "lite").eval()
    net = networks.create("hidiff", "lite", in_channels=3, num_classes=1, segmentor={"network": "banet"}).eval()
    net.segmentor.load_state_dict(banet.state_dict())
    assert net.refiner.condition_dims == banet.feature_dims == (96, 192, 384, 768)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats, logits = net.features_and_logits(x)
        expected = torch.softmax(banet(x), dim=1)[:, 1:]
        net.sampling_steps = 0
        segmented = net.predict_logits(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert torch.allclose(torch.sigmoid(logits), expected, atol=1e-5)
    assert torch.equal(segmented, logits)
    with pytest.raises(ValueError, match="divisible by 32"):
        banet.features_and_logits(torch.randn(1, 3, 48, 48))


def test_condseg_can_be_hidiffs_segmentor(tmp_path, defective):
    """HiDiff works with any feature-exposing segmentor: ConDSeg through its features_and_logits."""
    from PIL import Image

    from MedSegSuiteLib import networks

    net = networks.create("hidiff", "lite", in_channels=1, num_classes=1, segmentor={"network": "condseg"})
    assert type(net.segmentor).__name__ == "ConDSeg" and net.refiner.condition_dims == net.segmentor.feature_dims
    image, mask, _ = defective
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    for k in range(3):
        Image.fromarray(image.array[k].astype(np.uint8)).save(tmp_path / "data" / "images" / f"s{k}.png")
        Image.fromarray(mask.array[k] * 255).save(tmp_path / "data" / "masks" / f"s{k}.png")
    code = main(
        [
            "train",
            "--network",
            "hidiff",
            "--data",
            str(tmp_path / "data"),
            "-o",
            str(tmp_path / "model"),
            "--size",
            "64,64",
            "--iterations",
            "4",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--labels",
            "1:Disc",
            "--config",
            "segmentor={'network': 'condseg', 'preset': 'lite'}",
            "--recipe",
            "pretrain_fraction=0.5",
        ]
    )
    assert code == 0
    refined = Refiner(load_model(tmp_path / "model"), device="cpu").refine(image, mask, steps=2)
    assert refined.labels.shape == mask.shape


def test_the_simulated_user_corrects_the_worst_slice_or_the_largest_wrong_region():
    truth = np.zeros((4, 10, 10), np.uint8)
    truth[:, 2:8, 2:8] = 1
    mask = truth.copy()
    mask[1, 2:8, 2:5] = 0  # 18 wrong voxels on slice 1
    mask[3, 0:2, 0:2] = 2  # 4 wrong voxels on slice 3
    first = correct_once(mask, truth)
    assert first.slice_index == 1 and np.array_equal(first.mask[1], truth[1]) and first.keep[1].all()
    assert not first.keep[[0, 2, 3]].any()
    second = correct_once(first.mask, truth, first.keep)
    assert second.slice_index == 3 and np.array_equal(second.mask, truth) and second.keep[[1, 3]].all()
    assert correct_once(second.mask, truth, second.keep) is None
    photo_truth = np.zeros((1, 12, 12), np.uint8)
    photo_truth[0, 3:9, 3:9] = 1
    photo = photo_truth.copy()
    photo[0, 3:9, 3:5] = 0  # the largest wrong region: 12 pixels
    photo[0, 0, 11] = 1  # a single wrong pixel elsewhere
    fixed = correct_once(photo, photo_truth)
    assert np.array_equal(fixed.keep[0].nonzero()[1], np.tile([3, 4], 6)) and fixed.mask[0, 0, 11] == 1
    assert foreground_dice(fixed.mask, photo_truth, ~fixed.keep) < 1.0
    assert foreground_dice(photo_truth, photo_truth) == 1.0 and foreground_dice(photo * 0, photo * 0) == 1.0
