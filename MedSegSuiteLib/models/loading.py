"""Turning a model card and its weights into a ready network."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from ..errors import ModelError
from .card import ModelCard
from .registry import ModelEntry, ModelRegistry, weights_inside
from .weights import load_state_dict_strict, read_weights

__all__ = ["LoadedModel", "build_network", "load_model"]


@dataclass
class LoadedModel:
    """A network in eval mode with the card that describes it."""

    card: ModelCard
    network: nn.Module
    directory: Optional[Path] = None


def build_network(card: ModelCard) -> nn.Module:
    """The network the card describes, with fresh (untrained) weights."""
    from .. import networks

    if card.network not in networks.available():
        raise ModelError(
            f"model {card.id!r} needs network {card.network!r}, which this MedSegSuite does not have "
            f"(available: {', '.join(networks.available())}); update MedSegSuite"
        )
    try:
        return networks.create(card.network, preset=card.preset, **card.config)
    except (TypeError, ValueError) as error:
        raise ModelError(
            f"model card {card.id!r}: network {card.network!r} cannot be built from its config: {error}"
        ) from None


def load_model(
    spec: Union[str, Path, ModelEntry],
    registry: Optional[ModelRegistry] = None,
    device: Union[str, torch.device] = "cpu",
) -> LoadedModel:
    """Load a model by id, model folder or registry entry; verifies the weights' sha256 and keys."""
    entry = spec if isinstance(spec, ModelEntry) else (registry or ModelRegistry()).resolve(spec)
    card = entry.card
    if entry.weights_path.exists():  # a missing file is named by read_weights
        weights_inside(entry.directory, card.weights_file)
    from .footprint import check_network_fits

    size = entry.weights_path.stat().st_size if entry.weights_path.is_file() else None
    check_network_fits(card, size)  # a card far larger than its weights is refused before it takes the memory
    network = build_network(card)
    state = read_weights(entry.weights_path, sha256=card.weights.get("sha256"), size=card.weights.get("bytes"))
    load_state_dict_strict(network, state, str(entry.weights_path))
    network.eval()
    return LoadedModel(card, network.to(device), entry.directory)
