"""MRML volume nodes <-> :class:`~MedSegSuiteLib.volume.Volume`, and ROI nodes -> voxel boxes.

Slicer describes a volume by its IJK-to-RAS matrix (origin, spacing and the direction
of each voxel axis in RAS); a :class:`Volume` uses LPS. The conversion negates the
first two physical coordinates of the origin and of each axis direction; nothing is
resampled, so a round trip gives back the same numbers. Array orders: MRML arrays
are ``[k, j, i]`` (``[k, j, i, c]`` for vector volumes), a Volume is ``[z, y, x]`` or
``[c, z, y, x]``. All geometry is the node's own (local) geometry; parent transforms
are left to the caller (results are placed under the same transform as the input).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import slicer
import vtk

from ..errors import InputError
from ..geometry import Box
from ..volume import Grid, Volume

__all__ = [
    "LPS_FROM_RAS",
    "add_volume_node",
    "box_from_roi",
    "INPUT_VOLUME_CLASSES",
    "grid_from_node",
    "ijk_to_ras_matrix",
    "input_channels",
    "input_volumes",
    "update_node_from_volume",
    "volume_from_node",
]

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse
_VECTOR_CLASSES = ("vtkMRMLVectorVolumeNode",)
#: The volume classes the module takes as images, matched exactly: label maps and the
#: scalar-volume subclasses for diffusion data (DWI, DTI) are no images to segment, and
#: an RGB volume (a vector volume, which is also a scalar volume) is listed once.
INPUT_VOLUME_CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode")


def input_volumes(scene: Any) -> list[Any]:
    """The scene's volumes that can be inputs (see :data:`INPUT_VOLUME_CLASSES`), in scene order, hidden ones left out.

    The same nodes the panel's input selector offers (its ``nodeTypes`` with
    ``showChildNodeTypes`` off).
    """
    found = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")):  # no collection to release
        node = scene.GetNthNodeByClass(index, "vtkMRMLVolumeNode")
        if node.GetClassName() in INPUT_VOLUME_CLASSES and not node.GetHideFromEditors():
            found.append(node)
    return found


def _direction_ras(node: Any) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)], dtype=np.float64)


def grid_from_node(node: Any) -> Grid:
    """The LPS voxel grid (shape, spacing, origin, direction) of a volume node with image data."""
    image = node.GetImageData() if node is not None else None
    if image is None:
        raise InputError(f"volume {node.GetName() if node else '(none)'!r} has no image data; load an image first")
    i, j, k = image.GetDimensions()
    return Grid(
        (k, j, i),
        tuple(node.GetSpacing()),
        tuple(LPS_FROM_RAS @ np.asarray(node.GetOrigin(), dtype=np.float64)),
        LPS_FROM_RAS @ _direction_ras(node),
    )


def volume_from_node(node: Any, copy: bool = True) -> Volume:
    """The image of a scalar or vector (e.g. RGB) volume node as a Volume in LPS.

    ``copy=False`` returns a view of the node's voxels (valid until the node changes).
    """
    grid = grid_from_node(node)
    array = slicer.util.arrayFromVolume(node)
    if array.ndim == 4:  # [k, j, i, c] -> [c, k, j, i]
        array = np.moveaxis(array, -1, 0)
    if copy:
        array = np.array(array, copy=True)
    return Volume.on_grid(array, grid)


def input_channels(node: Any) -> int:
    """The channels of a volume node's image as the library reads it for a job: the node's scalar
    components, with a 4-component (RGBA) image counted as RGB, since reading drops its alpha."""
    image = node.GetImageData() if node is not None else None
    if image is None:
        raise InputError(f"volume {node.GetName() if node else '(none)'!r} has no image data; load an image first")
    components = int(image.GetNumberOfScalarComponents())
    return 3 if components == 4 else components


def ijk_to_ras_matrix(grid: Grid) -> vtk.vtkMatrix4x4:
    """The IJK-to-RAS matrix of an LPS grid."""
    m = np.eye(4)
    m[:3, :3] = LPS_FROM_RAS @ np.asarray(grid.direction) * np.asarray(grid.spacing)[None, :]
    m[:3, 3] = LPS_FROM_RAS @ np.asarray(grid.origin)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(m[r, c]))
    return matrix


def _set_geometry(node: Any, grid: Grid) -> None:
    direction = vtk.vtkMatrix4x4()
    ras = LPS_FROM_RAS @ np.asarray(grid.direction)
    for r in range(3):
        for c in range(3):
            direction.SetElement(r, c, float(ras[r, c]))
    node.SetIJKToRASDirectionMatrix(direction)
    node.SetSpacing(*grid.spacing)
    node.SetOrigin(*(float(v) for v in LPS_FROM_RAS @ np.asarray(grid.origin)))


def update_node_from_volume(node: Any, volume: Volume) -> None:
    """Replace the voxels and geometry of ``node`` with ``volume`` (vector nodes take multi-channel volumes)."""
    vector = node.GetClassName() in _VECTOR_CLASSES
    array = volume.array
    if array.ndim == 4:
        if not vector and volume.channels != 1:
            raise InputError(f"a {volume.channels}-channel image needs a vector volume node, not {node.GetClassName()}")
        array = np.moveaxis(array, 0, -1) if vector else array[0]
    was_modifying = node.StartModify()
    try:
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
        _set_geometry(node, volume.grid)
    finally:
        node.EndModify(was_modifying)


def add_volume_node(volume: Volume, name: str = "Volume", scene: Optional[Any] = None, label: bool = False) -> Any:
    """Add ``volume`` to the scene as a new volume node with display nodes and return it.

    Multi-channel volumes become ``vtkMRMLVectorVolumeNode``; ``label=True`` makes a
    ``vtkMRMLLabelMapVolumeNode``; anything else a ``vtkMRMLScalarVolumeNode``.
    """
    scene = scene or slicer.mrmlScene
    if volume.array.ndim == 4 and volume.channels > 1:
        cls = "vtkMRMLVectorVolumeNode"
    elif label:
        cls = "vtkMRMLLabelMapVolumeNode"
    else:
        cls = "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    update_node_from_volume(node, volume)
    node.CreateDefaultDisplayNodes()
    return node


def _world_to_node(node: Any) -> vtk.vtkGeneralTransform:
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, node.GetParentTransformNode(), transform)
    return transform


def box_from_roi(roi_node: Any, volume_node: Any) -> Box:
    """The voxel box of ``volume_node`` covered by a markups ROI (any voxel the ROI touches).

    The ROI may be rotated and either node may be transformed; the box is the
    axis-aligned hull of the ROI's eight corners in the volume's voxel grid, clipped to
    the volume. Raises InputError if the ROI misses the volume.
    """
    grid = grid_from_node(volume_node)
    centre, size = [0.0] * 3, [0.0] * 3
    roi_node.GetCenterWorld(centre)
    roi_node.GetSizeWorld(size)
    axes = []
    for getter in (roi_node.GetXAxisWorld, roi_node.GetYAxisWorld, roi_node.GetZAxisWorld):
        axis = [0.0] * 3
        getter(axis)
        axes.append(np.asarray(axis))
    to_node = _world_to_node(volume_node)
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    corners = []
    for sx in (-0.5, 0.5):
        for sy in (-0.5, 0.5):
            for sz in (-0.5, 0.5):
                world = np.asarray(centre) + sx * size[0] * axes[0] + sy * size[1] * axes[1] + sz * size[2] * axes[2]
                local = to_node.TransformPoint(*world)
                corners.append(ras_to_ijk.MultiplyPoint((*local, 1.0))[:3])
    low, high = np.min(corners, axis=0), np.max(corners, axis=0)
    size_ijk = (grid.shape[2], grid.shape[1], grid.shape[0])
    start, stop = [], []
    for a in range(3):
        # voxel n spans [n - 0.5, n + 0.5]: keep those that overlap [low, high]
        first = max(0, math.floor(low[a] - 0.5) + 1)
        last = min(size_ijk[a] - 1, math.ceil(high[a] + 0.5) - 1)
        if first > last:
            raise InputError(
                f"the region {roi_node.GetName()!r} does not overlap volume {volume_node.GetName()!r}; "
                "move it onto the image or choose no region"
            )
        start.append(int(first))
        stop.append(int(last) + 1)
    return Box(tuple(start), tuple(stop))  # type: ignore[arg-type]
