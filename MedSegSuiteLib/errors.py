"""Errors MedSegSuite raises on purpose.

Every message says what is wrong and what to do about it, in one line, so that the
CLI can print it as is and the Slicer panel can show it in its status line.
"""

from __future__ import annotations

__all__ = [
    "Cancelled",
    "InputError",
    "MedSegSuiteError",
    "ModelError",
    "OutOfMemory",
    "WeightsError",
]


class MedSegSuiteError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class InputError(MedSegSuiteError, ValueError):
    """An image, mask, ROI or argument that cannot be used as given."""


class ModelError(MedSegSuiteError):
    """A model id, model card or registry problem."""


class WeightsError(ModelError):
    """A weights file that is missing, corrupt, foreign or does not match its card."""


class OutOfMemory(MedSegSuiteError, MemoryError):
    """Not enough (GPU or host) memory, even after the automatic retries."""


class Cancelled(MedSegSuiteError):
    """The caller's cancel event was set; nothing was written."""
