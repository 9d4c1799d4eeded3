"""The training loop shared by every recipe: validation, best model, checkpoints, resume, cancel.

A run works in ``<output>.training/`` beside the output model folder: ``checkpoint.pt``
(everything a resume needs, written atomically every few minutes and on cancel),
``best.safetensors`` (the best-validated weights so far) and ``log.json``. When the run
finishes, the best weights become the output model folder (card + weights + training
log, written atomically) and the work folder is removed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import Cancelled, InputError
from ..evaluation import evaluate_model
from ..inference import Predictor
from ..io.atomic import atomic_output
from ..models import LoadedModel, ModelEntry, card_from_dict, save_model
from ..models.weights import read_weights, save_weights
from ..progress import ProgressCallback, check_cancelled, report
from ..volume import Volume
from .distributed import RankShare, current, wrap_recipe
from .prefetch import BatchPrefetcher
from .recipes.base import Recipe, TrainingData

__all__ = ["Trainer", "TrainingSettings"]

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
BEST = "best.safetensors"
LOG = "log.json"


@dataclass
class TrainingSettings:
    """How long and how to train: iterations, validation cadence, checkpoint cadence, seed and device."""

    iterations: int = 1000
    validate_every: int = 0  # 0: ten validations per run
    checkpoint_minutes: float = 5.0
    seed: int = 0
    max_val_cases: int = 200

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise InputError("iterations must be at least 1")
        if self.validate_every <= 0:
            self.validate_every = max(1, self.iterations // 10)


class Trainer:
    """Runs a :class:`Recipe` on :class:`TrainingData` and writes the best model.

    Args:
        recipe: the network family's step.
        data: training samples.
        card: the output model's card data (everything but ``weights``, ``metrics``);
            ``training`` is extended with the run's facts.
        validation: (id, image, label) cases held out from training, at full resolution.
        settings: see :class:`TrainingSettings`.
        output: the model folder to create.
        baseline: metrics of the starting weights on ``validation`` (e.g. a parent model's):
            they compete as the checkpoint of iteration 0, so a run that never beats them
            returns the starting weights.
        baseline_margin: how much Dice a checkpoint must gain over ``baseline`` to replace it.
    """

    def __init__(
        self,
        recipe: Recipe,
        data: TrainingData,
        card: dict[str, Any],
        validation: Sequence[tuple[str, Volume, Volume]],
        settings: TrainingSettings,
        output: Path,
        baseline: Optional[dict[str, Any]] = None,
        baseline_margin: float = 0.0,
    ) -> None:
        self.recipe, self.data, self.settings = recipe, data, settings
        self.baseline, self.baseline_margin = baseline, float(baseline_margin)
        self.card = dict(card)
        self.validation = list(validation)[: settings.max_val_cases]
        self.output = Path(output)
        self.workdir = self.output.with_name(self.output.name + ".training")
        self.history: list[dict[str, Any]] = []
        self.best: Optional[dict[str, Any]] = None
        self.iteration = 0
        self.train_seconds = 0.0  # time spent in training steps, validation excluded, across resumes
        self.validation_due = False  # the current iteration's validation has not finished yet
        # under torchrun: DDP-wrapped network, rank 0 alone validates and writes (see .distributed)
        self.distributed = current()
        self.is_main = self.distributed is None or self.distributed.is_main
        if self.distributed is not None:
            wrap_recipe(self.recipe, self.distributed)
        card_from_dict({**self.card, "weights": {"file": "model.safetensors"}}, source="the training card")

    # -- state ---------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        if not self.is_main:
            return
        state = {
            "iteration": self.iteration,
            "recipe": self.recipe.state_dict(),
            "history": json.dumps(self.history),
            "best": json.dumps(self.best),
            "settings": json.dumps(asdict(self.settings)),
            "validation_due": self.validation_due,
            "train_seconds": self.train_seconds,
        }
        with atomic_output(self.workdir / CHECKPOINT, overwrite=True) as tmp:
            torch.save(state, tmp)
        (self.workdir / LOG).write_text(json.dumps(self.history), encoding="utf-8")

    def _load_checkpoint(self) -> None:
        path = self.workdir / CHECKPOINT
        readable = self.is_main and path.is_file()
        state = torch.load(str(path), map_location="cpu", weights_only=True) if readable else None
        if self.distributed is not None:
            state = self.distributed.broadcast(state)  # rank 0's checkpoint, on every rank
        if state is None:
            raise InputError(f"nothing to resume: {path} does not exist")
        self.recipe.load_state_dict(state["recipe"])
        self.iteration = int(state["iteration"])
        self.history = json.loads(state["history"])
        self.best = json.loads(state["best"])
        self.validation_due = bool(state.get("validation_due", False))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        log.info("resumed training at iteration %d", self.iteration)

    # -- validation ----------------------------------------------------------------------
    def validate(self, cancel: Optional[threading.Event] = None) -> dict[str, Any]:
        """Metrics of the current network on the validation cases (the network is left in train mode)."""
        card = card_from_dict({**self.card, "weights": {"file": "model.safetensors"}}, source="the training card")
        network = self.recipe.network
        network.eval()
        try:
            predictor = Predictor(LoadedModel(card, network), device=self.recipe.device, channels_last=False)
            mean = evaluate_model(predictor, self.validation, cancel=cancel).mean()
            mean["per_label"] = {str(value): metrics for value, metrics in mean["per_label"].items()}
            return mean
        finally:
            network.train()

    # -- the run ---------------------------------------------------------------------------
    def run(
        self,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[threading.Event] = None,
        resume: bool = False,
        overwrite: bool = False,
        on_log: Optional[Callable[[dict[str, Any]], None]] = None,
    ) -> Optional[ModelEntry]:
        """Train to the end (or until ``cancel``), then write the best model to ``output`` and return it
        (under torchrun only rank 0 writes and returns it; the other ranks return None).

        On cancel a checkpoint is written and :class:`Cancelled` raised; ``resume=True``
        continues from it. ``on_log`` receives each loss/validation record as it is made.
        """
        if self.output.exists() and not overwrite:
            raise InputError(f"{self.output} already exists; choose another folder or pass --overwrite to replace it")
        if resume:
            self._load_checkpoint()
        elif (self.workdir / CHECKPOINT).exists():
            raise InputError(
                f"{self.workdir} holds an unfinished run; resume it (--resume) or delete that folder to start again"
            )
        if self.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()

        def record(entry: dict[str, Any]) -> None:
            self.history.append(entry)
            if on_log is not None:
                on_log(entry)

        if self.baseline is not None and not resume:
            self._keep_baseline(record)

        try:
            self._loop(progress, cancel, record)
        except Cancelled:
            self._save_checkpoint()
            raise Cancelled(
                f"training cancelled at iteration {self.iteration}; the checkpoint in {self.workdir} can be resumed"
            ) from None
        return self._finish(time.monotonic() - started, overwrite)

    def _loop(self, progress, cancel, record) -> None:  # noqa: ANN001
        settings = self.settings
        last_checkpoint = time.monotonic()
        if self.validation_due:  # cancelled during a validation: finish it first
            self._validate_and_keep_best(cancel, record)
            last_checkpoint = time.monotonic()
        data = self.data if self.distributed is None else RankShare(self.data, self.distributed)
        batches = BatchPrefetcher(data, lambda iteration: settings.seed * 1_000_003 + iteration)
        try:
            self._steps(batches, progress, cancel, record, last_checkpoint)
        finally:
            batches.close()

    def _steps(self, batches, progress, cancel, record, last_checkpoint) -> None:  # noqa: ANN001
        settings = self.settings
        log_every = max(1, settings.iterations // 200)
        while self.iteration < settings.iterations:
            if self.distributed is None:
                check_cancelled(cancel)
            started = time.monotonic()
            generator, data = batches.get(self.iteration)
            parts = self.recipe.step(data, generator, self.iteration)
            if self.distributed is not None:  # every rank logs the mean, and stops when any rank is cancelled
                parts, stop = self.distributed.mean(parts, cancel is not None and cancel.is_set())
                if stop:
                    raise Cancelled("training cancelled")
            self.iteration += 1
            self.train_seconds += time.monotonic() - started
            if not all(np.isfinite(v) for v in parts.values()):
                self._save_checkpoint()
                raise InputError(
                    f"training diverged at iteration {self.iteration} (loss {parts}); lower the learning "
                    "rate and resume or restart"
                )
            if self.iteration % log_every == 0 or self.iteration == 1:
                record({"iteration": self.iteration, **{k: round(float(v), 6) for k, v in parts.items()}})
                per_step = self.train_seconds / max(1, self.iteration)
                log.info(
                    "iteration %d/%d: loss %.4f, %.2f s per iteration",
                    self.iteration,
                    settings.iterations,
                    parts.get("loss", float("nan")),
                    per_step,
                )
            if self.is_main:
                report(progress, self.iteration, settings.iterations, "training")
            last = self.iteration == settings.iterations
            if last or (
                self.iteration % settings.validate_every == 0 and self.recipe.ready_to_validate(self.iteration)
            ):
                self.validation_due = True
                self._validate_and_keep_best(cancel, record)
                last_checkpoint = time.monotonic()
            elif time.monotonic() - last_checkpoint > settings.checkpoint_minutes * 60:
                self._save_checkpoint()
                last_checkpoint = time.monotonic()

    def _keep_baseline(self, record) -> None:  # noqa: ANN001
        baseline = dict(self.baseline or {})
        baseline["per_label"] = {str(value): m for value, m in baseline.get("per_label", {}).items()}
        self.best = {**baseline, "iteration": 0}
        if self.is_main:
            save_weights(self.recipe.network.state_dict(), self.workdir / BEST, overwrite=True)
        record({"iteration": 0, "val_dice": baseline["dice"], "val_hd95": baseline.get("hd95")})

    def _validate_and_keep_best(self, cancel, record) -> None:  # noqa: ANN001
        metrics = self.validate(cancel) if self.is_main else None
        if self.distributed is not None:
            metrics = self.distributed.broadcast(metrics)  # one validation, one best-model decision
        self.recipe.validated(float(metrics["dice"]))
        minutes = round(self.train_seconds / 60, 2)
        record(
            {"iteration": self.iteration, "val_dice": metrics["dice"], "val_hd95": metrics["hd95"], "minutes": minutes}
        )
        log.info(
            "iteration %d: validation Dice %.4f after %.1f training minutes", self.iteration, metrics["dice"], minutes
        )
        margin = self.baseline_margin if self.best is not None and self.best.get("iteration") == 0 else 0.0
        if self.best is None or metrics["dice"] > self.best["dice"] + margin:
            self.best = {**metrics, "iteration": self.iteration}
            if self.is_main:
                save_weights(self.recipe.network.state_dict(), self.workdir / BEST, overwrite=True)
        self.validation_due = False
        self._save_checkpoint()

    def _finish(self, seconds: float, overwrite: bool) -> Optional[ModelEntry]:
        """Rank 0 (or the only process) writes the model and returns its entry; other ranks wait for it
        and return None."""
        if self.distributed is None:
            return self._write_model(seconds, overwrite)
        try:
            return self._write_model(seconds, overwrite) if self.is_main else None
        finally:
            self.distributed.barrier()

    def _write_model(self, seconds: float, overwrite: bool) -> ModelEntry:
        assert self.best is not None
        self.recipe.network.load_state_dict(read_weights(self.workdir / BEST))
        self.recipe.network.eval()
        best = self.best
        split = f"validation: {len(self.validation)} labelled cases held out from training"
        metrics = [{"name": "dice", "value": round(best["dice"], 4), "split": split, "iteration": best["iteration"]}]
        if best.get("hd95") is not None:
            metrics.append({"name": "hd95_mm", "value": round(best["hd95"], 3), "split": split})
        for value, label_metrics in best["per_label"].items():
            metrics.append({"name": f"dice_label_{value}", "value": round(label_metrics["dice"], 4), "split": split})
        card = dict(self.card)
        card["metrics"] = list(card.get("metrics", [])) + metrics
        card["training"] = {
            **card.get("training", {}),
            "recipe": {
                **card.get("training", {}).get("recipe", {}),
                **self.recipe.describe(),
                "iterations": self.settings.iterations,
                "seed": self.settings.seed,
            },
            "validation_ids": [case_id for case_id, _, _ in self.validation],
            "seconds": round(seconds, 1),
            "device": str(self.recipe.device),
        }
        entry = save_model(
            self.output,
            self.recipe.network,
            card,
            overwrite=overwrite,
            extra_files={"training_log.json": json.dumps(self.history)},
        )
        for name in (CHECKPOINT, BEST, LOG):
            (self.workdir / name).unlink(missing_ok=True)
        try:
            self.workdir.rmdir()
        except OSError:
            log.warning("left %s in place: it holds files this run did not write", self.workdir)
        return entry
