"""The README's first command: ``medsegsuite demo`` on the bundled sample with a bundled model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from MedSegSuiteLib.cli import main
from MedSegSuiteLib.demo import SAMPLE_MODEL, sample_paths
from MedSegSuiteLib.io import read_image
from MedSegSuiteLib.models import ModelRegistry


@pytest.fixture
def user_home(tmp_path, monkeypatch):
    """An empty user model folder; the bundled models and sample stay visible."""
    monkeypatch.setenv("MEDSEGSUITE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDSEGSUITE_RESOURCES", raising=False)


def test_demo_segments_the_bundled_sample_and_reports_dice(tmp_path, user_home, capsys):
    assert SAMPLE_MODEL in {entry.card.id for entry in ModelRegistry().entries()}, "the demo model is not bundled"
    assert main(["demo", "-o", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"with {SAMPLE_MODEL}" in printed and "Dice against the sample's reference label" in printed

    image_path, label_path = sample_paths()
    labels = read_image(tmp_path / "demo" / "sample-labels.nrrd")
    assert labels.grid.same_as(read_image(image_path).grid)
    truth = read_image(label_path).array
    assert set(np.unique(labels.array)) <= {0, 1, 2}

    report = json.loads((tmp_path / "demo" / "sample-dice.json").read_text(encoding="utf-8"))
    assert report["model"] == SAMPLE_MODEL
    for name, value in report["dice"].items():
        assert value > 0.6, f"{name}: Dice {value} on the bundled sample"
        assert f"{name} {value:.3f}" in printed
    both = (labels.array > 0) & (truth > 0)
    assert 2 * both.sum() / ((labels.array > 0).sum() + (truth > 0).sum()) > 0.7

    overlay = Image.open(tmp_path / "demo" / "sample-overlay.png")
    assert overlay.format == "PNG" and overlay.width > overlay.height > 0
    assert len(np.unique(np.asarray(overlay).reshape(-1, 3), axis=0)) > 50  # an image, not a blank


def test_demo_with_an_unknown_model_names_the_known_ones(tmp_path, user_home, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "-m", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "sample-labels.nrrd").exists()
