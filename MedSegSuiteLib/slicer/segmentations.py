"""Label maps -> segmentation nodes with named, coloured, terminology-coded segments.

A result becomes one segment per model-card label (empty labels included, so the user
can paint them), with the label's name and colour, its terminology codes in Slicer's
string form, and tags naming the model. The input volume is the segmentation's
reference geometry, its parent transform is the input's, it sits next to the input in
the subject hierarchy (the input's study for DICOM data), and it is shown in the slice
views.

Terminology strings come from :func:`MedSegSuiteLib.io.label_table.terminology_string`.

A refinement with an ensemble may add a segment that shows where its chains disagree
(tagged ``MedSegSuite.role`` = ``uncertainty``, see :mod:`.refinement`). It is a
display aid, not a label of any model: :func:`label_segment_ids` leaves it out, and
everything that reads segments as model labels (refinement, finetuning, export) uses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import InputError
from ..io.label_table import terminology_string
from ..io.seg_nrrd import ROLE_UNCERTAINTY, TAG_LABEL_VALUE, TAG_MODEL, TAG_ROLE
from .volumes import grid_from_node

if TYPE_CHECKING:
    from ..models.card import Label

__all__ = [
    "ROLE_UNCERTAINTY",
    "TAG_INPUT_WARNINGS",
    "TAG_LABEL_VALUE",
    "TAG_MODEL",
    "TAG_ROLE",
    "create_segmentation_node",
    "frame_matrix",
    "geometry_matches",
    "is_uncertainty_segment",
    "label_segment_ids",
    "place_next_to",
    "record_input_warnings",
    "remove_node",
    "same_frame",
    "segment_ids",
    "segment_labelmap",
    "segment_mask",
    "segment_tag",
    "segment_terminology",
    "SegmentationBackup",
    "set_segment_mask",
    "set_segment_terminology",
    "write_labels",
]

#: Node attribute: how the input was far from what the model was trained on, sentences joined by " | "
#: (the command line records the same in a .seg.nrrd header or a label table).
TAG_INPUT_WARNINGS = "MedSegSuite.inputWarnings"
WARNINGS_SEPARATOR = " | "


def create_segmentation_node(reference_node: Any, name: Optional[str] = None, scene: Optional[Any] = None) -> Any:
    """A new, empty segmentation node with display nodes, named after ``reference_node`` by default."""
    scene = scene or reference_node.GetScene() or slicer.mrmlScene
    base = name or f"{reference_node.GetName()} segmentation"
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(base))
    node.CreateDefaultDisplayNodes()
    return node


def _oriented_mask(mask: np.ndarray, ijk_to_ras: vtk.vtkMatrix4x4) -> Any:
    image = slicer.vtkOrientedImageData()
    k, j, i = mask.shape
    image.SetDimensions(i, j, k)
    image.SetImageToWorldMatrix(ijk_to_ras)
    scalars = numpy_support.numpy_to_vtk(
        np.ascontiguousarray(mask, dtype=np.uint8).ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR
    )
    image.GetPointData().SetScalars(scalars)
    return image


def segment_ids(segmentation_node: Any) -> list[str]:
    """The ids of the node's segments, in display order."""
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def is_uncertainty_segment(segment: Any) -> bool:
    """True for the segment a refinement ensemble added to show where its chains disagree (never a model label)."""
    return segment is not None and segment_tag(segment, TAG_ROLE) == ROLE_UNCERTAINTY


def label_segment_ids(segmentation_node: Any) -> list[str]:
    """The ids of the segments that may stand for model labels, in display order: all but uncertainty segments."""
    segmentation = segmentation_node.GetSegmentation()
    return [sid for sid in segment_ids(segmentation_node) if not is_uncertainty_segment(segmentation.GetSegment(sid))]


def segment_tag(segment: Any, key: str) -> str:
    """A segment tag's value ("" when the segment has no such tag)."""
    value = vtk.reference("")
    return str(value.get()) if segment.GetTag(key, value) else ""


def segment_terminology(segment: Any) -> str:
    """A segment's terminology string ("" when it has none).

    Read through the tag API, which every Slicer 5.x has (``vtkSegment.GetTerminology``
    only exists from Slicer 5.10 on).
    """
    return segment_tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName())


def set_segment_terminology(segment: Any, terminology: str) -> None:
    """Set a segment's terminology string (Slicer's seven ``~``-separated fields) through the tag API.

    Slicer 5.8 stores and parses exactly this string under the ``TerminologyEntry`` tag
    (``vtkSlicerTerminologiesModuleLogic::DeserializeTerminologyEntry``);
    ``vtkSegment.SetTerminology`` (Slicer 5.10+) writes the same tag.
    """
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)


def _parent(node: Any) -> Any:
    return node.GetParentTransformNode() if node is not None else None


def same_frame(node: Any, other: Any) -> bool:
    """True when both nodes sit under the same parent transform (or both under none): same local coordinates."""
    a, b = _parent(node), _parent(other)
    return (a.GetID() if a is not None else None) == (b.GetID() if b is not None else None)


