"""Recipe for D-Net: Dice + cross-entropy with deep supervision, SGD (Nesterov, 0.99) with a poly schedule.

The nnU-Net v2 setting the journal version was most likely trained in (spec §1.5): deep
supervision over the full-resolution output and the four decoder heads with weights
1, 1/2, 1/4, 1/8 and 0 for the lowest, normalised; foreground oversampling a third of
the time; flips, in-plane rot90, intensity scale/shift and noise. For real scans the
defaults add what nnU-Net's pipeline also draws (rotation about every axis, scaling,
gamma) plus a bias field and patches that reach past the image edge, and normalise by
the non-zero voxels, so that added background, oblique acquisitions and coil
inhomogeneity do not throw the model. Deep supervision is
switched on only inside the training step, so validation and inference see one output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..data import Augment
from ..losses.dnet import DNetLoss
from .base import Recipe, SupervisedRecipe

__all__ = ["DIMS", "OPTIMIZER", "card_defaults", "inference", "make", "network_config", "supervised_loss"]

DIMS = (3,)
OPTIMIZER = "sgd"
_LOSS = DNetLoss()


def network_config(dims: int, channels: int, num_labels: int, patch_zyx: Any = None) -> dict[str, Any]:
    return {"in_channels": channels, "num_classes": num_labels + 1}


def card_defaults(dims: int) -> dict[str, Any]:
    return {
        "input": {"normalization": {"kind": "zscore", "nonzero": True}, "patch_xyz": [64, 64, 64]},
        "defaults": {
            "batch_size": 2,
            "iterations": 4000,
            "lr": 1e-2,
            "foreground": 0.33,
            "augment": Augment(
                flip=0.5,
                rot90=True,
                rotate=20,
                rotate_p=0.3,
                scale=(0.85, 1.15),
                intensity=0.1,
                noise=0.05,
                gamma=(0.7, 1.5),
                bias_field=0.3,
                fov_pad=12,
            ),
        },
    }


def inference(dims: int, num_labels: int) -> dict[str, Any]:
    return {"activation": "softmax", "overlap": 0.5, "blend": "gaussian", "batch_size": 2, "fast": {"overlap": 0.25}}


def supervised_loss(network: nn.Module, images: torch.Tensor, classes: torch.Tensor):  # noqa: ANN201
    """Dice + CE over the deep-supervision outputs (unlabelled voxels count as background)."""
    previous = getattr(network, "deep_supervision", False)
    network.deep_supervision = True
    try:
        outputs = network(images)
    finally:
        network.deep_supervision = previous
    target = torch.where(classes == 255, torch.zeros_like(classes), classes)
    return _LOSS([o.float() for o in outputs], target), {}


def make(network: nn.Module, options: dict[str, Any]) -> Recipe:
    return SupervisedRecipe(
        network,
        supervised_loss,
        options["iterations"],
        optimizer=OPTIMIZER,
        lr=options["lr"],
        weight_decay=3e-5,
        schedule="poly",
        device=options["device"],
    )
