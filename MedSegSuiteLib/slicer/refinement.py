"""The GUI side of refinement steps: which segments a HiDiff model refines, the user's edits, and undo.

Refinement works on whatever segmentation is current, made by a model or painted by
hand. :func:`match_segments` pairs its segments with the HiDiff model's labels (by
name, then terminology type code, then the ``MedSegSuite.labelValue`` tag of segments
that model made); the other segments are left untouched and reported.

"Keep my edits" needs to know what the user changed since the last AI result.
:class:`AIResults` remembers, per segmentation node and segment, the mask the last
segmentation or refinement produced (in memory, one bit per voxel); the user's
edits are the voxels whose current label differs from it. A segment with no AI
result counts as painted by hand: its labelled voxels are the user's.

:class:`UndoStack` keeps copies of a segmentation as it was before each refinement
(a few levels), so **Undo refinement** restores it exactly.

A refinement with an ensemble (several chains) also shows where the chains disagree:
:func:`show_uncertainty` replaces the segment "Uncertain (refinement)" (tagged
``MedSegSuite.role`` = ``uncertainty``) with the voxels whose uncertainty (the chains'
standard deviation, 0 to 0.5) is above :data:`UNCERTAIN_THRESHOLD`. It is never a model
label: :func:`match_segments` skips it, so later refinements, finetuning and export
leave it out, and a refinement without an ensemble removes it (it would describe an
older result).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import slicer

from ..errors import InputError
from ..io.label_table import parse_terminology
from ..volume import Grid
from .segmentations import (
    ROLE_UNCERTAINTY,
    TAG_LABEL_VALUE,
    TAG_MODEL,
    TAG_ROLE,
    is_uncertainty_segment,
    label_segment_ids,
    segment_ids,
    segment_mask,
    segment_tag,
    segment_terminology,
    set_segment_mask,
)
from .volumes import grid_from_node

__all__ = [
    "UNCERTAIN_COLOR",
    "UNCERTAIN_SEGMENT_NAME",
    "UNCERTAIN_THRESHOLD",
    "AIResults",
    "RefinePlan",
    "SegmentMatch",
    "UndoStack",
    "apply_refinement",
    "describe_left_untouched",
    "match_segments",
    "plan_refinement",
    "remove_uncertainty",
    "show_uncertainty",
]

log = logging.getLogger(__name__)

#: The name of the segment that shows where a refinement's ensemble chains disagree.
UNCERTAIN_SEGMENT_NAME = "Uncertain (refinement)"
#: Voxels whose uncertainty (the chains' standard deviation: 0 all agree, 0.5 half say yes and half no) is above
#: this go into that segment; for yes/no answers it means "not (nearly) all chains agree".
UNCERTAIN_THRESHOLD = 0.2
#: Its colour (RGB 0-1): magenta, which no bundled model's label uses.
UNCERTAIN_COLOR = (1.0, 0.0, 1.0)


@dataclass(frozen=True)
class SegmentMatch:
    """A segment of the node and the model label it is refined as (``how``: name, type code or label value)."""

    segment_id: str
    name: str
    label: Any
    how: str


def _type_code(segment: Any) -> Optional[tuple[str, str]]:
    try:
        code = parse_terminology(segment_terminology(segment)).get("type")
    except InputError:
        return None
    return (str(code[0]).upper(), str(code[1])) if code else None


def match_segments(segmentation_node: Any, card: Any) -> tuple[list[SegmentMatch], list[str]]:
    """Pair the node's segments with ``card``'s labels; returns ``(matches, reasons for the others)``.

    A segment matches a label with the same name (case-insensitive), else with the
    same terminology type code, else with the same ``MedSegSuite.labelValue`` tag when
    the segment's ``MedSegSuite.model`` tag names this model. Each label takes one
    segment (the first in the list); every other segment is reported with a reason.
    The uncertainty segment of a refinement (see :func:`show_uncertainty`) is neither
    matched nor reported: it is no label.
    """
    segmentation = segmentation_node.GetSegmentation()
    labels = list(card.labels)
    by_name = {label.name.strip().lower(): label for label in labels}
    by_code: dict[tuple[str, str], Any] = {}
    for label in labels:
        code = (label.terminology or {}).get("type")
        if code:
            by_code.setdefault((str(code[0]).upper(), str(code[1])), label)
    by_value = {label.value: label for label in labels}
    matches: list[SegmentMatch] = []
    unknown: list[str] = []
    taken: dict[int, str] = {}
    for segment_id in label_segment_ids(segmentation_node):
        segment = segmentation.GetSegment(segment_id)
        name = segment.GetName()
        found, how = by_name.get(name.strip().lower()), "name"
        if found is None:
            code = _type_code(segment)
            found, how = (by_code.get(code) if code else None), "type code"
        if found is None and segment_tag(segment, TAG_MODEL).split(" ")[0] == card.id:
            value = segment_tag(segment, TAG_LABEL_VALUE)
            found, how = (by_value.get(int(value)) if value.isdigit() else None), "label value"
        if found is None:
            unknown.append(f"{name!r} (no label of {card.name} matches it)")
        elif found.value in taken:
            unknown.append(f"{name!r} (it matches {found.name!r} like {taken[found.value]!r})")
        else:
            taken[found.value] = name
            matches.append(SegmentMatch(segment_id, name, found, how))
    return matches, unknown


def _pack(mask: np.ndarray) -> bytes:
    return np.packbits(np.asarray(mask, dtype=bool).ravel()).tobytes()


def _unpack(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    count = int(np.prod(shape))
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count).astype(bool).reshape(shape)


class AIResults:
    """The last AI result of each segment, per segmentation node (kept in memory, one bit per voxel).

    Entries are keyed by node ID and segment ID and remember the voxel grid they were
    made on; a request on another grid finds nothing.
    """

    def __init__(self) -> None:
        self._results: dict[str, tuple[Grid, dict[str, bytes]]] = {}

    def remember(self, node: Any, grid: Grid, masks: dict[str, np.ndarray], replace: bool = False) -> None:
        """Record ``masks`` (segment id -> ``[k, j, i]`` mask on ``grid``); ``replace`` forgets the node's others."""
        previous = self._results.get(node.GetID())
        kept = {} if replace or previous is None or not previous[0].same_as(grid) else dict(previous[1])
        kept.update({segment_id: _pack(mask) for segment_id, mask in masks.items()})
        self._results[node.GetID()] = (grid, kept)

    def mask(self, node: Any, segment_id: str, grid: Grid) -> Optional[np.ndarray]:
        """The segment's last AI result on ``grid``, or None when there is none (or it was made on another grid)."""
        entry = self._results.get(node.GetID())
        if entry is None or not entry[0].same_as(grid) or segment_id not in entry[1]:
            return None
        return _unpack(entry[1][segment_id], grid.shape)

    def snapshot(self, node: Any) -> Optional[tuple[Grid, dict[str, bytes]]]:
        """The node's entries as they are now (for undo)."""
        entry = self._results.get(node.GetID())
        return (entry[0], dict(entry[1])) if entry is not None else None

    def restore(self, node: Any, snapshot: Optional[tuple[Grid, dict[str, bytes]]]) -> None:
        if snapshot is None:
            self._results.pop(node.GetID(), None)
        else:
            self._results[node.GetID()] = (snapshot[0], dict(snapshot[1]))

    def forget(self, node: Optional[Any] = None) -> None:
        """Forget one node's results, or everything (``node=None``, e.g. when the scene closes)."""
        if node is None:
            self._results.clear()
        else:
            self._results.pop(node.GetID(), None)

    def prune(self, exists: Callable[[str], bool]) -> None:
        """Forget the results of nodes for whose ID ``exists`` is false (removed from the scene)."""
        for node_id in [key for key in self._results if not exists(key)]:
            del self._results[node_id]


