"""Stand-in for ``slicer.i18n`` (Slicer 5.x): ``tr`` and ``translate`` through ``slicer.app.translate``.

``tr(text)`` translates in the context Slicer derives from the calling file (its name
without ``.py``, prefixed by its package folder when that folder has an
``__init__.py``), and keeps the text when a translation loses a ``{placeholder}``.
The harness's ``slicer.app.translate`` returns the text unless a test sets
``slicer.app.translator`` to a function ``(context, text) -> text``.
"""

from __future__ import annotations

import os
import re
import sys

__all__ = ["getContext", "tr", "translate"]

_PLACEHOLDER = re.compile(r"(?<!\{)\{([^{}]+)\}(?!\})")


def translate(context: str, text: str) -> str:
    import slicer

    return slicer.app.translate(context, text)


def getContext(sourceFile: str) -> str:  # noqa: N802, N803 - Slicer's names
    folder = os.path.dirname(sourceFile)
    name = os.path.splitext(os.path.basename(sourceFile))[0]
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        return f"{os.path.basename(folder)}.{name}"
    return name


def tr(text: str) -> str:
    context = getContext(sys._getframe(1).f_code.co_filename)
    translated = translate(context, text)
    if set(_PLACEHOLDER.findall(text)) != set(_PLACEHOLDER.findall(translated)):
        return text
    return translated
