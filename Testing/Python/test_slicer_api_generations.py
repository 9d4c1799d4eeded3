"""The module against Slicer 5.8 and the current Slicer API: what differs, the harness that presents either
generation, a scan that keeps calls to newer APIs out of the module, and the harness's node selector and
translation stand-ins.

Slicer 5.8's ``vtkSegment`` has no ``SetTerminology`` / ``GetTerminology`` (Slicer 5.10 added them); the
terminology string lives in the ``TerminologyEntry`` tag in every version, in the format Slicer 5.8's
``vtkSlicerTerminologiesModuleLogic::DeserializeTerminologyEntry`` reads: seven ``~``-separated fields, each
code ``scheme^value^meaning``.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types

import numpy as np
import pytest
import slicer_harness
from conftest import REPO, UNET3D_CARD
from slicer_harness.fixtures import slicer_api  # noqa: F401 - a fixture
from slicer_harness.generations import GENERATIONS, REMOVED_IN_5_8, api_generation

from MedSegSuiteLib.models.card import card_from_dict

# Methods and functions that Slicer 5.8.1 does not have, found by comparing the headers of the classes the
# module uses (vtkSegment, vtkSegmentation, vtkSegmentationConverter, vtkOrientedImageData,
# vtkMRMLSegmentationNode, vtkSlicerSegmentationsModuleLogic, vtkMRMLScene, vtkMRMLNode, vtkMRMLVolumeNode,
# vtkMRMLTransformNode, ...) and Base/Python/slicer/util.py at tag v5.8.1 with main (September 2026).
NEWER_THAN_5_8 = {
    "SetTerminology": "vtkSegment (5.10): segment.SetTag(vtkSegment.GetTerminologyEntryTagName(), text)",
    "GetTerminology": "vtkSegment (5.10): segment.GetTag(vtkSegment.GetTerminologyEntryTagName(), ref)",
    "HasTerminology": "vtkSegment (5.10): segment.HasTag(vtkSegment.GetTerminologyEntryTagName())",
    "GetLabelmapConversionColorTableNodeID": "vtkMRMLSegmentationNode (5.10)",
    "SetLabelmapConversionColorTableNodeID": "vtkMRMLSegmentationNode (5.10)",
    "AddColorTableNodeForSegmentation": "vtkSlicerSegmentationsModuleLogic (5.10)",
    "ExportSegmentsToColorTableNode": "vtkSlicerSegmentationsModuleLogic (5.10)",
    "GetPrivateStorableNodesDirectory": "vtkMRMLScene (after 5.8)",
    "GetPrivateStorableNodesModifiedSinceRead": "vtkMRMLScene (after 5.8)",
    "RemoveUnreferencedDisplayNodes": "vtkMRMLScene (after 5.8)",
    "RemoveUnreferencedStorageNodes": "vtkMRMLScene (after 5.8)",
    "GetTransformedImageData": "vtkMRMLVolumeNode (after 5.8)",
    "AddObjectEvent": "vtkMRMLNode (after 5.8)",
    "GetDefaultNodeNamePrefix": "vtkMRMLNode (after 5.8)",
    "SetDefaultNodeNamePrefix": "vtkMRMLNode (after 5.8)",
    "SetNthNodeReferenceProperties": "vtkMRMLNode (after 5.8)",
    "SetTypeDisplayName": "vtkMRMLNode (after 5.8)",
    "executePythonModule": "slicer.util (after 5.8)",
}
MODULE_SOURCES = sorted((REPO / "MedSegSuiteLib" / "slicer").glob("*.py")) + [REPO / "MedSegSuite" / "MedSegSuite.py"]


def newer_api_uses(source: str, filename: str) -> list[str]:
    """``file:line name`` for every attribute of :data:`NEWER_THAN_5_8` the source reads or calls."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and node.attr in NEWER_THAN_5_8:
            found.append(f"{filename}:{node.lineno} {node.attr} ({NEWER_THAN_5_8[node.attr]})")
    return found


