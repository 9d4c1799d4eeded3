"""What one training iteration does: the recipe interface, schedules and the plain supervised recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ...inference.device import autocast
from ..data import Augment, PatchStore, SliceStore

__all__ = ["LossFn", "Recipe", "SupervisedRecipe", "TrainingData", "make_optimizer", "make_schedule"]

# loss_fn(network, images, classes) -> (loss, {part: value})
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainingData:
    """The samples a recipe draws from.

    ``labelled`` and ``unlabelled`` are :class:`SliceStore` (2D) or :class:`PatchStore`
    (3D); ``patch_zyx`` is the 3D patch size; ``augment`` the augmentation settings.
    """

    labelled: Any
    batch_size: int
    augment: Augment = field(default_factory=Augment)
    unlabelled: Optional[Any] = None
    patch_zyx: Optional[Sequence[int]] = None
    foreground: float = 0.5
    channels_last: bool = False  # hand 2D image batches over in channels-last memory format

    def labelled_batch(
        self, generator: torch.Generator, count: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(self.labelled, generator, count or self.batch_size)

    def unlabelled_batch(self, generator: torch.Generator, count: Optional[int] = None) -> torch.Tensor:
        if self.unlabelled is None:
            raise ValueError("this recipe needs unlabelled data")
        return self._batch(self.unlabelled, generator, count or self.batch_size)[0]

    def _batch(self, store, generator, count):  # noqa: ANN001
        if isinstance(store, PatchStore):
            return store.sample(generator, count, self.patch_zyx, self.augment, self.foreground)
        assert isinstance(store, SliceStore)
        images, classes = store.sample(generator, count, self.augment, self.foreground)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, classes


def make_optimizer(name: str, parameters, lr: float, weight_decay: float = 0.0, momentum: float = 0.99):  # noqa: ANN001
    """``adam``, ``adamw`` or ``sgd`` (Nesterov)."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use adam, adamw or sgd")


def make_schedule(name: str, optimizer: torch.optim.Optimizer, iterations: int, **options: Any):
    """Per-iteration learning-rate schedules: ``constant``, ``poly`` (power 0.9), ``step`` (milestones), ``cosine``."""
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    if name == "poly":
        power = options.get("power", 0.9)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: max(0.0, 1 - it / max(1, iterations)) ** power)
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, options["milestones"], options.get("gamma", 0.1))
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, iterations))
    raise ValueError(f"unknown schedule {name!r}")


class Recipe:
    """One network family's training step.

    Subclasses set ``network`` (the model that is validated and saved) and implement
    :meth:`step`. Everything that must survive a resume goes through
    :meth:`state_dict` / :meth:`load_state_dict`.
    """

    network: nn.Module
    device: torch.device = torch.device("cpu")
    cpu_bf16: bool = False  # bf16 autocast when training on the CPU

    def step(self, data: TrainingData, generator: torch.Generator, iteration: int) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def validated(self, score: float) -> None:
        """Called with the validation score after each validation (for plateau schedules)."""

    def ready_to_validate(self, iteration: int) -> bool:
        """Whether the model validated after ``iteration`` steps is one that could ship (the last always is)."""
        return True

    def describe(self) -> dict[str, Any]:
        """The recipe's settings, recorded in the model card."""
        return {}


class SupervisedRecipe(Recipe):
    """Labelled batches, one loss, one optimizer, a per-iteration schedule.

    Args:
        network: the network to train (moved to ``device``).
        loss_fn: ``loss_fn(network, images, classes) -> (loss, parts)``.
        optimizer, lr, weight_decay: see :func:`make_optimizer`.
        schedule: see :func:`make_schedule`; ``iterations`` is its length.
        device: where to train; ``amp`` enables autocast on CUDA.
        grad_clip: maximum gradient norm (0 = off).
    """

    def __init__(
        self,
        network: nn.Module,
        loss_fn: LossFn,
        iterations: int,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        schedule: str = "poly",
        device: Optional[torch.device] = None,
        amp: bool = True,
        grad_clip: float = 12.0,
        schedule_options: Optional[dict[str, Any]] = None,
    ) -> None:
        self.device = device or torch.device("cpu")
        self.network = network.to(self.device)
        self.loss_fn = loss_fn
        self.amp = amp
        self.grad_clip = grad_clip
        self.optimizer = make_optimizer(optimizer, self.network.parameters(), lr, weight_decay)
        self.schedule = make_schedule(schedule, self.optimizer, iterations, **(schedule_options or {}))
        self.settings = {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "schedule": schedule}

    def step(self, data: TrainingData, generator: torch.Generator, iteration: int) -> dict[str, float]:
        images, classes = data.labelled_batch(generator)
        images, classes = images.to(self.device), classes.to(self.device)
        self.network.train()
        with autocast(self.device, self.amp, cpu=self.cpu_bf16):
            loss, parts = self.loss_fn(self.network, images, classes)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        return {"loss": float(loss.detach()), **parts, "lr": self.optimizer.param_groups[0]["lr"]}

    def state_dict(self) -> dict[str, Any]:
        return {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])

    def describe(self) -> dict[str, Any]:
        return dict(self.settings)
