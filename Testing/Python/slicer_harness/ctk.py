# ruff: noqa: N802, N803, N815 - Slicer's camelCase API
"""Stand-in for the ``ctk`` names used by MedSegSuite's panel: :class:`ctkCollapsibleButton`.

Like CTK's widget it is a button whose header (arrow + title) toggles the visibility of
the widgets laid out below it; ``collapsed`` is a Qt property, so ``.ui`` files set it
(the harness's ``qt.QUiLoader`` hides the contents of sections loaded collapsed, as CTK does).
"""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtWidgets


class ctkCollapsibleButton(QtWidgets.QAbstractButton):  # noqa: N801 - CTK's class name
    """A collapsible section: click the header to show or hide its contents."""

    contentsCollapsed = QtCore.Signal(bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False
        self._hidden_by_us = []
        self.setCheckable(True)
        self.setChecked(True)
        self.toggled.connect(lambda checked: self.setCollapsed(not checked))
        self.setSizePolicy(QtWidgets.QSizePolicy.Preferred, QtWidgets.QSizePolicy.Preferred)
        self.setContentsMargins(0, self.headerHeight() + 2, 0, 0)

    def headerHeight(self) -> int:
        return max(self.fontMetrics().height() + 10, 24)

    def collapsed(self) -> bool:
        return self._collapsed

    def setCollapsed(self, collapsed: bool) -> None:
        collapsed = bool(collapsed)
        if collapsed == self._collapsed:
            return
        self._collapsed = collapsed
        self.setChecked(not collapsed)
        children = self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly)
        if collapsed:
            self._hidden_by_us = [child for child in children if not child.isHidden()]
            for child in self._hidden_by_us:
                child.hide()
            self.setMaximumHeight(self.headerHeight())
        else:
            for child in self._hidden_by_us:
                child.show()
            self._hidden_by_us = []
            self.setMaximumHeight(16777215)
        self.updateGeometry()
        self.contentsCollapsed.emit(collapsed)

    collapsed = QtCore.Property(bool, collapsed, setCollapsed)

    def hide_contents_if_collapsed(self) -> None:
        """Hide the widgets added since the section was collapsed (the loader sets ``collapsed`` before adding)."""
        if not self._collapsed:
            return
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
            if not child.isHidden():
                child.hide()
                self._hidden_by_us.append(child)
        self.setMaximumHeight(self.headerHeight())

    def hitButton(self, pos) -> bool:
        return 0 <= pos.y() < self.headerHeight()

    def sizeHint(self):
        hint = super().sizeHint()
        width = self.fontMetrics().horizontalAdvance(self.text()) + 40
        if self._collapsed:
            return QtCore.QSize(max(hint.width(), width), self.headerHeight())
        return QtCore.QSize(max(hint.width(), width), max(hint.height(), self.headerHeight()))

    def minimumSizeHint(self):
        hint = super().minimumSizeHint()
        if self._collapsed:
            return QtCore.QSize(hint.width(), self.headerHeight())
        return hint

    def paintEvent(self, event) -> None:
        painter = QtGui.QPainter(self)
        style = self.style()
        header = QtCore.QRect(0, 0, self.width(), self.headerHeight())
        option = QtWidgets.QStyleOptionButton()
        option.initFrom(self)
        option.rect = header
        option.state |= QtWidgets.QStyle.State_Sunken if self.isDown() else QtWidgets.QStyle.State_Raised
        style.drawPrimitive(QtWidgets.QStyle.PE_PanelButtonCommand, option, painter, self)
        arrow = QtWidgets.QStyleOption()
        arrow.initFrom(self)
        arrow.rect = QtCore.QRect(6, (header.height() - 12) // 2, 12, 12)
        arrows = (QtWidgets.QStyle.PE_IndicatorArrowDown, QtWidgets.QStyle.PE_IndicatorArrowRight)
        primitive = arrows[1] if self._collapsed else arrows[0]
        style.drawPrimitive(primitive, arrow, painter, self)
        text_rect = header.adjusted(24, 0, -6, 0)
        style.drawItemText(
            painter,
            text_rect,
            int(QtCore.Qt.AlignLeft | QtCore.Qt.AlignVCenter),
            self.palette(),
            self.isEnabled(),
            self.text(),
            QtGui.QPalette.ButtonText,
        )
        painter.end()