def frame_matrix(from_node: Any, to_node: Any) -> vtk.vtkMatrix4x4:
    """The matrix from ``from_node``'s local coordinates to ``to_node``'s (identity when they share a frame).

    Raises InputError when a non-linear transform lies between them (the voxels could
    not be compared without warping): harden the transform or put both nodes under it.
    """
    matrix = vtk.vtkMatrix4x4()
    if same_frame(from_node, to_node):
        return matrix
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(_parent(from_node), _parent(to_node), matrix):
        raise InputError(
            f"{from_node.GetName()!r} and {to_node.GetName()!r} are under different transforms and one is not "
            "linear; put both under the same transform or harden it (Transforms module)"
        )
    return matrix


def segment_labelmap(segmentation_node: Any, segment_id: str, reference_node: Any) -> Optional[Any]:
    """A copy of a segment's binary labelmap placed in ``reference_node``'s local coordinates, or None if empty.

    The labelmap is read in the segmentation's own coordinates (parent transform not
    applied) and moved into the reference node's frame by :func:`frame_matrix`, so it
    lines up with the reference's IJK-to-RAS matrix whatever transforms the two nodes
    are under.
    """
    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, labelmap, False
    ):
        return None
    if not same_frame(segmentation_node, reference_node):
        to_reference = frame_matrix(segmentation_node, reference_node)
        image_to_local, image_to_reference = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(image_to_local)
        vtk.vtkMatrix4x4.Multiply4x4(to_reference, image_to_local, image_to_reference)
        labelmap.SetImageToWorldMatrix(image_to_reference)
    return labelmap


def segment_mask(segmentation_node: Any, segment_id: str, reference_node: Any) -> np.ndarray:
    """A segment's voxels ``[k, j, i]`` (bool) on ``reference_node``'s voxel grid; adds nothing to the scene.

    The segment's binary labelmap is resampled (nearest neighbour) onto the reference
    grid when its own geometry differs; parent transforms of both nodes are taken into
    account (see :func:`segment_labelmap`); an empty segment gives an all-false mask.
    """
    i, j, k = reference_node.GetImageData().GetDimensions()
    labelmap = segment_labelmap(segmentation_node, segment_id, reference_node)
    if labelmap is None:
        return np.zeros((k, j, i), dtype=bool)
    reference = slicer.vtkOrientedImageData()
    matrix = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(matrix)
    reference.SetImageToWorldMatrix(matrix)
    reference.SetExtent(reference_node.GetImageData().GetExtent())
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled)
    scalars = resampled.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros((k, j, i), dtype=bool)
    values = numpy_support.vtk_to_numpy(scalars).reshape(k, j, i)
    label_value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    return values == label_value


def set_segment_mask(segmentation_node: Any, segment_id: str, mask: np.ndarray, reference_node: Any) -> None:
    """Replace a segment's voxels with ``mask`` (``[k, j, i]`` on the reference grid); other segments keep theirs.

    The mask is placed through the reference's parent transform into the
    segmentation's own coordinates (see :func:`frame_matrix`). Where the new voxels
    overlap another segment that shares the layer, Slicer moves the segment to a layer
    of its own, so no other segment loses a voxel.
    """
    grid = grid_from_node(reference_node)
    mask = np.asarray(mask)
    if mask.shape != grid.shape:
        raise InputError(f"a mask of shape {mask.shape} does not fit volume {reference_node.GetName()!r} {grid.shape}")
    ijk_to_local = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(ijk_to_local)
    ijk_to_ras = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(frame_matrix(reference_node, segmentation_node), ijk_to_local, ijk_to_ras)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        _oriented_mask(mask, ijk_to_ras), segmentation_node, segment_id
    )
    if not ok:
        raise InputError(f"could not store segment {segment_id!r} in {segmentation_node.GetName()!r}")


def geometry_matches(segmentation_node: Any, volume_node: Any, atol: float = 1e-6) -> bool:
    """True when the segmentation's reference image geometry is exactly the volume's grid (matrix and extent).

    Compares the nodes' own (local) coordinates: callers that also need both nodes in
    one frame check :func:`same_frame`.
    """
    converter = slicer.vtkSegmentationConverter
    text = segmentation_node.GetSegmentation().GetConversionParameter(
        converter.GetReferenceImageGeometryParameterName()
    )
    geometry = slicer.vtkOrientedImageData()
    if not text or not converter.DeserializeImageGeometry(text, geometry, False):
        return False
    found, expected = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(found)
    volume_node.GetIJKToRASMatrix(expected)
    same_matrix = all(
        abs(found.GetElement(r, c) - expected.GetElement(r, c)) <= atol for r in range(4) for c in range(4)
    )
    dims = volume_node.GetImageData().GetDimensions()
    extent = tuple(geometry.GetExtent())
    return same_matrix and extent == (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)


