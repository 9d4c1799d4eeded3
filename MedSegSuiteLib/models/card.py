"""Model cards: the JSON file that describes a model next to its weights.

A card says which network to build (``network``, ``preset``, ``config``), what the
network expects (``input``), how to run it (``inference``), what its outputs mean
(``labels``), which weights belong to it (``weights`` with sha256) and where it came
from (``training``, ``metrics``, ``parent``, ``licence``). Sizes and spacings are in
**x, y, z** order, like the ``--roi`` option and image spacing.

Minimal example::

    {
      "schema_version": 1, "id": "hippocampus-dnet-lite", "version": "1.0.0",
      "name": "Hippocampus (D-Net lite)", "network": "dnet", "preset": "lite",
      "config": {"in_channels": 1, "num_classes": 3}, "dims": 3,
      "input": {"channels": 1, "normalization": {"kind": "zscore"},
                "spacing": [1.0, 1.0, 1.0], "patch_xyz": [64, 64, 64]},
      "inference": {"activation": "softmax", "overlap": 0.5},
      "labels": [{"value": 1, "name": "Anterior", "color": [255, 128, 0]},
                 {"value": 2, "name": "Posterior", "color": [0, 128, 255]}],
      "weights": {"file": "model.safetensors", "sha256": "...", "bytes": 123}
    }

:func:`card_from_dict` validates everything and raises
:class:`~MedSegSuiteLib.errors.ModelError` naming the field and the problem.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..errors import ModelError
from ..jsonfile import read_json
from ..preprocessing import validate_normalization

__all__ = [
    "CARD_FILE",
    "SCHEMA_VERSION",
    "InferenceSpec",
    "InputSpec",
    "Label",
    "ModelCard",
    "card_from_dict",
    "load_card",
    "save_card",
]

CARD_FILE = "card.json"
SCHEMA_VERSION = 1
ACTIVATIONS = ("softmax", "sigmoid", "relu")
BLEND_MODES = ("gaussian", "constant")
POSTPROCESS = ("largest_component",)
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Fields:
    """Reads fields of one JSON object and reports problems with their full path."""

    def __init__(self, data: Any, where: str, source: str) -> None:
        if not isinstance(data, Mapping):
            self._fail(where, source, f"must be an object, got {type(data).__name__}")
        self.data, self.where, self.source = data, where, source

    @staticmethod
    def _fail(where: str, source: str, problem: str) -> None:
        raise ModelError(f"model card {source}: {where or 'card'} {problem}")

    def fail(self, key: str, problem: str) -> None:
        self._fail(f"{self.where}.{key}" if self.where else key, self.source, problem)

    def get(self, key: str, kind: Any, required: bool = True, default: Any = None) -> Any:
        if key not in self.data or self.data[key] is None:
            if required:
                self.fail(key, "is missing")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool:
            self.fail(key, f"must be {getattr(kind, '__name__', kind)}, got a boolean")
        if not isinstance(value, kind):
            self.fail(key, f"must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
        return value

    def sizes(self, key: str, count: int, positive_int: bool = True, required: bool = False) -> Optional[tuple]:
        value = self.get(key, list, required=required)
        if value is None:
            return None
        if len(value) != count:
            self.fail(key, f"must have {count} numbers (x, y{', z' if count == 3 else ''}), got {len(value)}")
        if positive_int:
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
                self.fail(key, f"must hold positive integers, got {value}")
        elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
            self.fail(key, f"must hold positive numbers, got {value}")
        return tuple(value)

    def child(self, key: str, required: bool = True) -> Optional[_Fields]:
        value = self.get(key, Mapping, required=required)
        if value is None:
            return None
        return _Fields(value, f"{self.where}.{key}" if self.where else key, self.source)


@dataclass(frozen=True)
class Label:
    """One output label: its voxel value in label maps, name, RGB colour (0-255) and terminology codes."""

    value: int
    name: str
    color: tuple[int, int, int]
    terminology: Optional[dict[str, list[str]]] = None


@dataclass(frozen=True)
class InputSpec:
    """What the network expects. ``size_xy`` (2D) resizes each slice; ``patch_xyz`` (3D) is the window."""

    channels: int
    normalization: dict[str, Any]
    spacing: Optional[tuple[float, float, float]] = None
    size_xy: Optional[tuple[int, int]] = None
    patch_xyz: Optional[tuple[int, int, int]] = None
    pad_multiple: int = 1


@dataclass(frozen=True)
class InferenceSpec:
    """How to run and decode the network.

    ``activation``: softmax (channel 0 = background, channel i = labels[i-1]), or
    sigmoid / relu (channel i = labels[i], a voxel gets the best-scoring label above
    ``threshold``). 3D windows step by ``stride_xyz`` when given, else by
    ``overlap``; ``fast`` holds overrides for the quicker mode (e.g. lower overlap).
    """

    activation: str = "softmax"
    threshold: float = 0.5
    overlap: float = 0.5
    stride_xyz: Optional[tuple[int, int, int]] = None
    blend: str = "gaussian"
    batch_size: int = 4
    postprocess: tuple[str, ...] = ()
    fast: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelCard:
    """A validated model card; build it with :func:`card_from_dict` or :func:`load_card`."""

    id: str
    version: str
    name: str
    network: str
    preset: str
    config: dict[str, Any]
    dims: int
    input: InputSpec
    inference: InferenceSpec
    labels: tuple[Label, ...]
    weights: dict[str, Any]
    description: str = ""
    licence: str = "unspecified"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[dict[str, Any], ...] = ()
    parent: Optional[str] = None
    resources: dict[str, Any] = field(default_factory=dict)
    citation: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def output_channels(self) -> int:
        """Channels the network must produce: labels + background for softmax, one per label otherwise."""
        return len(self.labels) + (1 if self.inference.activation == "softmax" else 0)

    @property
    def weights_file(self) -> str:
        return str(self.weights["file"])

    def label_table(self) -> dict[int, Label]:
        return {label.value: label for label in self.labels}

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data: a copy of the JSON it was validated from."""
        return copy.deepcopy(self.raw)

    def replace(self, **changes: Any) -> ModelCard:
        """A new validated card with top-level fields of the JSON replaced (e.g. ``id``, ``weights``)."""
        data = self.to_dict()
        data.update(copy.deepcopy(changes))
        return card_from_dict(data, source=f"{self.id} (modified)")


