"""The MedSegSuite parameter node: the panel's choices, saved with the scene.

The classic pattern: one ``vtkMRMLScriptedModuleNode`` per scene with the singleton
tag ``MedSegSuite``, string parameters for plain values and node references for
nodes. The singleton tag is set *before* the node is added, so loading a saved scene
merges the saved choices into the existing node instead of adding a second one.
"""

from __future__ import annotations

from typing import Any, Optional

import slicer

__all__ = ["MODULE_NAME", "Parameters", "get_parameter_node"]

MODULE_NAME = "MedSegSuite"

# node reference roles
INPUT_VOLUME = "InputVolume"
OUTPUT_SEGMENTATION = "OutputSegmentation"
REGION = "Region"
REFINE_REGION = "RefineRegion"
FINETUNE_LABELLED = "FinetuneLabelled"  # segmentation nodes (several references)
FINETUNE_UNLABELLED = "FinetuneUnlabelled"  # volume nodes (several references)
FINETUNE_LOSS_TABLE = "FinetuneLossTable"
FINETUNE_VALIDATION_TABLE = "FinetuneValidationTable"
FINETUNE_CHART = "FinetuneChart"
# string parameters and their defaults
MODEL = "Model"
DEVICE = "Device"
FAST = "FastMode"
REFINE_MODEL = "RefineModel"
REFINE_STEPS = "RefineSteps"
REFINE_SCOPE = "RefineScope"
REFINE_NEIGHBOURS = "RefineNeighbours"  # slices on either side for the scope "neighbours" (no control yet)
REFINE_SPREAD = "RefineSpread"
REFINE_ENSEMBLE = "RefineEnsemble"
KEEP_EDITS = "KeepEdits"
EXPORT_FORMAT = "ExportFormat"
EXPORT_PATH = "ExportPath"
EXPORT_OVERWRITE = "ExportOverwrite"
FINETUNE_MODEL = "FinetuneModel"
FINETUNE_ITERATIONS = "FinetuneIterations"
FINETUNE_FOLDER = "FinetuneUnlabelledFolder"
DEFAULTS = {
    MODEL: "",
    DEVICE: "auto",
    FAST: "false",
    REFINE_MODEL: "",
    # Chosen by benchmarks/refinement (README, "Refinement benchmark"): one step on the edited slice and its
    # neighbours, spreading the edit at 0.5, was the only setting that did not lower Dice on average.
    REFINE_STEPS: "1",
    REFINE_SCOPE: "neighbours",
    REFINE_NEIGHBOURS: "2",
    REFINE_SPREAD: "0.5",
    REFINE_ENSEMBLE: "1",
    KEEP_EDITS: "true",
    EXPORT_FORMAT: "seg.nrrd",
    EXPORT_PATH: "",
    EXPORT_OVERWRITE: "false",
    FINETUNE_MODEL: "",
    FINETUNE_ITERATIONS: "200",
    FINETUNE_FOLDER: "",
}


def get_parameter_node(scene: Optional[Any] = None, create: bool = True) -> Optional[Any]:
    """The scene's MedSegSuite parameter node (created with defaults if missing and ``create``)."""
    scene = scene or slicer.mrmlScene
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None:
        if not create:
            return None
        new = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        new.UnRegister(None)  # the Python variable owns it now
        new.SetSingletonTag(MODULE_NAME)
        new.SetModuleName(MODULE_NAME)
        new.SetName(MODULE_NAME)
        new.SetHideFromEditors(True)
        node = scene.AddNode(new)
    for key, value in DEFAULTS.items():
        if not node.GetParameter(key):
            node.SetParameter(key, value)
    return node


class _Reference:
    """A node reference of the parameter node (None when unset)."""

    def __init__(self, role: str) -> None:
        self.role = role

    def __get__(self, owner: Optional[Parameters], kind: type) -> Any:
        return self if owner is None else owner.node.GetNodeReference(self.role)

    def __set__(self, owner: Parameters, value: Optional[Any]) -> None:
        owner.node.SetNodeReferenceID(self.role, value.GetID() if value is not None else None)


class _References(_Reference):
    """Several node references under one role, in order (missing nodes left out)."""

    def __get__(self, owner: Optional[Parameters], kind: type) -> Any:
        if owner is None:
            return self
        node = owner.node
        found = (node.GetNthNodeReference(self.role, n) for n in range(node.GetNumberOfNodeReferences(self.role)))
        return [value for value in found if value is not None]

    def __set__(self, owner: Parameters, values: list[Any]) -> None:
        values = list(values)
        if [n.GetID() for n in self.__get__(owner, type(owner))] == [n.GetID() for n in values]:
            return
        was_modifying = owner.node.StartModify()
        try:
            owner.node.RemoveNodeReferenceIDs(self.role)
            for value in values:
                owner.node.AddNodeReferenceID(self.role, value.GetID())
        finally:
            owner.node.EndModify(was_modifying)


