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


def _bundled_hippocampus() -> Path:
    folder = resources_dir() / "Models" / "hippocampus-dnet-lite"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("bundled models are not installed")
    return folder


def test_segment_with_the_bundled_hippocampus_model_warns_about_a_large_volume_unless_an_roi_fits(capsys, tmp_path):
    """96 x 60 x 46 mm is more than twice the 43 mm width of the largest training crop: the ROI warning, recorded in
    the result; an ROI of a crop's size gets none (the warning is about what the network sees)."""
    model = _bundled_hippocampus()
    head = np.random.default_rng(3).normal(30000, 8000, (46, 60, 96)).astype(np.float32)
    source = write_image(Volume(head, (1.0, 1.0, 1.0)), tmp_path / "head.nrrd")
    out = tmp_path / "r.seg.nrrd"
    code, _, err = run(capsys, "segment", source, "-m", model, "-o", out, "--device", "cpu", "--fast", "-q")
    assert code == 0, err
    warning = (
        "this image covers 96 x 60 x 46 mm, far more than the 43 x 58 x 46 mm (at most) hippocampus-dnet-lite was "
        "trained on: it may find the structure in the wrong place; segment an ROI around it (--roi)"
    )
    assert f"warning: head.nrrd: {warning}" in err
    header = out.read_bytes().split(b"\n\n")[0].decode()
    assert f"MedSegSuite_InputWarnings:={warning}" in header
    code, _, err = run(capsys, "segment", source, "-m", model, "-o", out, "--device", "cpu", "--fast", "-q")
    assert code == 2 and "already exists" in err
    roi = ["--roi", "30,5,3,70,55,43", "--overwrite"]
    code, _, err = run(capsys, "segment", source, "-m", model, "-o", out, "--device", "cpu", "--fast", "-q", *roi)
    assert code == 0 and "warning" not in err, err
    assert b"MedSegSuite_InputWarnings" not in out.read_bytes().split(b"\n\n")[0]


def test_demo_prints_and_records_the_warnings_of_a_model_trained_on_other_images(capsys, tmp_path, monkeypatch):
    """A copy of the bundled model whose card says it was trained on small CT crops: the MRI sample is named as
    both too large and of another modality, on standard error and in sample-dice.json."""
    import shutil

    monkeypatch.setenv("MEDSEGSUITE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDSEGSUITE_RESOURCES", raising=False)
    folder = tmp_path / "ct-crops"
    shutil.copytree(_bundled_hippocampus(), folder)
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    card["id"] = "ct-crops"
    card["training"]["inputs"].update(modality="CT", fov_mm={"min": [8.0, 8.0, 8.0], "max": [12.0, 12.0, 12.0]})
    (folder / "card.json").write_text(json.dumps(card), encoding="utf-8")
    code, out, err = run(capsys, "demo", "-m", folder, "-o", tmp_path / "demo", "--device", "cpu")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert lines == [
        "warning: MSD-Hippocampus-sample: ct-crops was trained on CT images; this is MR",
        "warning: MSD-Hippocampus-sample: this image covers 34 x 52 x 35 mm, far more than the 12 x 12 x 12 mm "
        "(at most) ct-crops was trained on: it may find the structure in the wrong place; segment an ROI around it "
        "(medsegsuite segment --roi)",
    ], err
    assert "Dice against the sample's reference label" in out
    recorded = json.loads((tmp_path / "demo" / "sample-dice.json").read_text(encoding="utf-8"))["input_warnings"]
    assert recorded == [line.split(": ", 2)[2] for line in lines]
