"""CANet's semi-supervised recipe (spec §2.4): V-Net + transformer, SDF head, adversarial discriminator.

Every iteration draws ``labelled_batch`` labelled and ``unlabelled_batch`` unlabelled
patches (2 + 2 in the paper). The segmenter (train mode, discriminator in eval mode)
minimises Dice + 0.3 SDF loss on the labelled part plus lambda(t) times the adversarial
loss of its unlabelled SDF maps (it wants them to pass as "labelled"); then the
discriminator (segmenter in eval mode, no gradient) learns to tell labelled (1) from
unlabelled (0) on all items. SGD 0.01 (momentum 0.9, weight decay 1e-4) for the
segmenter, dropping to 1e-3 and 1e-4 at 2500/6000 and 3800/6000 of the run; Adam 1e-4
(0.9, 0.99) for the discriminator. Without unlabelled data the adversarial terms are
left out. The discriminator starts fresh in each run (model folders hold the segmenter).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ... import networks
from ...inference.device import autocast
from ..data import Augment
from ..losses.canet import discriminator_loss, segmenter_loss
from .base import Recipe, TrainingData

__all__ = ["DIMS", "CANetRecipe", "card_defaults", "inference", "make", "make_finetune", "network_config"]

DIMS = (3,)


def network_config(dims: int, channels: int, num_labels: int, patch_zyx: Any = None) -> dict[str, Any]:
    if num_labels != 1:
        raise ValueError(f"CANet segments one structure; the data has {num_labels} labels")
    config: dict[str, Any] = {"in_channels": channels, "num_classes": 1}
    if patch_zyx is not None:
        config["patch_size"] = tuple(int(v) for v in patch_zyx)  # the token grid follows the window
    return config


def card_defaults(dims: int) -> dict[str, Any]:
    return {
        "input": {"normalization": {"kind": "zscore"}, "patch_xyz": [112, 112, 80]},
        "defaults": {
            "batch_size": 2,
            "unlabelled_batch": 2,
            "iterations": 6000,
            "lr": 1e-2,
            "foreground": 0.5,
            "cpu_bf16": False,  # bf16 made the discriminator's loss NaN within two steps on real data
            "augment": Augment(flip=0.5, rot90=True, intensity=0.0, noise=0.0),
        },
    }


def inference(dims: int, num_labels: int) -> dict[str, Any]:
    # Paper protocol: 18x18x4 strides, mean of ReLU(logit) > 0.5, largest component. Fast: 50% overlap, sigmoid.
    return {
        "activation": "relu",
        "threshold": 0.5,
        "stride_xyz": [18, 18, 4],
        "blend": "constant",
        "batch_size": 2,
        "postprocess": ["largest_component"],
        "fast": {"stride_xyz": None, "overlap": 0.5, "activation": "sigmoid", "blend": "gaussian"},
    }


class CANetRecipe(Recipe):
    """Alternating segmenter / discriminator updates (see the module docstring)."""

    def __init__(
        self,
        network: nn.Module,
        iterations: int,
        lr: float = 1e-2,
        unlabelled_batch: int = 2,
        discriminator_preset: str = "lite",
        device: Optional[torch.device] = None,
        amp: bool = True,
        max_adversarial_weight: float = 0.01,
        milestones: tuple[float, float] = (2500 / 6000, 3800 / 6000),
    ):
        self.device = device or torch.device("cpu")
        self.network = network.to(self.device)
        self.discriminator = networks.create(
            "canet_discriminator", discriminator_preset, map_channels=1, image_channels=network.in_channels
        ).to(self.device)
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        steps = [max(1, int(round(m * iterations))) for m in milestones]
        self.schedule = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, steps, 0.1)
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=1e-4, betas=(0.9, 0.99))
        self.unlabelled_batch = unlabelled_batch
        self.max_adversarial_weight = max_adversarial_weight
        self.scale = 6000 / max(1, iterations)  # the ramp-up follows the run's progress, as over 6000 iterations
        self.amp = amp
        self.settings = {
            "recipe": "CANet semi-supervised",
            "optimizer": "sgd",
            "lr": lr,
            "milestones": steps,
            "discriminator": discriminator_preset,
            "unlabelled_batch": unlabelled_batch,
        }

    def step(self, data: TrainingData, generator: torch.Generator, iteration: int) -> dict[str, float]:
        images, classes = data.labelled_batch(generator)
        masks = (classes == 1).long().to(self.device)
        images = images.to(self.device)
        count = images.shape[0]
        if data.unlabelled is not None:
            unlabelled = data.unlabelled_batch(generator, self.unlabelled_batch).to(self.device)
            images = torch.cat([images, unlabelled])
        self.network.train()
        self.discriminator.eval()
        with autocast(self.device, self.amp, cpu=self.cpu_bf16):
            sdf, logits = self.network(images)
            d_unlabelled = None
            if images.shape[0] > count:
                d_unlabelled = self.discriminator(sdf[count:], images[count:])
            loss, parts = segmenter_loss(
                sdf[:count].float(),
                logits[:count].float(),
                masks,
                d_unlabelled.float() if d_unlabelled is not None else None,
                iteration=int(iteration * self.scale),
                max_adversarial_weight=self.max_adversarial_weight,
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        if images.shape[0] > count:
            self.network.eval()
            self.discriminator.train()
            with torch.no_grad(), autocast(self.device, self.amp, cpu=self.cpu_bf16):
                sdf_all, _ = self.network(images)
            with autocast(self.device, self.amp, cpu=self.cpu_bf16):
                d_logits = self.discriminator(sdf_all, images)
                d_loss = discriminator_loss(d_logits.float(), [True] * count + [False] * (images.shape[0] - count))
            self.d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self.d_optimizer.step()
            parts["discriminator"] = float(d_loss.detach())
            self.network.train()
        return {"loss": float(loss.detach()), **parts, "lr": self.optimizer.param_groups[0]["lr"]}

    def state_dict(self) -> dict[str, Any]:
        return {
            "network": self.network.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "d_optimizer": self.d_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("network", "discriminator", "optimizer", "schedule", "d_optimizer"):
            getattr(self, name).load_state_dict(state[name])

    def describe(self) -> dict[str, Any]:
        return dict(self.settings)


def make(network: nn.Module, options: dict[str, Any]) -> Recipe:
    return CANetRecipe(
        network,
        options["iterations"],
        options["lr"],
        int(options.get("unlabelled_batch", 2)),
        options.get("discriminator_preset", options.get("preset", "lite")),
        options["device"],
    )


def make_finetune(network: nn.Module, options: dict[str, Any]) -> Recipe:
    """CANet's own recipe for finetuning (a tenth of the training learning rate, same schedule shape)."""
    return make(network, options)