def _color(f: _Fields, key: str) -> tuple[int, int, int]:
    value = f.get(key, list)
    if len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value):
        f.fail(key, f"must be three integers 0-255 (R, G, B), got {value}")
    return tuple(value)  # type: ignore[return-value]


def _terminology(f: _Fields) -> Optional[dict[str, list[str]]]:
    term = f.child("terminology", required=False)
    if term is None:
        return None
    out: dict[str, list[str]] = {}
    for key in ("category", "type", "modifier", "region", "region_modifier"):
        code = term.get(key, list, required=key in ("category", "type"))
        if code is None:
            continue
        if len(code) != 3 or not all(isinstance(c, str) for c in code) or not code[0] or not code[1]:
            term.fail(key, f"must be [coding scheme, code value, code meaning], got {code}")
        out[key] = list(code)
    return out


def _labels(f: _Fields) -> tuple[Label, ...]:
    items = f.get("labels", list)
    if not items:
        f.fail("labels", "must list at least one label")
    labels, values, names = [], set(), set()
    for index, item in enumerate(items):
        lf = _Fields(item, f"labels[{index}]", f.source)
        value = lf.get("value", int)
        if not 1 <= value <= 65535:
            lf.fail("value", f"must be between 1 and 65535 (0 is background), got {value}")
        name = lf.get("name", str).strip()
        if not name:
            lf.fail("name", "must not be empty")
        if value in values or name.lower() in names:
            lf.fail("value", f"label {value} {name!r} is listed twice")
        values.add(value)
        names.add(name.lower())
        labels.append(Label(value, name, _color(lf, "color"), _terminology(lf)))
    return tuple(labels)


def _input(f: _Fields, dims: int) -> InputSpec:
    inp = f.child("input")
    channels = inp.get("channels", int)
    if not 1 <= channels <= 16:
        inp.fail("channels", f"must be between 1 and 16, got {channels}")
    try:
        normalization = validate_normalization(inp.get("normalization", Mapping))
    except ValueError as error:
        inp.fail("normalization", str(error))
    spacing = inp.sizes("spacing", 3, positive_int=False)
    size_xy = inp.sizes("size_xy", 2) if dims == 2 else None
    patch = inp.sizes("patch_xyz", 3, required=dims == 3) if dims == 3 else None
    if dims == 2 and "patch_xyz" in inp.data:
        inp.fail("patch_xyz", "is for 3D models; a 2D model uses size_xy")
    pad_multiple = inp.get("pad_multiple", int, required=False, default=1)
    if pad_multiple < 1:
        inp.fail("pad_multiple", "must be a positive integer")
    return InputSpec(
        channels,
        normalization,
        tuple(float(s) for s in spacing) if spacing else None,  # type: ignore[arg-type]
        size_xy,  # type: ignore[arg-type]
        patch,  # type: ignore[arg-type]
        pad_multiple,
    )


