"""Weight files: safetensors with sha256, safe import of PyTorch checkpoints, strict loading.

Only safetensors files are read directly. ``.pth``/``.pt``/``.ckpt`` checkpoints are
read with ``torch.load(weights_only=True)`` (which refuses pickles that would run
code), unwrapped and converted.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from ..errors import WeightsError
from ..io.atomic import atomic_output

if TYPE_CHECKING:  # torch is imported where it is used, so listing models needs no torch
    import torch
    import torch.nn as nn

__all__ = [
    "CARD_METADATA_KEY",
    "TORCH_SUFFIXES",
    "load_state_dict_strict",
    "read_embedded_card",
    "read_torch_checkpoint",
    "read_weights",
    "save_weights",
    "sha256_file",
    "unwrap_state_dict",
]

PathLike = Union[str, Path]
CARD_METADATA_KEY = "medsegsuite.card"
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
_WRAPPER_KEYS = ("state_dict", "network_weights", "model_state_dict", "model", "net", "network")
_PREFIXES = ("module.", "_orig_mod.")
_KEEP_FP32 = ("running_mean", "running_var")


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_weights(
    state_dict: Mapping[str, torch.Tensor],
    path: PathLike,
    half: bool = False,
    card: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``state_dict`` as safetensors atomically; return the card's ``weights`` entry.

    ``half`` stores float32 parameters as float16 (BatchNorm statistics stay
    float32). ``card`` (JSON data) is embedded in the file's metadata so a weights
    file alone can be imported later.
    """
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for key, value in state_dict.items():
        tensor = value.detach().to("cpu").contiguous().clone()
        if half and tensor.dtype == torch.float32 and not key.endswith(_KEEP_FP32):
            tensor = tensor.half()
        tensors[key] = tensor
    metadata = {"format": "pt"}
    if card is not None:
        embedded = {k: v for k, v in card.items() if k != "weights"}
        metadata[CARD_METADATA_KEY] = json.dumps(embedded)
    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "dtype": "float16" if half else "float32",
    }


def read_weights(path: PathLike, sha256: Optional[str] = None, size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file on the CPU, verifying its size and sha256 when they are given.

    Raises :class:`WeightsError` for a missing, truncated or corrupt file, or a
    size or checksum mismatch.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} is missing; re-install or re-import the model")
    if path.suffix.lower() != ".safetensors":
        raise WeightsError(f"{path.name}: only .safetensors weights are loaded directly; import other formats first")
    if size is not None and path.stat().st_size != size:
        actual_size = path.stat().st_size
        what = "is truncated" if actual_size < size else "does not match its model card"
        raise WeightsError(
            f"weights file {path} {what}: it holds {actual_size} bytes, its model card says {size}; "
            "re-install or re-import the model"
        )
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise WeightsError(
                f"weights file {path} does not match its model card (sha256 {actual[:12]}... expected "
                f"{sha256[:12]}...): the file is damaged or was replaced; re-install or re-import the model"
            )
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error type for bad headers
        raise WeightsError(
            f"weights file {path} is truncated or corrupt ({error}); re-install or re-import it"
        ) from None


def read_embedded_card(path: PathLike) -> Optional[dict[str, Any]]:
    """The card data embedded in a safetensors file's metadata by :func:`save_weights`, if any."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise WeightsError(f"weights file {path} is truncated or corrupt ({error})") from None
    text = metadata.get(CARD_METADATA_KEY)
    return json.loads(text) if text else None


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state_dict inside a checkpoint object and strip ``module.``-style prefixes.

    Accepts a plain ``{name: tensor}`` mapping or one nested under a usual wrapper key
    (``state_dict``, ``network_weights``, ``model`` ...), at any depth.
    """
    import torch

    current = obj
    for _ in range(4):
        if isinstance(current, Mapping) and current and all(isinstance(v, torch.Tensor) for v in current.values()):
            break
        if isinstance(current, Mapping):
            inner = next((current[k] for k in _WRAPPER_KEYS if isinstance(current.get(k), Mapping)), None)
            if inner is not None:
                current = inner
                continue
        raise WeightsError(
            f"{source} holds no state_dict (a mapping of parameter names to tensors); found "
            f"{type(current).__name__} with keys {list(current)[:6] if isinstance(current, Mapping) else '-'}"
        )
    else:
        raise WeightsError(f"{source}: state_dict nested too deeply")
    out = {}
    for key, tensor in current.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = tensor
    return out


def read_torch_checkpoint(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a PyTorch checkpoint safely (``weights_only=True``) and return its unwrapped state_dict."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise WeightsError(
            f"refused to load {path.name}: it contains Python objects beyond tensors, which could run code when "
            f"loaded ({first[:160]}); ask for a plain state_dict or a .safetensors file"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise WeightsError(
            f"cannot read {path.name} as a PyTorch checkpoint ({str(error)[:160]}); is it truncated?"
        ) from None
    return unwrap_state_dict(obj, source=path.name)


def load_state_dict_strict(network: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``network`` with every key and shape required to match.

    Raises :class:`WeightsError` summarising missing keys, unexpected keys and shape
    mismatches (a few examples of each), which usually means the weights belong to
    another network or the card's config does not describe them.
    """
    import torch

    expected = network.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: network {tuple(expected[k].shape)} vs file {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:2])})")
        raise WeightsError(
            f"weights in {source} do not fit the network the model card describes: {', '.join(parts)}. "
            "The weights belong to another network or the card's network/preset/config is wrong."
        )
    non_finite = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise WeightsError(
            f"weights in {source} contain NaN or infinite values (e.g. {non_finite[0]}); the model is broken"
        )
    network.load_state_dict(dict(state_dict), strict=True)
