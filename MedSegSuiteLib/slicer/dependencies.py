"""First-use installation of MedSegSuite's Python packages inside 3D Slicer.

Asks once (skipped in testing mode), installs PyTorch through the PyTorch extension's
``PyTorchUtils`` (which picks the build that matches the GPU driver), then the other
packages of ``Resources/requirements.txt`` with ``slicer.util.pip_install``. pip runs
with a constraints file that pins the installed torch (``PIP_CONSTRAINT``), so no
requirement can pull another torch build in transitively: pip fails instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import MedSegSuiteError
from .messages import describe_error

__all__ = ["DependencyInstaller", "InstallError", "missing_requirements", "read_requirements", "satisfied"]

log = logging.getLogger(__name__)

TORCH_REQUIREMENT = "torch>=2.1"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class InstallError(MedSegSuiteError):
    """Packages could not be installed; the message says what to do."""


def _name(requirement: str) -> str:
    match = _NAME.match(requirement)
    return match.group(1).lower().replace("_", "-") if match else requirement.strip().lower()


def read_requirements(path: Union[str, Path]) -> list[str]:
    """The requirement lines of a requirements file (comments, blanks and pip options dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def satisfied(requirement: str) -> bool:
    """True when an installed distribution meets ``requirement`` (checked without importing it)."""
    match = _NAME.match(requirement)
    written = match.group(1) if match else requirement.strip()
    installed = None
    for name in dict.fromkeys((written, _name(requirement))):  # as written, then normalised (Python 3.9 lookups)
        try:
            installed = metadata.version(name)
            break
        except metadata.PackageNotFoundError:
            continue
    if installed is None:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip-based Pythons
        return True
    return Requirement(requirement).specifier.contains(installed, prereleases=True)


def missing_requirements(requirements: Sequence[str]) -> list[str]:
    """The requirements not met by the installed packages."""
    return [r for r in requirements if not satisfied(r)]


class DependencyInstaller:
    """Checks and installs what MedSegSuite needs inside Slicer.

    Args:
        requirements: path of ``requirements.txt`` (torch lines in it are ignored: torch
            always comes from the PyTorch extension).
        torch_requirement: the torch version MedSegSuite needs.
        slicer_module: the ``slicer`` module (tests pass a stand-in).
    """

    def __init__(
        self,
        requirements: Union[str, Path],
        torch_requirement: str = TORCH_REQUIREMENT,
        slicer_module: Optional[Any] = None,
    ) -> None:
        self.requirements_path = Path(requirements)
        self.torch_requirement = torch_requirement
        self._slicer = slicer_module

    @property
    def slicer(self) -> Any:
        if self._slicer is None:
            import slicer

            self._slicer = slicer
        return self._slicer

    def requirements(self) -> list[str]:
        return [r for r in read_requirements(self.requirements_path) if _name(r) != "torch"]

    def missing(self) -> list[str]:
        """Unmet requirements, torch first."""
        torch = [] if satisfied(self.torch_requirement) else [self.torch_requirement]
        return torch + missing_requirements(self.requirements())

    def ensure(self) -> bool:
        """Install what is missing after asking once; True when everything is there, False if the user declined.

        Raises :class:`InstallError` when an installation fails or leaves something missing.
        """
        missing = self.missing()
        if not missing:
            return True
        slicer = self.slicer
        if not slicer.app.testingEnabled():
            listing = "\n".join(
                f"  - {r} (through the PyTorch extension)" if _name(r) == "torch" else f"  - {r}" for r in missing
            )
            question = (
                "MedSegSuite needs Python packages that are not installed yet:\n\n"
                f"{listing}\n\nInstall them now? This can download several hundred MB and take a few minutes."
            )
            if not slicer.util.confirmOkCancelDisplay(question, windowTitle="MedSegSuite: install packages"):
                return False
        if _name(missing[0]) == "torch":
            self._install_torch()
        others = [r for r in missing if _name(r) != "torch"]
        if others:
            self._pip_install(others)
        importlib.invalidate_caches()
        still = self.missing()
        if still:
            raise InstallError(
                f"these packages are still missing after the installation: {', '.join(still)}; "
                "restart 3D Slicer and click Segment again"
            )
        return True

    def _install_torch(self) -> None:
        try:
            import PyTorchUtils
        except ImportError:
            raise InstallError(
                "MedSegSuite needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                "restart 3D Slicer and click Segment again"
            ) from None
        version = self.torch_requirement[len("torch") :].strip() or None
        log.info("installing PyTorch through the PyTorch extension (%s)", version or "any version")
        try:
            logic = PyTorchUtils.PyTorchUtilsLogic()
            torch = logic.installTorch(askConfirmation=False, torchVersionRequirement=version)
        except Exception as error:  # pip's CalledProcessError, an ImportError of the new build, anything else
            log.warning("installing PyTorch failed", exc_info=True)
            raise InstallError(
                f"PyTorch could not be installed ({describe_error(error)}); install it from the PyTorch module, "
                "restart 3D Slicer and click Segment again"
            ) from None
        if torch is None:
            raise InstallError("PyTorch was not installed; install it from the PyTorch module and try again")

    def _pip_install(self, requirements: list[str]) -> None:
        try:
            torch_version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            raise InstallError("PyTorch must be installed before the other packages") from None
        with tempfile.TemporaryDirectory(prefix="medsegsuite-pip-") as folder:
            constraints = Path(folder) / "constraints.txt"
            constraints.write_text(f"torch=={torch_version}\n", encoding="utf-8")
            previous = os.environ.get("PIP_CONSTRAINT")
            os.environ["PIP_CONSTRAINT"] = str(constraints)
            try:
                log.info("installing %s (torch pinned to %s)", ", ".join(requirements), torch_version)
                self.slicer.util.pip_install(list(requirements))
            except Exception as error:
                log.warning("pip failed", exc_info=True)
                names = ", ".join(requirements)
                raise InstallError(f"pip could not install {names} ({describe_error(error)})") from None
            finally:
                if previous is None:
                    os.environ.pop("PIP_CONSTRAINT", None)
                else:
                    os.environ["PIP_CONSTRAINT"] = previous
