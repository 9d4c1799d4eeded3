"""Model cards, the model registry and weight files."""

from .card import CARD_FILE, InferenceSpec, InputSpec, Label, ModelCard, card_from_dict, load_card, save_card
from .loading import LoadedModel, build_network, load_model
from .registry import ModelEntry, ModelRegistry, default_user_dir
from .saving import save_model

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
