"""The main job on the bundled sample: segment it with a bundled model, save an overlay, report Dice."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import InputError
from .inference import Predictor
from .io import read_image, write_image
from .io.atomic import atomic_output
from .models import ModelCard, ModelRegistry, load_model
from .resources import resources_dir
from .training.metrics import case_metrics
from .volume import Volume

__all__ = ["SAMPLE_MODEL", "DemoResult", "overlay_png", "run_demo", "sample_paths"]

SAMPLE_MODEL = "hippocampus-dnet-lite"
SAMPLE_NAME = "MSD-Hippocampus-sample"


@dataclass
class DemoResult:
    labels_path: Path
    overlay_path: Path
    dice: dict[str, float]
    seconds: float


def sample_paths() -> tuple[Path, Path]:
    """The bundled sample image and its reference label map (``Resources/Samples``)."""
    folder = resources_dir() / "Samples"
    image, label = folder / f"{SAMPLE_NAME}.nrrd", folder / f"{SAMPLE_NAME}-label.nrrd"
    if not image.is_file() or not label.is_file():
        raise InputError(f"the bundled sample is missing from {folder}; re-install MedSegSuite")
    return image, label


def _normalised_slice(volume: Volume, k: int) -> np.ndarray:
    plane = volume.channel_first()[:, k].astype(np.float32)
    low, high = np.percentile(plane, [1, 99])
    grey = np.clip((plane - low) / max(high - low, 1e-6), 0, 1)
    return np.repeat(grey, 3, axis=0)[:3] if grey.shape[0] == 1 else grey[:3]


def overlay_png(
    image: Volume, labels: Volume, card: ModelCard, path: Union[str, Path], scale: int = 4, overwrite: bool = True
) -> Path:
    """A PNG of up to three axial slices through the labelled region, labels blended in their card colours."""
    from PIL import Image

    from .geometry import to_canonical

    canonical, transform = to_canonical(image)
    label_array = transform.apply(labels.array)
    depth = label_array.shape[0]
    found = np.nonzero(label_array.reshape(depth, -1).any(1))[0]
    picks = np.linspace(found[0], found[-1], 3).round().astype(int) if len(found) else [depth // 2]
    tiles = []
    for k in sorted(set(int(p) for p in picks)):
        rgb = _normalised_slice(canonical, k).transpose(1, 2, 0)
        plane = label_array[k]
        for label in card.labels:
            mask = plane == label.value
            rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.array(label.color) / 255.0
        tiles.append(rgb)
    montage = np.concatenate(tiles, axis=1)
    picture = Image.fromarray((montage * 255).astype(np.uint8))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    with atomic_output(path, overwrite=overwrite) as tmp:
        picture.save(tmp, format="PNG")
    return Path(path)


def run_demo(
    output: Union[str, Path], model: str = SAMPLE_MODEL, device: str = "auto", registry: Optional[ModelRegistry] = None
) -> DemoResult:
    """Segment the bundled sample, write labels + overlay into ``output``, and compare with its reference."""
    import time

    image_path, label_path = sample_paths()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model, registry or ModelRegistry())
    image, truth = read_image(image_path), read_image(label_path)
    started = time.perf_counter()
    result = Predictor(loaded, device=device).predict(image)
    seconds = time.perf_counter() - started
    labels_path = write_image(result.labels, output / "sample-labels.nrrd", overwrite=True)
    overlay_path = overlay_png(image, result.labels, loaded.card, output / "sample-overlay.png")
    values = [label.value for label in loaded.card.labels]
    metrics = case_metrics(result.labels.array, truth.array, values, image.spacing)
    dice = {label.name: round(metrics[label.value]["dice"], 4) for label in loaded.card.labels}
    with atomic_output(output / "sample-dice.json", overwrite=True) as tmp:
        Path(tmp).write_text(
            json.dumps({"model": loaded.card.id, "dice": dice, "seconds": seconds}, indent=2), encoding="utf-8"
        )
    return DemoResult(labels_path, overlay_path, dice, seconds)
