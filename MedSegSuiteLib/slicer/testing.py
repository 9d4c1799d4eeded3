"""Helpers for the module self-test (``MedSegSuiteTest``), usable in 3D Slicer and in the test harness.

Synthetic data with a known object, picking an installed model, waiting while Qt keeps
running, and saving and reloading the scene with the MRML library's own functions (so
the same code works with and without the Slicer application).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Callable, Optional

import numpy as np
import slicer

from ..volume import Volume
from .segmentations import segment_mask
from .volumes import add_volume_node

__all__ = [
    "add_ball_volume",
    "add_disc_stack_volume",
    "add_faint_ball_case",
    "add_painted_segmentation",
    "dice",
    "pick_3d_model",
    "pick_finetune_parent",
    "pick_refiner",
    "save_and_reload_scene",
    "segment_array",
    "set_checked_items",
    "wait_until",
]


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    axis_array = np.asarray(axis, dtype=np.float64)
    x, y, z = axis_array / np.linalg.norm(axis_array)
    angle = np.radians(degrees)
    c, s, t = np.cos(angle), np.sin(angle), 1 - np.cos(angle)
    return np.array(
        [
            [t * x * x + c, t * x * y - s * z, t * x * z + s * y],
            [t * x * y + s * z, t * y * y + c, t * y * z - s * x],
            [t * x * z - s * y, t * y * z + s * x, t * z * z + c],
        ]
    )


def add_ball_volume(
    name: str = "MedSegSuite ball",
    shape: tuple[int, int, int] = (24, 48, 48),
    radius: float = 6.0,
    seed: int = 0,
    study: Optional[str] = "MedSegSuite test study",
) -> tuple[Any, np.ndarray]:
    """Add a noisy volume with one bright ball on an oblique grid; returns ``(node, ball mask [k, j, i])``.

    Intensities: about 100 +- 20 outside and 180 inside. The grid is rotated by 20
    degrees about an oblique axis with anisotropic spacing. With ``study`` the volume
    is placed in a patient/study of the subject hierarchy, as DICOM data would be.
    """
    rng = np.random.default_rng(seed)
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    centre = [(n - 1) / 2.0 for n in shape]
    mask = ((kk - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (ii - centre[2]) ** 2 <= radius**2).astype(np.uint8)
    image = (100.0 + 20.0 * rng.standard_normal(shape) + 80.0 * mask).astype(np.float32)
    volume = Volume(image, (0.9, 0.8, 1.2), (-20.0, 15.0, 30.0), _rotation((1.0, 2.0, 3.0), 20.0))
    node = add_volume_node(volume, name)
    if study:
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
        patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "MedSegSuite test patient")
        study_item = sh.CreateStudyItem(patient, study)
        item = sh.GetItemByDataNode(node) or sh.CreateItem(study_item, node)
        sh.SetItemParent(item, study_item)
    return node, mask


def add_disc_stack_volume(
    name: str = "MedSegSuite discs",
    size: int = 32,
    centres: tuple[tuple[float, float], ...] = ((16, 15), (15, 17), (17, 16)),
    radius: float = 7.5,
    seed: int = 40,
) -> tuple[Any, np.ndarray]:
    """Add a volume of stacked 8-bit grey slices, each with one bright disc; returns ``(node, disc mask [k, j, i])``.

    Each slice is noise of about 80 +- 20 with 100 added inside its disc (clipped to
    0-255), like the 2D images small HiDiff test models are trained on. Spacing
    0.8 x 0.8 x 2 mm, axis-aligned.
    """
    images, masks = [], []
    yy, xx = np.mgrid[:size, :size]
    for k, centre in enumerate(centres):
        rng = np.random.default_rng(seed + k)
        mask = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
        images.append(np.clip(rng.normal(80, 20, (size, size)) + 100 * mask, 0, 255).astype(np.uint8))
        masks.append(mask)
    volume = Volume(np.stack(images).astype(np.float32), (0.8, 0.8, 2.0), (5.0, -3.0, 10.0))
    return add_volume_node(volume, name), np.stack(masks).astype(np.uint8)


def add_painted_segmentation(
    volume_node: Any, segments: dict[str, tuple[np.ndarray, tuple[int, int, int]]], name: str = "Painted"
) -> Any:
    """Add a segmentation on ``volume_node`` painted like a user would: name -> (mask ``[k, j, i]``, RGB 0-255)."""
    from .segmentations import create_segmentation_node

    node = create_segmentation_node(volume_node, name=name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    for segment_name, (mask, color) in segments.items():
        segment_id = node.GetSegmentation().AddEmptySegment(segment_name, segment_name, [c / 255.0 for c in color])
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            np.asarray(mask, dtype=np.uint8), node, segment_id, volume_node
        )
    return node


def add_faint_ball_case(
    name: str,
    label_name: Optional[str] = None,
    seed: int = 0,
    shape: tuple[int, int, int] = (20, 36, 36),
    radius: float = 4.5,
) -> tuple[Any, Optional[Any], np.ndarray]:
    """Add a volume with a faint ball (the structure) beside a bright one (a distractor); returns
    ``(volume node, segmentation node or None, faint ball mask [k, j, i])``.

    A model that finds bright balls marks the wrong one, so finetuning has something to
    learn. Intensities: about 100 +- 10 background, 140 faint ball, 180 bright ball.
    With ``label_name`` the faint ball is painted as a segment of that name (a labelled
    case); the grid is axis-aligned with 1 x 1 x 1.5 mm voxels.
    """
    rng = np.random.default_rng(seed)
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    depth, rows, cols = shape
    margin = radius + 1.5
    faint_centre = (
        rng.uniform(margin, depth - margin),
        rng.uniform(margin, rows / 2),
        rng.uniform(margin, cols - margin),
    )
    bright_centre = (
        rng.uniform(margin, depth - margin),
        rng.uniform(rows / 2 + 1.5, rows - margin),
        rng.uniform(margin, cols - margin),
    )

    def ball(centre: tuple[float, float, float]) -> np.ndarray:
        return (kk - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (ii - centre[2]) ** 2 <= radius**2

    faint, bright = ball(faint_centre), ball(bright_centre) & ~ball(faint_centre)
    image = 100.0 + 10.0 * rng.standard_normal(shape) + 40.0 * faint + 80.0 * bright
    node = add_volume_node(Volume(image.astype(np.float32), (1.0, 1.0, 1.5), (-10.0, 5.0, 0.0)), name)
    mask = faint.astype(np.uint8)
    segmentation = None
    if label_name:
        segmentation = add_painted_segmentation(node, {label_name: (mask, (230, 60, 40))}, name=f"{name} segmentation")
    return node, segmentation, mask


def pick_finetune_parent(entries: list[Any]) -> Optional[Any]:
    """A small (``lite``) 3D model to finetune in a self-test (smallest patch, bundled first on a tie), or None."""
    small = [entry for entry in entries if entry.card.dims == 3 and str(entry.card.preset).lower() == "lite"]
    if not small:
        return None

    def size(entry: Any) -> tuple[int, int]:
        patch = entry.card.input.patch_xyz or (64, 64, 64)
        return int(np.prod(patch)), 0 if entry.source == "bundled" else 1

    return min(small, key=size)


def set_checked_items(list_widget: Any, data: list[str]) -> None:
    """Check the items of a checkable ``QListWidget`` whose user data is in ``data``, uncheck the others."""
    import qt

    for row in range(int(list_widget.property("count"))):
        item = list_widget.item(row)
        item.setCheckState(qt.Qt.Checked if str(item.data(qt.Qt.UserRole)) in data else qt.Qt.Unchecked)


def pick_refiner(entries: list[Any]) -> Optional[Any]:
    """An installed HiDiff model (bundled first), the kind that runs refinement steps, or None."""
    hidiff = [entry for entry in entries if entry.card.network == "hidiff"]
    bundled = [entry for entry in hidiff if entry.source == "bundled"]
    return (bundled or hidiff or [None])[0]


def pick_3d_model(entries: list[Any]) -> Optional[Any]:
    """A bundled 3D model if there is one, else an imported 3D model, else None."""
    three_d = [entry for entry in entries if entry.card.dims == 3]
    bundled = [entry for entry in three_d if entry.source == "bundled"]
    return (bundled or three_d or [None])[0]


def wait_until(predicate: Callable[[], bool], timeout: float = 120.0, interval: float = 0.02) -> bool:
    """Process Qt events until ``predicate()`` is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        slicer.app.processEvents()
        if predicate():
            return True
        time.sleep(interval)
    slicer.app.processEvents()
    return bool(predicate())


def segment_array(segmentation_node: Any, segment_id: str, reference_node: Any) -> np.ndarray:
    """A segment's voxels ``[k, j, i]`` (uint8, 0/1) on the reference volume's grid; adds nothing to the scene."""
    return segment_mask(segmentation_node, segment_id, reference_node).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def save_and_reload_scene() -> None:
    """Save the scene with its data to a temporary folder, close it, and load the saved copy."""
    scene = slicer.mrmlScene
    folder = tempfile.mkdtemp(prefix="medsegsuite-scene-")
    try:
        if not slicer.app.applicationLogic().SaveSceneToSlicerDataBundleDirectory(folder, None):
            raise RuntimeError(f"could not save the scene to {folder}")
        mrml = [name for name in os.listdir(folder) if name.endswith(".mrml")]
        if len(mrml) != 1:
            raise RuntimeError(f"expected one .mrml file in {folder}, found {mrml}")
        scene.Clear(0)
        scene.SetURL(os.path.join(folder, mrml[0]))
        if not scene.Import():
            raise RuntimeError(f"could not load the scene {mrml[0]}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
