"""The README's first command: ``medsegsuite demo`` on the bundled sample with a bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from MedSegSuiteLib.cli import main
from MedSegSuiteLib.demo import SAMPLE_MODEL, sample_paths
from MedSegSuiteLib.io import read_image
from MedSegSuiteLib.models import ModelRegistry

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def user_home(tmp_path, monkeypatch):
    """An empty user model folder; the bundled models and sample stay visible."""
    monkeypatch.setenv("MEDSEGSUITE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDSEGSUITE_RESOURCES", raising=False)


def test_demo_segments_the_bundled_sample_and_reports_dice(tmp_path, user_home, capsys):
    assert SAMPLE_MODEL in {entry.card.id for entry in ModelRegistry().entries()}, "the demo model is not bundled"
    assert main(["demo", "-o", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    printed, warned = capsys.readouterr()
    assert f"with {SAMPLE_MODEL}" in printed and "Dice against the sample's reference label" in printed
    assert "warning" not in warned, "the sample is what the bundled model was trained on"

    image_path, label_path = sample_paths()
    labels = read_image(tmp_path / "demo" / "sample-labels.nrrd")
    assert labels.grid.same_as(read_image(image_path).grid)
    truth = read_image(label_path).array
    assert set(np.unique(labels.array)) <= {0, 1, 2}

    report = json.loads((tmp_path / "demo" / "sample-dice.json").read_text(encoding="utf-8"))
    assert report["model"] == SAMPLE_MODEL and report["input_warnings"] == []
    for name, value in report["dice"].items():
        assert value > 0.6, f"{name}: Dice {value} on the bundled sample"
        assert f"{name} {value:.3f}" in printed
    both = (labels.array > 0) & (truth > 0)
    assert 2 * both.sum() / ((labels.array > 0).sum() + (truth > 0).sum()) > 0.7

    overlay = Image.open(tmp_path / "demo" / "sample-overlay.png")
    assert overlay.format == "PNG" and overlay.width >= 700 and overlay.height >= 400, "readable, not thumbnails"
    pixels = np.asarray(overlay.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # an image, not a blank
    for label in ModelRegistry().resolve(SAMPLE_MODEL).card.labels:  # contours (and legend) in each label's colour
        assert (pixels == label.color).all(1).sum() > 200, label.name

    # The README shows this picture: its copy must be what the demo writes now.
    committed = np.asarray(Image.open(REPO / "Resources" / "Screenshots" / "demo-overlay.png").convert("RGB"))
    fresh = np.asarray(overlay.convert("RGB"))
    assert committed.shape == fresh.shape, "refresh Resources/Screenshots/demo-overlay.png (see the README)"
    assert (committed != fresh).any(2).mean() < 0.01, "refresh Resources/Screenshots/demo-overlay.png (see the README)"


def test_demo_with_an_unknown_model_names_the_known_ones(tmp_path, user_home, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "-m", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "sample-labels.nrrd").exists()


def test_demo_refuses_a_2d_model_before_any_work(tmp_path, user_home, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "-m", "polyp-banet-lite", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "2D model" in err and "MRI volume" in err and SAMPLE_MODEL in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "demo" / "sample-labels.nrrd").exists()
