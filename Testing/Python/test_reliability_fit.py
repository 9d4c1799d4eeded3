"""Inputs far from what a model was trained on: segment warns in plain words and records it in the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import UNET2D_CARD, UNET3D_CARD
from conftest import run_cli as run

from MedSegSuiteLib.inference.fit_check import fit_warnings, input_profile
from MedSegSuiteLib.io import write_image
from MedSegSuiteLib.models.card import card_from_dict, load_card
from MedSegSuiteLib.resources import resources_dir
from MedSegSuiteLib.volume import Volume

PROFILE = {
    "dims": 3,
    "channels": 1,
    "modality": "MR",
    "fov_mm": {"min": [24.0, 24.0, 24.0], "max": [36.0, 36.0, 36.0]},
    "spacing_mm": {"min": [1.0, 1.0, 1.5], "max": [1.0, 1.0, 2.0]},
    "intensity": {"mean": 100.0, "std": 20.0},
}


@pytest.fixture(scope="module")
def fitted_model(tmp_path_factory) -> Path:
    from MedSegSuiteLib import networks
    from MedSegSuiteLib.models import save_model

    torch.manual_seed(0)
    network = networks.create("unet", "lite", spatial_dims=3, in_channels=1, out_channels=2)
    card = {**UNET3D_CARD, "training": {**UNET3D_CARD["training"], "inputs": PROFILE}}
    directory = tmp_path_factory.mktemp("models") / "test-unet3d"
    save_model(directory, network, card)
    return directory


def card(**training) -> object:
    return card_from_dict({**UNET3D_CARD, "training": {"inputs": PROFILE, **training}, "weights": {"file": "w"}})


def test_an_input_like_the_training_data_gets_no_warning():
    volume = Volume(np.zeros((16, 32, 32), np.float32) + 100, (1.0, 1.0, 2.0))
    assert fit_warnings(volume, card()) == []


def test_a_whole_head_for_a_crop_model_says_so_and_suggests_an_roi():
    volume = Volume(np.zeros((90, 110, 90), np.float32), (2.0, 2.0, 2.0))
    warnings = fit_warnings(volume, card())
    assert any("180 x 220 x 180 mm" in w and "--roi" in w for w in warnings), warnings


def test_far_spacing_modality_and_a_volume_for_a_photo_model_are_named():
    coarse = Volume(np.zeros((8, 8, 8), np.float32), (5.0, 5.0, 5.0))
    assert any("voxels are 5 x 5 x 5 mm" in w for w in fit_warnings(coarse, card()))
    ct = Volume(np.zeros((16, 32, 32), np.float32), (1.0, 1.0, 2.0))
    assert any("trained on MR images; this is CT" in w for w in fit_warnings(ct, card(), modality="CT"))
    photo_model = card_from_dict({**UNET2D_CARD, "weights": {"file": "w"}})
    volume = Volume(np.zeros((3, 20, 40, 40), np.uint8))
    assert any("2D colour photos" in w and "20-slice volume" in w for w in fit_warnings(volume, photo_model))


def test_a_profile_is_computed_from_training_volumes():
    volumes = [Volume(np.full((10, 20, 30), v, np.float32), (1.0, 1.0, s)) for v, s in ((50, 2.0), (150, 3.0))]
    profile = input_profile(volumes, modality="CT")
    assert profile["fov_mm"] == {"min": [30.0, 20.0, 20.0], "max": [30.0, 20.0, 30.0]}
    assert profile["spacing_mm"]["max"] == [1.0, 1.0, 3.0] and profile["intensity"]["mean"] == pytest.approx(100)
    assert profile["modality"] == "CT" and profile["dims"] == 3


def test_segment_warns_and_records_the_warning_in_the_result(capsys, tmp_path, fitted_model):
    rng = np.random.default_rng(0)
    volume = Volume(rng.random((40, 48, 48), dtype=np.float32) * 200, (2.0, 2.0, 2.0))
    big = write_image(volume, tmp_path / "big.nii.gz")
    code, _, err = run(capsys, "segment", big, "-m", fitted_model, "-o", tmp_path / "r.nii.gz", "--device", "cpu")
    assert code == 0, err
    assert "warning: big.nii.gz: this image covers 96 x 96 x 80 mm" in err
    table = json.loads((tmp_path / "r.labels.json").read_text(encoding="utf-8"))
    assert any("96 x 96 x 80 mm" in w for w in table["input_warnings"])
    code, _, err = run(capsys, "segment", big, "-m", fitted_model, "-o", tmp_path / "r.seg.nrrd", "--device", "cpu")
    assert code == 0, err
    header = (tmp_path / "r.seg.nrrd").read_bytes().split(b"\n\n")[0].decode()
    assert "MedSegSuite_InputWarnings:=this image covers 96 x 96 x 80 mm" in header


def test_the_bundled_hippocampus_card_records_its_training_inputs():
    card_path = resources_dir() / "Models" / "hippocampus-dnet-lite" / "card.json"
    if not card_path.is_file():
        pytest.skip("bundled models are not installed")
    profile = load_card(card_path).training["inputs"]
    assert profile["modality"] == "MR" and max(profile["fov_mm"]["max"]) < 60
    brain = Volume(np.zeros((180, 220, 180), np.float32), (1.0, 1.0, 1.0))
    assert any("--roi" in w for w in fit_warnings(brain, load_card(card_path)))
