"""Training end to end: learning, validation, cancel and resume, card out, and use by segment."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import disc_image, sphere_volume
from PIL import Image

from MedSegSuiteLib.cli import main
from MedSegSuiteLib.errors import Cancelled, InputError
from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.models import load_card
from MedSegSuiteLib.models.weights import read_weights
from MedSegSuiteLib.training.jobs import TrainOptions, train_model
from MedSegSuiteLib.volume import Volume


@pytest.fixture(scope="module")
def discs(tmp_path_factory) -> Path:
    """24 RGB PNG photos of varying size with one disc each, and 0/255 PNG masks."""
    root = tmp_path_factory.mktemp("discs")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        size = int(rng.integers(48, 80))
        image, mask = disc_image(size, tuple(rng.uniform(15, size - 15, 2)), rng.uniform(5, 12), seed=i)
        Image.fromarray(np.moveaxis(image[:, 0], 0, -1)).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask[0] * 255).save(root / "masks" / f"case{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def two_balls(tmp_path_factory) -> Path:
    """10 noisy volumes with a bright ball labelled 1 and a dim one labelled 2."""
    root = tmp_path_factory.mktemp("balls")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    rng = np.random.default_rng(1)
    for i in range(10):
        a, mask_a = sphere_volume((20, 32, 32), (10, *rng.uniform(8, 12, 2)), 4.5, seed=i)
        b, mask_b = sphere_volume((20, 32, 32), (10, *rng.uniform(20, 24, 2)), 4.5, seed=100 + i)
        image = a + (b - 100) * 0.5
        labels = (mask_a + 2 * mask_b * (1 - mask_a)).astype(np.uint8)
        write_image(Volume(image.astype(np.float32)), root / "images" / f"v{i}.nii.gz")
        write_image(Volume(labels), root / "labels" / f"v{i}.nii.gz")
    return root


def _options(data: Path, output: Path, **changes) -> TrainOptions:
    options = TrainOptions(
        network="unet",
        data=data,
        output=output,
        model_id=output.name,
        iterations=60,
        batch_size=8,
        size_xy=(48, 48),
        device="cpu",
        validate_every=20,
        labels=[{"value": 1, "name": "Disc"}],
        data_licence="CC0-1.0 (synthetic)",
    )
    for key, value in changes.items():
        setattr(options, key, value)
    return options


def test_cli_train_2d_learns_and_segment_uses_the_model(discs, tmp_path, capsys):
    code = main(
        [
            "train",
            "--network",
            "unet",
            "--data",
            str(discs),
            "-o",
            str(tmp_path / "disc-model"),
            "--iterations",
            "80",
            "--batch-size",
            "8",
            "--size",
            "48,48",
            "--device",
            "cpu",
            "--labels",
            "1:Disc",
            "--validate-every",
            "20",
            "--data-licence",
            "CC0-1.0 (synthetic)",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    card = load_card(tmp_path / "disc-model" / "card.json")
    log = json.loads((tmp_path / "disc-model" / "training_log.json").read_text(encoding="utf-8"))
    validations = [entry["val_dice"] for entry in log if "val_dice" in entry]
    assert validations[-1] > 0.75 and max(validations) > validations[0] + 0.15, validations
    dice = next(m for m in card.metrics if m["name"] == "dice")
    assert dice["value"] == pytest.approx(max(validations), abs=1e-4) and "held out" in dice["split"]
    assert (
        card.training["cases"] == {"train": 19, "unlabelled": 0, "validation": 5}
        and len(card.training["validation_ids"]) == 5
    )
    assert card.training["licence"] == "CC0-1.0 (synthetic)" and card.labels[0].name == "Disc"
    assert not (tmp_path / "disc-model.training").exists()
    first = card.training["validation_ids"][0]
    code = main(
        [
            "segment",
            str(discs / "images" / f"{first}.png"),
            "-m",
            str(tmp_path / "disc-model"),
            "-o",
            str(tmp_path / "out.nrrd"),
        ]
    )
    assert code == 0
    truth = read_image(discs / "masks" / f"{first}.png").array > 127
    predicted = read_image(tmp_path / "out.nrrd").array == 1
    assert 2 * (truth & predicted).sum() / (truth.sum() + predicted.sum()) > 0.7


def test_3d_training_with_two_labels_learns(two_balls, tmp_path):
    logs = []
    entry = train_model(
        TrainOptions(
            network="unet",
            data=two_balls,
            output=tmp_path / "balls",
            model_id="balls",
            iterations=60,
            batch_size=2,
            patch_xyz=(32, 32, 16),
            device="cpu",
            validate_every=20,
            labels=[{"value": 1, "name": "Bright"}, {"value": 2, "name": "Dim"}],
        ),
        on_log=logs.append,
    )
    validations = [entry["val_dice"] for entry in logs if "val_dice" in entry]
    assert max(validations) > 0.6 and max(validations) > validations[0] + 0.1, validations
    assert [label.value for label in entry.card.labels] == [1, 2] and entry.card.output_channels == 3


def test_cancel_keeps_a_checkpoint_and_resume_matches_an_uninterrupted_run(discs, tmp_path, single_thread):
    short = dict(iterations=8, batch_size=2, validate_every=4)  # resuming is exact whatever the run's length
    reference = train_model(_options(discs, tmp_path / "straight", **short))
    cancel = threading.Event()

    def progress(done, total, stage):
        if stage == "training" and done == 4:
            cancel.set()

    with pytest.raises(Cancelled, match="cancelled at iteration 4; the checkpoint"):
        train_model(_options(discs, tmp_path / "paused", **short), progress=progress, cancel=cancel)
    assert (tmp_path / "paused.training" / "checkpoint.pt").is_file() and not (tmp_path / "paused").exists()
    with pytest.raises(InputError, match="holds an unfinished run; resume it"):
        train_model(_options(discs, tmp_path / "paused", **short))
    resumed = train_model(_options(discs, tmp_path / "paused", **short), resume=True)
    a, b = read_weights(reference.weights_path), read_weights(resumed.weights_path)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert resumed.card.metrics[0]["value"] == pytest.approx(reference.card.metrics[0]["value"], abs=1e-4)


def test_label_values_the_table_does_not_name_are_refused(two_balls, discs, tmp_path):
    with pytest.raises(InputError, match="label value\\(s\\) \\[2\\] that --labels does not name"):
        train_model(
            TrainOptions(
                network="unet",
                data=two_balls,
                output=tmp_path / "x",
                model_id="x",
                iterations=1,
                patch_xyz=(32, 32, 16),
                device="cpu",
                labels=[{"value": 1, "name": "Bright"}],
            )
        )
    with pytest.raises(InputError, match="already exists"):
        (tmp_path / "taken").mkdir()
        train_model(_options(discs, tmp_path / "taken"))
    with pytest.raises(ValueError, match="no training recipe for 'vnet'"):
        train_model(_options(two_balls, tmp_path / "y", network="vnet"))


def test_hidiff_validates_only_once_its_refiner_has_trained(discs, tmp_path):
    """Before the refiner trains, the full inference would run an untrained refiner: no validation then."""
    entry = train_model(
        _options(
            discs,
            tmp_path / "hd",
            network="hidiff",
            iterations=6,
            batch_size=2,
            size_xy=(32, 32),
            validate_every=1,
            recipe={"pretrain_fraction": 0.5},
        )
    )
    log = json.loads((tmp_path / "hd" / "training_log.json").read_text())
    validated = [row["iteration"] for row in log if "val_dice" in row]
    assert validated == [4, 5, 6]
    card = entry.card
    assert card.training["recipe"]["pretrain_iterations"] == 3
    assert card.training["inputs"]["dims"] == 2 and card.training["inputs"]["channels"] == 3
    assert card.training["recipe"]["augment"]["flip_axes"] == "xyz"
