"""The Segmentation type: named, coloured, coded segments stored as layers of label values on one grid.

A :class:`Segmentation` holds ``layers``, an integer array ``(L, z, y, x)`` on one
:class:`~MedSegSuiteLib.volume.Grid`, and one :class:`Segment` record per segment
saying which ``layer`` it lives in and which ``value`` marks it there. Segments in
different layers may overlap; segments in one layer cannot (this is the layout of
Slicer's ``.seg.nrrd``). A label map is the one-layer case.

Converting to a label map (:meth:`Segmentation.to_label_map`) needs one label per
voxel, so overlapping segments are refused by default (``overlap="refuse"``), or
resolved with ``overlap="first"`` (the segment listed first wins) or ``"last"``
(the segment listed last wins, as if painted in order).

Each segment also has a ``label_value``: the value it gets in exported label maps
(by default its ``value``); readers set it from the file's label table or DICOM
segment number, and label matching (:meth:`Segmentation.with_labels`) sets it from a
model card's label table.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

from ..errors import InputError
from ..volume import Grid, Volume

if TYPE_CHECKING:
    from ..models.card import Label

__all__ = [
    "OVERLAP_MODES",
    "LabelMatch",
    "Segment",
    "Segmentation",
    "describe_grid",
    "match_labels",
]

log = logging.getLogger(__name__)

OVERLAP_MODES = ("refuse", "first", "last")
GRID_TOLERANCE_MM = 1e-3
_DEFAULT_COLOR = (128, 174, 128)
_GENERATED_NAME = re.compile(r"^(segment|label)[ _-]?\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class Segment:
    """One segment: identity, appearance, meaning, and where its voxels are stored.

    ``color`` is RGB 0-255; ``terminology`` is a card-form code dict (see
    :mod:`MedSegSuiteLib.io.label_table`) or None; ``layer`` indexes
    :attr:`Segmentation.layers` and ``value`` (1-65535) marks the segment's voxels in
    that layer; ``label_value`` is its value in exported label maps (None: ``value``);
    ``tags`` holds other key/value tags (Slicer segment tags); ``name_auto`` /
    ``color_auto`` say the name / colour were generated rather than chosen.
    """

    id: str
    name: str
    color: tuple[int, int, int] = _DEFAULT_COLOR
    terminology: Optional[dict[str, Any]] = None
    layer: int = 0
    value: int = 1
    label_value: Optional[int] = None
    tags: Mapping[str, str] = field(default_factory=dict)
    name_auto: bool = False
    color_auto: bool = False

    @property
    def export_value(self) -> int:
        """The value of this segment in label maps."""
        return int(self.label_value if self.label_value is not None else self.value)

    @property
    def has_generated_name(self) -> bool:
        """True when the name carries no meaning (``Segment_3``, ``Label 3``, ``3`` or flagged as generated)."""
        name = self.name.strip()
        return self.name_auto or not name or bool(_GENERATED_NAME.match(name)) or name == str(self.export_value)

    def type_code(self) -> Optional[tuple[str, str]]:
        """``(coding scheme, code value)`` of the terminology's type, or None."""
        code = (self.terminology or {}).get("type")
        return (str(code[0]).upper(), str(code[1])) if code else None

    def to_label(self, value: Optional[int] = None) -> Label:
        """The model-card :class:`~MedSegSuiteLib.models.card.Label` of this segment."""
        from ..models.card import Label

        terminology = dict(self.terminology) if self.terminology else None
        return Label(int(value if value is not None else self.export_value), self.name, tuple(self.color), terminology)


def describe_grid(grid: Grid) -> str:
    """One line naming shape, spacing, origin and (when not the identity) direction of ``grid``."""
    text = grid.describe()
    if not np.allclose(grid.direction, np.eye(3), atol=1e-6):
        rows = ",".join("(" + ",".join(f"{v:.3f}" for v in row) + ")" for row in np.asarray(grid.direction))
        text += f", direction={rows}"
    return text


def _check_overlap_mode(overlap: str) -> None:
    if overlap not in OVERLAP_MODES:
        raise InputError(f"overlap must be one of {', '.join(OVERLAP_MODES)}, got {overlap!r}")


