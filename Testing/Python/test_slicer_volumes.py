"""MRML volume nodes <-> Volume (RAS/LPS, oblique grids, RGB images) and ROI nodes -> voxel boxes, on real MRML."""

from __future__ import annotations

import numpy as np
import pytest
import vtk
from scipy.spatial.transform import Rotation

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.io import read_image
from MedSegSuiteLib.volume import Volume


def _oblique(seed=0, shape=(5, 6, 7), dtype=np.float32):
    rng = np.random.default_rng(seed)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    direction = Rotation.random(random_state=seed).as_matrix()
    return Volume(array, (0.7, 1.3, 2.9), (12.5, -40.25, 7.0), direction)


def test_oblique_scalar_volume_round_trips_exactly_through_a_node(scene):
    from MedSegSuiteLib.slicer.volumes import add_volume_node, volume_from_node

    volume = _oblique()
    node = add_volume_node(volume, "CT")
    back = volume_from_node(node)
    assert node.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert np.array_equal(back.array, volume.array) and back.array.dtype == np.float32
    assert back.spacing == volume.spacing
    assert np.array_equal(back.origin, volume.origin)
    assert np.abs(back.direction - volume.direction).max() < 1e-15


def test_node_geometry_is_the_volume_geometry_in_ras(scene):
    """Every voxel lands at the same physical point: LPS (x, y, z) == RAS (-x, -y, z)."""
    from MedSegSuiteLib.slicer.volumes import add_volume_node

    volume = _oblique(seed=3)
    node = add_volume_node(volume, "CT")
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    for ijk in [(0, 0, 0), (6, 0, 0), (0, 5, 4), (3.5, 2.0, 1.25)]:
        ras = np.array(ijk_to_ras.MultiplyPoint((*ijk, 1.0))[:3])
        lps = volume.grid.index_to_physical(ijk)
        assert np.allclose(ras, lps * [-1, -1, 1], atol=1e-9)
    assert np.array_equal(np.array(node.GetOrigin()), np.array(volume.origin) * [-1, -1, 1])


def test_volume_from_node_matches_what_slicer_writes_to_disk(scene, tmp_path):
    """Slicer's own NRRD writer and MedSegSuite's reader agree with the adapter, voxel for voxel."""
    import slicer

    from MedSegSuiteLib.slicer.volumes import add_volume_node, volume_from_node

    node = add_volume_node(_oblique(seed=5), "CT")
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "ct.nrrd"))
    assert storage.WriteData(node)
    on_disk, adapted = read_image(tmp_path / "ct.nrrd"), volume_from_node(node)
    assert on_disk.grid.same_as(adapted.grid, atol=1e-9)
    assert np.array_equal(on_disk.array, adapted.array)


def test_rgb_image_round_trips_through_a_vector_volume_node(scene):
    from MedSegSuiteLib.slicer.volumes import add_volume_node, volume_from_node

    rgb = np.random.default_rng(1).integers(0, 256, (3, 1, 20, 30), dtype=np.uint8)
    volume = Volume(rgb, (0.5, 0.5, 1.0), (0.0, 0.0, 0.0))
    node = add_volume_node(volume, "photo")
    assert node.GetClassName() == "vtkMRMLVectorVolumeNode"
    assert node.GetImageData().GetNumberOfScalarComponents() == 3
    back = volume_from_node(node)
    assert back.array.shape == (3, 1, 20, 30) and back.array.dtype == np.uint8
    assert np.array_equal(back.array, rgb) and back.grid.same_as(volume.grid, atol=0)


def test_updating_a_node_replaces_voxels_and_geometry_and_views_are_optional(scene):
    from MedSegSuiteLib.slicer.volumes import add_volume_node, update_node_from_volume, volume_from_node

    node = add_volume_node(_oblique(seed=1), "CT")
    replacement = _oblique(seed=2, shape=(3, 4, 5), dtype=np.int16)
    update_node_from_volume(node, replacement)
    view = volume_from_node(node, copy=False)
    assert np.array_equal(view.array, replacement.array) and view.grid.same_as(replacement.grid, atol=1e-12)
    with pytest.raises(InputError, match="vector volume node"):
        update_node_from_volume(node, Volume(np.zeros((3, 1, 4, 4), np.uint8)))