class _Text:
    """A string parameter; with ``fallback`` an empty value reads and writes as its default."""

    def __init__(self, key: str, fallback: bool = False) -> None:
        self.key = key
        self.empty = DEFAULTS[key] if fallback else ""

    def __get__(self, owner: Optional[Parameters], kind: type) -> Any:
        return self if owner is None else owner.node.GetParameter(self.key) or self.empty

    def __set__(self, owner: Parameters, value: str) -> None:
        owner.node.SetParameter(self.key, value or self.empty)


class _Flag:
    """A "true"/"false" parameter; anything else reads as ``default``."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.default = DEFAULTS[key] == "true"

    def __get__(self, owner: Optional[Parameters], kind: type) -> Any:
        if owner is None:
            return self
        text = owner.node.GetParameter(self.key)
        return self.default if text not in ("true", "false") else text == "true"

    def __set__(self, owner: Parameters, value: bool) -> None:
        owner.node.SetParameter(self.key, "true" if value else "false")


class _Integer:
    """An integer parameter, at least ``minimum`` (when given); unreadable text reads as the default."""

    def __init__(self, key: str, minimum: Optional[int] = None) -> None:
        self.key = key
        self.minimum = minimum

    def _clamped(self, value: int) -> int:
        return value if self.minimum is None else max(self.minimum, value)

    def __get__(self, owner: Optional[Parameters], kind: type) -> Any:
        if owner is None:
            return self
        try:
            return self._clamped(int(owner.node.GetParameter(self.key)))
        except ValueError:
            return int(DEFAULTS[self.key])

    def __set__(self, owner: Parameters, value: int) -> None:
        owner.node.SetParameter(self.key, str(self._clamped(int(value))))


class _Fraction:
    """A number from 0 to 1 (clamped); unreadable text or NaN reads as the default."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __get__(self, owner: Optional[Parameters], kind: type) -> Any:
        if owner is None:
            return self
        try:
            value = float(owner.node.GetParameter(self.key))
        except ValueError:
            value = float("nan")
        return min(1.0, max(0.0, value)) if value == value else float(DEFAULTS[self.key])

    def __set__(self, owner: Parameters, value: float) -> None:
        owner.node.SetParameter(self.key, f"{min(1.0, max(0.0, float(value))):g}")


class Parameters:
    """Typed view of a parameter node; setting a value modifies the node (and notifies observers)."""

    input_volume = _Reference(INPUT_VOLUME)
    output_segmentation = _Reference(OUTPUT_SEGMENTATION)
    region = _Reference(REGION)
    model_id = _Text(MODEL)
    device = _Text(DEVICE, fallback=True)
    fast = _Flag(FAST)
    refine_region = _Reference(REFINE_REGION)
    refine_model_id = _Text(REFINE_MODEL)
    refine_steps = _Integer(REFINE_STEPS)
    refine_scope = _Text(REFINE_SCOPE, fallback=True)
    #: Slices on either side of the current one for the scope "neighbours" (at least 0).
    refine_neighbours = _Integer(REFINE_NEIGHBOURS, minimum=0)
    #: How strongly an edited slice guides the slices beside it, 0 to 1.
    refine_spread = _Fraction(REFINE_SPREAD)
    #: Refinement chains per click, at least 1 (2 or more also show where they disagree).
    refine_ensemble = _Integer(REFINE_ENSEMBLE, minimum=1)
    keep_edits = _Flag(KEEP_EDITS)
    export_format = _Text(EXPORT_FORMAT, fallback=True)
    export_path = _Text(EXPORT_PATH)
    export_overwrite = _Flag(EXPORT_OVERWRITE)
    #: The model finetuning starts from ("" until chosen).
    finetune_model_id = _Text(FINETUNE_MODEL)
    finetune_iterations = _Integer(FINETUNE_ITERATIONS, minimum=1)
    #: An optional folder of more unlabelled images.
    finetune_folder = _Text(FINETUNE_FOLDER)
    #: The checked labelled cases (segmentation nodes; each brings its reference volume).
    finetune_labelled = _References(FINETUNE_LABELLED)
    #: The checked unlabelled volume nodes.
    finetune_unlabelled = _References(FINETUNE_UNLABELLED)
    finetune_loss_table = _Reference(FINETUNE_LOSS_TABLE)
    finetune_validation_table = _Reference(FINETUNE_VALIDATION_TABLE)
    finetune_chart = _Reference(FINETUNE_CHART)

    def __init__(self, node: Any) -> None:
        self.node = node
