"""Run MedSegSuite's Slicer module outside 3D Slicer: real MRML (slicer-core wheel), real Qt (PySide6).

The ``slicer-core`` wheel provides the MRML scene, the module logics and ``slicer.util``;
PySide6 provides Qt. What only the Slicer application provides is stood in for here,
as small as MedSegSuite needs:

=================================  ===========================================================
``qt`` (:mod:`.qt`)                 PySide6 classes in one namespace; a ``QUiLoader`` that knows
                                    the custom widgets below
``ctk`` (:mod:`.ctk`)               ``ctkCollapsibleButton``
``slicer.qMRMLWidget``,             panel root and node selector (:mod:`.mrml_widgets`)
``slicer.qMRMLNodeComboBox``
``slicer.ScriptedLoadableModule``   Module / Widget / Logic / Test base classes (:mod:`.scripted_module`)
``slicer.app``, ``slicer.modules``  testing flag, event processing, module manager, module logics,
                                    ``translate`` (:mod:`.application`)
``slicer.i18n``                     ``tr`` / ``translate`` for module texts (:mod:`.i18n`)
PythonQt's ``QObject.name``         alias of ``objectName()`` (``slicer.util.childWidgetVariables`` uses it)
=================================  ===========================================================

:mod:`.generations` presents either Slicer API generation (5.8, or the current one of
the wheel); tests choose it with the ``slicer_api`` fixture of their file.

Usage (what the pytest files do)::

    import slicer_harness
    slicer_harness.install()                         # once per process; QT_QPA_PLATFORM=offscreen
    module = slicer_harness.load_module()            # imports MedSegSuite/MedSegSuite.py
    widget = slicer.util.getModuleWidget("MedSegSuite")
    module.python_module.MedSegSuiteTest().runTest() # the module's own self-test
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

__all__ = ["MODULE_FILE", "install", "load_module", "process_events", "unload_modules"]

MODULE_FILE = Path(__file__).resolve().parents[3] / "MedSegSuite" / "MedSegSuite.py"

_state: dict[str, Any] = {}


def _keep_none_alive() -> None:
    """Give ``None`` a reference count that no test run can use up (CPython before 3.12 only).

    PySide6 6.12 returns ``None`` from C++ methods that return ``void`` without a new
    reference (from CPython 3.12 on ``None`` is immortal, so that is harmless there):
    on 3.11 every ``setText``/``setEnabled``/``addItem`` call takes one reference away
    from ``None``, and a long test process ends with "Fatal Python error: none_dealloc"
    (exit status 134) once the count reaches zero. Real 3D Slicer uses PythonQt and is
    not affected. The count is the first field of every object in release builds.
    ``True`` and ``False`` get the same treatment: bool results and bool Qt properties
    read through PySide6 lose references the same way ("Fatal Python error:
    bool_dealloc"), seen once the panel tests ran against both Slicer API generations
    in one process.
    """
    if sys.implementation.name != "cpython" or sys.version_info >= (3, 12) or hasattr(sys, "gettotalrefcount"):
        return
    import ctypes

    for singleton in (None, True, False):
        ctypes.c_ssize_t.from_address(id(singleton)).value += 1 << 40


def install(testing: bool = True) -> Any:
    """Put the stand-ins in place (idempotent) and return the ``slicer.app`` stand-in."""
    if "app" in _state:
        _state["app"].testing = testing
        return _state["app"]
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    _keep_none_alive()
    from PySide6 import QtCore, QtWidgets

    qapp = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["slicer-harness"])
    if not hasattr(QtCore.QObject, "name"):
        QtCore.QObject.name = property(lambda self: self.objectName())  # PythonQt's alias

    from . import ctk as ctk_module
    from . import qt as qt_module

    for name, module in (("qt", qt_module), ("ctk", ctk_module)):
        existing = sys.modules.get(name)
        if existing is not None and existing is not module:
            raise RuntimeError(f"a module named {name!r} is already imported ({existing!r}); it would shadow Slicer's")
        sys.modules[name] = module

    import slicer

    from . import application, mrml_widgets, scripted_module

    scene, app_logic, logics = application.bootstrap_scene()
    slicer.mrmlScene = scene
    app = application.App(qapp, app_logic, testing)
    slicer.app = app
    slicer.modules = SimpleNamespace(
        **{name: SimpleNamespace(logic=(lambda logic=logic: logic)) for name, logic in logics.items()}
    )
    slicer.ScriptedLoadableModule = scripted_module
    sys.modules["slicer.ScriptedLoadableModule"] = scripted_module
    if "slicer.i18n" not in sys.modules:  # Slicer 5.x has it; the slicer-core wheel does not
        from . import i18n

        slicer.i18n = i18n
        sys.modules["slicer.i18n"] = i18n
    slicer.qMRMLWidget = mrml_widgets.qMRMLWidget
    slicer.qMRMLNodeComboBox = mrml_widgets.qMRMLNodeComboBox
    slicer.qSlicerScriptedLoadableModuleWidget = application.qSlicerScriptedLoadableModuleWidget
    _state.update(app=app, qapp=qapp, logics=logics)
    return app


def load_module(path: Optional[Path] = None, name: str = "MedSegSuite") -> Any:
    """Import a scripted module file and register it like Slicer does; returns its module record.

    ``slicer.modules.<name lower>`` and ``slicer.app.moduleManager().module(name)`` then
    give the record, whose ``widgetRepresentation()`` creates and sets up the widget.
    """
    install()
    import slicer

    from .application import LoadedModule

    path = Path(path or MODULE_FILE)
    manager = slicer.app.moduleManager()
    if name in manager.modules:
        return manager.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    python_module = importlib.util.module_from_spec(spec)
    sys.modules[name] = python_module
    spec.loader.exec_module(python_module)
    record = LoadedModule(name, str(path), python_module)
    manager.modules[name] = record
    setattr(slicer.modules, name.lower(), record)
    return record


def open_module_widget(client: Any) -> Any:
    """A cleared scene and a freshly loaded MedSegSuite widget whose logic talks to ``client``
    (a :class:`~MedSegSuiteLib.worker.client.WorkerClient`), with its model list read."""
    install()
    import slicer

    slicer.mrmlScene.Clear(0)
    load_module()
    widget = slicer.util.getModuleWidget("MedSegSuite")
    widget.logic._client = client
    widget.refreshModels()
    return widget


def unload_modules() -> None:
    """Clean up every loaded module's widget (stops its worker) and forget the modules."""
    if "app" not in _state:
        return
    import slicer

    manager = slicer.app.moduleManager()
    slicer.app._slots.clear()
    for name, record in list(manager.modules.items()):
        record.cleanup()
        del manager.modules[name]
        sys.modules.pop(name, None)
        for attribute in (name.lower(), name + "Widget"):
            if hasattr(slicer.modules, attribute):
                delattr(slicer.modules, attribute)


def process_events() -> None:
    """Let Qt deliver pending events (timers included)."""
    if "qapp" in _state:
        _state["qapp"].processEvents()
