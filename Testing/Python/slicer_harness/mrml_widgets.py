# ruff: noqa: N802, N803, N815 - Slicer's camelCase API
"""Stand-ins for the qMRML widgets of MedSegSuite's panel: ``qMRMLWidget`` and ``qMRMLNodeComboBox``.

:class:`qMRMLNodeComboBox` lists the scene's nodes of its ``nodeTypes`` (exact classes
when ``showChildNodeTypes`` is false; hidden nodes only with ``showHidden``), keeps the
list current through scene observers, offers a "None" entry (``noneEnabled``, text
``noneDisplay``) and emits ``currentNodeChanged(node)``. ``currentNode()``,
``setCurrentNode()``, ``currentNodeID()``, ``setCurrentNodeID()``, ``setMRMLScene()``
and ``mrmlScene()`` behave like the real widget (Slicer's ``qMRMLNodeComboBox.cxx``,
v5.8.1): ``setCurrentNode(None)`` selects "None" when it is enabled and otherwise
clears the selection (no current node; adding nodes to a non-empty list does not
select one); a removed current node gives way to the first entry. The real widget's
other designer properties (``addEnabled``, ``removeEnabled``, ``editEnabled``,
``renameEnabled``, ``selectNodeUponCreation``, ``baseName``) are kept but do nothing:
it offers no "Create new" or "Rename" actions (MedSegSuite does not rely on them).
Reading or writing a property the real widget does not have raises AttributeError
(``property()`` / ``setProperty()``), and the harness's ``QUiLoader`` refuses ``.ui``
properties that no stand-in declares.

:class:`qMRMLWidget` passes ``setMRMLScene`` on to every node selector inside it (the
real one does it through the ``.ui`` file's signal connections, which PySide6 cannot
deliver for ``vtkMRMLScene*`` arguments).
"""

from __future__ import annotations

import weakref