def test_the_module_calls_no_api_that_slicer_5_8_lacks():
    uses = []
    for path in MODULE_SOURCES:
        uses += newer_api_uses(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert not uses, "Slicer 5.8 lacks these; use the 5.8 API:\n" + "\n".join(uses)


def test_the_scan_finds_a_newer_call_where_it_is_written():
    source = "def f(segment):\n    x = 1\n    return segment.GetTerminology() or segment.SetTerminology\n"
    assert [use.split(" ")[0] for use in newer_api_uses(source, "probe.py")] == ["probe.py:3", "probe.py:3"]
    assert not newer_api_uses("segment.SetTag('TerminologyEntry', 'x')\n", "probe.py")


def test_the_5_8_surface_has_no_terminology_methods_and_the_current_one_has_them(scene):
    import slicer

    for generation, present in (("5.8", False), ("current", True)):
        with api_generation(generation):
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", generation)
            segment = node.GetSegmentation().GetSegment(node.GetSegmentation().AddEmptySegment("a", "a", [1, 0, 0]))
            for name in REMOVED_IN_5_8:
                assert hasattr(segment, name) is present, (generation, name)
            assert segment.GetClassName() == "vtkSegment" and isinstance(segment, slicer.vtkSegment)
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), "x")  # the tag API works in both
            del segment
    assert GENERATIONS == ("5.8", "current")


CARD = dict(
    UNET3D_CARD,
    id="test-liver",
    name="Liver finder",
    labels=[
        {
            "value": 1,
            "name": "Liver",
            "color": [221, 130, 101],
            "terminology": {
                "category": ["SCT", "123037004", "Anatomical Structure"],
                "type": ["SCT", "10200004", "Liver"],
            },
        },
        {"value": 2, "name": "Other", "color": [10, 20, 30]},
    ],
    weights={"file": "model.safetensors"},
)


@pytest.mark.usefixtures("slicer_api")
def test_results_carry_terminology_in_the_string_slicer_5_8_reads(scene):
    import slicer

    from MedSegSuiteLib.slicer.refinement import match_segments
    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node, segment_terminology, write_labels
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    volume, ball = add_ball_volume("CT", shape=(8, 12, 12), radius=3.0, study=None)
    card = card_from_dict(CARD)
    node = create_segmentation_node(volume)
    write_labels(node, ball.astype(np.uint8), volume, card.labels, model_tag="test-liver 1.0.0")
    liver = node.GetSegmentation().GetSegment(node.GetSegmentation().GetSegmentIdBySegmentName("Liver"))
    value = slicer_harness_tag(liver, slicer.vtkSegment.GetTerminologyEntryTagName())
    assert value == (
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
        "~Anatomic codes - DICOM master list~^^~^^"
    )
    fields = value.split("~")  # what DeserializeTerminologyEntry (v5.8.1) requires
    assert len(fields) == 7 and fields[0] and fields[1] != "^^"
    assert all(len(fields[i].split("^")) == 3 for i in (1, 2, 3, 5, 6))
    assert segment_terminology(liver) == value
    # a renamed segment is still matched by its terminology's type code, in both generations
    liver.SetName("Hepar")
    matches, unknown = match_segments(node, card)
    assert [(m.name, m.label.name, m.how) for m in matches] == [
        ("Hepar", "Liver", "type code"),
        ("Other", "Other", "name"),
    ]
    assert not unknown


def slicer_harness_tag(segment, key):
    import vtk

    value = vtk.reference("")
    assert segment.GetTag(key, value)
    return str(value.get())


# -- the harness's node selector behaves like qMRMLNodeComboBox ------------------------------------------------
def _combo(scene, none_enabled):
    slicer_harness.install()
    from slicer_harness.mrml_widgets import qMRMLNodeComboBox

    combo = qMRMLNodeComboBox()
    combo.nodeTypes = ["vtkMRMLScalarVolumeNode"]
    combo.noneEnabled = none_enabled
    combo.setMRMLScene(scene)
    return combo


def test_set_current_node_none_clears_the_selection_unless_none_is_an_entry(scene):
    first = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "A")
    seen = []
    combo = _combo(scene, none_enabled=False)
    combo.currentNodeChanged.connect(seen.append)
    assert combo.currentNode() is first  # the first entry of a list that was empty is selected
    combo.setCurrentNode(None)
    assert combo.currentNode() is None and combo.currentIndex() == -1 and seen == [None]
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "B")
    assert combo.currentNode() is None  # adding to a non-empty list selects nothing
    with_none = _combo(scene, none_enabled=True)
    with_none.setCurrentNode(first)
    with_none.setCurrentNode(None)
    assert with_none.currentNode() is None and with_none.currentIndex() == 0


