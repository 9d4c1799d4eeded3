"""Every network trains on real MRI volumes: a few iterations on MSD hippocampus cases keep the loss finite.

Real intensities (float32 up to several thousand, some volumes 8-bit), two labels and
axial slices without any foreground are what broke HiDiff (a NaN at iteration 1); the
2D networks train slice-wise on the same volumes, the 3D ones on patches.
"""

from __future__ import annotations

import json
import math
import shutil

import h5py
import numpy as np
import pytest
from conftest import real_data

from MedSegSuiteLib.training.jobs import TrainOptions, train_model

LABELS = [{"value": 1, "name": "Anterior"}, {"value": 2, "name": "Posterior"}]

# network: (size_xy or None, patch_xyz or None, extra recipe options)
CASES = {
    "unet": (None, (32, 32, 32), {}),
    "dnet": (None, (32, 32, 32), {}),
    "banet": ((64, 64), None, {}),
    "condseg": ((64, 64), None, {"stage1_fraction": 0.5}),
    "hidiff": ((64, 64), None, {"pretrain_fraction": 0.5}),
}


@pytest.fixture(scope="module")
def small_hippocampus(tmp_path_factory):
    """Four real hippocampus cases (two with float intensities in the thousands) in an images/ + labels/ folder."""
    source = real_data("msd_hippocampus")
    names = sorted(p.name for p in (source / "images").iterdir())[:4]
    folder = tmp_path_factory.mktemp("hippocampus")
    for sub in ("images", "labels"):
        (folder / sub).mkdir()
        for name in names:
            shutil.copy(source / sub / name, folder / sub / name)
    return folder, names


@pytest.mark.parametrize("network", sorted(CASES))
def test_every_network_trains_on_real_volumes_with_a_finite_loss(network, small_hippocampus, tmp_path):
    folder, names = small_hippocampus
    size, patch, recipe = CASES[network]
    options = TrainOptions(
        network=network,
        data=folder,
        output=tmp_path / "model",
        model_id=f"test-{network}",
        labels=LABELS,
        iterations=4,
        batch_size=2,
        size_xy=size,
        patch_xyz=patch,
        val_ids=[names[0].split(".")[0]],
        validate_every=4,
        recipe=recipe,
    )
    records = []
    entry = train_model(options, on_log=records.append)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses), losses
    card = json.loads((entry.directory / "card.json").read_text(encoding="utf-8"))
    assert [label["value"] for label in card["labels"]] == [1, 2]
    if size is not None:  # MRI is not 8-bit: slice-wise networks normalise per volume, not by /255
        assert card["input"]["normalization"]["kind"] != "scale"


def test_canet_trains_semi_supervised_on_real_left_atrium_volumes_with_a_finite_loss(tmp_path):
    source = real_data("la_mri_2018") / "h5"
    names = sorted(p.name for p in source.iterdir())[:3]
    folder = tmp_path / "h5"
    folder.mkdir()
    for name in names:  # a 48-voxel cube around the atrium keeps validation to a few windows
        with h5py.File(source / name, "r") as whole, h5py.File(folder / name, "w") as part:
            label = whole["label"][:]
            centre = [int(np.mean(axis)) for axis in np.nonzero(label)]
            box = tuple(slice(max(0, c - 24), max(0, c - 24) + 48) for c in centre)
            part["image"], part["label"] = whole["image"][box], label[box]
    options = TrainOptions(
        network="canet",
        data=folder,
        output=tmp_path / "model",
        model_id="test-canet",
        labels=[{"value": 1, "name": "Left atrium"}],
        iterations=3,
        batch_size=1,
        patch_xyz=(32, 32, 32),
        h5_spacing=(0.625, 0.625, 0.625),
        val_ids=[names[0].split(".")[0]],
        validate_every=3,
        labelled_cases=1,
        recipe={"unlabelled_batch": 1},
    )
    records = []
    train_model(options, on_log=records.append)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses), losses
