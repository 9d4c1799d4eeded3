"""Recipe for the baseline U-Net: Dice + cross-entropy, Adam, poly schedule."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..data import Augment
from ..losses.common import dice_ce_loss
from .base import Recipe, SupervisedRecipe

__all__ = ["card_defaults", "inference", "make", "network_config", "supervised_loss"]


def network_config(dims: int, channels: int, num_labels: int, patch_zyx: Any = None) -> dict[str, Any]:
    return {"spatial_dims": dims, "in_channels": channels, "out_channels": num_labels + 1}


def card_defaults(dims: int) -> dict[str, Any]:
    if dims == 2:
        return {
            "input": {"normalization": {"kind": "zscore"}, "size_xy": [256, 256]},
            "defaults": {
                "batch_size": 8,
                "iterations": 2000,
                "lr": 2e-3,
                "augment": Augment(flip=0.5, rotate=30, scale=(0.8, 1.25), colour=0.2),
            },
        }
    return {
        "input": {"normalization": {"kind": "zscore"}, "patch_xyz": [64, 64, 64]},
        "defaults": {"batch_size": 2, "iterations": 2000, "lr": 2e-3, "augment": Augment(noise=0.05)},
    }


def inference(dims: int, num_labels: int) -> dict[str, Any]:
    if dims == 2:
        return {"activation": "softmax", "batch_size": 8}
    return {"activation": "softmax", "overlap": 0.5, "batch_size": 2, "fast": {"overlap": 0.25}}


def supervised_loss(network: nn.Module, images, classes):  # noqa: ANN001
    """Dice + cross-entropy of the network's logits against class maps."""
    loss = dice_ce_loss(network(images), classes)
    return loss, {}


def make(network: nn.Module, options: dict[str, Any]) -> Recipe:
    return SupervisedRecipe(
        network,
        supervised_loss,
        options["iterations"],
        optimizer="adam",
        lr=options["lr"],
        schedule="poly",
        device=options["device"],
    )
