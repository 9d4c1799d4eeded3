"""Recipe for ConDSeg: optional stage-1 consistency reinforcement, then the full network (spec §1.3-1.5).

Stage 1 trains :class:`ConDSegStage1` (the same trunk with a light head) so that its
prediction on an image and on a strongly colour-augmented copy agree with each other
and with the mask; its trunk, BatchNorm statistics included, then initialises the
stage-2 network (the official script dropped those statistics). Stage 2 trains ConDSeg
with its main Dice+BCE loss, the SID losses with per-image detached area weights and
the complementarity loss. Adam with two parameter groups (encoder, rest); the learning
rate drops by ``plateau_factor`` when validation Dice has not improved for
``plateau_patience`` validations (the official ReduceLROnPlateau, counted in
validations rather than epochs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ... import networks
from ...inference.device import autocast
from ...networks.condseg import transfer_stage1_encoder
from ..color_augment import strong_color_augment
from ..data import Augment
from ..losses.condseg import condseg_loss, stage1_consistency_loss
from .base import Recipe, TrainingData

__all__ = ["DIMS", "ConDSegRecipe", "card_defaults", "inference", "make", "network_config", "supervised_loss"]

DIMS = (2,)


def network_config(dims: int, channels: int, num_labels: int, patch_zyx: Any = None) -> dict[str, Any]:
    return {"in_channels": channels, "out_channels": num_labels}


def card_defaults(dims: int) -> dict[str, Any]:
    return {
        "channels": 3,  # ImageNet-style RGB trunk; grey images are replicated by the channel rule
        "input": {"normalization": {"kind": "scale", "divisor": 255}, "size_xy": [256, 256], "pad_multiple": 16},
        "defaults": {
            "batch_size": 8,
            "iterations": 6000,
            "lr": 1e-3,
            "stage1_fraction": 0.0,
            "encoder_lr_factor": 1.0,
            "plateau_patience": 4,
            "plateau_factor": 0.3,
            "cpu_bf16": True,
            "augment": Augment(
                flip=0.5, rotate=35, rotate_p=0.5, scale=(0.8, 1.25), colour=0.2, specular=0.3, cutout=0.3
            ),
        },
    }


def inference(dims: int, num_labels: int) -> dict[str, Any]:
    return {"activation": "sigmoid", "batch_size": 4}


def _targets(classes: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label binary targets ``[B, L, H, W]`` and the mask of labelled pixels."""
    valid = (classes != 255).unsqueeze(1).float()
    labels = torch.arange(1, channels + 1, device=classes.device).view(1, -1, 1, 1)
    return (classes.unsqueeze(1) == labels).float(), valid


def supervised_loss(network: nn.Module, images: torch.Tensor, classes: torch.Tensor):  # noqa: ANN201
    """The stage-2 ConDSeg loss (main + SID + complementarity) on labelled pixels."""
    logits, fg, bg, uc = network(images, return_aux=True)
    target, valid = _targets(classes, logits.shape[1])
    parts = condseg_loss(logits.float() * valid, fg.float(), bg.float(), uc.float(), target * valid)
    return parts["loss"], {k: float(v.detach()) for k, v in parts.items() if k != "loss"}


class ConDSegRecipe(Recipe):
    """Two-stage ConDSeg training (stage 1 optional, see the module docstring)."""

    def __init__(
        self,
        network: nn.Module,
        iterations: int,
        lr: float,
        stage1_fraction: float = 0.0,
        encoder_lr_factor: float = 1.0,
        plateau_patience: int = 4,
        plateau_factor: float = 0.3,
        preset: str = "lite",
        device: torch.device = None,
        amp: bool = True,
    ) -> None:  # noqa: RUF013
        self.device = device or torch.device("cpu")
        self.network = network.to(self.device)
        self.stage1_iterations = int(round(stage1_fraction * iterations))
        self.amp = amp
        self.stage1 = None
        if self.stage1_iterations:
            # the same trunk as the network (its width and depth, and its weights when it was initialised)
            keys = ("in_channels", "out_channels", "encoder_layers", "encoder_width")
            config = {k: getattr(network, k) for k in keys if hasattr(network, k)}
            self.stage1 = networks.create("condseg_stage1", preset, **config).to(self.device)
            transfer_stage1_encoder(network, self.stage1)
            self.stage1_optimizer = torch.optim.Adam(self.stage1.parameters(), lr=lr)
        encoder = [p for n, p in network.named_parameters() if n.startswith(network.encoder_prefixes)]
        rest = [p for n, p in network.named_parameters() if not n.startswith(network.encoder_prefixes)]
        self.optimizer = torch.optim.Adam([{"params": encoder, "lr": lr * encoder_lr_factor}, {"params": rest}], lr=lr)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=plateau_factor, patience=plateau_patience
        )
        self.settings = {
            "optimizer": "adam",
            "lr": lr,
            "encoder_lr_factor": encoder_lr_factor,
            "schedule": f"plateau on validation Dice (patience {plateau_patience}, x{plateau_factor})",
            "stage1_iterations": self.stage1_iterations,
        }

    def _stage1_step(self, data: TrainingData, generator: torch.Generator) -> dict[str, float]:
        images, classes = data.labelled_batch(generator)
        images, classes = images.to(self.device), classes.to(self.device)
        strong = strong_color_augment(images.clamp(0, 1).cpu(), generator).to(self.device)
        self.stage1.train()
        with autocast(self.device, self.amp, cpu=self.cpu_bf16):
            weak_out, strong_out = self.stage1(images), self.stage1(strong)
            target, valid = _targets(classes, weak_out.shape[1])  # one channel per label
            parts = stage1_consistency_loss(weak_out * valid, strong_out * valid, target * valid)
        self.stage1_optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        self.stage1_optimizer.step()
        return {k: float(v.detach()) for k, v in parts.items()}

    def step(self, data: TrainingData, generator: torch.Generator, iteration: int) -> dict[str, float]:
        if iteration < self.stage1_iterations:  # "loss" is stage 1's own, the parts are named by stage
            parts = self._stage1_step(data, generator)
            return {"loss": parts.pop("loss"), **{f"stage1_{k}": v for k, v in parts.items()}}
        if self.stage1 is not None and iteration == self.stage1_iterations:
            transfer_stage1_encoder(self.stage1, self.network)
        images, classes = data.labelled_batch(generator)
        images, classes = images.to(self.device), classes.to(self.device)
        self.network.train()
        with autocast(self.device, self.amp, cpu=self.cpu_bf16):
            loss, parts = supervised_loss(self.network, images, classes)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
        self.optimizer.step()
        return {"loss": float(loss.detach()), **parts, "lr": self.optimizer.param_groups[1]["lr"]}

    def validated(self, score: float) -> None:
        self.plateau.step(score)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "plateau": self.plateau.state_dict(),
        }
        if self.stage1 is not None:
            state.update(stage1=self.stage1.state_dict(), stage1_optimizer=self.stage1_optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.plateau.load_state_dict(state["plateau"])
        if self.stage1 is not None:
            self.stage1.load_state_dict(state["stage1"])
            self.stage1_optimizer.load_state_dict(state["stage1_optimizer"])

    def describe(self) -> dict[str, Any]:
        return dict(self.settings)


def make(network: nn.Module, options: dict[str, Any]) -> Recipe:
    return ConDSegRecipe(
        network,
        options["iterations"],
        options["lr"],
        options.get("stage1_fraction", 0.0),
        options.get("encoder_lr_factor", 1.0),
        options.get("plateau_patience", 4),
        options.get("plateau_factor", 0.3),
        options.get("preset", "lite"),
        options["device"],
    )
