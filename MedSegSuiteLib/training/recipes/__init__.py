"""Training recipes, one module per network family.

Each recipe module provides:

- ``network_config(dims, channels, num_labels, patch_zyx=None) -> dict``: constructor
  overrides for the given image channels, number of labels and (3D) window size;
- ``card_defaults(dims) -> dict``: the card's ``input`` section (without ``channels``;
  a ``channels`` key beside it forces the image channels) and ``defaults`` for the run:
  batch size, iterations, learning rate, augmentation and recipe options;
- ``inference(dims, num_labels) -> dict``: the card's ``inference`` section;
- ``DIMS`` (optional): the dimensionalities the network trains in, default (2, 3);
- ``make(network, options) -> Recipe``: the recipe for a built network;
- ``supervised_loss(network, images, classes) -> (loss, parts)`` (optional): the loss
  the mean-teacher finetuning recipe uses on labelled batches; without it the network
  is finetuned with Dice + cross-entropy on its main logits.
- ``make_finetune(network, options) -> Recipe`` (optional): the network's own
  semi-supervised finetuning recipe (CANet's), used instead of the mean teacher.
- ``OPTIMIZER`` (optional): the optimiser ``make`` trains with when it is not Adam
  (``"sgd"``); the mean-teacher finetuning continues with the same one.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["recipe_module", "trainable_networks"]

_RECIPES = {
    "unet": "MedSegSuiteLib.training.recipes.unet",
    "hidiff": "MedSegSuiteLib.training.recipes.hidiff",
    "condseg": "MedSegSuiteLib.training.recipes.condseg",
    "banet": "MedSegSuiteLib.training.recipes.banet",
    "dnet": "MedSegSuiteLib.training.recipes.dnet",
    "canet": "MedSegSuiteLib.training.recipes.canet",
}


def trainable_networks() -> list[str]:
    """Networks ``medsegsuite train`` can train."""
    return [name for name, module in _RECIPES.items() if importlib.util.find_spec(module) is not None]


def recipe_module(network: str) -> ModuleType:
    """The recipe module for ``network`` (ValueError if there is none)."""
    if network not in trainable_networks():
        raise ValueError(f"no training recipe for {network!r}; trainable networks: {', '.join(trainable_networks())}")
    return importlib.import_module(_RECIPES[network])
