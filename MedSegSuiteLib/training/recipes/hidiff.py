"""Recipe for HiDiff: segmentor pre-training, then alternating refiner / segmentor updates (spec §4.2).

Each iteration after pre-training: (1) the refiner takes one step on the BBDM loss with
the segmentor's features and prior detached; (2) the segmentor takes one step on its own
loss plus ``diff_weight`` x the BBDM loss, whose gradient reaches it through the prior
and the features (the refiner's gradients from that pass are discarded). AdamW with a
poly schedule for both. Unlike the official code there is no refiner EMA: CPU runs are a
few thousand iterations, far too short for a 0.9999 average.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...inference.device import autocast
from ...networks.bbdm import mask_to_channels, prior_from_logits
from ..data import Augment
from ..losses.common import dice_ce_loss
from .base import Recipe, TrainingData, make_schedule

__all__ = ["DIMS", "HiDiffRecipe", "card_defaults", "inference", "make", "network_config"]

DIMS = (2,)


def network_config(dims: int, channels: int, num_labels: int, patch_zyx: Any = None) -> dict[str, Any]:
    return {"in_channels": channels, "num_classes": 1 if num_labels == 1 else num_labels + 1}


def card_defaults(dims: int) -> dict[str, Any]:
    return {
        "input": {"normalization": {"kind": "scale", "divisor": 255}, "size_xy": [256, 256]},
        "defaults": {
            "batch_size": 8,
            "iterations": 4000,
            "lr": 1e-3,
            "pretrain_fraction": 0.3,
            "diff_weight": 0.0,
            "segmentor_lr_factor": 1.0,
            "cpu_bf16": True,
            "augment": Augment(flip=0.5, rotate=180, rotate_p=0.5, scale=(0.75, 1.33), colour=0.2, specular=0.3),
        },
    }


def inference(dims: int, num_labels: int) -> dict[str, Any]:
    return {"activation": "sigmoid" if num_labels == 1 else "softmax", "batch_size": 4}


def _segmentation_loss(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] > 1:
        return dice_ce_loss(logits, classes)
    valid = (classes != 255).unsqueeze(1).float()
    target = (classes == 1).unsqueeze(1).float()
    logits = logits.float()
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum() / valid.sum().clamp_min(
        1
    )
    p = torch.sigmoid(logits) * valid
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + (target * valid).sum() + 1)
    return bce + dice


class HiDiffRecipe(Recipe):
    """Alternate-collaborative training of :class:`~MedSegSuiteLib.networks.hidiff_model.HiDiff`.

    Args:
        network: the HiDiff model (segmentor + refiner).
        iterations: run length (for the schedules).
        lr: AdamW learning rate of both networks.
        pretrain_fraction: share of the iterations spent on the segmentor alone first.
        segmentor_lr_factor: the segmentor's learning rate is ``lr`` times this (below 1 keeps a
            segmentor that was trained before, e.g. with ``--init-weights``; 0 freezes it).
        diff_weight: weight of the BBDM loss in the segmentor's update (the official default is 0).
        device, amp: where to train; autocast on CUDA.
    """

    def __init__(
        self,
        network: nn.Module,
        iterations: int,
        lr: float = 1e-3,
        pretrain_fraction: float = 0.3,
        diff_weight: float = 0.0,
        device: torch.device = None,
        segmentor_lr_factor: float = 1.0,
        amp: bool = True,
    ) -> None:  # noqa: RUF013
        self.device = device or torch.device("cpu")
        self.network = network.to(self.device)
        self.pretrain = int(round(pretrain_fraction * iterations))
        self.diff_weight = float(diff_weight)
        self.amp = amp
        if segmentor_lr_factor < 0:
            raise ValueError(f"segmentor_lr_factor must be >= 0, got {segmentor_lr_factor}")
        self.seg_optimizer = torch.optim.AdamW(network.segmentor.parameters(), lr=lr * segmentor_lr_factor)
        self.ref_optimizer = torch.optim.AdamW(network.refiner.parameters(), lr=lr)
        self.seg_schedule = make_schedule("poly", self.seg_optimizer, iterations)
        self.ref_schedule = make_schedule("poly", self.ref_optimizer, max(1, iterations - self.pretrain))
        self.settings = {
            "optimizer": "adamw",
            "lr": lr,
            "segmentor_lr_factor": float(segmentor_lr_factor),
            "schedule": "poly",
            "pretrain_iterations": self.pretrain,
            "diff_weight": self.diff_weight,
            "diffusion_steps": network.diffusion.num_steps,
        }

    def _diffusion_loss(self, images, feats, prior, target, generator) -> dict[str, torch.Tensor]:  # noqa: ANN001
        net = self.network
        return net.diffusion.training_losses(net.model_fn(images, feats, prior), target, prior, generator=generator)

    def step(self, data: TrainingData, generator: torch.Generator, iteration: int) -> dict[str, float]:
        net = self.network
        images, classes = data.labelled_batch(generator)
        images, classes = images.to(self.device), classes.to(self.device)
        device_generator = torch.Generator(device=self.device).manual_seed(
            int(torch.randint(2**31, (1,), generator=generator))
        )
        net.train()
        parts: dict[str, float] = {}
        if iteration >= self.pretrain:
            target = mask_to_channels(torch.where(classes == 255, torch.zeros_like(classes), classes), net.num_classes)
            with torch.no_grad(), autocast(self.device, self.amp, cpu=self.cpu_bf16):
                feats, logits = net.features_and_logits(images)
            feats = [f.float() for f in feats]
            prior = prior_from_logits(logits.float())
            with autocast(self.device, self.amp, cpu=self.cpu_bf16):
                losses = self._diffusion_loss(images, feats, prior, target, device_generator)
            self.ref_optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(net.refiner.parameters(), 12.0)
            self.ref_optimizer.step()
            self.ref_schedule.step()
            parts.update({"refiner": float(losses["total"].detach()), "vb": float(losses["vb"].detach())})
        with autocast(self.device, self.amp, cpu=self.cpu_bf16):
            feats, logits = net.features_and_logits(images)
            loss = _segmentation_loss(logits, classes)
            if self.diff_weight > 0 and iteration >= self.pretrain:
                target = mask_to_channels(
                    torch.where(classes == 255, torch.zeros_like(classes), classes), net.num_classes
                )
                prior = prior_from_logits(logits.float())
                diffusion = self._diffusion_loss(images, [f.float() for f in feats], prior, target, device_generator)
                loss = loss + self.diff_weight * diffusion["total"]
        self.seg_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        net.refiner.zero_grad(set_to_none=True)
        torch.nn.utils.clip_grad_norm_(net.segmentor.parameters(), 12.0)
        self.seg_optimizer.step()
        self.seg_schedule.step()
        parts["loss"] = float(loss.detach())
        parts["lr"] = self.seg_optimizer.param_groups[0]["lr"]
        return parts

    def ready_to_validate(self, iteration: int) -> bool:
        # Before the refiner has trained, the full inference runs an untrained refiner: nothing to keep.
        return iteration > self.pretrain

    def state_dict(self) -> dict[str, Any]:
        return {
            "network": self.network.state_dict(),
            "seg_optimizer": self.seg_optimizer.state_dict(),
            "ref_optimizer": self.ref_optimizer.state_dict(),
            "seg_schedule": self.seg_schedule.state_dict(),
            "ref_schedule": self.ref_schedule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        for name in ("seg_optimizer", "ref_optimizer", "seg_schedule", "ref_schedule"):
            getattr(self, name).load_state_dict(state[name])

    def describe(self) -> dict[str, Any]:
        return dict(self.settings)


def make(network: nn.Module, options: dict[str, Any]) -> Recipe:
    return HiDiffRecipe(
        network,
        options["iterations"],
        lr=options["lr"],
        pretrain_fraction=options.get("pretrain_fraction", 0.3),
        diff_weight=options.get("diff_weight", 0.0),
        device=options["device"],
        segmentor_lr_factor=options.get("segmentor_lr_factor", 1.0),
    )
