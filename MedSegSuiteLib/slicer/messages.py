"""Texts the module shows: translation functions and one-sentence descriptions of errors.

``_`` and ``translate`` are Slicer's (``slicer.i18n``, Slicer 5.x) so that Slicer's
translation tools find and translate the module's texts; where ``slicer.i18n`` does
not exist (the ``slicer-core`` wheels used by scripts and tests) they return the text
unchanged. Use them as Slicer's scripted modules do: ``_("Segmenting {name}").format(name=...)``
(never an f-string inside ``_``, or the text cannot be looked up).
"""

from __future__ import annotations

import logging

from ..errors import MedSegSuiteError

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # slicer-core wheels have no slicer.i18n: texts stay as written

    def _(text: str) -> str:
        """The text unchanged (no translation outside 3D Slicer)."""
        return text

    def translate(context: str, text: str) -> str:
        """The text unchanged (no translation outside 3D Slicer)."""
        return text


__all__ = ["_", "describe_error", "error_message", "sentence", "translate"]

log = logging.getLogger(__name__)


def sentence(text: str) -> str:
    """``text`` stripped, with a capital first letter."""
    text = str(text).strip()
    return (text[0].upper() + text[1:]) if text else text


def describe_error(error: BaseException, limit: int = 160) -> str:
    """``TypeName: message`` on one line, shortened to about ``limit`` characters."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def error_message(error: BaseException, action: str) -> str:
    """One plain sentence for the status line about an error that stopped ``action`` (e.g. "Segment").

    The project's own errors and OS errors carry a message meant for the user; anything
    else is unexpected: its traceback goes to the log and the sentence says so.
    """
    if isinstance(error, (MedSegSuiteError, OSError)):
        return sentence(str(error)).rstrip(".") + "."
    log.error("%s failed with an unexpected error", action, exc_info=error)
    return _(
        "{action} failed because of an unexpected error ({error}); nothing was changed. "
        "Details are in the Python console."
    ).format(action=action, error=describe_error(error))
