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


class Parameters:
    """Typed view of a parameter node; setting a value modifies the node (and notifies observers)."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def _ref(self, role: str) -> Optional[Any]:
        return self.node.GetNodeReference(role)

    def _set_ref(self, role: str, value: Optional[Any]) -> None:
        self.node.SetNodeReferenceID(role, value.GetID() if value is not None else None)

    def _refs(self, role: str) -> list[Any]:
        nodes = (self.node.GetNthNodeReference(role, n) for n in range(self.node.GetNumberOfNodeReferences(role)))
        return [node for node in nodes if node is not None]

    def _set_refs(self, role: str, values: list[Any]) -> None:
        if [node.GetID() for node in self._refs(role)] == [node.GetID() for node in values]:
            return
        was_modifying = self.node.StartModify()
        try:
            self.node.RemoveNodeReferenceIDs(role)
            for value in values:
                self.node.AddNodeReferenceID(role, value.GetID())
        finally:
            self.node.EndModify(was_modifying)

    @property
    def input_volume(self) -> Optional[Any]:
        return self._ref(INPUT_VOLUME)

    @input_volume.setter
    def input_volume(self, value: Optional[Any]) -> None:
        self._set_ref(INPUT_VOLUME, value)

    @property
    def output_segmentation(self) -> Optional[Any]:
        return self._ref(OUTPUT_SEGMENTATION)

    @output_segmentation.setter
    def output_segmentation(self, value: Optional[Any]) -> None:
        self._set_ref(OUTPUT_SEGMENTATION, value)

    @property
    def region(self) -> Optional[Any]:
        return self._ref(REGION)

    @region.setter
    def region(self, value: Optional[Any]) -> None:
        self._set_ref(REGION, value)

    @property
    def model_id(self) -> str:
        return self.node.GetParameter(MODEL)

    @model_id.setter
    def model_id(self, value: str) -> None:
        self.node.SetParameter(MODEL, value or "")

    @property
    def device(self) -> str:
        return self.node.GetParameter(DEVICE) or DEFAULTS[DEVICE]

    @device.setter
    def device(self, value: str) -> None:
        self.node.SetParameter(DEVICE, value or DEFAULTS[DEVICE])

    @property
    def fast(self) -> bool:
        return self.node.GetParameter(FAST) == "true"

    @fast.setter
    def fast(self, value: bool) -> None:
        self.node.SetParameter(FAST, "true" if value else "false")

    @property
    def refine_region(self) -> Optional[Any]:
        return self._ref(REFINE_REGION)

    @refine_region.setter
    def refine_region(self, value: Optional[Any]) -> None:
        self._set_ref(REFINE_REGION, value)

    @property
    def refine_model_id(self) -> str:
        return self.node.GetParameter(REFINE_MODEL)

    @refine_model_id.setter
    def refine_model_id(self, value: str) -> None:
        self.node.SetParameter(REFINE_MODEL, value or "")

    @property
    def refine_steps(self) -> int:
        try:
            return int(self.node.GetParameter(REFINE_STEPS))
        except ValueError:
            return int(DEFAULTS[REFINE_STEPS])

    @refine_steps.setter
    def refine_steps(self, value: int) -> None:
        self.node.SetParameter(REFINE_STEPS, str(int(value)))

    @property
    def refine_scope(self) -> str:
        return self.node.GetParameter(REFINE_SCOPE) or DEFAULTS[REFINE_SCOPE]

    @refine_scope.setter
    def refine_scope(self, value: str) -> None:
        self.node.SetParameter(REFINE_SCOPE, value or DEFAULTS[REFINE_SCOPE])

    @property
    def refine_neighbours(self) -> int:
        """Slices on either side of the current one for the scope "neighbours" (at least 0)."""
        try:
            return max(0, int(self.node.GetParameter(REFINE_NEIGHBOURS)))
        except ValueError:
            return int(DEFAULTS[REFINE_NEIGHBOURS])

    @refine_neighbours.setter
    def refine_neighbours(self, value: int) -> None:
        self.node.SetParameter(REFINE_NEIGHBOURS, str(max(0, int(value))))

    @property
    def refine_spread(self) -> float:
        """How strongly an edited slice guides the slices beside it, 0 to 1."""
        try:
            value = float(self.node.GetParameter(REFINE_SPREAD))
        except ValueError:
            return float(DEFAULTS[REFINE_SPREAD])
        return min(1.0, max(0.0, value)) if value == value else float(DEFAULTS[REFINE_SPREAD])

    @refine_spread.setter
    def refine_spread(self, value: float) -> None:
        self.node.SetParameter(REFINE_SPREAD, f"{min(1.0, max(0.0, float(value))):g}")

    @property
    def refine_ensemble(self) -> int:
        """Refinement chains per click, at least 1 (2 or more also show where they disagree)."""
        try:
            return max(1, int(self.node.GetParameter(REFINE_ENSEMBLE)))
        except ValueError:
            return int(DEFAULTS[REFINE_ENSEMBLE])

    @refine_ensemble.setter
    def refine_ensemble(self, value: int) -> None:
        self.node.SetParameter(REFINE_ENSEMBLE, str(max(1, int(value))))

    @property
    def keep_edits(self) -> bool:
        return self.node.GetParameter(KEEP_EDITS) != "false"

    @keep_edits.setter
    def keep_edits(self, value: bool) -> None:
        self.node.SetParameter(KEEP_EDITS, "true" if value else "false")

    @property
    def export_format(self) -> str:
        return self.node.GetParameter(EXPORT_FORMAT) or DEFAULTS[EXPORT_FORMAT]

    @export_format.setter
    def export_format(self, value: str) -> None:
        self.node.SetParameter(EXPORT_FORMAT, value or DEFAULTS[EXPORT_FORMAT])

    @property
    def export_path(self) -> str:
        return self.node.GetParameter(EXPORT_PATH)

    @export_path.setter
    def export_path(self, value: str) -> None:
        self.node.SetParameter(EXPORT_PATH, value or "")

    @property
    def export_overwrite(self) -> bool:
        return self.node.GetParameter(EXPORT_OVERWRITE) == "true"

    @export_overwrite.setter
    def export_overwrite(self, value: bool) -> None:
        self.node.SetParameter(EXPORT_OVERWRITE, "true" if value else "false")

    @property
    def finetune_model_id(self) -> str:
        """The model finetuning starts from ("" until chosen)."""
        return self.node.GetParameter(FINETUNE_MODEL)

    @finetune_model_id.setter
    def finetune_model_id(self, value: str) -> None:
        self.node.SetParameter(FINETUNE_MODEL, value or "")

    @property
    def finetune_iterations(self) -> int:
        try:
            return max(1, int(self.node.GetParameter(FINETUNE_ITERATIONS)))
        except ValueError:
            return int(DEFAULTS[FINETUNE_ITERATIONS])

    @finetune_iterations.setter
    def finetune_iterations(self, value: int) -> None:
        self.node.SetParameter(FINETUNE_ITERATIONS, str(int(value)))

    @property
    def finetune_folder(self) -> str:
        """An optional folder of more unlabelled images."""
        return self.node.GetParameter(FINETUNE_FOLDER)

    @finetune_folder.setter
    def finetune_folder(self, value: str) -> None:
        self.node.SetParameter(FINETUNE_FOLDER, value or "")

    @property
    def finetune_labelled(self) -> list[Any]:
        """The checked labelled cases (segmentation nodes; each brings its reference volume)."""
        return self._refs(FINETUNE_LABELLED)

    @finetune_labelled.setter
    def finetune_labelled(self, values: list[Any]) -> None:
        self._set_refs(FINETUNE_LABELLED, list(values))

    @property
    def finetune_unlabelled(self) -> list[Any]:
        """The checked unlabelled volume nodes."""
        return self._refs(FINETUNE_UNLABELLED)

    @finetune_unlabelled.setter
    def finetune_unlabelled(self, values: list[Any]) -> None:
        self._set_refs(FINETUNE_UNLABELLED, list(values))

    @property
    def finetune_loss_table(self) -> Optional[Any]:
        return self._ref(FINETUNE_LOSS_TABLE)

    @finetune_loss_table.setter
    def finetune_loss_table(self, value: Optional[Any]) -> None:
        self._set_ref(FINETUNE_LOSS_TABLE, value)

    @property
    def finetune_validation_table(self) -> Optional[Any]:
        return self._ref(FINETUNE_VALIDATION_TABLE)

    @finetune_validation_table.setter
    def finetune_validation_table(self, value: Optional[Any]) -> None:
        self._set_ref(FINETUNE_VALIDATION_TABLE, value)

    @property
    def finetune_chart(self) -> Optional[Any]:
        return self._ref(FINETUNE_CHART)

    @finetune_chart.setter
    def finetune_chart(self, value: Optional[Any]) -> None:
        self._set_ref(FINETUNE_CHART, value)