def test_unknown_selector_properties_are_errors(scene, tmp_path):
    combo = _combo(scene, none_enabled=False)
    assert combo.property("addEnabled") is True and combo.property("noneEnabled") is False
    with pytest.raises(AttributeError, match="no property 'nodeType'"):
        combo.property("nodeType")
    with pytest.raises(AttributeError, match="no property 'noneEnable'"):
        combo.setProperty("noneEnable", True)
    import qt

    ui = tmp_path / "bad.ui"
    ui.write_text(
        '<?xml version="1.0" encoding="UTF-8"?><ui version="4.0"><class>W</class>'
        '<widget class="qMRMLWidget" name="W"><layout class="QVBoxLayout"><item>'
        '<widget class="qMRMLNodeComboBox" name="selector"><property name="noneEnable"><bool>true</bool></property>'
        "</widget></item></layout></widget>"
        "<customwidgets><customwidget><class>qMRMLNodeComboBox</class><extends>QWidget</extends>"
        "<header>qMRMLNodeComboBox.h</header></customwidget><customwidget><class>qMRMLWidget</class>"
        "<extends>QWidget</extends><header>qMRMLWidget.h</header></customwidget></customwidgets></ui>",
        encoding="utf-8",
    )
    file = qt.QFile(str(ui))
    file.open(qt.QIODevice.ReadOnly)
    try:
        with pytest.raises(AttributeError, match="selector.noneEnable"):
            qt.QUiLoader().load(file)
    finally:
        file.close()


def test_the_panel_file_sets_only_properties_the_slicer_widgets_have():
    slicer_harness.install()
    import qt

    file = qt.QFile(str(REPO / "Resources" / "UI" / "MedSegSuite.ui"))
    file.open(qt.QIODevice.ReadOnly)
    try:
        widget = qt.QUiLoader().load(file)
    finally:
        file.close()
    assert widget.findChild(qt.QWidget, "inputVolumeSelector").property("showChildNodeTypes") is False
    widget.deleteLater()


# -- translation -------------------------------------------------------------------------------------------------
def _fresh_messages(monkeypatch, i18n):
    """A fresh copy of MedSegSuiteLib.slicer.messages imported with ``i18n`` as ``slicer.i18n`` (None: absent)."""
    import slicer

    if i18n is None:
        monkeypatch.setitem(sys.modules, "slicer.i18n", None)  # an import of it fails
    else:
        monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
        monkeypatch.setattr(slicer, "i18n", i18n, raising=False)
    path = REPO / "MedSegSuiteLib" / "slicer" / "messages.py"
    spec = importlib.util.spec_from_file_location("MedSegSuiteLib.slicer._messages_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_texts_go_through_slicers_translation_functions_where_slicer_has_them(monkeypatch):
    calls = []
    fake = types.ModuleType("slicer.i18n")
    fake.tr = lambda text: calls.append(text) or f"<{text}>"
    fake.translate = lambda context, text: f"<{context}|{text}>"
    messages = _fresh_messages(monkeypatch, fake)
    assert messages._ is fake.tr and messages.translate is fake.translate
    assert messages.error_message(KeyError("x"), "Export").startswith(
        "<Export failed because of an unexpected error (KeyError: 'x')"
    )
    plain = _fresh_messages(monkeypatch, None)  # the slicer-core wheel: no slicer.i18n, texts unchanged
    assert plain._("Segment") == "Segment" and plain.translate("ctx", "Segment") == "Segment"


def test_the_harness_translates_module_texts_in_the_context_slicer_uses(monkeypatch):
    app = slicer_harness.install()
    from slicer_harness import i18n

    seen = []
    monkeypatch.setattr(
        app, "translator", lambda context, text: seen.append(context) or text.replace("Segment", "SEGMENT")
    )
    assert i18n.tr("Segment {name}") == "SEGMENT {name}"
    assert seen == ["test_slicer_api_generations"]  # a file without a package: its own name
    monkeypatch.setattr(app, "translator", lambda context, text: "Segmentieren {Name}")
    assert i18n.tr("Segment {name}") == "Segment {name}"  # a lost placeholder: the text stays


def test_the_module_title_and_help_are_translatable(monkeypatch):
    slicer_harness.install()
    source = (REPO / "MedSegSuite" / "MedSegSuite.py").read_text(encoding="utf-8")
    assert "from slicer.i18n import tr as _" in source and "from slicer.i18n import translate" in source
    tree = ast.parse(source)
    assigned = {
        target.attr: node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Attribute) and target.attr in ("title", "helpText", "acknowledgementText")
    }
    for name, value in assigned.items():
        assert isinstance(value, ast.Call) and getattr(value.func, "id", "") == "_", name
    assert set(assigned) == {"title", "helpText", "acknowledgementText"}
