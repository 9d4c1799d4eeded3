"""Writing a model folder (card + safetensors weights) in one atomic step."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch.nn as nn

from ..io.atomic import atomic_directory
from .card import CARD_FILE, card_from_dict, save_card
from .registry import WEIGHTS_FILE, ModelEntry
from .weights import load_state_dict_strict, save_weights

__all__ = ["save_model"]


def save_model(
    directory: Union[str, Path],
    network: nn.Module,
    card: Mapping[str, Any],
    half: bool = False,
    overwrite: bool = False,
    extra_files: Optional[Mapping[str, str]] = None,
) -> ModelEntry:
    """Write ``network``'s weights and the card data to a new model folder and return its entry.

    The card is validated first and its ``weights`` entry (file, sha256, bytes, dtype)
    is filled in. The folder appears complete or not at all; an existing folder is
    replaced only with ``overwrite``. With ``half`` the weights are stored as float16
    (and reloaded once to check they still load). ``extra_files`` (name -> text) are
    written beside the card, e.g. a training log.
    """
    data = dict(card)
    data["weights"] = {"file": WEIGHTS_FILE}
    card_from_dict(data, source=f"for {Path(directory).name}")
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        data["weights"] = save_weights(network.state_dict(), tmp / WEIGHTS_FILE, half=half, card=data)
        final = card_from_dict(data, source=str(directory / CARD_FILE))
        if half:
            from .loading import build_network
            from .weights import read_weights

            load_state_dict_strict(build_network(final), read_weights(tmp / WEIGHTS_FILE), WEIGHTS_FILE)
        save_card(final, tmp / CARD_FILE)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return ModelEntry(final, directory, "path")
