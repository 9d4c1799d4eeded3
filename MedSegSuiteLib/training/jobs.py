"""From a data folder and a few options to a trained model folder (``medsegsuite train``)."""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .. import networks
from ..errors import InputError, ModelError
from ..inference.device import resolve_device
from ..inference.fit_check import input_profile
from ..models import ModelEntry
from ..progress import ProgressCallback
from .data import PatchStore, SliceStore, changed_augment
from .datasets import discover_cases, label_values, load_case, load_cases, split_cases
from .recipes import recipe_module
from .recipes.base import TrainingData
from .trainer import Trainer, TrainingSettings

__all__ = ["PALETTE", "TrainOptions", "build_card", "train_model"]

log = logging.getLogger(__name__)

# Distinct, colour-blind-friendly label colours (Okabe-Ito, then extras).
PALETTE = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (170, 68, 153),
    (68, 170, 153),
    (153, 153, 51),
]


@dataclass
class TrainOptions:
    """Everything ``medsegsuite train`` takes; ``None`` means the recipe's default."""

    network: str
    data: Path
    output: Path
    model_id: str
    preset: str = "lite"
    name: Optional[str] = None
    description: str = ""
    dims: Optional[int] = None
    labels: Optional[list[dict[str, Any]]] = None
    iterations: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    size_xy: Optional[Sequence[int]] = None
    patch_xyz: Optional[Sequence[int]] = None
    spacing: Optional[Sequence[float]] = None
    h5_spacing: Sequence[float] = (1.0, 1.0, 1.0)
    val_fraction: float = 0.2
    val_ids: Optional[Sequence[str]] = None
    seed: int = 0
    device: str = "auto"
    data_licence: str = "unspecified"
    config: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    validate_every: int = 0
    max_val_cases: int = 200
    labelled_cases: Optional[int] = None  # keep labels for only this many training cases; the rest are unlabelled
    init_encoder: Optional[str] = None  # a trained model (id or folder) whose ResNet trunk starts this network
    init_weights: Optional[str] = None  # a trained model whose weights start the network (HiDiff: its segmentor)


def build_card(
    options: TrainOptions,
    dims: int,
    channels: int,
    labels: list[dict[str, Any]],
    defaults: dict[str, Any],
    inference: dict[str, Any],
    config: dict[str, Any],
) -> dict[str, Any]:
    """The card data of the model a training run will produce (weights and metrics come later)."""
    inp = {"channels": channels, **defaults["input"]}
    if dims == 2 and options.size_xy:
        inp["size_xy"] = [int(v) for v in options.size_xy]
    if dims == 3 and options.patch_xyz:
        inp["patch_xyz"] = [int(v) for v in options.patch_xyz]
    if options.spacing:
        inp["spacing"] = [float(v) for v in options.spacing]
    return {
        "schema_version": 1,
        "id": options.model_id,
        "version": "1.0.0",
        "name": options.name or options.model_id,
        "description": options.description,
        "network": options.network,
        "preset": options.preset,
        "config": config,
        "dims": dims,
        "input": inp,
        "inference": inference,
        "labels": labels,
        "licence": f"weights trained on data under: {options.data_licence}",
        "training": {"data": str(options.data), "licence": options.data_licence},
    }


def _labels(options: TrainOptions, found: list[int]) -> list[dict[str, Any]]:
    if options.labels:
        declared = {int(label["value"]) for label in options.labels}
        missing = set(found) - declared
        if missing:
            raise InputError(f"the data holds label value(s) {sorted(missing)} that --labels does not name")
        return [{"color": list(PALETTE[i % len(PALETTE)]), **label} for i, label in enumerate(options.labels)]
    return [{"value": v, "name": f"Label {v}", "color": list(PALETTE[i % len(PALETTE)])} for i, v in enumerate(found)]


def _fit_normalization(defaults: dict[str, Any], first: Any) -> dict[str, Any]:
    """The recipe defaults with an 8-bit photo scaling replaced by a per-volume one for other data.

    A fixed /255 scale suits 8-bit photographs; MRI and CT intensities (any image that
    is not 8-bit) get a z-score over the non-zero voxels instead, which does not depend
    on how much empty background surrounds the structure.
    """
    normalization = defaults["input"]["normalization"]
    if normalization["kind"] != "scale" or first.array.dtype == np.uint8:
        return defaults
    log.info("the data is not 8-bit: normalising each image by the z-score of its non-zero voxels")
    return {**defaults, "input": {**defaults["input"], "normalization": {"kind": "zscore", "nonzero": True}}}


