"""Benchmark workloads that need set-up: whole volumes, refinement, finetuning iterations.

Each function builds what it needs (randomly initialised networks described by a model
card, synthetic images) and returns a zero-argument callable that ``measure.py`` times.
Random weights cost exactly what trained ones do.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from MedSegSuiteLib import networks
from MedSegSuiteLib.inference import Predictor
from MedSegSuiteLib.models import LoadedModel, card_from_dict
from MedSegSuiteLib.volume import Volume


def _card(
    network: str,
    preset: str,
    config: dict[str, Any],
    dims: int,
    channels: int,
    labels: int,
    inference: Optional[dict[str, Any]] = None,
    **inp: Any,
) -> Any:
    return card_from_dict(
        {
            "id": f"bench-{network}",
            "version": "0.0.0",
            "network": network,
            "preset": preset,
            "config": config,
            "dims": dims,
            "input": {"channels": channels, "normalization": {"kind": "zscore"}, **inp},
            "inference": inference or {"activation": "softmax"},
            "labels": [{"value": v, "name": f"L{v}", "color": [v, v, v]} for v in range(1, labels + 1)],
            "weights": {"file": "model.safetensors"},
        }
    )


def _model(card: Any) -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(card, networks.create(card.network, card.preset, **card.config).eval())


def predict_volume(
    device: torch.device,
    network: str,
    preset: str,
    shape: Sequence[int],
    config: dict[str, Any],
    labels: int,
    patch_xyz: Optional[Sequence[int]] = None,
    size_xy: Optional[Sequence[int]] = None,
    channels: int = 1,
    inference: Optional[dict[str, Any]] = None,
    fast: bool = False,
    batch_size: Optional[int] = None,
) -> Callable[[], Any]:
    """One whole-volume Predictor.predict of a ``shape`` (z, y, x) synthetic image of ``channels`` channels.

    The model takes the network's ``in_channels``; a grey image for an RGB network goes
    through the channel rule (replicated), as a CT or MRI volume does in practice.
    """
    dims = 3 if patch_xyz else 2
    extra = {"patch_xyz": list(patch_xyz)} if patch_xyz else ({"size_xy": list(size_xy)} if size_xy else {})
    card = _card(network, preset, config, dims, config.get("in_channels", channels), labels, inference, **extra)
    predictor = Predictor(_model(card), device=device, fast=fast, batch_size=batch_size)
    array = np.random.default_rng(0).normal(100, 20, ((channels,) if channels > 1 else ()) + tuple(shape))
    volume = Volume(array.astype(np.float32))
    return lambda: predictor.predict(volume)


def refiner_call(
    device: torch.device, preset: str, binary: bool, size: int = 224, classes: int = 9
) -> Callable[[], Any]:
    """One refiner network call on a ``size`` x ``size`` slice (eval, inference mode)."""
    from MedSegSuiteLib.networks.hidiff import PRESETS

    config = {**PRESETS["hidiff_refiner"][preset], "binary": binary, "num_classes": classes}
    refiner = networks.create("hidiff_refiner", preset, **config).eval().to(device)
    dims = config["condition_dims"]
    feats = [torch.randn(1, c, size // 2 ** (i + 2), size // 2 ** (i + 2), device=device) for i, c in enumerate(dims)]
    y = torch.randint(0, 2, (1, classes, size, size), device=device).float()
    t = torch.tensor([5], device=device)
    image = torch.randn(1, config["img_channels"], size, size, device=device)
    prior = torch.rand(1, classes, size, size, device=device)

    def run() -> Any:
        with torch.inference_mode():
            return refiner(y, t, image, prior, feats)

    return run


def refine_slice(
    device: torch.device, preset: str, binary: bool, steps: int = 10, size: int = 224
) -> Callable[[], Any]:
    """A ``steps``-step refinement of one ``size`` x ``size`` slice from a mask (segmentor + refiner calls)."""
    from MedSegSuiteLib.refine.refinement import Refiner

    card = _card(
        "hidiff",
        preset,
        {
            "in_channels": 1,
            "num_classes": 1,
            "refiner": {"preset": preset, "binary": binary},
            "segmentor": {"preset": preset},
        },
        2,
        1,
        1,
        {"activation": "sigmoid"},
        size_xy=[size, size],
    )
    refiner = Refiner(_model(card), device=device, batch_size=1)
    yy, xx = np.mgrid[:size, :size]
    mask = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 5) ** 2).astype(np.uint8)[None]
    image = Volume(np.random.default_rng(0).normal(100, 20, (1, size, size)).astype(np.float32))
    return lambda: refiner.refine(image, image.with_array(mask), steps=steps)


def finetune_iteration(
    device: torch.device,
    network: str,
    preset: str,
    config: dict[str, Any],
    dims: int,
    patch_zyx: Optional[Sequence[int]] = None,
    size: int = 256,
    channels: int = 1,
    batch: int = 2,
) -> Callable[[], Any]:
    """One mean-teacher finetuning iteration (labelled + unlabelled batch) of ``network``."""
    from MedSegSuiteLib.training.data import Augment, PatchStore, SliceStore
    from MedSegSuiteLib.training.recipes import recipe_module
    from MedSegSuiteLib.training.recipes.base import TrainingData
    from MedSegSuiteLib.training.recipes.mean_teacher import MeanTeacherRecipe

    rng = np.random.default_rng(0)
    if dims == 3:
        shape = tuple(s + 8 for s in patch_zyx)
        image = Volume(rng.normal(0, 1, shape).astype(np.float32))
        label = image.with_array((rng.random(shape) > 0.7).astype(np.uint8))
        store = PatchStore([("a", image, label)], [1], channels, {"kind": "zscore"})
        extra = PatchStore([("b", image, None)], [1], channels, {"kind": "zscore"})
    else:
        shape = (2, size, size)
        image = Volume(rng.normal(0, 1, ((channels,) if channels > 1 else ()) + shape).astype(np.float32))
        label = Volume((rng.random(shape) > 0.7).astype(np.uint8))
        store = SliceStore([("a", image, label)], [1], channels, {"kind": "zscore"}, (size, size))
        extra = SliceStore([("b", image, None)], [1], channels, {"kind": "zscore"}, (size, size))
    torch.manual_seed(0)
    net = networks.create(network, preset, **config)
    module = recipe_module(network)
    recipe = MeanTeacherRecipe(net, 100, getattr(module, "supervised_loss", None), device=device)
    data = TrainingData(store, batch, Augment(rotate=0), unlabelled=extra, patch_zyx=patch_zyx)
    state = {"i": 0}

    def run() -> Any:
        state["i"] += 1
        return recipe.step(data, torch.Generator().manual_seed(state["i"]), state["i"])

    return run
