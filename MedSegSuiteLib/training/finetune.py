"""Semi-supervised finetuning of a model on a clinician's labelled (and unlabelled) cases.

The parent model is never changed: the result is a new model ``<parent id>-ft-<n>``
with its own card (parent, data counts, recipe, held-out Dice before and after),
written atomically and registered in the user model folder at once. CANet uses its own
recipe (Dice + SDF on labelled data, adversarial on unlabelled data with its
discriminator); every other network the mean-teacher recipe (EMA teacher, consistency
on unlabelled data under noise, ramped weight). 2D networks learn from slices (or 2D
images), 3D networks from patches.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..evaluation import evaluate_model
from ..inference import Predictor
from ..inference.device import resolve_device
from ..io import compound_suffix
from ..models import LoadedModel, ModelEntry, ModelRegistry, load_model
from ..progress import ProgressCallback, check_cancelled, report
from .data import Augment, Item, PatchStore, SliceStore, changed_augment
from .datasets import Case, discover_cases, load_case
from .recipes import recipe_module
from .recipes.base import TrainingData
from .recipes.mean_teacher import MeanTeacherRecipe
from .runs import WORKDIR_SUFFIX, finetune_base, pending_finetune_runs
from .trainer import Trainer, TrainingSettings
from .verdict import FinetuneVerdict

__all__ = ["FinetuneOptions", "finetune_model", "load_labelled", "next_finetune_id"]

log = logging.getLogger(__name__)
# the share of the family's learning rate finetuning uses: at 0.1 (D-Net: SGD 1e-3) the hippocampus benchmark
# lost up to 0.016 Dice on unseen cases in a draw, at 0.03 (3e-4) at most 0.003 (benchmarks/finetune, README)
LR_SHARE = 0.03
_RASTER = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class FinetuneOptions:
    """What ``medsegsuite finetune`` takes; ``None`` means a default from the parent or its recipe."""

    parent: str
    labelled: Union[str, Path, Sequence[Item]]
    unlabelled: Optional[Union[str, Path, Sequence[Item]]] = None
    output: Optional[Path] = None
    model_id: Optional[str] = None
    iterations: int = 200
    batch_size: Optional[int] = None
    lr: Optional[float] = None  # default: LR_SHARE of the family's, with the family's optimiser
    device: str = "auto"
    seed: int = 0
    held_out: Optional[int] = None  # default: 20% of the labelled cases (at least one) when there are 3 or more
    keep_parent_weights: bool = True  # the parent competes as checkpoint 0: a run that never beats it returns it
    min_gain: float = 0.005  # held-back Dice a checkpoint must gain over the parent to replace it
    keep_if_worse: bool = False  # select the new model even when the held-back check finds it no better
    resample: bool = False
    h5_spacing: Sequence[float] = (1.0, 1.0, 1.0)
    recipe: dict[str, Any] = field(default_factory=dict)


def next_finetune_id(parent_id: str, registry: ModelRegistry, resume: bool = False) -> str:
    """``<parent>-ft-<n>``: with ``resume`` the newest unfinished run of this parent, else the next free ``n``."""
    base = finetune_base(parent_id)
    if resume:
        pending = pending_finetune_runs(registry.user_dir, parent_id)
        if not pending:
            raise InputError(f"no unfinished finetuning of {parent_id!r} to resume in {registry.user_dir}")
        return pending[-1].name[: -len(WORKDIR_SUFFIX)]
    taken = {entry.card.id for entry in registry.entries()}
    n = 1
    while f"{base}-ft-{n}" in taken or any(registry.user_dir.glob(f"{base}-ft-{n}*")):
        n += 1
    return f"{base}-ft-{n}"


def load_labelled(
    case: Case, model: LoadedModel, resample: bool = False, h5_spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> Item:
    """A labelled case with its labels in the model's values on the image's grid.

    ``.seg.nrrd``, DICOM SEG and label maps with a JSON table are matched to the model's
    labels by name (then code, then value); plain label maps and 8-bit mask images by
    value. Unknown labels and geometry mismatches are refused before any training;
    with ``resample`` a label on another grid that covers the same region is resampled.
    """
    from ..export import import_labels

    if case.hdf5 or case.label is None or compound_suffix(case.label) in _RASTER:
        image, label = load_case(case, h5_spacing)
        known = {lab.value for lab in model.card.labels}
        unknown = {int(v) for v in np.unique(label.array)} - known - {0}
        if unknown:
            raise InputError(
                f"case {case.id}: label value(s) {sorted(unknown)} are not in model {model.card.id!r}'s label table "
                f"({', '.join(f'{lab.value} {lab.name}' for lab in model.card.labels)})"
            )
        return case.id, image, label
    from ..io import read_image

    image = read_image(case.image)
    return case.id, image, import_labels(case.label, model.card.labels, image, resample=resample)


def _items(
    source: Union[str, Path, Sequence[Item]],
    labelled: bool,
    model: LoadedModel,
    options: FinetuneOptions,
    progress: Optional[ProgressCallback],
    cancel,
) -> list[Item]:  # noqa: ANN001
    if not isinstance(source, (str, Path)):
        return list(source)
    cases = discover_cases(source, require_labels=labelled)
    items = []
    for index, case in enumerate(cases):
        check_cancelled(cancel)
        report(progress, index, len(cases), "loading data")
        if labelled:
            items.append(load_labelled(case, model, options.resample, options.h5_spacing))
        else:
            image, _ = load_case(Case(case.id, case.image, None, case.hdf5), options.h5_spacing)
            items.append((case.id, image, None))
    return items


def _check_images(items: Sequence[Item], model: LoadedModel) -> None:
    for case_id, image, label in items:
        if model.card.dims == 3 and image.is_2d:
            raise InputError(f"case {case_id}: model {model.card.id!r} is 3D, this case is a 2D image")
        if label is not None and (label.shape != image.shape or not label.grid.same_as(image.grid, atol=1e-3)):
            raise InputError(f"case {case_id}: the segmentation's grid differs from its image's")


def _finetune_augment(augment: Augment, recipe: dict[str, Any]) -> Augment:
    """The recipe's augmentation without mirror flips and 90-degree turns, unless ``recipe`` sets ``augment``.

    Flips swap anatomical sides (the anterior and posterior hippocampus trade places), so a
    parent trained with them has a high loss on flipped patches: continuing to train on them
    pulled the bundled hippocampus model's Dice on unseen cases from 0.81 to below 0.6 within
    30 iterations. The clinician's cases come as they are; intensity changes still help.
    """
    given = recipe.get("augment")
    if given is not None:
        return changed_augment(augment, given)
    return replace(augment, flip=0.0, rot90=False)


def finetune_model(
    options: FinetuneOptions,
    registry: Optional[ModelRegistry] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    resume: bool = False,
    on_log: Optional[Callable[[dict[str, Any]], None]] = None,
) -> Optional[ModelEntry]:
    """Finetune ``options.parent`` and register the new model in the user folder; returns its entry
    (None on the ranks other than 0 of a torchrun job: rank 0 writes and registers it).

    The held-back labelled cases decide: the new card's ``training.finetune.verdict``
    (see :class:`~.verdict.FinetuneVerdict`) says whether it beat its parent there and
    whether it is selected. With ``options.keep_parent_weights`` the parent's weights
    compete as the first checkpoint, so a run in which no checkpoint beats the parent on
    the held-back cases by ``options.min_gain`` returns the parent's weights (and is not
    better): gains smaller than that on one or two held-back cases did not carry over to
    unseen cases in the benchmark.
    """
    registry = registry or ModelRegistry()
    device = resolve_device(options.device)
    parent = load_model(options.parent, registry, device="cpu")
    card = parent.card
    model_id = options.model_id or next_finetune_id(card.id, registry, resume)
    output = Path(options.output) if options.output is not None else registry.user_dir / model_id
    if output.exists():
        raise InputError(f"{output} already exists; choose another output folder or model id")
    output.parent.mkdir(parents=True, exist_ok=True)
    labelled = _items(options.labelled, True, parent, options, progress, cancel)
    unlabelled = _items(options.unlabelled, False, parent, options, progress, cancel) if options.unlabelled else []
    if not labelled:
        raise InputError("finetuning needs at least one labelled case")
    _check_images(labelled + unlabelled, parent)
    order = np.random.default_rng(options.seed).permutation(len(labelled))
    held = (
        options.held_out
        if options.held_out is not None
        else (max(1, int(round(0.2 * len(labelled)))) if len(labelled) >= 3 else 0)
    )
    if held >= len(labelled):
        raise InputError(f"cannot hold back {held} of {len(labelled)} labelled case(s); at least one must train")
    held_out = [labelled[int(i)] for i in order[:held]]
    training = [labelled[int(i)] for i in order[held:]]
    validation = held_out or training
    report(progress, 0, 1, "measuring the parent")
    before = evaluate_model(Predictor(parent, device=device, channels_last=False), validation, cancel=cancel).mean()

    values = [label.value for label in card.labels]
    normalization = card.input.normalization
    if card.dims == 2:
        size = card.input.size_xy or (256, 256)
        store = SliceStore(training, values, card.input.channels, normalization, size, cancel)
        extra = SliceStore(unlabelled, values, card.input.channels, normalization, size, cancel) if unlabelled else None
        patch = None
    else:
        store = PatchStore(training, values, card.input.channels, normalization, card.input.spacing, cancel)
        extra = (
            PatchStore(unlabelled, values, card.input.channels, normalization, card.input.spacing, cancel)
            if unlabelled
            else None
        )
        patch = tuple(reversed(card.input.patch_xyz))
    module = recipe_module(card.network)
    defaults = module.card_defaults(card.dims)["defaults"]
    batch = int(options.batch_size or defaults.get("batch_size", 2))
    lr = float(options.lr or defaults.get("lr", 1e-3) * LR_SHARE)
    run = {
        **defaults,
        "iterations": options.iterations,
        "batch_size": batch,
        "lr": lr,
        "device": device,
        "dims": card.dims,
        **options.recipe,
    }
    network = parent.network.train()
    if hasattr(module, "make_finetune"):
        recipe = module.make_finetune(network, run)
    else:
        known = ("ema", "consistency", "rampup", "noise", "unlabelled_batch", "frozen_norm", "anchor", "schedule")
        recipe = MeanTeacherRecipe(
            network,
            options.iterations,
            getattr(module, "supervised_loss", None),
            activation="softmax" if card.inference.activation == "softmax" else "sigmoid",
            lr=lr,
            optimizer=getattr(module, "OPTIMIZER", "adam"),  # a share of an SGD rate would be a large Adam rate
            device=device,
            **{k: v for k, v in options.recipe.items() if k in known},
        )
    data = TrainingData(
        store,
        batch,
        _finetune_augment(defaults.get("augment", Augment()), options.recipe),
        unlabelled=extra,
        patch_zyx=patch,
        foreground=float(run.get("foreground", 0.5)),
    )
    split = (
        f"held-out: {len(held_out)} of the {len(labelled)} labelled cases"
        if held_out
        else f"the {len(training)} labelled training cases (too few to hold any back)"
    )
    new_card = card.to_dict()
    new_card.pop("weights", None)
    new_card.update(
        {
            "id": model_id,
            "version": "1.0.0",
            "parent": card.id,
            "metrics": [{"name": "dice_before_finetuning", "value": round(float(before["dice"]), 4), "split": split}],
            "name": f"{card.name} (finetuned)",
            "description": f"{card.name} finetuned on {len(labelled)} labelled and "
            f"{len(unlabelled)} unlabelled case(s).",
            "training": {
                **card.training,
                "finetune": {
                    "parent": card.id,
                    "parent_version": card.version,
                    "labelled": len(labelled),
                    "unlabelled": len(unlabelled),
                    "held_out": [case_id for case_id, _, _ in held_out],
                    "dice_before": round(float(before["dice"]), 4),
                    "split": split,
                },
            },
        }
    )
    settings = TrainingSettings(options.iterations, max(1, options.iterations // 5), seed=options.seed)
    baseline = before if options.keep_parent_weights else None
    margin = options.min_gain if held_out else 0.0
    trainer = Trainer(recipe, data, new_card, validation, settings, output, baseline=baseline, baseline_margin=margin)
    entry = trainer.run(progress, cancel, resume=resume, on_log=on_log)
    if entry is None:  # another rank of a torchrun job wrote and registers the model
        return None
    kept_parent = baseline is not None and trainer.best is not None and trainer.best.get("iteration") == 0
    verdict = _record_verdict(entry, len(held_out), kept_parent, options.keep_if_worse)
    log.info("finetuned %s -> %s: %s", card.id, model_id, verdict.sentence(card.id))
    if options.output is not None and Path(output).resolve().parent != registry.user_dir.resolve():
        return registry.import_model(output)
    return registry.get(model_id)


def _record_verdict(entry: ModelEntry, held_back: int, kept_parent: bool, keep_if_worse: bool) -> FinetuneVerdict:
    """Judge the saved model against its parent and write the verdict into its card (atomically)."""
    from ..io.atomic import atomic_output
    from ..models.card import CARD_FILE, card_from_dict, save_card

    metrics = {m["name"]: m["value"] for m in entry.card.metrics}
    verdict = FinetuneVerdict.judge(
        float(metrics["dice_before_finetuning"]),
        float(metrics["dice"]),
        held_back,
        kept_parent=kept_parent,
        keep_if_worse=keep_if_worse,
    )
    data = entry.card.to_dict()
    data["training"]["finetune"]["verdict"] = verdict.to_dict()
    with atomic_output(entry.directory / CARD_FILE, overwrite=True) as tmp:
        save_card(card_from_dict(data, source=str(entry.directory / CARD_FILE)), tmp)
    return verdict