def _flag(value: Any, name: str) -> bool:
    """A recipe option's truth value: booleans, 0/1, or true/false/yes/no/on/off in any case."""
    if isinstance(value, (bool, int)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise InputError(f"--recipe {name}= takes true or false, got {value!r}")


def _speed_settings(recipe: Any, run: dict[str, Any], dims: int) -> dict[str, bool]:
    """Apply the run's CPU speed settings to ``recipe`` and say which were used.

    ``cpu_bf16`` (bf16 autocast when training on the CPU) comes from the recipe defaults
    or ``--recipe cpu_bf16=...``. Channels-last memory format is used for 2D networks
    without GroupNorm (PyTorch's CPU GroupNorm backward mishandles mixed formats), unless
    ``--recipe channels_last=False``.
    """
    recipe.cpu_bf16 = _flag(run.get("cpu_bf16", False), "cpu_bf16") and recipe.device.type == "cpu"
    group_norm = any(isinstance(m, torch.nn.GroupNorm) for m in recipe.network.modules())
    channels_last = dims == 2 and not group_norm and _flag(run.get("channels_last", True), "channels_last")
    if channels_last and recipe.cpu_bf16:
        broken = _broken_bf16_channels_last_convs(recipe.network)
        if broken:
            log.warning(
                "this PyTorch gives non-finite bf16 channels-last weight gradients for %s; "
                "training without channels-last",
                ", ".join(broken),
            )
            channels_last = False
    if channels_last:
        recipe.network.to(memory_format=torch.channels_last)
    return {"cpu_bf16": recipe.cpu_bf16, "channels_last": channels_last}


def _broken_bf16_channels_last_convs(network: torch.nn.Module) -> list[str]:
    """The dilated 2D convolutions of ``network`` whose bf16 channels-last weight gradient is not finite.

    PyTorch 2.13's CPU kernels return NaN weight gradients for dilated convolutions with some
    input widths (20, 24, 40, ... channels) in bf16 channels-last; each distinct shape is tried
    once on a small random input. Returns descriptions such as ``"24-channel dilation-6 convolutions"``.
    """
    seen: dict[tuple, str] = {}
    for module in network.modules():
        if not isinstance(module, torch.nn.Conv2d) or max(module.dilation) == 1:
            continue
        key = (module.in_channels, module.out_channels, module.kernel_size, module.dilation, module.groups)
        if key in seen:
            continue
        probe = torch.nn.Conv2d(
            module.in_channels, module.out_channels, module.kernel_size,
            padding=module.padding, dilation=module.dilation, groups=module.groups, bias=False,
        ).to(memory_format=torch.channels_last)  # fmt: skip
        side = 16 + max(d * (k - 1) for d, k in zip(module.dilation, module.kernel_size))
        x = torch.randn(2, module.in_channels, side, side).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = probe(x)
        (grad,) = torch.autograd.grad(out.float().sum(), probe.weight)
        seen[key] = "" if torch.isfinite(grad).all() else f"{module.in_channels}-channel dilation-{module.dilation[0]}"
    return sorted({f"{name} convolutions" for name in seen.values() if name})


def _check_input_size(network: torch.nn.Module, channels: int, size_zyx: Optional[Sequence[int]], dims: int) -> None:
    """Refuse a --size/--patch the network cannot take, by running one empty input through it."""
    if size_zyx is None:
        return
    option = "--size" if dims == 2 else "--patch"
    given = ",".join(str(int(v)) for v in reversed(size_zyx))
    model = getattr(network, "segmentor", network)  # HiDiff: the segmentor fixes the input size
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, *(int(v) for v in size_zyx)))
    except (ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{option} {given} does not suit this network: {reason}") from None
    finally:
        model.train(was_training)


def _same_folder(a: Any, b: Any) -> bool:
    a, b = Path(str(a)), Path(str(b))
    return a.resolve() == b.resolve() or (a.name == b.name and a.name != "")


def _load_source(source: str, flag: str, data: Optional[Path], validation_ids: Sequence[str]) -> Any:
    """The trained model ``source`` (id or folder) that starts a run, refused when it has seen this
    run's validation cases: trained on the same ``data`` (same folder, case ids in common) without
    holding out every one of ``validation_ids``. ``flag`` names the option in the errors."""
    from ..models import load_model

    try:
        donor = load_model(source)
    except (ModelError, OSError) as error:
        raise InputError(f"{flag} {source}: {error}") from error
    trained_on = donor.card.training.get("data")
    held_out = set(donor.card.training.get("validation_ids") or ())
    # the same data set: the same folder, and some case ids in common (another data set shares none)
    if data is not None and trained_on and _same_folder(trained_on, data) and held_out & set(validation_ids):
        seen = sorted(set(validation_ids) - held_out)
        if seen:
            raise InputError(
                f"{flag} {source}: that model trained on {len(seen)} of this run's validation cases "
                f"(e.g. {seen[0]}), so validation would flatter this one; pass --val-ids with its validation ids"
            )
    return donor


def _provenance(donor: Any, **extra: Any) -> dict[str, Any]:
    card = donor.card
    return {"model": card.id, "version": card.version, "network": card.network, **extra}


def init_encoder_from(
    network: torch.nn.Module,
    source: str,
    normalization: dict[str, Any],
    channels: int,
    data: Optional[Path] = None,
    validation_ids: Sequence[str] = (),
) -> dict[str, Any]:
    """Start ``network``'s ResNet trunk from the trunk of the trained model ``source`` (id or folder).

    The two models' input normalisations are reconciled in the stem (see
    :func:`MedSegSuiteLib.networks.resnet.copy_resnet_trunk`). When the source was trained on the
    same ``data``, every one of ``validation_ids`` must have been held out by the source too, or its
    trunk would have seen this run's validation cases (``InputError``). Returns what the card records:
    the source's id, version, network and the number of tensors copied. Raises ``InputError``
    when the source cannot be loaded or its trunk does not fit.
    """
    from ..networks.resnet import copy_resnet_trunk
    from ..preprocessing import pixel_affine

    donor = _load_source(source, "--init-encoder", data, validation_ids)
    mine = pixel_affine(normalization, channels)
    theirs = pixel_affine(donor.card.input.normalization, channels)
    if mine is None or theirs is None:
        raise InputError(
            f"--init-encoder needs fixed per-pixel normalisations (none, scale, imagenet); "
            f"{source} or this network normalises per image"
        )
    # the donor saw a_d * raw + b_d where this network sees x = a * raw + b
    scale = theirs[0] / mine[0]
    offset = theirs[1] - mine[1] * scale
    try:
        copied = copy_resnet_trunk(donor.network, network, scale.tolist(), offset.tolist())
    except ValueError as error:
        raise InputError(f"--init-encoder {source}: {error}") from error
    return _provenance(donor, tensors=len(copied))


def init_weights_from(
    network_name: str, config: dict[str, Any], network: torch.nn.Module, donor: Any, source: str
) -> dict[str, Any]:
    """Load the trained model ``donor`` (loaded from ``source``) into ``network``, a ``network_name``
    built from ``config``.

    A model of the same network and configuration starts the whole network (a second training
    cycle); for HiDiff, a model of its segmentor's network (``config["segmentor"]["network"]``)
    starts the segmentor (the paper pre-trains its segmentor and loads it before the joint
    training). Returns what the card records; raises ``InputError`` when the weights do not fit.
    """
    from ..models.weights import load_state_dict_strict

    segmentor = (config.get("segmentor") or {}).get("network") if network_name == "hidiff" else None
    if donor.card.network == network_name:
        target, part = network, "network"
    elif segmentor is not None and donor.card.network == segmentor:
        target, part = network.segmentor, "segmentor"
    else:
        wanted = network_name if segmentor is None else f"{network_name} or {segmentor}"
        raise InputError(f"--init-weights {source}: that is a {donor.card.network} model; this run needs {wanted}")
    try:
        load_state_dict_strict(target, donor.network.state_dict(), source)
    except ModelError as error:
        raise InputError(
            f"--init-weights {source}: its weights do not fit this {part} ({error}); "
            "pass the --preset and --config of that model's card"
        ) from None
    return _provenance(donor, part=part)


def train_model(
    options: TrainOptions,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    resume: bool = False,
    overwrite: bool = False,
    on_log: Optional[Callable[[dict[str, Any]], None]] = None,
) -> ModelEntry:
    """Train ``options.network`` on ``options.data`` and write the best-validated model to ``options.output``."""
    module = recipe_module(options.network)
    if Path(options.output).exists() and not overwrite:
        raise InputError(f"{options.output} already exists; choose another folder or pass --overwrite to replace it")
    cases = discover_cases(options.data, require_labels=True)
    train_cases, val_cases = split_cases(cases, options.val_fraction, options.seed, options.val_ids)
    first, _ = load_case(train_cases[0], options.h5_spacing)
    supported = getattr(module, "DIMS", (2, 3))
    dims = options.dims or (2 if first.is_2d or 3 not in supported else 3)
    if dims not in supported:
        raise InputError(f"{options.network} trains in {supported[0]}D only")
    defaults = _fit_normalization(module.card_defaults(dims), first)
    donor = None
    if options.init_weights:  # the network sees what the model it starts from saw
        donor = _load_source(options.init_weights, "--init-weights", options.data, [c.id for c in val_cases])
        defaults["input"]["normalization"] = dict(donor.card.input.normalization)
    channels = int(defaults.get("channels", first.channels))
    validation = load_cases(val_cases, options.h5_spacing)
    run = dict(defaults["defaults"])
    for key in ("iterations", "batch_size", "lr"):
        if getattr(options, key) is not None:
            run[key] = getattr(options, key)
    run.update(options.recipe)
    run["augment"] = changed_augment(defaults["defaults"]["augment"], options.recipe.get("augment"))
    device = resolve_device(options.device)
    items = load_cases(train_cases, options.h5_spacing, progress, cancel)
    profile = input_profile([image for _, image, _ in items])
    unlabelled_items: list = []
    if options.labelled_cases is not None:
        if not 1 <= options.labelled_cases <= len(items):
            raise InputError(f"--labelled-cases must be between 1 and {len(items)} (the training cases)")
        order = np.random.default_rng(options.seed + 1).permutation(len(items))
        keep = {int(i) for i in order[: options.labelled_cases]}
        unlabelled_items = [(cid, image, None) for i, (cid, image, _) in enumerate(items) if i not in keep]
        items = [item for i, item in enumerate(items) if i in keep]
    normalization = defaults["input"]["normalization"]
    if dims == 2:
        size = options.size_xy or defaults["input"]["size_xy"]
        store = SliceStore(items, None, channels, normalization, size, cancel)
        extra = SliceStore(unlabelled_items, [], channels, normalization, size, cancel) if unlabelled_items else None
    else:
        store = PatchStore(items, None, channels, normalization, options.spacing, cancel)
        extra = (
            PatchStore(unlabelled_items, [], channels, normalization, options.spacing, cancel)
            if unlabelled_items
            else None
        )
    labels = _labels(options, sorted(set(label_values([label for _, _, label in validation])) | set(store.values)))
    store.remap([int(label["value"]) for label in labels])
    patch_xyz = (options.patch_xyz or defaults["input"].get("patch_xyz")) if dims == 3 else None
    patch_zyx = tuple(reversed(patch_xyz)) if patch_xyz else None
    config = {**module.network_config(dims, channels, len(labels), patch_zyx=patch_zyx), **options.config}
    card = build_card(options, dims, channels, labels, defaults, module.inference(dims, len(labels)), config)
    card["training"]["cases"] = {"train": len(items), "unlabelled": len(unlabelled_items), "validation": len(val_cases)}
    card["training"]["inputs"] = profile  # what segment compares inputs with (fit warnings)
    torch.manual_seed(options.seed)
    network = networks.create(options.network, options.preset, **config)
    _check_input_size(network, channels, tuple(reversed(size)) if dims == 2 else patch_zyx, dims)
    if options.init_encoder:
        card["training"]["encoder_init"] = init_encoder_from(
            network, options.init_encoder, normalization, channels, options.data, [c.id for c in val_cases]
        )
    if donor is not None:
        card["training"]["weights_init"] = init_weights_from(
            options.network, config, network, donor, options.init_weights
        )
    recipe = module.make(network, {**run, "device": device, "dims": dims, "labels": labels, "preset": options.preset})
    speed = _speed_settings(recipe, run, dims)
    augment = {k: v for k, v in asdict(run["augment"]).items() if k != "extra"}
    card["training"]["recipe"] = {**card["training"].get("recipe", {}), **speed, "augment": augment}
    patch = card["input"].get("patch_xyz")
    data = TrainingData(
        store,
        int(run["batch_size"]),
        run["augment"],
        unlabelled=extra,
        patch_zyx=tuple(reversed(patch)) if patch else None,
        foreground=float(run.get("foreground", 0.5)),
        channels_last=speed["channels_last"],
    )
    settings = TrainingSettings(
        int(run["iterations"]), options.validate_every, seed=options.seed, max_val_cases=options.max_val_cases
    )
    trainer = Trainer(recipe, data, card, validation, settings, Path(options.output))
    return trainer.run(progress, cancel, resume=resume, overwrite=overwrite, on_log=on_log)
