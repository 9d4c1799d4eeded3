"""Mean-teacher semi-supervised finetuning (Tarvainen & Valpola, NeurIPS 2017), for any network.

The student learns from labelled batches with its family's supervised loss and from
unlabelled batches by agreeing with a teacher whose weights are an exponential moving
average of the student's. Both see the same unlabelled images under independent noise;
the consistency term is the mean squared difference of their probabilities, weighted by
``consistency x exp(-5 (1 - t / ramp)^2)`` (the usual sigmoid ramp-up over the first
``rampup`` share of the run). The teacher is what is validated and saved.

By default BatchNorm layers keep the parent's running statistics (they normalise in
eval mode while their scale and shift still learn): a finetuning batch of two patches,
half of them noisy unlabelled ones, would otherwise overwrite statistics gathered over
a whole training run within a few iterations and make a good parent worse.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ...inference.device import autocast
from ..losses.common import dice_ce_loss
from .base import LossFn, Recipe, TrainingData, make_optimizer, make_schedule

__all__ = ["MeanTeacherRecipe", "main_logits", "sigmoid_rampup"]


def sigmoid_rampup(iteration: int, length: int) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = iteration / length`` clipped to [0, 1]; 1 when ``length`` is 0."""
    if length <= 0:
        return 1.0
    t = min(max(iteration / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def main_logits(output: Any) -> torch.Tensor:
    """The main logits of a network's training-mode output (a tensor, the first of a sequence, or ``out``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["out"] if "out" in output else next(iter(output.values()))
    return main_logits(output[0])


def _freeze_batchnorm_statistics(network: nn.Module) -> None:
    """Put every BatchNorm layer of a training-mode ``network`` in eval mode (running statistics stay)."""
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _default_loss(network: nn.Module, images: torch.Tensor, classes: torch.Tensor):  # noqa: ANN202
    return dice_ce_loss(main_logits(network(images)), classes), {}


class MeanTeacherRecipe(Recipe):
    """Student + EMA teacher; labelled loss + ramped consistency on unlabelled data.

    Args:
        network: the starting network (e.g. the parent model); student and teacher start from it.
        iterations: run length (schedules and ramp-up).
        supervised_loss: ``loss(network, images, classes) -> (loss, parts)``; default Dice + CE.
        activation: ``"softmax"`` or ``"sigmoid"``, how logits become the probabilities compared.
        lr, optimizer, schedule: the student's optimiser (see :func:`make_optimizer`).
        ema: teacher decay per iteration, reached after a warm-up (``min(1 - 1/(t + 1), ema)``,
            as in the original code); 0.95 suits finetuning runs of a few hundred iterations.
        consistency: maximum weight of the consistency term; rampup: its ramp-up share of the run.
        noise: standard deviation of the Gaussian input noise (normalised units) for each network.
        unlabelled_batch: unlabelled images per iteration (default: the labelled batch size).
        frozen_norm: keep the BatchNorm running statistics of the starting network (default True).
        anchor: weight of the squared distance of the student's weights to the starting ones
            (L2-SP, Li et al., ICML 2018), summed over all weights; 0 turns it off.
    """

    def __init__(
        self,
        network: nn.Module,
        iterations: int,
        supervised_loss: Optional[LossFn] = None,
        activation: str = "softmax",
        lr: float = 1e-4,
        optimizer: str = "adam",
        schedule: str = "poly",
        ema: float = 0.99,
        consistency: float = 1.0,
        rampup: float = 0.4,
        noise: float = 0.1,
        unlabelled_batch: Optional[int] = None,
        device: Optional[torch.device] = None,
        amp: bool = True,
        frozen_norm: bool = True,
        anchor: float = 0.0,
    ) -> None:
        self.device = device or torch.device("cpu")
        self.student = network.to(self.device)
        self.network = copy.deepcopy(self.student)
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)
        self.loss_fn = supervised_loss or _default_loss
        self.activation: Callable[[torch.Tensor], torch.Tensor] = (
            (lambda x: torch.softmax(x, 1)) if activation == "softmax" else torch.sigmoid
        )
        self.optimizer = make_optimizer(optimizer, self.student.parameters(), lr)
        self.schedule = make_schedule(schedule, self.optimizer, iterations)
        self.ema, self.consistency, self.noise = ema, consistency, noise
        self.rampup = int(round(rampup * iterations))
        self.unlabelled_batch = unlabelled_batch
        self.amp = amp
        self.frozen_norm = bool(frozen_norm)
        self.anchor = float(anchor)
        self._start = [p.detach().clone() for p in self.student.parameters()] if self.anchor > 0 else []
        self.settings = {
            "recipe": "mean teacher",
            "optimizer": optimizer,
            "lr": lr,
            "schedule": schedule,
            "ema": ema,
            "consistency": consistency,
            "rampup_iterations": self.rampup,
            "noise": noise,
            "frozen_norm": self.frozen_norm,
            "anchor": self.anchor,
        }

    def _noisy(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(images.shape, generator=generator) * self.noise
        return images + noise.to(images.device)

    @torch.no_grad()
    def _update_teacher(self, iteration: int) -> None:
        decay = min(1.0 - 1.0 / (iteration + 1), self.ema)
        for t, s in zip(self.network.parameters(), self.student.parameters()):
            t.mul_(decay).add_(s.detach(), alpha=1 - decay)
        for t, s in zip(self.network.buffers(), self.student.buffers()):
            t.copy_(s)

    def step(self, data: TrainingData, generator: torch.Generator, iteration: int) -> dict[str, float]:
        images, classes = data.labelled_batch(generator)
        images, classes = images.to(self.device), classes.to(self.device)
        self.student.train()
        self.network.train()
        if self.frozen_norm:
            for network in (self.student, self.network):
                _freeze_batchnorm_statistics(network)
        with autocast(self.device, self.amp):
            loss, parts = self.loss_fn(self.student, images, classes)
        parts = {"supervised": float(loss.detach()), **parts}
        weight = self.consistency * sigmoid_rampup(iteration, self.rampup)
        if data.unlabelled is not None:
            unlabelled = data.unlabelled_batch(generator, self.unlabelled_batch).to(self.device)
            with torch.no_grad(), autocast(self.device, self.amp):
                target = self.activation(main_logits(self.network(self._noisy(unlabelled, generator))).float())
            with autocast(self.device, self.amp):
                student = self.activation(main_logits(self.student(self._noisy(unlabelled, generator))).float())
            consistency = torch.mean((student - target) ** 2)
            loss = loss + weight * consistency
            parts.update({"consistency": float(consistency.detach()), "consistency_weight": weight})
        if self._start:
            distance = sum(((p - p0) ** 2).sum() for p, p0 in zip(self.student.parameters(), self._start))
            loss = loss + self.anchor * distance
            parts["anchor_distance"] = float(distance.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 12.0)
        self.optimizer.step()
        self.schedule.step()
        self._update_teacher(iteration)
        return {"loss": float(loss.detach()), **parts, "lr": self.optimizer.param_groups[0]["lr"]}

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "teacher": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.network.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])

    def describe(self) -> dict[str, Any]:
        return dict(self.settings)
