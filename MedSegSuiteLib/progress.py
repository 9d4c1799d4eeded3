"""Progress reporting and cancellation shared by long-running jobs.

A progress callback receives ``(done, total, stage)``: ``done`` and ``total`` count
units of the current stage (slices, windows, iterations) and ``stage`` names it
("preprocessing", "segmenting", "postprocessing", "training", ...). Cancellation is a
``threading.Event`` that jobs check between units of work.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .errors import Cancelled

__all__ = ["ProgressCallback", "check_cancelled", "report"]

ProgressCallback = Callable[[int, int, str], None]


def report(callback: Optional[ProgressCallback], done: int, total: int, stage: str) -> None:
    """Call ``callback(done, total, stage)`` if a callback was given."""
    if callback is not None:
        callback(done, total, stage)


def check_cancelled(cancel: Optional[threading.Event]) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by the user; nothing was written")
