"""What a model costs in memory, worked out without allocating it.

The network a card describes is built on PyTorch's ``meta`` device (shapes only, no
storage), so an absurd card (millions of channels) is refused with the amount it
would need instead of taking the machine's memory. One forward pass on ``meta``
gives the activations of one window or slice, which bounds what a batch needs.
Every network of the suite, at every preset, builds and runs on ``meta`` (the tests check
it); a network added later that cannot is built without an estimate.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..errors import ModelError
from ..memory import check_fits, format_bytes
from .card import ModelCard

__all__ = ["activation_bytes", "check_batch_fits", "check_network_fits", "meta_network", "parameter_bytes"]


def meta_network(card: ModelCard) -> nn.Module:
    """The card's network with shapes only (no memory for weights)."""
    from .loading import build_network

    with torch.device("meta"):
        return build_network(card)


def parameter_bytes(network: nn.Module) -> int:
    """Bytes of the network's parameters and buffers in float32."""
    return 4 * sum(t.numel() for t in list(network.parameters()) + list(network.buffers()))


#: No published network of the suite has a width, depth or size above this; a card that does is broken.
MAX_CONFIG_NUMBER = 1 << 16


def _check_config_sizes(card: ModelCard) -> None:
    """ModelError for a card config holding absurd whole numbers (too big even to build on meta quickly)."""

    def numbers(value: object) -> list[int]:
        if isinstance(value, bool):
            return []
        if isinstance(value, int):
            return [value]
        if isinstance(value, (list, tuple)):
            return [n for item in value for n in numbers(item)]
        if isinstance(value, dict):
            return [n for item in value.values() for n in numbers(item)]
        return []

    for key, value in card.config.items():
        big = [n for n in numbers(value) if abs(n) > MAX_CONFIG_NUMBER]
        if big:
            raise ModelError(
                f"model card {card.id!r}: config {key}={big[0]} is far beyond any network this suite builds "
                f"(at most {MAX_CONFIG_NUMBER}); the card is broken: fix its config"
            )


def check_network_fits(card: ModelCard, weights_bytes: Optional[int] = None) -> Optional[nn.Module]:
    """Refuse (OutOfMemory) a card whose network would not fit in free memory; return its meta network.

    Loading holds the network and the weights read from disk at once: twice the
    parameters. With ``weights_bytes`` (the weights file's size) only a network far
    larger than its weights (a broken card) is checked here; the weights of a
    consistent card are read the usual way. ModelError when the card's network
    cannot be built; None when it cannot be built on ``meta`` (then it is not estimated).
    """
    _check_config_sizes(card)
    try:
        network = meta_network(card)
    except ModelError:
        raise
    except Exception:  # noqa: BLE001 - a network that cannot be built on meta is not estimated
        return None
    needed = 2 * parameter_bytes(network)
    if weights_bytes is not None and needed <= 8 * weights_bytes:  # fp16 files hold half of float32
        return network
    check_fits(
        needed,
        f"model {card.id!r} ({format_bytes(needed / 2)} of parameters as its card describes the network)",
        "check the card's config (network sizes) or use a machine with more memory",
    )
    return network


def activation_bytes(card: ModelCard, network: Optional[nn.Module] = None) -> Optional[int]:
    """Bytes of all intermediate outputs of one forward pass on one window (3D) or slice (2D).

    An upper bound of what inference keeps alive for one batch item (it frees most of
    them on the way). None when the card gives no input size or the network cannot
    run on ``meta``.
    """
    if card.dims == 3:
        size = card.input.patch_xyz
    else:
        size = card.input.size_xy
    if not size:
        return None
    shape = (1, card.input.channels, *reversed(tuple(int(s) for s in size)))
    network = network if network is not None else meta_network(card)
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        for item in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(item, torch.Tensor):
                total += item.numel() * max(item.element_size(), 4)

    hooks = [m.register_forward_hook(count) for m in network.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            network.eval()(torch.empty(shape, device="meta"))
    except Exception:  # noqa: BLE001 - a network that cannot run on meta is not estimated
        return None
    finally:
        for hook in hooks:
            hook.remove()
    return total + 4 * int(torch.tensor(shape).prod())


def check_batch_fits(card: ModelCard, batch_size: int, network: Optional[nn.Module] = None) -> None:
    """Refuse (OutOfMemory) a batch size whose windows or slices would not fit in free memory."""
    per_item = activation_bytes(card, network)
    if per_item is None:
        return
    unit = "window" if card.dims == 3 else "slice"
    check_fits(
        per_item * batch_size,
        f"--batch-size {batch_size} ({format_bytes(per_item)} per {unit} of {card.id})",
        "use a smaller --batch-size",
    )
