# ruff: noqa: N802, N803, N815 - Slicer's camelCase API
"""Stand-in for ``slicer.ScriptedLoadableModule``: the four base classes of a scripted module.

They keep the attributes and methods MedSegSuite.py uses from the real ones: the
module's ``parent`` metadata, the widget's ``parent``/``layout``/``resourcePath``/
``setup``/``enter``/``exit``/``cleanup``, the logic's singleton parameter node, and the
test case's ``delayDisplay``/``takeScreenshot`` (a unittest.TestCase, like Slicer's).
"""

from __future__ import annotations

import logging
import os
import sys
import unittest

import slicer

__all__ = [
    "ScriptedLoadableModule",
    "ScriptedLoadableModuleLogic",
    "ScriptedLoadableModuleTest",
    "ScriptedLoadableModuleWidget",
]


class ScriptedLoadableModule:
    """Module metadata holder; ``parent`` is the harness's module record."""

    def __init__(self, parent):
        self.parent = parent
        self.moduleName = type(self).__name__
        parent.title = self.moduleName
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""
        parent.hidden = False

    def getDefaultModuleDocumentationLink(self, docPage=None):
        return ""

    def runTest(self, msec=100, **kwargs):
        test_class = getattr(sys.modules[type(self).__module__], self.moduleName + "Test")
        test_class().runTest()


class ScriptedLoadableModuleWidget:
    """The panel base class: ``self.layout`` is the module panel's layout."""

    def __init__(self, parent=None):
        from PySide6 import QtWidgets

        self.moduleName = type(self).__name__[: -len("Widget")] if type(self).__name__.endswith("Widget") else ""
        self.developerMode = False
        if parent is None:
            parent = slicer.qSlicerScriptedLoadableModuleWidget()
        if parent.layout() is None:
            parent.setLayout(QtWidgets.QVBoxLayout())
        self.parent = parent
        self.layout = parent.layout()

    def resourcePath(self, filename):
        module_dir = os.path.dirname(os.path.abspath(sys.modules[type(self).__module__].__file__))
        return os.path.join(module_dir, "Resources", filename)

    def setup(self):
        pass

    def enter(self):
        pass

    def exit(self):
        pass

    def cleanup(self):
        pass

    def onReload(self):
        pass


class ScriptedLoadableModuleLogic:
    """Logic base class with Slicer's singleton parameter node handling."""

    def __init__(self, parent=None):
        name = type(self).__name__
        self.moduleName = name[: -len("Logic")] if name.endswith("Logic") else name
        self.isSingletonParameterNode = True

    def createParameterNode(self):
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return node

    def getParameterNode(self):
        if self.isSingletonParameterNode:
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node:
                return node
        node = self.createParameterNode()
        if self.isSingletonParameterNode:
            node.SetSingletonTag(self.moduleName)
        return slicer.mrmlScene.AddNode(node)


class ScriptedLoadableModuleTest(unittest.TestCase):
    """A module self-test; Slicer runs ``runTest``, unittest loaders run the ``test_*`` methods."""

    def delayDisplay(self, message, msec=100):
        logging.info(message)
        slicer.app.processEvents()

    def takeScreenshot(self, name, description, type=-1):
        logging.info("screenshot %s: %s (not taken by the harness)", name, description)

    def runTest(self):
        pass
