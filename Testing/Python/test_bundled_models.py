"""Every bundled model loads (sha256 checked), documents itself, and segments what it was made for."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA, dice, real_data

from MedSegSuiteLib.inference import Predictor
from MedSegSuiteLib.io import read_image
from MedSegSuiteLib.models import ModelRegistry, load_model
from MedSegSuiteLib.resources import resources_dir

BUNDLED = sorted(p.name for p in (resources_dir() / "Models").iterdir() if (p / "card.json").is_file())


@pytest.fixture
def user_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEGSUITE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDSEGSUITE_RESOURCES", raising=False)


def test_the_hippocampus_and_polyp_models_are_bundled():
    assert {"hippocampus-dnet-lite", "polyp-banet-lite"} <= set(BUNDLED)


@pytest.mark.parametrize("model_id", BUNDLED)
def test_a_bundled_model_loads_and_its_card_says_where_it_came_from(user_home, model_id):
    entry = ModelRegistry().get(model_id)
    assert entry.source == "bundled"
    model = load_model(model_id)  # checks the sha256 and loads with strict=True
    card = model.card
    assert card.licence and card.training["licence"] and card.training["validation_ids"]
    assert entry.weights_path.stat().st_size < 10_000_000, "bundled weights must keep the repository light"
    dice_metric = next(m for m in card.metrics if m["name"] == "dice")
    assert "held out from training" in dice_metric["split"] and 0 < dice_metric["value"] <= 1
    assert card.resources["cpu_seconds_per_case"] > 0


def _validation_cases(model_id: str, folder: str, count: int) -> list:
    card = load_model(model_id).card
    real_data(folder)
    return card.training["validation_ids"][:count]


def test_the_polyp_model_finds_polyps_in_photos_it_never_trained_on(user_home):
    ids = _validation_cases("polyp-banet-lite", "kvasir_seg", 8)
    predictor = Predictor(load_model("polyp-banet-lite"), device="cpu")
    scores = []
    for case in ids:
        image = read_image(SHARED_DATA / "kvasir_seg" / "images" / f"{case}.jpg")
        truth = read_image(SHARED_DATA / "kvasir_seg" / "masks" / f"{case}.jpg").array > 127
        labels = predictor.predict(image).labels
        assert labels.shape == image.shape and set(np.unique(labels.array)) <= {0, 1}
        scores.append(dice(labels.array > 0, truth))
    assert np.mean(scores) > 0.6, scores


def test_the_hippocampus_model_segments_volumes_it_never_trained_on(user_home):
    ids = _validation_cases("hippocampus-dnet-lite", "msd_hippocampus", 4)
    predictor = Predictor(load_model("hippocampus-dnet-lite"), device="cpu")
    for case in ids:
        image = read_image(SHARED_DATA / "msd_hippocampus" / "images" / f"{case}.nii.gz")
        truth = read_image(SHARED_DATA / "msd_hippocampus" / "labels" / f"{case}.nii.gz").array
        labels = predictor.predict(image).labels.array
        for value in (1, 2):
            assert dice(labels == value, truth == value) > 0.6, (case, value)