class UndoStack:
    """Copies of segmentations taken before refinements, newest last, at most ``levels`` per node."""

    def __init__(self, levels: int = 5) -> None:
        if levels < 1:
            raise ValueError("levels must be at least 1")
        self.levels = levels
        self._stacks: dict[str, list[tuple[Any, Any]]] = {}

    def push(self, node: Any, extra: Any = None) -> None:
        """Remember the node's segmentation as it is now (and ``extra``, given back by :meth:`pop`)."""
        copy = slicer.vtkSegmentation()
        copy.DeepCopy(node.GetSegmentation())
        stack = self._stacks.setdefault(node.GetID(), [])
        stack.append((copy, extra))
        del stack[: -self.levels]

    def can_undo(self, node: Optional[Any]) -> bool:
        return node is not None and bool(self._stacks.get(node.GetID()))

    def pop(self, node: Any) -> Any:
        """Put the node's segmentation back as it was at the last :meth:`push`; returns that push's ``extra``."""
        stack = self._stacks.get(node.GetID())
        if not stack:
            raise InputError(f"there is no refinement of {node.GetName()!r} to undo")
        copy, extra = stack.pop()
        was_modifying = node.StartModify()
        try:
            node.GetSegmentation().DeepCopy(copy)
        finally:
            node.EndModify(was_modifying)
        return extra

    def forget(self, node: Optional[Any] = None) -> None:
        if node is None:
            self._stacks.clear()
        else:
            self._stacks.pop(node.GetID(), None)

    def prune(self, exists: Callable[[str], bool]) -> None:
        """Forget the copies of nodes for whose ID ``exists`` is false (removed from the scene)."""
        for node_id in [key for key in self._stacks if not exists(key)]:
            del self._stacks[node_id]