import shiboken6
from PySide6 import QtCore, QtWidgets


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801 - Slicer's class name
    """A node selector over a MRML scene."""

    currentNodeChanged = QtCore.Signal(object)
    currentNodeIDChanged = QtCore.Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._observations = []
        self._node_types = []
        self._hide_child_types = []
        self._none_enabled = False
        self._none_display = ""
        self._show_hidden = False
        self._show_child_types = True
        self._current_id = ""
        self._refreshing = False
        self.setSizeAdjustPolicy(QtWidgets.QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(8)
        self.currentIndexChanged.connect(self._on_index_changed)

    # -- properties the .ui file sets ----------------------------------------------------
    def _get_types(self):
        return list(self._node_types)

    def _set_types(self, value):
        self._node_types = list(value)
        self._refresh()

    nodeTypes = QtCore.Property("QStringList", _get_types, _set_types)

    def _get_hidden_types(self):
        return list(self._hide_child_types)

    def _set_hidden_types(self, value):
        self._hide_child_types = list(value)
        self._refresh()

    hideChildNodeTypes = QtCore.Property("QStringList", _get_hidden_types, _set_hidden_types)

    def _flag(name):  # noqa: N805 - builds properties in the class body
        def getter(self):
            return getattr(self, name)

        def setter(self, value):
            setattr(self, name, bool(value))
            self._refresh()

        return QtCore.Property(bool, getter, setter)

    noneEnabled = _flag("_none_enabled")
    showHidden = _flag("_show_hidden")
    showChildNodeTypes = _flag("_show_child_types")
    del _flag

    def _kept(name, kind, default):  # noqa: N805 - builds properties in the class body
        """A property of the real widget that the stand-in keeps without acting on it."""

        def getter(self):
            return self.__dict__.get(name, default)

        def setter(self, value):
            self.__dict__[name] = kind(value)

        return QtCore.Property(kind, getter, setter)

    addEnabled = _kept("_add_enabled", bool, True)
    removeEnabled = _kept("_remove_enabled", bool, True)
    editEnabled = _kept("_edit_enabled", bool, False)
    renameEnabled = _kept("_rename_enabled", bool, False)
    selectNodeUponCreation = _kept("_select_upon_creation", bool, True)
    baseName = _kept("_base_name", str, "")
    del _kept

    def _get_none_display(self):
        return self._none_display

    def _set_none_display(self, value):
        self._none_display = str(value)
        self._refresh()

    noneDisplay = QtCore.Property(str, _get_none_display, _set_none_display)

    # -- scene ---------------------------------------------------------------------------
    def mrmlScene(self):
        return self._scene

    @QtCore.Slot("vtkMRMLScene*")
    def setMRMLScene(self, scene) -> None:
        if self._scene is not None:
            for tag in self._observations:
                self._scene.RemoveObserver(tag)
        self._observations = []
        self._scene = scene
        if scene is not None:
            me = weakref.ref(self)
            tags = self._observations

            def refresh(caller, event):
                widget = me()
                if widget is None or not shiboken6.isValid(widget):  # the panel was deleted: stop observing
                    for tag in tags:
                        caller.RemoveObserver(tag)
                    return
                widget._refresh()

            for event in (
                scene.NodeAddedEvent,
                scene.NodeRemovedEvent,
                scene.EndImportEvent,
                scene.EndCloseEvent,
                scene.EndBatchProcessEvent,
            ):
                tags.append(scene.AddObserver(event, refresh))
        self._refresh()

    def _accepts(self, node) -> bool:
        if not self._show_hidden and node.GetHideFromEditors():
            return False
        if any(node.IsA(hidden) for hidden in self._hide_child_types):
            return False
        if self._show_child_types:
            return any(node.IsA(name) for name in self._node_types)
        return node.GetClassName() in self._node_types

    def nodes(self) -> list:
        """The nodes this selector offers, in scene order."""
        if self._scene is None:
            return []
        collection = self._scene.GetNodes()
        found = []
        for index in range(collection.GetNumberOfItems()):
            node = collection.GetItemAsObject(index)
            if node is not None and self._accepts(node):
                found.append(node)
        return found

    # -- strict properties ------------------------------------------------------------------
    def _check_property(self, name) -> str:
        name = bytes(name).decode() if isinstance(name, (bytes, bytearray, QtCore.QByteArray)) else str(name)
        if self.metaObject().indexOfProperty(name) < 0 and not name.startswith("_"):
            raise AttributeError(f"qMRMLNodeComboBox has no property {name!r} (neither has Slicer's widget)")
        return name

    def property(self, name):
        return super().property(self._check_property(name))

    def setProperty(self, name, value):
        return super().setProperty(self._check_property(name), value)

    def _refresh(self) -> None:
        if self._refreshing:
            return
        self._refreshing = True
        previous = self._current_id
        was_empty = self.count() == 0 or (self._none_enabled and self.count() == 1)
        try:
            self.blockSignals(True)
            self.clear()
            if self._none_enabled:
                self.addItem(self._none_display or "None", "")
            for node in self.nodes():
                self.addItem(node.GetName() or node.GetID(), node.GetID())
            if previous:
                index = self.findData(previous)
                if index < 0:  # the current node left the list: like QComboBox, the first entry takes over
                    index = 0 if self.count() else -1
            elif self._none_enabled:
                index = 0
            else:  # nothing selected: QComboBox selects only the first entry of a list that was empty
                index = (0 if self.count() else -1) if was_empty else -1
            self.setCurrentIndex(index)
        finally:
            self.blockSignals(False)
            self._refreshing = False
        self._on_index_changed(self.currentIndex())

    def _on_index_changed(self, index: int) -> None:
        if self._refreshing:
            return
        node_id = self.itemData(index) if index >= 0 else ""
        node_id = node_id or ""
        if node_id != self._current_id:
            self._current_id = node_id
            self.currentNodeChanged.emit(self.currentNode())
            self.currentNodeIDChanged.emit(node_id)

    # -- current node ---------------------------------------------------------------------
    def currentNode(self):
        if not self._current_id or self._scene is None:
            return None
        return self._scene.GetNodeByID(self._current_id)

    def currentNodeID(self) -> str:
        return self._current_id

    def setCurrentNodeID(self, node_id) -> None:
        """Select the node; an empty or unknown ID selects "None" if enabled, else clears the selection."""
        index = self.findData(node_id) if node_id else -1
        if index < 0:
            index = 0 if self._none_enabled else -1
        self.setCurrentIndex(index)

    def setCurrentNode(self, node) -> None:
        self.setCurrentNodeID(node.GetID() if node is not None else "")


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801 - Slicer's class name
    """The root widget of a Slicer ``.ui`` panel."""

    mrmlSceneChanged = QtCore.Signal("vtkMRMLScene*")

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def mrmlScene(self):
        return self._scene

    @QtCore.Slot("vtkMRMLScene*")
    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        for child in self.findChildren(qMRMLNodeComboBox):
            child.setMRMLScene(scene)