def _corners(grid: Grid) -> np.ndarray:
    """The 8 LPS corners (mm) of the field of view of ``grid`` (outer voxel edges)."""
    n = np.array([grid.shape[2], grid.shape[1], grid.shape[0]], dtype=np.float64)
    corners = []
    for bits in range(8):
        index = np.array([(bits >> a) & 1 for a in range(3)], dtype=np.float64) * n - 0.5
        corners.append(grid.index_to_physical(index))
    return np.array(corners)


def _inside(points: np.ndarray, grid: Grid, tolerance_mm: float) -> bool:
    n = np.array([grid.shape[2], grid.shape[1], grid.shape[0]], dtype=np.float64)
    slack = tolerance_mm / np.asarray(grid.spacing)
    for point in points:
        index = grid.physical_to_index(point)
        if np.any(index < -0.5 - slack) or np.any(index > n - 0.5 + slack):
            return False
    return True


def same_region(a: Grid, b: Grid) -> bool:
    """True when both grids' fields of view coincide within one voxel of the coarser grid."""
    tolerance = max(max(a.spacing), max(b.spacing))
    return _inside(_corners(a), b, tolerance) and _inside(_corners(b), a, tolerance)


def _value_dtype(max_value: int) -> np.dtype:
    return np.dtype(np.uint8) if max_value <= 255 else np.dtype(np.uint16)


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Segments stored as label-value layers on one grid (see the module docstring).

    ``layers`` has shape ``(L, z, y, x)`` (L >= 1) and an unsigned integer dtype;
    construction validates that every segment's layer exists, that ids are unique
    and that no two segments share a (layer, value) pair, raising
    :class:`~MedSegSuiteLib.errors.InputError` otherwise.
    """

    grid: Grid
    layers: np.ndarray
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        layers = np.asarray(self.layers)
        if layers.ndim == 3:
            layers = layers[None]
        if layers.ndim != 4 or tuple(layers.shape[1:]) != self.grid.shape:
            raise InputError(f"segmentation layers of shape {layers.shape} do not fit grid shape {self.grid.shape}")
        if layers.shape[0] < 1:
            raise InputError("a segmentation needs at least one layer")
        if not np.issubdtype(layers.dtype, np.integer):
            raise InputError(f"segmentation layers must hold integers, got {layers.dtype}")
        segments = tuple(self.segments)
        ids, slots = set(), set()
        for segment in segments:
            if segment.id in ids:
                raise InputError(f"segment id {segment.id!r} is used twice")
            if not 0 <= segment.layer < layers.shape[0]:
                raise InputError(f"segment {segment.name!r} is in layer {segment.layer} of {layers.shape[0]}")
            if not 1 <= segment.value <= 65535:
                raise InputError(f"segment {segment.name!r} has value {segment.value}; values must be 1-65535")
            if (segment.layer, segment.value) in slots:
                raise InputError(f"two segments use value {segment.value} in layer {segment.layer}")
            ids.add(segment.id)
            slots.add((segment.layer, segment.value))
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "segments", segments)

    # -- access ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    def mask(self, segment: Segment | str) -> np.ndarray:
        """Boolean ``(z, y, x)`` mask of a segment (given as record or id)."""
        if isinstance(segment, str):
            segment = self.segment(segment)
        return self.layers[segment.layer] == segment.value

    def segment(self, key: str) -> Segment:
        """The segment with this id (or, failing that, this name, case-insensitively)."""
        for segment in self.segments:
            if segment.id == key:
                return segment
        for segment in self.segments:
            if segment.name.lower() == key.lower():
                return segment
        raise KeyError(key)

    def overlaps(self, limit: int = 3) -> list[tuple[str, str, int]]:
        """Up to ``limit`` pairs of overlapping segments as ``(name, name, shared voxels)``."""
        if self.layers.shape[0] < 2:
            return []
        covered = (self.layers != 0).sum(axis=0)
        if covered.max(initial=0) < 2:
            return []
        multi = covered > 1
        found = []
        for index, first in enumerate(self.segments):
            mask_a = self.mask(first) & multi
            if not mask_a.any():
                continue
            for second in self.segments[index + 1 :]:
                if second.layer == first.layer:
                    continue
                shared = int((mask_a & self.mask(second)).sum())
                if shared:
                    found.append((first.name, second.name, shared))
                    if len(found) >= limit:
                        return found
        return found

    def labels(self) -> tuple[Label, ...]:
        """The label table of :meth:`to_label_map`'s output (value, name, colour, terminology), in segment order."""
        values = self._export_values()
        return tuple(segment.to_label(value) for segment, value in zip(self.segments, values))

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_label_map(
        cls, volume: Volume, labels: Optional[Sequence[Label]] = None, source: str = "label map"
    ) -> Segmentation:
        """A one-layer segmentation of an integer label map.

        Without ``labels`` every non-zero value ``v`` becomes segment ``Segment_v``
        (generated name and colour). With a label table every listed label becomes a
        segment (empty ones included) and a value the table does not list is refused.
        """
        array = volume.array
        if array.ndim == 4:
            raise InputError(f"{source} has {array.shape[0]} channels; a label map has one")
        if np.issubdtype(array.dtype, np.floating):
            if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
                raise InputError(f"{source} holds fractions, NaN or infinity; a label map holds whole numbers")
        elif not np.issubdtype(array.dtype, np.integer):
            raise InputError(f"{source} has voxel type {array.dtype}; a label map holds integers")
        present = [int(v) for v in np.unique(array) if v != 0]
        if present and (present[0] < 0 or present[-1] > 65535):
            raise InputError(f"{source} holds values outside 0-65535 ({present[0]}..{present[-1]})")
        if labels is None:
            segments = [
                Segment(f"Segment_{v}", f"Segment_{v}", _generated_color(v), None, 0, v, None, {}, True, True)
                for v in present
            ]
            max_value = present[-1] if present else 1
        else:
            listed = {label.value for label in labels}
            missing = [v for v in present if v not in listed]
            if missing:
                raise InputError(
                    f"{source} holds value(s) {', '.join(map(str, missing[:10]))} that its label table does not list "
                    f"(it lists {', '.join(str(v) for v in sorted(listed)) or 'nothing'})"
                )
            segments = [
                Segment(
                    f"Segment_{label.value}",
                    label.name,
                    tuple(int(c) for c in label.color),  # type: ignore[arg-type]
                    dict(label.terminology) if label.terminology else None,
                    0,
                    int(label.value),
                )
                for label in sorted(labels, key=lambda item: item.value)
            ]
            max_value = max([1] + [label.value for label in labels])
        layers = np.ascontiguousarray(array, dtype=_value_dtype(max_value))[None]
        return cls(volume.grid, layers, tuple(segments))

    @classmethod
    def from_masks(cls, grid: Grid, masks: Sequence[np.ndarray], segments: Sequence[Segment]) -> Segmentation:
        """Pack binary ``(z, y, x)`` masks into as few layers as keep them apart.

        Each segment goes to the first layer where it overlaps nothing, keeping its
        ``value`` there when free (else the next free value); ``layer`` and ``value``
        of the given records are replaced.
        """
        if len(masks) != len(segments):
            raise InputError(f"{len(masks)} masks for {len(segments)} segments")
        layers: list[np.ndarray] = []
        used: list[set[int]] = []
        placed = []
        max_value = max([1] + [s.value for s in segments] + [len(segments)])
        dtype = _value_dtype(max_value + len(segments))
        for mask, segment in zip(masks, segments):
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != grid.shape:
                raise InputError(f"mask of segment {segment.name!r} has shape {mask.shape}, grid is {grid.shape}")
            index = next((i for i, layer in enumerate(layers) if not (mask & (layer != 0)).any()), None)
            if index is None:
                layers.append(np.zeros(grid.shape, dtype=dtype))
                used.append(set())
                index = len(layers) - 1
            value = segment.value if segment.value not in used[index] else max(used[index]) + 1
            layers[index][mask] = value
            used[index].add(value)
            label_value = segment.label_value if segment.label_value is not None else segment.value
            placed.append(dataclasses.replace(segment, layer=index, value=value, label_value=label_value))
        if not layers:
            layers.append(np.zeros(grid.shape, dtype=dtype))
        return cls(grid, np.stack(layers), tuple(placed))

    # -- conversion -----------------------------------------------------------------------
    def _export_values(self) -> list[int]:
        values = [segment.export_value for segment in self.segments]
        if len(set(values)) != len(values) or any(not 1 <= v <= 65535 for v in values):
            log.info("segment label values collide across layers; numbering the segments 1..%d", len(values))
            values = list(range(1, len(values) + 1))
        return values

    def to_label_map(self, overlap: str = "refuse") -> tuple[Volume, tuple[Label, ...]]:
        """One label map on this grid (uint8, or uint16 above 255) and its label table.

        ``overlap``: ``"refuse"`` raises InputError naming overlapping segments;
        ``"first"`` gives a shared voxel to the segment listed first, ``"last"`` to
        the one listed last.
        """
        _check_overlap_mode(overlap)
        pairs = self.overlaps()
        if pairs and overlap == "refuse":
            listing = "; ".join(f"{a!r} and {b!r} share {n} voxels" for a, b, n in pairs)
            raise InputError(
                f"segments overlap ({listing}) and a label map holds one label per voxel: export to .seg.nrrd, which "
                "keeps overlaps, or choose which segment wins with --overlap first|last"
            )
        values = self._export_values()
        out = np.zeros(self.grid.shape, dtype=_value_dtype(max([1] + values)))
        order = list(zip(self.segments, values))
        if overlap == "first":
            order.reverse()
        if self.layers.shape[0] == 1 and all(s.value == v for s, v in order):
            out[...] = self.layers[0]
            known = np.isin(out, values)
            out[~known] = 0
        else:
            for segment, value in order:
                out[self.mask(segment)] = value
        labels = tuple(segment.to_label(value) for segment, value in zip(self.segments, values))
        return Volume.on_grid(out, self.grid), labels

    def on_grid(self, target: Grid, resample: bool = False, what: str = "the segmentation") -> Segmentation:
        """This segmentation on ``target``: as is when the grids agree within 1e-3 mm, else resampled.

        A segmentation cropped on ``target``'s own lattice (same spacing and
        direction, origin on a voxel of ``target``: what Slicer writes for segments
        cropped to their extent) and lying within it is padded back with zeros, not
        resampled. Resampling (nearest neighbour, layer
        by layer) happens only with ``resample`` and only when both grids cover the
        same physical region; otherwise InputError names both grids.
        """
        if self.grid.same_as(target, atol=GRID_TOLERANCE_MM):
            return dataclasses.replace(self, grid=target)
        padded = self._padded_onto(target, what)
        if padded is not None:
            return padded
        if not resample:
            raise InputError(
                f"{what}'s grid differs from the reference volume's: {what} has {describe_grid(self.grid)}; "
                f"the reference has {describe_grid(target)}; pass --resample to resample it (nearest neighbour)"
            )
        if not same_region(self.grid, target):
            raise InputError(
                f"{what} does not cover the same region as the reference volume, so it is not resampled: {what} has "
                f"{describe_grid(self.grid)}; the reference has {describe_grid(target)}"
            )
        from ..geometry import resample as resample_array

        layers = np.stack([resample_array(layer, self.grid, target, order=0) for layer in self.layers])
        log.info("resampled %s (nearest neighbour) onto %s", what, target.describe())
        return Segmentation(target, layers.astype(self.layers.dtype, copy=False), self.segments)

    def _padded_onto(self, target: Grid, what: str) -> Optional[Segmentation]:
        """This segmentation padded onto ``target`` when it is a crop of ``target``'s lattice, else None."""
        source = self.grid
        if not np.allclose(source.spacing, target.spacing, rtol=0, atol=GRID_TOLERANCE_MM) or not np.allclose(
            source.direction, target.direction, rtol=0, atol=1e-4
        ):
            return None
        offset_xyz = target.physical_to_index(source.origin)
        start_xyz = np.round(offset_xyz)
        spacing = np.asarray(target.spacing, dtype=np.float64)
        if np.any(np.abs(offset_xyz - start_xyz) * spacing > GRID_TOLERANCE_MM):
            return None
        start = start_xyz[::-1].astype(int)  # z, y, x
        stop = start + np.asarray(source.shape)
        if np.any(start < 0) or np.any(stop > np.asarray(target.shape)):
            return None  # not a crop of the reference: it reaches beyond it
        layers = np.zeros((self.layers.shape[0], *target.shape), dtype=self.layers.dtype)
        layers[(slice(None), *(slice(int(a), int(b)) for a, b in zip(start, stop)))] = self.layers
        log.info("padded %s from %s onto the reference grid %s", what, source.describe(), target.describe())
        return Segmentation(target, layers, self.segments)

    def with_labels(self, card_labels: Sequence[Label], by_value: str = "unnamed") -> Segmentation:
        """Segments renamed, recoloured, coded and numbered after the matching labels of a model's table.

        Matching follows :func:`match_labels`; unmatched segments raise InputError
        listing them. Layers and voxels are unchanged.
        """
        matches = match_labels(self.segments, card_labels, by_value=by_value)
        segments = []
        for match in matches:
            label = match.label
            segments.append(
                dataclasses.replace(
                    match.segment,
                    name=label.name,
                    color=tuple(int(c) for c in label.color),
                    terminology=dict(label.terminology) if label.terminology else match.segment.terminology,
                    label_value=int(label.value),
                    name_auto=False,
                    color_auto=False,
                )
            )
        return dataclasses.replace(self, segments=tuple(segments))