@dataclass
class RefinePlan:
    """What a refinement job sends and how its result comes back.

    ``labels`` is the label map (model label values) of the matched segments on the
    volume's grid, ``keep`` the voxels to hold (or None), ``current`` the matched
    segments' masks before the job (to count changes), ``unknown`` the segments left
    untouched (with reasons), ``hand_painted`` the matched segments without an AI result.
    """

    matches: list[SegmentMatch]
    unknown: list[str]
    labels: np.ndarray
    keep: Optional[np.ndarray]
    current: dict[str, np.ndarray]
    hand_painted: list[str]


def plan_refinement(
    segmentation_node: Any, volume_node: Any, card: Any, ai_results: AIResults, keep_edits: bool = True
) -> RefinePlan:
    """Read the segments ``card`` can refine as one label map on the volume's grid, and the voxels to keep.

    Raises InputError (nothing is sent) when no segment matches a label of the model
    or when the matched segments are all empty.
    """
    matches, unknown = match_segments(segmentation_node, card)
    if not matches:
        names = ", ".join(label.name for label in card.labels)
        raise InputError(
            f"no segment of {segmentation_node.GetName()!r} matches a label of {card.name} ({names}); "
            "rename the segment to refine to one of these names"
        )
    grid = grid_from_node(volume_node)
    dtype = np.uint8 if max(label.value for label in card.labels) <= 255 else np.uint16
    labels = np.zeros(grid.shape, dtype=dtype)
    keep = np.zeros(grid.shape, dtype=bool) if keep_edits else None
    current: dict[str, np.ndarray] = {}
    hand_painted: list[str] = []
    for match in matches:
        mask = segment_mask(segmentation_node, match.segment_id, volume_node)
        current[match.segment_id] = mask
        labels[mask] = match.label.value
        if keep is not None:
            before = ai_results.mask(segmentation_node, match.segment_id, grid)
            if before is None:
                hand_painted.append(match.name)
                keep |= mask
            else:
                keep |= mask != before
    if not labels.any():
        names = ", ".join(repr(match.name) for match in matches)
        raise InputError(f"{names} {'is' if len(matches) == 1 else 'are'} empty: segment or paint first, then refine")
    return RefinePlan(matches, unknown, labels, keep, current, hand_painted)