def _inference(f: _Fields, dims: int, nested: bool = False) -> InferenceSpec:
    inf = f.child("fast" if nested else "inference", required=False)
    if inf is None:
        return InferenceSpec()
    activation = inf.get("activation", str, required=False, default="softmax")
    if activation not in ACTIVATIONS:
        inf.fail("activation", f"must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    threshold = inf.get("threshold", float, required=False, default=0.5)
    overlap = inf.get("overlap", float, required=False, default=0.5)
    if not 0 <= overlap < 1:
        inf.fail("overlap", f"must be in [0, 1), got {overlap}")
    blend = inf.get("blend", str, required=False, default="gaussian")
    if blend not in BLEND_MODES:
        inf.fail("blend", f"must be one of {', '.join(BLEND_MODES)}, got {blend!r}")
    batch = inf.get("batch_size", int, required=False, default=4)
    if batch < 1:
        inf.fail("batch_size", "must be a positive integer")
    post = inf.get("postprocess", list, required=False, default=[])
    for step in post:
        if step not in POSTPROCESS:
            inf.fail("postprocess", f"unknown step {step!r}; known: {', '.join(POSTPROCESS)}")
    fast: dict[str, Any] = {}
    if not nested and "fast" in inf.data:
        _inference(inf, dims, nested=True)  # validates the overrides
        fast = dict(inf.data["fast"])
    return InferenceSpec(
        activation,
        threshold,
        overlap,
        inf.sizes("stride_xyz", 3) if dims == 3 else None,
        blend,
        batch,
        tuple(post),
        fast,
    )


def card_from_dict(data: Mapping[str, Any], source: str = "<memory>") -> ModelCard:
    """Validate card data and return a :class:`ModelCard`; raises ModelError naming the bad field."""
    f = _Fields(data, "", source)
    schema = f.get("schema_version", int, required=False, default=SCHEMA_VERSION)
    if schema > SCHEMA_VERSION:
        f.fail("schema_version", f"is {schema}; this MedSegSuite reads up to {SCHEMA_VERSION}: please update")
    model_id = f.get("id", str)
    if not _ID.match(model_id):
        f.fail("id", f"{model_id!r} must be lower-case letters, digits, '.', '_' or '-' (at most 80)")
    version = f.get("version", str)
    if not _SEMVER.match(version):
        f.fail("version", f"{version!r} is not a semantic version such as 1.0.0")
    dims = f.get("dims", int)
    if dims not in (2, 3):
        f.fail("dims", f"must be 2 or 3, got {dims}")
    weights = f.child("weights")
    weights_file = weights.get("file", str)
    if "/" in weights_file or "\\" in weights_file or weights_file.startswith("."):
        weights.fail("file", f"must be a plain file name next to the card, got {weights_file!r}")
    sha = weights.get("sha256", str, required=False)
    if sha is not None and not _SHA256.match(sha):
        weights.fail("sha256", "must be 64 lower-case hex digits")
    weights.get("bytes", int, required=False)
    metrics = f.get("metrics", list, required=False, default=[])
    for index, metric in enumerate(metrics):
        mf = _Fields(metric, f"metrics[{index}]", source)
        mf.get("name", str)
        mf.get("value", float)
        mf.get("split", str)
    card = ModelCard(
        id=model_id,
        version=version,
        name=f.get("name", str, required=False, default=model_id),
        network=f.get("network", str),
        preset=f.get("preset", str, required=False, default="paper"),
        config=dict(f.get("config", Mapping, required=False, default={})),
        dims=dims,
        input=_input(f, dims),
        inference=_inference(f, dims),
        labels=_labels(f),
        weights=dict(weights.data),
        description=f.get("description", str, required=False, default=""),
        licence=f.get("licence", str, required=False, default="unspecified"),
        training=dict(f.get("training", Mapping, required=False, default={})),
        metrics=tuple(dict(m) for m in metrics),
        parent=f.get("parent", str, required=False),
        resources=dict(f.get("resources", Mapping, required=False, default={})),
        citation=f.get("citation", str, required=False, default=""),
        raw=copy.deepcopy(dict(data)),
    )
    if card.inference.activation == "softmax" and len(card.labels) > 254 and card.dims == 2:
        f.fail("labels", "at most 254 labels are supported")
    return card


def load_card(path: Union[str, Path]) -> ModelCard:
    """Read and validate a card JSON file (raises ModelError if missing, not JSON or invalid)."""
    return card_from_dict(read_json(path, "model card", ModelError), source=str(path))


def save_card(card: ModelCard, path: Union[str, Path]) -> None:
    """Write ``card`` as pretty JSON to ``path`` (the caller handles atomicity)."""
    Path(path).write_text(json.dumps(card.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
