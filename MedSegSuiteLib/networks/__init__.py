"""The segmentation networks of MedSegSuite, built by name.

Every network lives in its own module, which declares ``PRESETS``: registry name ->
preset name (at least ``"paper"`` and ``"lite"``) -> constructor keyword arguments.
:func:`create` imports the module on first use, so importing this package costs
nothing.

Output contract, relied on by the Predictor and the trainers:

- In ``eval()`` mode ``forward(x)`` returns the main **logits** as one tensor
  ``[B, K, *spatial]`` (no activation), or the network defines
  ``predict_logits(x)`` that does.
- Auxiliary outputs (deep supervision, side outputs, SDF heads) appear only when the
  network is asked for them (a constructor switch or a ``forward`` keyword) or in
  ``train()`` mode, as each network documents.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch.nn as nn

__all__ = ["available", "create", "network_class", "presets"]

# name -> (module, class). A name is listed by available() once its module exists.
_NETWORKS: dict[str, tuple[str, str]] = {
    "unet": ("MedSegSuiteLib.networks.unet", "UNet"),
    "condseg": ("MedSegSuiteLib.networks.condseg", "ConDSeg"),
    "condseg_stage1": ("MedSegSuiteLib.networks.condseg", "ConDSegStage1"),
    "banet": ("MedSegSuiteLib.networks.banet", "BANet"),
    "hidiff_refiner": ("MedSegSuiteLib.networks.hidiff", "BBDMRefiner"),
    "hidiff_segmentor": ("MedSegSuiteLib.networks.hidiff", "HiDiffSegmentor"),
    "hidiff": ("MedSegSuiteLib.networks.hidiff_model", "HiDiff"),
    "dnet": ("MedSegSuiteLib.networks.dnet", "DNet"),
    "canet": ("MedSegSuiteLib.networks.canet", "CANet"),
    "canet_discriminator": ("MedSegSuiteLib.networks.canet", "CANetDiscriminator"),
}


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available() -> list[str]:
    """Names accepted by :func:`create`, in a stable order."""
    return [name for name, (module, _) in _NETWORKS.items() if _module_exists(module)]


def _lookup(name: str) -> tuple[Any, type[nn.Module]]:
    if name not in _NETWORKS or not _module_exists(_NETWORKS[name][0]):
        raise ValueError(f"unknown network {name!r}; available networks: {', '.join(available())}")
    module_name, class_name = _NETWORKS[name]
    module = importlib.import_module(module_name)
    return module, getattr(module, class_name)


def network_class(name: str) -> type[nn.Module]:
    """The ``nn.Module`` class that :func:`create` instantiates for ``name``."""
    return _lookup(name)[1]


def presets(name: str) -> dict[str, dict[str, Any]]:
    """Preset name -> constructor keyword arguments for network ``name`` (a copy)."""
    module, _ = _lookup(name)
    return {preset: dict(kwargs) for preset, kwargs in module.PRESETS[name].items()}


def create(name: str, preset: str = "paper", **overrides: Any) -> nn.Module:
    """Build network ``name`` from ``preset`` with keyword ``overrides`` applied on top.

    Raises ``ValueError`` for an unknown network or preset, and whatever the
    network's constructor raises for invalid arguments.
    """
    _, cls = _lookup(name)
    table = presets(name)
    if preset not in table:
        raise ValueError(f"network {name!r} has no preset {preset!r}; presets: {', '.join(sorted(table))}")
    kwargs = {**table[preset], **overrides}
    return cls(**kwargs)