def apply_refinement(
    segmentation_node: Any, volume_node: Any, plan: RefinePlan, refined: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Replace the matched segments' content with the refined label map; other segments stay as they are.

    Returns the new masks and the number of changed voxels, by segment id. Segments
    whose voxels did not change are not touched. Raises InputError (and changes
    nothing) when a matched segment was removed or edited while the job ran.
    """
    masks: dict[str, np.ndarray] = {}
    changed: dict[str, int] = {}
    for match in plan.matches:
        if segmentation_node.GetSegmentation().GetSegment(match.segment_id) is None:
            raise InputError(f"segment {match.name!r} was removed while refining; the result was discarded")
        if not np.array_equal(
            segment_mask(segmentation_node, match.segment_id, volume_node), plan.current[match.segment_id]
        ):
            raise InputError(f"segment {match.name!r} was edited while refining; the result was discarded: run again")
    was_modifying = segmentation_node.StartModify()
    try:
        for match in plan.matches:
            mask = refined == match.label.value
            masks[match.segment_id] = mask
            changed[match.segment_id] = int((mask != plan.current[match.segment_id]).sum())
            if changed[match.segment_id]:
                set_segment_mask(segmentation_node, match.segment_id, mask, volume_node)
    finally:
        segmentation_node.EndModify(was_modifying)
    return masks, changed


def describe_left_untouched(unknown: Sequence[str]) -> str:
    """A sentence naming the segments a refinement did not touch ("" when there are none)."""
    return f" Left untouched: {'; '.join(unknown)}." if unknown else ""


def remove_uncertainty(segmentation_node: Any) -> int:
    """Remove the node's uncertainty segments (see :func:`show_uncertainty`); returns how many there were."""
    segmentation = segmentation_node.GetSegmentation()
    found = [sid for sid in segment_ids(segmentation_node) if is_uncertainty_segment(segmentation.GetSegment(sid))]
    for segment_id in found:
        segmentation.RemoveSegment(segment_id)
    return len(found)


def show_uncertainty(
    segmentation_node: Any,
    volume_node: Any,
    uncertainty: np.ndarray,
    threshold: float = UNCERTAIN_THRESHOLD,
    name: str = UNCERTAIN_SEGMENT_NAME,
) -> tuple[str, int]:
    """Replace the node's uncertainty segment with the voxels whose ``uncertainty`` is above ``threshold``.

    ``uncertainty`` is ``[k, j, i]`` on the volume's grid (a refinement's per-voxel
    standard deviation of its chains). The new segment is named ``name``, coloured
    :data:`UNCERTAIN_COLOR` and tagged ``MedSegSuite.role`` = ``uncertainty``, so it is
    never taken for a model label; it is added even when no voxel is uncertain (then it
    is empty). Other segments keep their voxels (overlaps go to separate layers).
    Returns ``(segment id, number of uncertain voxels)``; raises InputError (and
    changes nothing) when the map does not fit the volume.
    """
    grid = grid_from_node(volume_node)
    uncertainty = np.asarray(uncertainty)
    if uncertainty.shape != grid.shape:
        raise InputError(
            f"the uncertainty map's shape {uncertainty.shape} does not fit volume {volume_node.GetName()!r} "
            f"{grid.shape}; run again"
        )
    mask = uncertainty > threshold
    was_modifying = segmentation_node.StartModify()
    try:
        remove_uncertainty(segmentation_node)
        segmentation = segmentation_node.GetSegmentation()
        segment_id = segmentation.AddEmptySegment("", name, list(UNCERTAIN_COLOR))
        segmentation.GetSegment(segment_id).SetTag(TAG_ROLE, ROLE_UNCERTAINTY)
        if mask.any():
            set_segment_mask(segmentation_node, segment_id, mask, volume_node)
    finally:
        segmentation_node.EndModify(was_modifying)
    return segment_id, int(mask.sum())
