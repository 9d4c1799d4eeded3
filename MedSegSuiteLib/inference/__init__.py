"""Running a model on a volume: preprocessing, slice-wise 2D and sliding-window 3D inference."""

from .device import autocast, available_devices, resolve_device
from .predictor import Prediction, Predictor, validate_image
from .sliding_window import SlidingWindow

__all__ = [
    "Prediction",
    "Predictor",
    "SlidingWindow",
    "autocast",
    "available_devices",
    "resolve_device",
    "validate_image",
]