def write_labels(
    segmentation_node: Any,
    labels: np.ndarray,
    reference_node: Any,
    card_labels: Sequence[Label],
    model_tag: str = "",
) -> list[str]:
    """Replace the content of ``segmentation_node`` with one segment per card label; returns the segment ids.

    ``labels`` is a ``[k, j, i]`` label array on ``reference_node``'s voxel grid. The
    segments are named, coloured and terminology-coded from ``card_labels`` and tagged
    with ``model_tag`` and their label value; the reference geometry and parent
    transform become the reference node's. Everything that can fail is computed
    before the node is modified.
    """
    grid = grid_from_node(reference_node)
    labels = np.asarray(labels)
    if labels.shape != grid.shape:
        raise InputError(
            f"the result's shape {labels.shape} does not match volume {reference_node.GetName()!r} {grid.shape}; "
            "the volume changed while segmenting: run again"
        )
    ijk_to_ras = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(ijk_to_ras)
    masks = {}
    for label in card_labels:
        mask = labels == label.value
        if mask.any():
            masks[label.value] = _oriented_mask(mask, ijk_to_ras)

    segmentation = segmentation_node.GetSegmentation()
    was_modifying = segmentation_node.StartModify()
    try:
        segmentation.RemoveAllSegments()
        segmentation.SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
        segmentation_node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
        ids = []
        for label in card_labels:
            segment_id = segmentation.AddEmptySegment(label.name, label.name, [c / 255.0 for c in label.color])
            segment = segmentation.GetSegment(segment_id)
            term = terminology_string(label)
            if term:
                set_segment_terminology(segment, term)
            if model_tag:
                segment.SetTag(TAG_MODEL, model_tag)
            segment.SetTag(TAG_LABEL_VALUE, str(label.value))
            if label.value in masks:
                ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                    masks[label.value], segmentation_node, segment_id
                )
                if not ok:
                    raise InputError(f"could not store segment {label.name!r} in {segmentation_node.GetName()!r}")
            ids.append(segment_id)
        if model_tag:
            segmentation_node.SetAttribute(TAG_MODEL, model_tag)
    finally:
        segmentation_node.EndModify(was_modifying)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    display = segmentation_node.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2D(True)
    return ids


def record_input_warnings(segmentation_node: Any, warnings: Sequence[str]) -> None:
    """Keep ``warnings`` in the node's :data:`TAG_INPUT_WARNINGS` attribute (saved with the scene);
    none removes the attribute, so a later result that fits carries no earlier warning."""
    if warnings:
        segmentation_node.SetAttribute(TAG_INPUT_WARNINGS, WARNINGS_SEPARATOR.join(warnings))
    elif segmentation_node.GetAttribute(TAG_INPUT_WARNINGS) is not None:
        segmentation_node.RemoveAttribute(TAG_INPUT_WARNINGS)


class SegmentationBackup:
    """What :func:`write_labels` may change in an existing segmentation node, kept to put it back.

    Holds a deep copy of the node's segmentation (segments, representations,
    conversion parameters such as the reference geometry), its parent transform, its
    ``MedSegSuite.model`` attribute and its display node's visibility.
    """

    def __init__(self, node: Any) -> None:
        self.node = node
        self.segmentation = slicer.vtkSegmentation()
        self.segmentation.DeepCopy(node.GetSegmentation())
        self.transform_id = node.GetTransformNodeID()
        self.model = node.GetAttribute(TAG_MODEL)
        display = node.GetDisplayNode()
        self.visibility = (display.GetVisibility(), display.GetVisibility2D()) if display is not None else None

    def restore(self) -> None:
        """Put the node back as it was when the backup was taken."""
        node = self.node
        was_modifying = node.StartModify()
        try:
            node.GetSegmentation().DeepCopy(self.segmentation)
            node.SetAndObserveTransformNodeID(self.transform_id)
            if self.model is not None:
                node.SetAttribute(TAG_MODEL, self.model)
            else:
                node.RemoveAttribute(TAG_MODEL)
            display = node.GetDisplayNode()
            if display is not None and self.visibility is not None:
                display.SetVisibility(self.visibility[0])
                display.SetVisibility2D(self.visibility[1])
        finally:
            node.EndModify(was_modifying)


def remove_node(node: Any) -> None:
    """Remove a displayable node from its scene together with its display and storage nodes."""
    scene = node.GetScene()
    if scene is None:
        return
    helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is scene:
            scene.RemoveNode(helper)


def place_next_to(node: Any, reference_node: Any) -> bool:
    """Put ``node`` under the subject-hierarchy parent (study or folder) of ``reference_node``.

    Does nothing (returns False) when the reference is not in the hierarchy or sits
    directly under the scene.
    """
    scene = node.GetScene()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene else None
    if sh is None:
        return False
    reference_item = sh.GetItemByDataNode(reference_node)
    if not reference_item:
        return False
    parent = sh.GetItemParent(reference_item)
    if not parent or parent == sh.GetSceneItemID():
        return False
    item = sh.GetItemByDataNode(node) or sh.CreateItem(parent, node)
    sh.SetItemParent(item, parent)
    return True
