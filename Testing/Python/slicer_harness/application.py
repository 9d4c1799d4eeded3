# ruff: noqa: N802, N803, N815 - Slicer's camelCase API
"""Stand-ins for ``slicer.app`` and ``slicer.modules``, and a scene set up like Slicer's.

:func:`bootstrap_scene` creates a real ``vtkMRMLScene`` with the application logic and
the Colors, Subject hierarchy, Volumes, Segmentations and Markups module logics that
Slicer registers at start-up (without them, segmentations have no converter rules and
``slicer.util`` helpers fail). :class:`App` answers what module code asks of
``slicer.app``: ``testingEnabled()``, ``processEvents()``, ``applicationName``,
``applicationLogic()``, ``moduleManager().module(name)``, ``layoutManager()`` (None: there
are no views), ``temporaryPath``, ``topLevelWidgets()`` and ``translate(context, text)``.
"""

from __future__ import annotations

import tempfile
from types import SimpleNamespace
from typing import Any, Optional

import slicer
from PySide6 import QtWidgets

__all__ = ["App", "LoadedModule", "ModuleManager", "bootstrap_scene", "qSlicerScriptedLoadableModuleWidget"]


def bootstrap_scene() -> tuple[Any, Any, dict[str, Any]]:
    """``(scene, application_logic, module_logics)`` wired together like in Slicer."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colors)
    logics = {"colors": colors}
    for name, cls in (
        ("subjecthierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
        ("volumes", slicer.vtkSlicerVolumesLogic),
        ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("markups", slicer.vtkSlicerMarkupsLogic),
    ):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic
    return scene, app_logic, logics


class qSlicerScriptedLoadableModuleWidget(QtWidgets.QWidget):  # noqa: N801 - Slicer's class name
    """The module panel Slicer creates for a scripted module; ``self()`` is the Python widget."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._python_widget = None
        self.isEntered = False

    def self(self):
        return self._python_widget


class LoadedModule:
    """What ``slicer.modules.<name>`` and ``moduleManager().module(name)`` return."""

    def __init__(self, name: str, path: str, python_module: Any) -> None:
        self.name = name
        self.path = path
        self.python_module = python_module
        self.title = name
        self.categories: list = []
        self.dependencies: list = []
        self.contributors: list = []
        self.helpText = ""
        self.acknowledgementText = ""
        self.hidden = False
        self.instance = getattr(python_module, name)(self)
        self._representation: Optional[qSlicerScriptedLoadableModuleWidget] = None

    def widgetRepresentation(self) -> qSlicerScriptedLoadableModuleWidget:
        """The module panel, created and set up on first use (like Slicer)."""
        if self._representation is None:
            representation = qSlicerScriptedLoadableModuleWidget()
            representation.setLayout(QtWidgets.QVBoxLayout())
            widget = getattr(self.python_module, self.name + "Widget")(representation)
            representation._python_widget = widget
            self._representation = representation
            setattr(slicer.modules, self.name + "Widget", widget)
            widget.setup()
        return self._representation

    def cleanup(self) -> None:
        if self._representation is not None:
            widget = self._representation.self()
            widget.cleanup()
            self._representation.deleteLater()
            self._representation = None


class ModuleManager:
    def __init__(self) -> None:
        self.modules: dict[str, LoadedModule] = {}

    def module(self, name: str) -> Optional[LoadedModule]:
        return self.modules.get(name)


class App:
    """``slicer.app``: the parts of qSlicerApplication that module code uses."""

    applicationName = "3D Slicer"
    applicationVersion = "harness"

    def __init__(self, qapp: QtWidgets.QApplication, application_logic: Any, testing: bool = True) -> None:
        self.qapp = qapp
        self._application_logic = application_logic
        self._module_manager = ModuleManager()
        self.testing = testing
        self.temporaryPath = tempfile.gettempdir()
        self._slots: dict[str, list] = {}
        self.translator: Optional[Any] = None  # (context, text) -> text, for tests of translated texts

    def translate(self, context: str, text: str) -> str:
        """``QCoreApplication.translate`` as ``slicer.i18n`` calls it: the text itself unless a translator is set."""
        return self.translator(context, text) if self.translator is not None else text

    def connect(self, signal: str, slot: Any) -> None:
        """Keep ``slot`` for ``signal``; :meth:`emit` calls the slots of a signal in order."""
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal: str) -> None:
        for slot in self._slots.get(signal, []):
            slot()

    def testingEnabled(self) -> bool:
        return self.testing

    def processEvents(self, *args: Any) -> None:
        self.qapp.processEvents()

    def applicationLogic(self) -> Any:
        return self._application_logic

    def moduleManager(self) -> ModuleManager:
        return self._module_manager

    def layoutManager(self) -> None:
        return None

    def topLevelWidgets(self) -> list:
        return self.qapp.topLevelWidgets()

    def commandOptions(self) -> SimpleNamespace:
        return SimpleNamespace(testingEnabled=self.testing, noMainWindow=True)
