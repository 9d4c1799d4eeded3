"""Every bundled model loads (sha256 checked), documents itself, and segments what it was made for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import dice, real_data

from MedSegSuiteLib.inference import Predictor
from MedSegSuiteLib.models import ModelRegistry, load_model
from MedSegSuiteLib.resources import resources_dir

BUNDLED = sorted(p.name for p in (resources_dir() / "Models").iterdir() if (p / "card.json").is_file())


@pytest.fixture
def user_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEGSUITE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDSEGSUITE_RESOURCES", raising=False)


def test_the_hippocampus_and_polyp_models_are_bundled():
    assert {
        "hippocampus-dnet-lite",
        "hippocampus-hidiff-lite",
        "left-atrium-canet-lite",
        "polyp-banet-lite",
        "polyp-hidiff-lite",
    } <= set(BUNDLED)


@pytest.mark.parametrize("model_id", BUNDLED)
def test_a_bundled_model_loads_and_its_card_says_where_it_came_from(user_home, model_id):
    entry = ModelRegistry().get(model_id)
    assert entry.source == "bundled"
    model = load_model(model_id)  # checks the sha256 and loads with strict=True
    card = model.card
    assert card.licence and card.training["licence"] and card.training["validation_ids"]
    # HiDiff holds a segmentor and a refiner (the polyp one: BA-Net's 3.6 M parameters and a refiner of 6.9 M)
    limit = 22_000_000 if card.network == "hidiff" else 10_000_000
    assert entry.weights_path.stat().st_size < limit, "bundled weights must keep the repository light"
    dice_metric = next(m for m in card.metrics if m["name"] == "dice")
    assert "held out from training" in dice_metric["split"] and 0 < dice_metric["value"] <= 1
    assert card.resources["cpu_seconds_per_case"] > 0


#: voxel spacing of HDF5 data sets, which store none (``../shared/data/README.md``)
H5_SPACING = {"la_mri_2018": (0.625, 0.625, 0.625)}


@pytest.mark.parametrize("model_id", BUNDLED)
def test_every_bundled_model_segments_cases_it_never_trained_on(user_home, model_id):
    """A few of the card's own validation cases, read from ../shared/data, segmented at their own resolution."""
    from MedSegSuiteLib.training.datasets import discover_cases, load_cases

    model = load_model(model_id)
    card = model.card
    trained_on = Path(card.training["data"])
    folder = trained_on.parent.name if trained_on.name == "h5" else trained_on.name
    data = real_data(folder) / ("h5" if trained_on.name == "h5" else "")
    ids = set(card.training["validation_ids"][:3])
    cases = load_cases([c for c in discover_cases(data) if c.id in ids], H5_SPACING.get(folder, (1.0, 1.0, 1.0)))
    assert len(cases) == 3
    predictor = Predictor(model, device="cpu")
    values = [label.value for label in card.labels]
    scores = []
    for case_id, image, truth in cases:
        labels = predictor.predict(image).labels
        assert labels.shape == image.shape and set(np.unique(labels.array)) <= {0, *values}, case_id
        scores.append(np.mean([dice(labels.array == v, truth.array == v) for v in values]))
    recorded = next(m["value"] for m in card.metrics if m["name"] == "dice")
    assert np.mean(scores) > min(0.6, recorded - 0.15), (model_id, scores, recorded)
