"""MedSegSuite: the 3D Slicer module (metadata, panel and self-test). Logic lives in MedSegSuiteLib."""

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class MedSegSuite(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSegSuite"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["MedSegSuite developers"]
        self.parent.helpText = (
            "Segment images with ConDSeg, BA-Net, HiDiff, CANet or D-Net, refine corrected masks, finetune models "
            "on your own labelled volumes and export the results. "
            '<a href="https://github.com/MedSegSuite/MedSegSuite#readme">Documentation</a>.'
        )
        self.parent.acknowledgementText = (
            "The networks are re-implementations of the published methods; see each model card for its data and "
            "licence."
        )


class MedSegSuiteWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.panel = slicer.util.loadUI(self.resourcePath("UI/MedSegSuite.ui"))
        self.layout.addWidget(self.panel)
        self.ui = slicer.util.childWidgetVariables(self.panel)
        self.panel.setMRMLScene(slicer.mrmlScene)
        self.entries = []
        self.ui.modelSelector.currentIndexChanged.connect(self.onModelChanged)
        self.refreshModels()

    def refreshModels(self):
        from MedSegSuiteLib.models import ModelRegistry

        registry = ModelRegistry()
        self.entries = registry.entries()
        self.ui.modelSelector.clear()
        for entry in self.entries:
            self.ui.modelSelector.addItem(f"{entry.card.name} ({entry.card.version})")
        if not self.entries:
            self.ui.modelInfoLabel.setText(f"No models found in {registry.bundled_dir} or {registry.user_dir}.")

    def onModelChanged(self, index):
        if not 0 <= index < len(self.entries):
            return
        card = self.entries[index].card
        labels = ", ".join(label.name for label in card.labels)
        self.ui.modelInfoLabel.setText(f"{card.network} ({card.dims}D) - labels: {labels} - licence: {card.licence}")


class MedSegSuiteTest(ScriptedLoadableModuleTest):
    def runTest(self):
        self.test_models_are_listed()

    def test_models_are_listed(self):
        from MedSegSuiteLib.models import ModelRegistry

        registry = ModelRegistry()
        for entry in registry.entries():
            self.assertTrue(entry.weights_path.is_file(), entry.card.id)
        self.assertEqual(registry.problems, [])
