"""Where the extension's ``Resources/`` folder is, in every layout MedSegSuite runs from."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["resources_dir"]


def resources_dir() -> Path:
    """The ``Resources/`` folder: ``$MEDSEGSUITE_RESOURCES``, else inside the installed package (wheel),
    else beside the package (source tree, editable install, Slicer's qt-scripted-modules)."""
    override = os.environ.get("MEDSEGSUITE_RESOURCES")
    if override:
        return Path(override)
    package = Path(__file__).resolve().parent
    for candidate in (package / "Resources", package.parent / "Resources"):
        if candidate.is_dir():
            return candidate
    return package.parent / "Resources"
