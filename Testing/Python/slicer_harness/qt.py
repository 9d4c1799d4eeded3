# ruff: noqa: N802, N803, N815 - Slicer's camelCase API
"""Stand-in for Slicer's PythonQt ``qt`` module, made from PySide6.

Slicer exposes every Qt class in one ``qt`` namespace (``qt.QTimer``, ``qt.QFile``,
``qt.QUiLoader``...). This module does the same with PySide6's QtCore, QtGui,
QtWidgets and QtUiTools. Its :class:`QUiLoader` knows the custom widgets of Slicer
``.ui`` files (``ctkCollapsibleButton``, ``qMRMLWidget``, ``qMRMLNodeComboBox``), so
``slicer.util.loadUI`` builds the real panel.

Differences from PythonQt that module code must respect (all work in both):
use setter calls (``setEnabled(False)``) rather than property assignment, read
properties whose name is also a getter with ``widget.property("currentIndex")``, and
connect signals as ``widget.clicked.connect(slot)``.
"""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtWidgets
from PySide6.QtUiTools import QUiLoader as _QUiLoader

for _module in (QtCore, QtGui, QtWidgets):
    for _name in dir(_module):
        if _name.startswith("Q") or _name in ("Qt", "Signal", "Slot", "Property"):
            globals()[_name] = getattr(_module, _name)
del _module, _name


class QUiLoader(_QUiLoader):
    """PySide6's loader with the stand-ins of Slicer's custom widgets registered."""

    def __init__(self, parent=None):
        super().__init__(parent)
        from . import ctk, mrml_widgets

        for cls in (ctk.ctkCollapsibleButton, mrml_widgets.qMRMLWidget, mrml_widgets.qMRMLNodeComboBox):
            self.registerCustomWidget(cls)

    def load(self, *args, **kwargs):
        """Load a ``.ui`` file; sections marked ``collapsed`` start with their contents hidden."""
        from . import ctk

        widget = super().load(*args, **kwargs)
        if widget is not None:
            for section in widget.findChildren(ctk.ctkCollapsibleButton):
                section.hide_contents_if_collapsed()
        return widget
