"""Does an input fit what the model was trained on? Plain-words warnings, never a refusal.

A model card may record a profile of its training inputs under ``training.inputs``::

    "inputs": {"dims": 3, "channels": 1, "modality": "MR",
               "fov_mm": {"min": [x, y, z], "max": [x, y, z]},
               "spacing_mm": {"min": [x, y, z], "max": [x, y, z]},
               "intensity": {"mean": m, "std": s}}

:func:`input_profile` computes such a profile from training volumes;
:func:`fit_warnings` compares one input with it (and with the card's dims and
channels) and returns sentences for the user: a whole-brain MRI given to a model
trained on small hippocampus crops, a volume given to a 2D photo model, spacing or
intensities far from the training data.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..models.card import ModelCard
from ..volume import Volume

__all__ = ["fit_warnings", "input_profile"]

#: how far outside the training range (as a factor) an input may be before a warning
FOV_FACTOR = 2.0
SPACING_FACTOR = 2.0
INTENSITY_STDS = 5.0


def input_profile(volumes: Sequence[Volume], modality: Optional[str] = None) -> dict[str, Any]:
    """The ``training.inputs`` profile of ``volumes``: dims, channels, field of view, spacing, intensity."""
    fovs = np.array([np.array(v.shape[::-1]) * np.array(v.spacing) for v in volumes])
    spacings = np.array([v.spacing for v in volumes])
    means = [float(np.mean(v.array)) for v in volumes]
    stds = [float(np.std(v.array)) for v in volumes]
    profile: dict[str, Any] = {
        "dims": 2 if all(v.is_2d for v in volumes) else 3,
        "channels": int(volumes[0].channels),
        "fov_mm": {"min": fovs.min(0).round(2).tolist(), "max": fovs.max(0).round(2).tolist()},
        "spacing_mm": {"min": spacings.min(0).round(4).tolist(), "max": spacings.max(0).round(4).tolist()},
        "intensity": {"mean": round(float(np.mean(means)), 3), "std": round(float(np.mean(stds)), 3)},
    }
    if modality:
        profile["modality"] = modality
    return profile


def _mm(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.0f}" for v in values) + " mm"


def fit_warnings(volume: Volume, card: ModelCard, modality: Optional[str] = None, roi_hint: str = "--roi") -> list[str]:
    """Sentences saying how ``volume`` is far from what ``card``'s model was trained on (empty when it fits).

    ``modality`` (e.g. ``MR``), when known, is compared with the training modality; ``roi_hint`` says how
    the user chooses a region where a sentence suggests segmenting one (``--roi`` on the command line).
    Never raises for an input that merely does not fit.
    """
    warnings: list[str] = []
    profile = (card.training or {}).get("inputs") if isinstance(card.training, dict) else None
    profile = profile if isinstance(profile, dict) else {}
    if card.dims == 2 and not volume.is_2d and card.input.channels == 3:
        warnings.append(
            f"{card.id} was trained on 2D colour photos; this is a {volume.shape[0]}-slice volume, segmented slice by "
            "slice: expect a poor result"
        )
    trained_modality = profile.get("modality")
    if trained_modality and modality and str(modality).upper() != str(trained_modality).upper():
        warnings.append(f"{card.id} was trained on {trained_modality} images; this is {modality}")
    fov = profile.get("fov_mm") or {}
    size = np.array(volume.shape[::-1]) * np.array(volume.spacing)
    if fov.get("max") and fov.get("min"):
        high, low = np.array(fov["max"], float), np.array(fov["min"], float)
        axes = [i for i in range(3) if size[i] > FOV_FACTOR * high[i] and not (i == 2 and volume.is_2d)]
        if axes:
            warnings.append(
                f"this image covers {_mm(size)}, far more than the {_mm(high)} (at most) {card.id} was trained on: "
                f"it may find the structure in the wrong place; segment an ROI around it ({roi_hint})"
            )
        elif any(size[i] * FOV_FACTOR < low[i] for i in range(3 if not volume.is_2d else 2)):
            warnings.append(
                f"this image covers only {_mm(size)}, far less than the {_mm(low)} (at least) {card.id} was trained on"
            )
    spacing = profile.get("spacing_mm") or {}
    if spacing.get("max") and spacing.get("min") and card.input.spacing is None:
        high, low = np.array(spacing["max"], float), np.array(spacing["min"], float)
        checked = range(2) if volume.is_2d else range(3)
        far = [i for i in checked if not low[i] / SPACING_FACTOR <= volume.spacing[i] <= high[i] * SPACING_FACTOR]
        if far:
            warnings.append(
                f"its voxels are {' x '.join(f'{s:.3g}' for s in volume.spacing)} mm; {card.id} was trained on "
                f"{' x '.join(f'{s:.3g}' for s in low)} to {' x '.join(f'{s:.3g}' for s in high)} mm"
            )
    intensity = profile.get("intensity") or {}
    if "mean" in intensity and intensity.get("std") and card.input.normalization.get("kind") in ("none", "scale"):
        distance = abs(float(np.mean(volume.array)) - float(intensity["mean"])) / float(intensity["std"])
        if distance > INTENSITY_STDS:
            warnings.append(
                f"its intensities (mean {float(np.mean(volume.array)):.3g}) are far from the training images' "
                f"(mean {float(intensity['mean']):.3g}, spread {float(intensity['std']):.3g})"
            )
    return warnings
