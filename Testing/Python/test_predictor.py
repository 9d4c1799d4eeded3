"""The Predictor end to end, with small U-Nets trained by the fixtures on synthetic objects."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import dice, disc_image, sphere_volume
from scipy.spatial.transform import Rotation

from MedSegSuiteLib.errors import Cancelled, InputError, ModelError
from MedSegSuiteLib.geometry import Box
from MedSegSuiteLib.inference import Predictor
from MedSegSuiteLib.io import volume_from_sitk, volume_to_sitk
from MedSegSuiteLib.models import LoadedModel, load_model
from MedSegSuiteLib.volume import Volume

CENTRE = (11.0, 25.0, 12.0)  # off-centre, so a wrong flip or permutation puts the ball elsewhere


@pytest.fixture(scope="module")
def ball():
    image, mask = sphere_volume((34, 40, 36), CENTRE, 5.0, seed=7)  # >= one window on every axis
    return image, mask


@pytest.fixture(scope="module")
def predictor3d(unet3d_dir):
    return Predictor(load_model(unet3d_dir), device="cpu")


def test_ball_is_found_in_the_axis_aligned_volume(predictor3d, ball):
    image, mask = ball
    result = predictor3d.predict(Volume(image, (1, 1, 1), (3, -4, 5)))
    assert result.labels.array.dtype == np.uint8
    assert result.labels.shape == image.shape
    assert dice(result.labels.array == 1, mask) > 0.85


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ball_is_found_at_its_physical_place_in_an_oblique_copy(predictor3d, ball, seed):
    """Same voxels, oblique direction: the network sees a permuted/flipped array; labels must land back exactly."""
    image, mask = ball
    direction = Rotation.random(random_state=seed).as_matrix()
    volume = Volume(image, (1, 1, 1), (10, 20, -30), direction)
    result = predictor3d.predict(volume)
    assert result.labels.grid.same_as(volume.grid, atol=0)
    assert dice(result.labels.array == 1, mask) > 0.85


def test_ball_is_found_in_a_resampled_rotated_copy(predictor3d, ball):
    """The object stays at its physical place when the whole grid is rotated by 30 degrees and resampled."""
    image, mask = ball
    original = Volume(image, (1, 1, 1), (0, 0, 0))
    centre = original.grid.index_to_physical(np.array(original.shape[::-1]) / 2)
    rotated_dir = Rotation.from_euler("zy", [30, 20], degrees=True).as_matrix()
    reference = sitk.Image([34, 44, 26], sitk.sitkFloat32)
    reference.SetDirection(tuple(rotated_dir.ravel()))
    reference.SetOrigin(tuple(centre - rotated_dir @ (np.array([34, 44, 26]) / 2)))
    moved_image = sitk.Resample(volume_to_sitk(original), reference, sitk.Transform(), sitk.sitkLinear, 100.0)
    moved_mask = sitk.Resample(
        volume_to_sitk(Volume(mask, (1, 1, 1), (0, 0, 0))), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    result = predictor3d.predict(volume_from_sitk(moved_image))
    truth = sitk.GetArrayFromImage(moved_mask)
    assert truth.sum() > 300
    assert dice(result.labels.array == 1, truth) > 0.75


def test_roi_limits_the_result_and_scores_are_probabilities(predictor3d, ball):
    image, mask = ball
    volume = Volume(image)
    box = Box((2, 12, 0), (24, 36, 20))  # contains the ball
    result = predictor3d.predict(volume, roi=box, scores=True)
    outside = np.ones(volume.shape, bool)
    outside[box.numpy_slices()] = False
    assert not result.labels.array[outside].any()
    assert dice(result.labels.array == 1, mask) > 0.85
    scores = result.scores.array
    assert scores.shape == (2, *volume.shape) and scores.dtype == np.float32
    np.testing.assert_allclose(scores.sum(0), 1.0, atol=1e-5)
    assert np.all(scores[0][outside] == 1.0)


def test_card_spacing_resamples_and_maps_back_to_the_input_grid(unet3d_dir, ball):
    model = load_model(unet3d_dir)
    model.card = model.card.replace(input={**model.card.to_dict()["input"], "spacing": [1.0, 1.0, 1.0]})
    image, mask = sphere_volume((30, 60, 50), (15, 38, 20), 9.0, seed=3)  # 0.6 mm voxels: a 5.4 mm ball
    volume = Volume(image, (0.6, 0.6, 0.6), (0, 0, 0))
    result = Predictor(model, device="cpu").predict(volume)
    assert result.labels.shape == volume.shape
    assert dice(result.labels.array == 1, mask) > 0.8


def test_2d_model_segments_rgb_images_and_volumes_slice_by_slice(unet2d_dir):
    predictor = Predictor(load_model(unet2d_dir), device="cpu", batch_size=2)
    image, mask = disc_image(80, (30, 50), 14, seed=5)
    result = predictor.predict(Volume(image))
    assert result.labels.shape == (1, 80, 80)
    assert dice(result.labels.array, mask) > 0.8
    slices = [disc_image(64, c, 11, seed=i) for i, c in enumerate([(20, 20), (40, 30), (30, 44)])]
    stack = Volume(np.concatenate([s[0] for s in slices], axis=1))
    labels = predictor.predict(stack).labels.array
    for k, (_, slice_mask) in enumerate(slices):
        assert dice(labels[k], slice_mask[0]) > 0.8


def test_progress_reports_windows_and_cancel_stops_without_result(predictor3d, ball):
    image, _ = ball
    seen = []
    predictor3d.predict(Volume(image), progress=lambda d, t, s: seen.append((d, t, s)))
    stages = [s for _, _, s in seen]
    assert stages[0] == "preprocessing" and stages[-1] == "postprocessing" and "segmenting" in stages
    windows = [(d, t) for d, t, s in seen if s == "segmenting"]
    assert windows[-1][0] == windows[-1][1] > 1
    cancel = threading.Event()

    def progress(done, total, stage):
        if stage == "segmenting" and done >= 1:
            cancel.set()

    with pytest.raises(Cancelled):
        predictor3d.predict(Volume(image), progress=progress, cancel=cancel)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.where(np.arange(1000).reshape(10, 10, 10) == 5, np.nan, 1.0), "1 voxel\\(s\\) that are NaN or infinite"),
        (np.where(np.arange(1000).reshape(10, 10, 10) < 3, np.inf, 1.0), "3 voxel\\(s\\) that are NaN or infinite"),
        (np.full((10, 10, 10), 42.0), "constant \\(every voxel is 42.0\\)"),
        (np.random.default_rng(0).random((1, 20, 20)), "segments 3D volumes; this is a single 2D image"),
        (np.random.default_rng(0).random((2, 4, 20, 20)), "expects 1-channel images but this image has 2"),
    ],
)
def test_bad_images_are_refused_with_a_reason(predictor3d, array, message):
    with pytest.raises(InputError, match=message):
        predictor3d.predict(Volume(array))


def test_roi_outside_the_image_is_refused(predictor3d, ball):
    with pytest.raises(InputError, match="outside the image"):
        predictor3d.predict(Volume(ball[0]), roi=Box((0, 0, 0), (37, 40, 34)))


class _PicketyNet(torch.nn.Module):
    """Runs out of memory for batches above one; outputs `channels` maps."""

    def __init__(self, channels: int = 2):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, channels, 1)
        self.batches: list[int] = []

    def forward(self, x):
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        self.batches.append(x.shape[0])
        return self.conv(x)


def test_out_of_memory_retries_with_smaller_batches(unet3d_dir, ball):
    card = load_model(unet3d_dir).card
    net = _PicketyNet()
    Predictor(LoadedModel(card, net), device="cpu", batch_size=8).predict(Volume(ball[0]))
    assert net.batches and set(net.batches) == {1}


def test_network_with_wrong_output_channels_is_explained(unet3d_dir, ball):
    card = load_model(unet3d_dir).card
    with pytest.raises(ModelError, match="should output 2 channels, but it outputs 3"):
        Predictor(LoadedModel(card, _PicketyNet(3)), device="cpu", batch_size=1).predict(Volume(ball[0]))


def test_unavailable_device_is_refused(unet3d_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="'cuda' was requested but is not available"):
        Predictor(load_model(unet3d_dir), device="cuda")


def test_huge_images_are_refused_before_allocation_with_the_memory_needed(predictor3d, ball, tmp_path, monkeypatch):
    from MedSegSuiteLib import memory
    from MedSegSuiteLib.errors import OutOfMemory
    from MedSegSuiteLib.io import read_image, write_image

    path = write_image(Volume(ball[0]), tmp_path / "ball.nrrd")
    monkeypatch.setattr(memory, "available_bytes", lambda: 100_000)
    # ITK's buffer and the copy made of it: twice the float32 image
    with pytest.raises(OutOfMemory, match=r"reading ball.nrrd \(36 x 40 x 34 voxels\) needs about 382.5 kB"):
        read_image(path)
    with pytest.raises(
        OutOfMemory, match=r"segmenting this 36 x 40 x 34 image needs about .* but only 97.7 kB is free"
    ):
        predictor3d.predict(Volume(ball[0]))


def test_half_precision_accumulation_gives_the_labels_of_full_precision(predictor3d, ball):
    volume = Volume(ball[0])
    assert np.array_equal(
        predictor3d.predict(volume).labels.array, predictor3d.predict(volume, scores=True).labels.array
    )


def test_a_network_in_training_keeps_its_memory_format_and_gives_the_same_labels(unet2d_dir):
    image, _ = disc_image(48, (20, 26), 9, seed=5)
    volume = Volume(image.astype(np.float32), spacing=(1.0, 1.0, 1.0))
    training = load_model(unet2d_dir)
    kept = Predictor(training, device="cpu", channels_last=False).predict(volume)
    weights = [p for p in training.network.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous() for p in weights)
    fast = Predictor(load_model(unet2d_dir), device="cpu").predict(volume)
    np.testing.assert_array_equal(kept.labels.array, fast.labels.array)