def _generated_color(value: int) -> tuple[int, int, int]:
    """A stable, well-separated colour for label value ``value`` (golden-angle hues)."""
    import colorsys

    hue = (value * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.9)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


@dataclass(frozen=True)
class LabelMatch:
    """A segment, the model label it matched and how (``"name"``, ``"type code"`` or ``"value"``)."""

    segment: Segment
    label: Label
    how: str


def match_labels(
    segments: Sequence[Segment], card_labels: Sequence[Label], by_value: str = "unnamed"
) -> list[LabelMatch]:
    """Match every segment to a model label: by name (case-insensitive), then terminology type code, then value.

    Each stage only considers labels no earlier match took. ``by_value``:
    ``"unnamed"`` (default) matches by value only segments whose names carry no
    meaning (``Segment_3``, generated names), so a named segment is never silently
    relabelled; ``"always"`` matches any remaining segment by value; ``"never"``
    disables it. Raises InputError listing every unmatched segment name and the
    model's label names, or naming two segments that matched one label.
    """
    if by_value not in ("unnamed", "always", "never"):
        raise InputError(f"by_value must be unnamed, always or never, got {by_value!r}")
    if not card_labels:
        raise InputError("the model's label table is empty")
    found: dict[int, LabelMatch] = {}
    taken: dict[int, str] = {}

    def take(index: int, label: Label, how: str) -> None:
        if label.value in taken:
            raise InputError(
                f"segments {taken[label.value]!r} and {segments[index].name!r} both match model label "
                f"{label.value} {label.name!r}; rename or remove one"
            )
        taken[label.value] = segments[index].name
        found[index] = LabelMatch(segments[index], label, how)

    by_name = {label.name.strip().lower(): label for label in card_labels}
    for index, segment in enumerate(segments):
        label = by_name.get(segment.name.strip().lower())
        if label is not None:
            take(index, label, "name")
    by_code: dict[tuple[str, str], Label] = {}
    for label in card_labels:
        code = (label.terminology or {}).get("type")
        if code:
            by_code.setdefault((str(code[0]).upper(), str(code[1])), label)
    for index, segment in enumerate(segments):
        code = segment.type_code()
        if index in found or code is None:
            continue
        label = by_code.get(code)
        if label is not None and label.value not in taken:
            take(index, label, "type code")
    if by_value != "never":
        by_number = {label.value: label for label in card_labels}
        for index, segment in enumerate(segments):
            if index in found or (by_value == "unnamed" and not segment.has_generated_name):
                continue
            label = by_number.get(segment.export_value)
            if label is not None and label.value not in taken:
                take(index, label, "value")
    missing = [segment for index, segment in enumerate(segments) if index not in found]
    if missing:
        unnamed = [str(s.export_value) for s in missing if s.has_generated_name]
        named = [repr(s.name) for s in missing if not s.has_generated_name]
        what = ([f"segment(s) {', '.join(named)}"] if named else []) + (
            [f"label value(s) {', '.join(unnamed)}"] if unnamed else []
        )
        raise InputError(
            f"{' and '.join(what)} match no label of the model "
            f"({', '.join(f'{label.value}:{label.name}' for label in card_labels)}); rename or renumber them to a "
            "model label, or remove them"
        )
    return [found[index] for index in range(len(segments))]
