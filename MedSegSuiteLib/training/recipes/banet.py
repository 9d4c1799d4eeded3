"""Recipe for BA-Net: CE + Dice on the main output, CE on every side segmentation and edge map (spec §2.3).

The boundary target is computed from the mask at the network's input size. Adam with a
poly schedule (power 0.9), ImageNet normalisation, flips, zoom/crop and small rotations,
as in the official script; the checkpoint is chosen on a validation split, not the test
set.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..data import Augment
from ..losses.banet import banet_loss
from .base import Recipe, SupervisedRecipe

__all__ = ["DIMS", "card_defaults", "inference", "make", "network_config", "supervised_loss"]

DIMS = (2,)


def network_config(dims: int, channels: int, num_labels: int, patch_zyx: Any = None) -> dict[str, Any]:
    return {"in_channels": channels, "num_classes": num_labels + 1}


def card_defaults(dims: int) -> dict[str, Any]:
    return {
        "channels": 3,
        "input": {"normalization": {"kind": "imagenet", "divisor": 255}, "size_xy": [256, 256], "pad_multiple": 8},
        "defaults": {
            "batch_size": 8,
            "iterations": 6000,
            "lr": 1e-3,
            "cpu_bf16": True,
            "augment": Augment(flip=0.5, rotate=30, rotate_p=0.5, scale=(0.67, 1.5), colour=0.2, specular=0.3),
        },
    }


def inference(dims: int, num_labels: int) -> dict[str, Any]:
    return {"activation": "softmax", "batch_size": 4}


def supervised_loss(network: nn.Module, images: torch.Tensor, classes: torch.Tensor):  # noqa: ANN201
    """BA-Net's loss; unlabelled pixels (255) count as background in the side losses."""
    logits, side = network(images, return_side=True)
    target = torch.where(classes == 255, torch.zeros_like(classes), classes)
    parts = banet_loss(logits.float(), [(s.float(), e.float()) for s, e in side], target)
    return parts["loss"], {k: float(v.detach()) for k, v in parts.items() if k != "loss"}


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