def test_a_volume_without_image_data_is_a_clear_error(scene):
    from MedSegSuiteLib.slicer.volumes import volume_from_node

    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="has no image data"):
        volume_from_node(empty)


def _roi(scene, centre, size):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    roi.SetCenter(*centre)
    roi.SetSize(*size)
    return roi


def test_roi_gives_the_voxel_box_it_covers(scene):
    from MedSegSuiteLib.slicer.volumes import add_volume_node, box_from_roi

    # axis-aligned RAS volume: voxel (i, j, k) centre is at RAS (-(10 + i), -(20 + j), 30 + 2 k)
    volume = Volume(np.zeros((10, 20, 30), np.float32), (1.0, 1.0, 2.0), (10.0, 20.0, 30.0))
    node = add_volume_node(volume, "CT")
    roi = _roi(scene, centre=(-(10 + 7.0), -(20 + 4.0), 30 + 2 * 5.0), size=(4.0, 2.0, 4.0))
    box = box_from_roi(roi, node)
    assert box.start == (5, 3, 4) and box.stop == (10, 6, 7)  # every voxel the ROI touches
    huge = _roi(scene, centre=(-20, -30, 40), size=(500, 500, 500))
    assert box_from_roi(huge, node).start == (0, 0, 0) and box_from_roi(huge, node).stop == (30, 20, 10)
    away = _roi(scene, centre=(500, 500, 500), size=(1, 1, 1))
    with pytest.raises(InputError, match="does not overlap"):
        box_from_roi(away, node)


def test_roi_follows_the_volume_parent_transform(scene):
    from MedSegSuiteLib.slicer.volumes import add_volume_node, box_from_roi

    volume = Volume(np.zeros((10, 20, 30), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    node = add_volume_node(volume, "CT")
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 100.0)  # the volume appears 100 mm further right in the world
    shift.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(shift.GetID())
    roi = _roi(scene, centre=(100 - 5.0, -6.0, 3.0), size=(0.5, 0.5, 0.5))
    box = box_from_roi(roi, node)
    assert box.start == (5, 6, 3) and box.stop == (6, 7, 4)


def test_roi_finds_the_right_voxel_of_an_oblique_volume(scene):
    from MedSegSuiteLib.slicer.volumes import add_volume_node, box_from_roi

    volume = _oblique(seed=4, shape=(6, 7, 8))
    node = add_volume_node(volume, "CT")
    for ijk in [(3, 2, 1), (0, 6, 5), (7, 0, 0)]:
        lps = volume.grid.index_to_physical(ijk)
        roi = _roi(scene, centre=tuple(lps * [-1, -1, 1]), size=(0.1, 0.1, 0.1))
        box = box_from_roi(roi, node)
        assert box.start == ijk and box.stop == tuple(v + 1 for v in ijk)


def test_input_volumes_list_rgb_once_and_no_label_map_diffusion_or_hidden_volume(scene):
    from MedSegSuiteLib.slicer.volumes import add_volume_node, input_volumes

    grey = add_volume_node(Volume(np.zeros((2, 4, 4), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), "Grey")
    rgb = add_volume_node(Volume(np.zeros((3, 1, 4, 4), np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), "RGB")
    assert rgb.IsA("vtkMRMLVectorVolumeNode") and rgb.IsA("vtkMRMLScalarVolumeNode")  # why RGB was listed twice
    for cls in (
        "vtkMRMLLabelMapVolumeNode",
        "vtkMRMLDiffusionWeightedVolumeNode",
        "vtkMRMLDiffusionTensorVolumeNode",
    ):
        assert scene.AddNewNodeByClass(cls, cls).IsA("vtkMRMLScalarVolumeNode")
    hidden = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Hidden")
    hidden.SetHideFromEditors(True)
    assert input_volumes(scene) == [grey, rgb]
