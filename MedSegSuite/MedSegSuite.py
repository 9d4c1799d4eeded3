"""MedSegSuite: the 3D Slicer module (metadata, panel and self-test). Logic lives in MedSegSuiteLib."""

from __future__ import annotations

import os
import sys

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

try:  # Slicer 5.x: texts marked for Slicer's translation tools
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # environments without slicer.i18n (the slicer-core wheels): texts stay as written

    def _(text):
        return text

    def translate(context, text):
        return text


_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if not os.path.isdir(os.path.join(_HERE, "MedSegSuiteLib")) and os.path.isdir(os.path.join(_ROOT, "MedSegSuiteLib")):
    sys.path.insert(0, _ROOT)  # running from the source tree: MedSegSuiteLib sits beside this folder


def _resource(widget, relative):
    """A file of Resources/, beside the module when built, at the repository top in the source tree."""
    path = widget.resourcePath(relative)
    return path if os.path.exists(path) else os.path.join(_ROOT, "Resources", relative)


class MedSegSuite(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedSegSuite")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["MedSegSuite developers"]
        self.parent.helpText = _(
            "Segment CT, MRI and 2D images with ConDSeg, BA-Net, HiDiff, CANet or D-Net models. Choose the input "
            "volume and a model, click Segment; the work runs in a background process, so the viewer stays usable. "
            '<a href="https://github.com/MedSegSuite/MedSegSuite#readme">Documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "The networks are re-implementations of the published methods; see each model card for its data and "
            "licence."
        )
        slicer.app.connect("startupCompleted()", _registerSampleData)


def _registerSampleData():
    """Offer the bundled MSD hippocampus sample (CC BY-SA 4.0) in the Sample Data module."""
    import SampleData

    from MedSegSuiteLib.slicer.sample_data import register_sample_data

    register_sample_data(SampleData.SampleDataLogic.registerCustomSampleDataSource)


class MedSegSuiteWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.panel = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from MedSegSuiteLib.slicer.logic import SegmentationLogic
        from MedSegSuiteLib.slicer.panel import SegmentPanel

        uiWidget = slicer.util.loadUI(_resource(self, "UI/MedSegSuite.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegmentationLogic()
        self.panel = SegmentPanel(self.ui, self.logic, requirements=_resource(self, "requirements.txt"))
        self.panel.initialize_parameter_node()

    def enter(self):
        self.panel.enter()

    def cleanup(self):
        if self.panel is not None:
            self.panel.cleanup()
            self.logic.shutdown()

    def refreshModels(self):
        self.panel.refresh_models()


class MedSegSuiteTest(ScriptedLoadableModuleTest):
    """Drives the panel like a user: segment, cancel, survive a worker crash, reload the scene,
    refine while keeping edits, undo, refine with an ensemble (its uncertainty segment) and undo,
    finetune (start, cancel, resume, segment with the new model), and export.

    The segmentation steps need a 3D model (bundled, else imported), the refinement steps
    a HiDiff model and the finetuning steps a small (lite) 3D model; without one, those
    steps are skipped with a message (set MEDSEGSUITE_SELFTEST_REQUIRE_MODEL=1 /
    MEDSEGSUITE_SELFTEST_REQUIRE_REFINER=1 / MEDSEGSUITE_SELFTEST_REQUIRE_FINETUNE=1 to
    make that a failure). The finetuned model is removed from the user model folder
    afterwards. Exporting needs no model.
    """

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_MedSegSuite1()

    def test_MedSegSuite1(self):
        from MedSegSuiteLib.slicer import testing

        self.widget = slicer.util.getModuleWidget("MedSegSuite")
        self.widget.refreshModels()
        self.entry = testing.pick_3d_model(self.widget.panel.entries)
        volume, mask = testing.add_ball_volume("Ball", shape=(24, 48, 48))
        self.widget.ui.inputVolumeSelector.setCurrentNode(volume)
        if self.entry is None:
            if os.environ.get("MEDSEGSUITE_SELFTEST_REQUIRE_MODEL"):
                self.fail("no 3D model is installed")
            self.delayDisplay("No 3D model installed: skipping the segmentation steps (import one first).")
            self._checkSceneReload(volume, None)
        else:
            self.widget.ui.modelSelector.setCurrentIndex(self.widget.ui.modelSelector.findData(self.entry.card.id))
            segmentation = self._segment(volume, mask)
            big, _ = testing.add_ball_volume("Big ball", shape=(48, 96, 96), seed=1, study=None)
            self._cancelMidway(big, segmentation)
            self._killWorkerMidway(big, segmentation)
            self._checkSceneReload(volume, segmentation)
        self._refineKeepingEditsAndUndo()
        self._finetuneCancelResumeAndSegment()
        self._export()
        self.delayDisplay("MedSegSuite self-test passed")

    # -- steps ---------------------------------------------------------------------------
    def _clickAndWait(self, timeout=300):
        from MedSegSuiteLib.slicer import testing

        self.widget.ui.segmentButton.click()
        self.assertTrue(testing.wait_until(lambda: not self.widget.logic.busy, timeout), "segmentation timed out")
        return self.widget.logic.status

    def _waitForSegmenting(self):
        from MedSegSuiteLib.slicer import testing

        logic = self.widget.logic
        testing.wait_until(lambda: logic.status.stage == "segmenting" or not logic.busy)
        self.assertTrue(logic.busy, f"the job ended before it could be interrupted: {logic.status.message}")
        self.assertEqual(self.widget.ui.segmentButton.property("text"), "Cancel")

    def _segment(self, volume, mask):
        from MedSegSuiteLib.slicer import testing
        from MedSegSuiteLib.slicer.segmentations import geometry_matches, segment_terminology

        self.delayDisplay(f"Segmenting with {self.entry.card.name}")
        self.widget.ui.outputSegmentationSelector.setCurrentNode(None)
        status = self._clickAndWait()
        self.assertEqual(status.state, "done", status.message)
        segmentation = slicer.mrmlScene.GetNodeByID(status.output_node_id)
        self.assertIs(self.widget.ui.outputSegmentationSelector.currentNode(), segmentation)
        self.assertTrue(geometry_matches(segmentation, volume))
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(len(self.entry.card.labels))]
        self.assertEqual(names, [label.name for label in self.entry.card.labels])
        for label in self.entry.card.labels:
            segment = segmentation.GetSegmentation().GetSegment(label.name)
            color = [round(c * 255) for c in segment.GetColor()]
            self.assertEqual(color, list(label.color))
            if label.terminology:  # through the tag: vtkSegment.GetTerminology only exists from Slicer 5.10 on
                self.assertIn("^".join(label.terminology["type"]), segment_terminology(segment))
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        study = sh.GetItemParent(sh.GetItemByDataNode(volume))
        self.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(segmentation)), study)
        self.assertIsNotNone(segmentation.GetDisplayNode())
        if "Ball" in names:
            found = testing.segment_array(segmentation, "Ball", volume)
            self.assertGreater(testing.dice(found, mask), 0.7)
        return segmentation

    def _snapshot(self, segmentation, volume):
        from MedSegSuiteLib.slicer import testing

        segments = segmentation.GetSegmentation()
        ids = [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())]
        arrays = [testing.segment_array(segmentation, i, volume).tobytes() for i in ids]
        return slicer.mrmlScene.GetNumberOfNodes(), ids, arrays

    def _cancelMidway(self, big, segmentation):
        self.delayDisplay("Cancelling a run midway")
        volume = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
        before = self._snapshot(segmentation, volume)
        self.widget.ui.inputVolumeSelector.setCurrentNode(big)
        self.widget.ui.outputSegmentationSelector.setCurrentNode(segmentation)
        self.widget.ui.segmentButton.click()
        self._waitForSegmenting()
        status = self._clickAndWait()  # the button is Cancel now
        self.assertEqual(status.state, "cancelled", status.message)
        self.assertEqual(self._snapshot(segmentation, volume), before)
        self.assertEqual(self.widget.ui.segmentButton.property("text"), "Segment")

    def _killWorkerMidway(self, big, segmentation):
        from MedSegSuiteLib.slicer import testing

        self.delayDisplay("Killing the worker during a run")
        volume = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
        before = self._snapshot(segmentation, volume)
        self.widget.ui.segmentButton.click()
        self._waitForSegmenting()
        pid = self.widget.logic.client.pid
        self.widget.logic.client.process.kill()
        self.assertTrue(testing.wait_until(lambda: not self.widget.logic.busy, 60))
        message = self.widget.ui.statusLabel.property("text")
        self.assertIn("stopped unexpectedly", message)
        self.assertIn("scene is unchanged", message)
        self.assertEqual(self._snapshot(segmentation, volume), before)
        self.widget.ui.inputVolumeSelector.setCurrentNode(volume)
        status = self._clickAndWait()
        self.assertEqual(status.state, "done", status.message)
        self.assertNotEqual(self.widget.logic.client.pid, pid)

    def _checkSceneReload(self, volume, segmentation):
        from MedSegSuiteLib.slicer import testing

        self.delayDisplay("Saving and reloading the scene")
        ui = self.widget.ui
        ui.inputVolumeSelector.setCurrentNode(volume)
        ui.deviceSelector.setCurrentIndex(ui.deviceSelector.findData("cpu"))
        model = ui.modelSelector.itemData(ui.modelSelector.property("currentIndex")) if self.entry else ""
        testing.save_and_reload_scene()
        self.assertEqual(ui.inputVolumeSelector.currentNode().GetName(), volume.GetName())
        self.assertEqual(ui.deviceSelector.itemData(ui.deviceSelector.property("currentIndex")), "cpu")
        if segmentation is not None:
            self.assertEqual(ui.outputSegmentationSelector.currentNode().GetName(), segmentation.GetName())
            self.assertEqual(ui.modelSelector.itemData(ui.modelSelector.property("currentIndex")), model)

    def _refineKeepingEditsAndUndo(self):
        import numpy as np

        from MedSegSuiteLib.slicer import testing

        ui = self.widget.ui
        self.refiner = testing.pick_refiner(self.widget.panel.entries)
        if self.refiner is None:
            if os.environ.get("MEDSEGSUITE_SELFTEST_REQUIRE_REFINER"):
                self.fail("no HiDiff model is installed")
            self.delayDisplay("No HiDiff model installed: skipping the refinement steps (import one to test them).")
            return
        self.delayDisplay(f"Segmenting stacked discs with {self.refiner.card.name}, then refining with my edits kept")
        volume, _ = testing.add_disc_stack_volume("Discs")
        ui.inputVolumeSelector.setCurrentNode(volume)
        ui.outputSegmentationSelector.setCurrentNode(None)
        ui.modelSelector.setCurrentIndex(ui.modelSelector.findData(self.refiner.card.id))
        status = self._clickAndWait()
        self.assertEqual(status.state, "done", status.message)
        segmentation = slicer.mrmlScene.GetNodeByID(status.output_node_id)
        segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(self.refiner.card.labels[0].name)
        ai = testing.segment_array(segmentation, segment_id, volume)
        edited = ai.copy()
        edited[1, 1:4, 1:4] = 1  # painted a blob in the background
        inside = np.argwhere(ai[0])[:5]
        edited[0][tuple(inside.T)] = 0  # erased a few voxels of the result
        slicer.util.updateSegmentBinaryLabelmapFromArray(edited, segmentation, segment_id, volume)
        mine = edited != ai
        self.assertGreater(int(mine.sum()), 0)

        ui.refineModelSelector.setCurrentIndex(ui.refineModelSelector.findData(self.refiner.card.id))
        ui.refineStepsSpinBox.setValue(min(3, ui.refineStepsSpinBox.property("maximum")))
        ui.keepEditsCheckBox.setChecked(True)
        ui.refineScopeSelector.setCurrentIndex(ui.refineScopeSelector.findData("volume"))
        self.assertFalse(ui.undoRefineButton.isEnabled())
        ui.refineButton.click()
        self.assertTrue(testing.wait_until(lambda: not self.widget.logic.busy, 300), "refinement timed out")
        status = self.widget.logic.status
        self.assertEqual(status.state, "done", status.message)
        self.assertIn("Refined", ui.statusLabel.property("text"))
        refined = testing.segment_array(segmentation, segment_id, volume)
        self.assertTrue(np.array_equal(refined[mine], edited[mine]), "an edited voxel changed")
        self.delayDisplay(f"Refinement changed {int((refined != edited).sum())} voxel(s) outside my edits")

        self.assertTrue(ui.undoRefineButton.isEnabled())
        ui.undoRefineButton.click()
        self.assertTrue(np.array_equal(testing.segment_array(segmentation, segment_id, volume), edited))
        self.assertFalse(ui.undoRefineButton.isEnabled())

        self.delayDisplay("Refining with an ensemble of two chains: a segment shows where they disagree")
        segments = segmentation.GetSegmentation()
        ui.refineEnsembleSpinBox.setValue(2)
        ui.refineButton.click()
        self.assertTrue(testing.wait_until(lambda: not self.widget.logic.busy, 300), "refinement timed out")
        status = self.widget.logic.status
        self.assertEqual(status.state, "done", status.message)
        self.assertIn("chains disagree", ui.statusLabel.property("text"))
        uncertain = segments.GetSegmentIdBySegmentName("Uncertain (refinement)")
        self.assertTrue(uncertain, "the ensemble added no 'Uncertain (refinement)' segment")
        self.assertEqual(
            status.info["uncertain_voxels"], int(testing.segment_array(segmentation, uncertain, volume).sum())
        )
        ui.undoRefineButton.click()
        self.assertFalse(segments.GetSegmentIdBySegmentName("Uncertain (refinement)"))
        self.assertTrue(np.array_equal(testing.segment_array(segmentation, segment_id, volume), edited))
        ui.refineEnsembleSpinBox.setValue(1)

    def _finetuneCancelResumeAndSegment(self):
        import shutil
        from pathlib import Path

        from MedSegSuiteLib.slicer import testing

        ui, logic = self.widget.ui, self.widget.logic
        self.finetuned = None
        parent = testing.pick_finetune_parent(self.widget.panel.entries)
        if parent is None:
            if os.environ.get("MEDSEGSUITE_SELFTEST_REQUIRE_FINETUNE"):
                self.fail("no small (lite) 3D model to finetune is installed")
            self.delayDisplay(
                "No small (lite) 3D model installed: skipping the finetuning steps (import one to test them)."
            )
            return
        self.delayDisplay(f"Finetuning {parent.card.name}: start, cancel, resume, then segment with the new model")
        patch = tuple(reversed(parent.card.input.patch_xyz or (32, 32, 16)))
        shape = tuple(max(n + 4, m) for n, m in zip(patch, (20, 36, 36)))
        label = parent.card.labels[0].name
        cases = [testing.add_faint_ball_case(f"Faint ball {i}", label, seed=i, shape=shape) for i in (1, 2)]
        spare, _, _ = testing.add_faint_ball_case("Faint ball (unlabelled)", seed=3, shape=shape)
        slicer.app.processEvents()  # the case lists follow the scene
        ui.finetuneCollapsibleButton.setCollapsed(False)
        ui.finetuneModelSelector.setCurrentIndex(ui.finetuneModelSelector.findData(parent.card.id))
        testing.set_checked_items(ui.finetuneLabelledList, [segmentation.GetID() for _, segmentation, _ in cases])
        testing.set_checked_items(ui.finetuneUnlabelledList, [spare.GetID()])
        ui.finetuneIterationsSpinBox.setValue(10)
        self.assertTrue(ui.finetuneStartButton.isEnabled(), ui.finetuneStartButton.property("toolTip"))

        ui.finetuneStartButton.click()
        testing.wait_until(lambda: (logic.status.stage == "training" and logic.status.done >= 2) or not logic.busy, 300)
        self.assertTrue(logic.busy, f"the run ended before it could be cancelled: {logic.status.message}")
        self.assertEqual(ui.finetuneStartButton.property("text"), "Cancel")
        self.assertFalse(ui.finetuneResumeButton.isEnabled())
        ui.finetuneStartButton.click()  # Cancel
        self.assertTrue(testing.wait_until(lambda: not logic.busy, 300), "cancelling timed out")
        self.assertEqual(logic.status.state, "cancelled", logic.status.message)
        self.assertIn("click Resume to continue", ui.statusLabel.property("text"))
        run = logic.unfinished_finetune(parent)
        self.assertIsNotNone(run, "no checkpoint was kept")
        self.assertTrue(ui.finetuneResumeButton.isEnabled(), ui.finetuneResumeButton.property("toolTip"))

        self.delayDisplay(f"Resuming {run[0]}")
        ui.finetuneResumeButton.click()
        self.assertTrue(testing.wait_until(lambda: not logic.busy, 600), "finetuning timed out")
        status = logic.status
        self.assertEqual(status.state, "done", status.message)
        new_id = status.info["model"]
        self.finetuned = dict(status.info)
        try:
            self.assertEqual(new_id, run[0])
            # two labelled cases leave none to hold back: the gain is not checked, so Segment keeps the parent
            self.assertFalse(status.info.get("selected"), status.message)
            self.assertIn("The gain could not be checked", ui.statusLabel.property("text"))
            self.assertNotEqual(ui.modelSelector.itemData(ui.modelSelector.property("currentIndex")), new_id)
            ui.modelSelector.setCurrentIndex(ui.modelSelector.findData(new_id))  # the user may still choose it
            self.assertIn(f"Finetuned from {parent.card.id}", ui.modelInfoLabel.property("text"))
            parameters = self.widget.panel.parameters
            for table in (parameters.finetune_loss_table, parameters.finetune_validation_table):
                self.assertGreater(table.GetTable().GetNumberOfRows(), 0, table.GetName())
            loss = parameters.finetune_loss_table.GetTable()
            self.assertEqual(loss.GetValue(loss.GetNumberOfRows() - 1, 0).ToDouble(), 10.0)

            self.delayDisplay(f"Segmenting with {new_id}")
            ui.inputVolumeSelector.setCurrentNode(cases[0][0])
            ui.outputSegmentationSelector.setCurrentNode(None)
            status = self._clickAndWait()
            self.assertEqual(status.state, "done", status.message)
            self.assertEqual(status.info.get("model"), new_id)
            segmentation = slicer.mrmlScene.GetNodeByID(status.output_node_id)
            self.assertIsNotNone(segmentation.GetSegmentation().GetSegment(label))
            self.assertIn(new_id, segmentation.GetAttribute("MedSegSuite.model"))
        finally:
            for folder in (Path(self.finetuned["directory"]), Path(self.finetuned["directory"] + ".training")):
                shutil.rmtree(folder, ignore_errors=True)  # the test's model leaves the user's folder
            self.widget.refreshModels()

    def _export(self):
        import shutil
        import tempfile

        import numpy as np

        from MedSegSuiteLib.export import read_segmentation
        from MedSegSuiteLib.slicer import testing
        from MedSegSuiteLib.slicer.volumes import grid_from_node

        self.delayDisplay("Exporting to .seg.nrrd and to a NIfTI label map with its JSON table")
        ui = self.widget.ui
        volume, ball = testing.add_ball_volume("Export ball", shape=(12, 24, 20), radius=4.0, study=None)
        marker = np.zeros_like(ball)
        marker[2:4, 2:6, 3:7] = 1
        segments = {"Ball": (ball, (230, 60, 40)), "Marker": (marker, (30, 120, 220))}
        segmentation = testing.add_painted_segmentation(volume, segments, name="Painted")
        ui.inputVolumeSelector.setCurrentNode(volume)
        ui.outputSegmentationSelector.setCurrentNode(segmentation)
        folder = tempfile.mkdtemp(prefix="medsegsuite-selftest-")
        try:
            for key, name in (("seg.nrrd", "painted.seg.nrrd"), ("nifti", "painted.nii.gz")):
                ui.exportFormatSelector.setCurrentIndex(ui.exportFormatSelector.findData(key))
                path = os.path.join(folder, name)
                ui.exportPathLineEdit.setText(path)
                self.assertTrue(ui.exportButton.isEnabled(), ui.exportButton.property("toolTip"))
                ui.exportButton.click()
                self.assertIn(f"Exported 'Painted' to {path}", ui.statusLabel.property("text"))
                back = read_segmentation(path)
                self.assertTrue(back.grid.same_as(grid_from_node(volume), atol=1e-4))
                self.assertEqual(
                    [(s.name, tuple(s.color)) for s in back.segments], [(n, c) for n, (_, c) in segments.items()]
                )
                for segment, (mask, _) in zip(back.segments, segments.values()):
                    self.assertTrue(np.array_equal(back.mask(segment), mask.astype(bool)))
            self.assertTrue(os.path.isfile(os.path.join(folder, "painted.labels.json")))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
