"""Our .seg.nrrd files against Slicer's own reader and writer (vtkMRMLSegmentationStorageNode from slicer-core)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from MedSegSuiteLib.io.label_table import parse_terminology, terminology_string
from MedSegSuiteLib.io.seg_nrrd import read_seg_nrrd, write_seg_nrrd
from MedSegSuiteLib.io.segmentation import Segment, Segmentation
from MedSegSuiteLib.volume import Grid

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
vtk = pytest.importorskip("vtk")
if not hasattr(slicer, "vtkMRMLSegmentationStorageNode"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

from vtk.util import numpy_support  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SLICER_DEFAULT_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~SCT^85756007^Tissue"
    "~^^~Anatomic codes - DICOM master list~^^~^^"
)
LIVER = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}
MASS = {
    "category": ["SCT", "49755003", "Morphologically Altered Structure"],
    "type": ["SCT", "4147007", "Mass"],
    "modifier": ["SCT", "24028007", "Right"],
    "region": ["SCT", "10200004", "Liver"],
}


@pytest.fixture
def scene(monkeypatch):
    """A bare MRML scene with the Segmentations logic (converter rules) and the slicer.modules stand-in."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colors)
    logics = {}
    for name, logic in (("Volumes", slicer.vtkSlicerVolumesLogic()), ("Segmentations",
                        slicer.vtkSlicerSegmentationsModuleLogic())):  # fmt: skip
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name.lower()] = SimpleNamespace(logic=lambda logic=logic: logic)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "modules", SimpleNamespace(**logics), raising=False)
    yield scene
    scene.Clear(1)


def oblique_grid() -> Grid:
    direction = Rotation.from_euler("xyz", (12, -20, 35), degrees=True).as_matrix()
    return Grid((6, 9, 7), (0.7, 0.9, 2.2), (-12.5, 30.25, 41.0), direction)


def ras_matrix(grid: Grid) -> np.ndarray:
    return LPS_TO_RAS @ grid.index_to_physical_matrix


def vtk_matrix(array: np.ndarray):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def slicer_segments(node, shape):
    """(id, name, colour, terminology, layer, label value, mask on the full grid, image-to-world) per segment."""
    segmentation = node.GetSegmentation()
    out = []
    for index in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(sid)
        image = segment.GetRepresentation("Binary labelmap")
        extent = image.GetExtent()
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        mask = np.zeros(shape, bool)
        if extent[1] >= extent[0] and extent[3] >= extent[2] and extent[5] >= extent[4]:
            size = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
            voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(size)
            mask[extent[4] : extent[5] + 1, extent[2] : extent[3] + 1, extent[0] : extent[1] + 1] = (
                voxels == segment.GetLabelValue()
            )
        out.append(
            SimpleNamespace(
                id=sid,
                name=segment.GetName(),
                color=tuple(segment.GetColor()),
                terminology=segment.GetTerminology(),
                layer=segmentation.GetLayerIndex(sid),
                value=segment.GetLabelValue(),
                mask=mask,
                world=world,
                origin_extent=extent[::2],
                segment=segment,
            )
        )
    return out


def test_slicer_reads_our_seg_nrrd_identically(scene, tmp_path):
    grid = oblique_grid()
    liver = np.zeros(grid.shape, bool)
    liver[1:5, 2:7, 1:6] = True
    mass = np.zeros(grid.shape, bool)
    mass[3:6, 5:9, 3:7] = True  # overlaps the liver: a second layer
    segments = [
        Segment("liver", "Liver", (221, 130, 101), LIVER, value=1),
        Segment("mass", "Mass", (230, 60, 40), MASS, value=2, tags={"MedSegSuite.model": "demo-1"}),
        Segment("empty", "Empty", (0, 151, 206), None, value=3),
    ]
    ours = Segmentation.from_masks(grid, [liver, mass, np.zeros(grid.shape, bool)], segments)
    assert ours.layers.shape[0] == 2
    path = write_seg_nrrd(ours, tmp_path / "ours.seg.nrrd")

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    read = slicer_segments(node, grid.shape)
    assert [s.id for s in read] == ["liver", "mass", "empty"]
    for theirs, mine in zip(read, ours.segments):
        assert theirs.name == mine.name
        np.testing.assert_allclose(theirs.color, np.array(mine.color) / 255.0, atol=1e-5)
        assert theirs.terminology == (terminology_string(mine) or SLICER_DEFAULT_TERMINOLOGY)
        assert (theirs.layer, theirs.value) == (mine.layer, mine.value)
        assert np.array_equal(theirs.mask, ours.mask(mine)), mine.name
        # Each labelmap's image-to-world is our LPS grid in RAS, shifted to its extent's first voxel.
        expected = ras_matrix(grid).copy()
        expected[:3, 3] = (LPS_TO_RAS @ np.append(grid.index_to_physical(theirs.origin_extent), 1.0))[:3]
        np.testing.assert_allclose(theirs.world, expected, atol=1e-6)
    tag = vtk.reference("")
    assert read[1].segment.GetTag("MedSegSuite.model", tag) and str(tag) == "demo-1"
    assert read[1].terminology.endswith("~SCT^4147007^Mass~SCT^24028007^Right~Anatomic codes - DICOM master list"
                                        "~SCT^10200004^Liver~^^")  # fmt: skip


@pytest.mark.parametrize("crop", [False, True])
def test_we_read_slicers_seg_nrrd_identically(scene, tmp_path, crop):
    grid = oblique_grid()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    slicer.util.updateVolumeFromArray(volume, np.zeros(grid.shape, np.int16))
    ras = ras_matrix(grid)
    volume.SetIJKToRASMatrix(vtk_matrix(ras))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Seg")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    masks = {"liver": np.zeros(grid.shape, np.uint8), "mass": np.zeros(grid.shape, np.uint8)}
    masks["liver"][1:4, 2:7, 1:5] = 1
    masks["mass"][2:6, 4:8, 3:6] = 1  # overlaps
    colors = {"liver": (0.8, 0.4, 0.2), "mass": (0.2, 0.6, 1.0)}
    codes = {"liver": LIVER, "mass": MASS}
    for sid, mask in masks.items():
        node.GetSegmentation().AddEmptySegment(sid, sid.title(), colors[sid])
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, node, sid, volume)
        node.GetSegmentation().GetSegment(sid).SetTerminology(terminology_string(codes[sid]))
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "slicer.seg.nrrd"))
    storage.SetCropToMinimumExtent(crop)
    assert storage.WriteData(node) == 1

    header = (tmp_path / "slicer.seg.nrrd").read_bytes().split(b"\n\n")[0]
    assert (b"Segmentation_ReferenceImageExtentOffset:=0 0 0" not in header) == crop  # cropped files are padded back
    ours = read_seg_nrrd(tmp_path / "slicer.seg.nrrd")
    assert ours.grid.shape == grid.shape
    np.testing.assert_allclose(ours.grid.spacing, grid.spacing, atol=1e-9)
    np.testing.assert_allclose(ours.grid.origin, grid.origin, atol=1e-9)
    np.testing.assert_allclose(ours.grid.direction, grid.direction, atol=1e-9)
    assert ours.layers.shape[0] == 2
    for segment in ours.segments:
        assert segment.name == segment.id.title()
        assert segment.color == tuple(round(c * 255) for c in colors[segment.id])
        assert segment.terminology == codes[segment.id] == parse_terminology(terminology_string(codes[segment.id]))
        assert np.array_equal(ours.mask(segment), masks[segment.id].astype(bool)), segment.id
