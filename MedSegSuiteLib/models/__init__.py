"""Model cards, the model registry and weight files."""

from __future__ import annotations

from typing import Any

from .card import CARD_FILE, InferenceSpec, InputSpec, Label, ModelCard, card_from_dict, load_card, save_card
from .registry import ModelEntry, ModelRegistry, default_user_dir

# Loading and saving need torch; they are imported on first use so that listing models
# (for example in Slicer before the first-use install) works without it.
_LAZY = {"LoadedModel": "loading", "build_network": "loading", "load_model": "loading", "save_model": "saving"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CARD_FILE",
    "InferenceSpec",
    "InputSpec",
    "Label",
    "LoadedModel",
    "ModelCard",
    "ModelEntry",
    "ModelRegistry",
    "build_network",
    "card_from_dict",
    "default_user_dir",
    "load_card",
    "load_model",
    "save_card",
    "save_model",
]
