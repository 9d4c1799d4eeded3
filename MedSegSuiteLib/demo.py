"""The main job on the bundled sample: segment it with a bundled model, save an overlay, report Dice."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .errors import InputError
from .inference import Predictor
from .inference.fit_check import fit_warnings
from .io import read_image, write_image
from .io.atomic import atomic_output
from .models import ModelRegistry, load_model
from .preprocessing import check_channels
from .resources import resources_dir
from .review_picture import ContourLabel, review_png
from .training.metrics import case_metrics

__all__ = ["SAMPLE_MODEL", "DemoResult", "run_demo", "sample_paths"]

SAMPLE_MODEL = "hippocampus-dnet-lite"
SAMPLE_NAME = "MSD-Hippocampus-sample"
SAMPLE_MODALITY = "MR"


@dataclass
class DemoResult:
    """What the demo wrote and measured; ``warnings`` say how the sample is far from what the model was
    trained on (see :func:`~MedSegSuiteLib.inference.fit_check.fit_warnings`), empty when it fits."""

    labels_path: Path
    overlay_path: Path
    dice: dict[str, float]
    seconds: float
    warnings: list[str] = field(default_factory=list)


def sample_paths() -> tuple[Path, Path]:
    """The bundled sample image and its reference label map (``Resources/Samples``)."""
    folder = resources_dir() / "Samples"
    image, label = folder / f"{SAMPLE_NAME}.nrrd", folder / f"{SAMPLE_NAME}-label.nrrd"
    if not image.is_file() or not label.is_file():
        raise InputError(f"the bundled sample is missing from {folder}; re-install MedSegSuite")
    return image, label


def run_demo(
    output: Union[str, Path], model: str = SAMPLE_MODEL, device: str = "auto", registry: Optional[ModelRegistry] = None
) -> DemoResult:
    """Segment the bundled sample, write labels + a review picture into ``output``, and compare with its reference.

    Refuses (InputError) a 2D model, or one whose channels the channel rule cannot map from the
    sample's one, before any work: the sample is an MRI volume. The result's ``warnings`` (also
    written to ``sample-dice.json``) say how the sample is far from the model's training inputs.
    """
    import time

    image_path, label_path = sample_paths()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model, registry or ModelRegistry())
    if loaded.card.dims != 3:
        raise InputError(
            f"{loaded.card.id} is a 2D model, but the demo's sample is an MRI volume: "
            f"give a 3D model, such as {SAMPLE_MODEL}"
        )
    image, truth = read_image(image_path), read_image(label_path)
    check_channels(image.channels, loaded.card.input.channels, image="the sample", model=loaded.card.id)
    warnings = fit_warnings(image, loaded.card, modality=SAMPLE_MODALITY, roi_hint="medsegsuite segment --roi")
    started = time.perf_counter()
    result = Predictor(loaded, device=device).predict(image)
    seconds = time.perf_counter() - started
    labels_path = write_image(result.labels, output / "sample-labels.nrrd", overwrite=True)
    values = [label.value for label in loaded.card.labels]
    metrics = case_metrics(result.labels.array, truth.array, values, image.spacing)
    dice = {label.name: round(metrics[label.value]["dice"], 4) for label in loaded.card.labels}
    overlay_path = review_png(
        image,
        result.labels,
        [ContourLabel(label.value, label.name, tuple(label.color), dice[label.name]) for label in loaded.card.labels],
        output / "sample-overlay.png",
        reference=truth,
        title=f"{SAMPLE_NAME}: {loaded.card.id} against the reference label",
        prediction_name=loaded.card.id,
    )
    with atomic_output(output / "sample-dice.json", overwrite=True) as tmp:
        Path(tmp).write_text(
            json.dumps(
                {"model": loaded.card.id, "dice": dice, "seconds": seconds, "input_warnings": warnings}, indent=2
            ),
            encoding="utf-8",
        )
    return DemoResult(labels_path, overlay_path, dice, seconds, warnings)
