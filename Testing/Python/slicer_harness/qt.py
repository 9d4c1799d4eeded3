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
            _refuse_unknown_properties(widget)
            for section in widget.findChildren(ctk.ctkCollapsibleButton):
                section.hide_contents_if_collapsed()
        return widget


def _refuse_unknown_properties(root) -> None:
    """Raise if the ``.ui`` file set a property that a stand-in widget does not declare.

    Qt's loader turns such a property into a dynamic one and goes on; the real widget
    would ignore it (or Slicer's loader would warn), so a test would pass on a panel
    that does not work in Slicer.
    """
    from . import ctk, mrml_widgets

    stand_ins = (ctk.ctkCollapsibleButton, mrml_widgets.qMRMLWidget, mrml_widgets.qMRMLNodeComboBox)
    unknown = []
    for widget in [root, *root.findChildren(QtWidgets.QWidget)]:
        if isinstance(widget, stand_ins):
            names = [bytes(name).decode() for name in widget.dynamicPropertyNames()]
            unknown += [f"{widget.objectName()}.{name}" for name in names if not name.startswith("_")]
    if unknown:
        raise AttributeError(
            "the .ui file sets properties the Slicer widgets do not have (or the harness lacks): " + ", ".join(unknown)
        )
