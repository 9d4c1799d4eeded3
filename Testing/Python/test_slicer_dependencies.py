"""First-use installation inside Slicer, with stand-ins for slicer.util, slicer.app and the PyTorch extension."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from MedSegSuiteLib.slicer import dependencies
from MedSegSuiteLib.slicer.dependencies import DependencyInstaller, InstallError, read_requirements

REPO = Path(__file__).resolve().parents[2]


class FakeSlicer:
    """Records dialogs and pip calls; ``installed`` is what the fake environment has."""

    def __init__(self, installed: set, testing: bool = False, answer: bool = True) -> None:
        self.installed = installed
        self.questions: list[str] = []
        self.pip_calls: list[tuple[list[str], str]] = []
        self.app = SimpleNamespace(testingEnabled=lambda: testing)
        self.util = SimpleNamespace(confirmOkCancelDisplay=self._confirm, pip_install=self._pip)
        self.answer = answer

    def _confirm(self, text, windowTitle=None, **kwargs):  # noqa: N803 - Slicer's keyword
        self.questions.append(text)
        return self.answer

    def _pip(self, requirements):
        constraint = Path(os.environ["PIP_CONSTRAINT"]).read_text(encoding="utf-8")
        self.pip_calls.append((list(requirements), constraint))
        self.installed.update(dependencies._name(r) for r in requirements)


@pytest.fixture
def environment(monkeypatch, tmp_path):
    """A requirements file and a fake package inventory (torch 2.5.1 installed unless removed)."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nmonai>=1.3\nsafetensors>=0.4  # weights\ntorch>=2.0\n--index-url https://x\n")
    installed = {"torch", "safetensors"}
    monkeypatch.setattr(dependencies, "satisfied", lambda r: dependencies._name(r) in installed)

    def version(name):
        if name == "torch" and "torch" in installed:
            return "2.5.1+cu121"
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(dependencies.metadata, "version", version)
    monkeypatch.delenv("PIP_CONSTRAINT", raising=False)
    return requirements, installed


def test_requirements_file_lists_no_torch_and_reading_drops_comments_and_options(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("# c\nmonai>=1.3  # x\n\n-r other.txt\nscipy\n")
    assert read_requirements(path) == ["monai>=1.3", "scipy"]
    shipped = read_requirements(REPO / "Resources" / "requirements.txt")
    assert shipped and not [r for r in shipped if dependencies._name(r) == "torch"]


def test_nothing_is_asked_or_installed_when_everything_is_there(environment):
    requirements, installed = environment
    installed.add("monai")
    fake = FakeSlicer(installed)
    assert DependencyInstaller(requirements, slicer_module=fake).ensure()
    assert fake.questions == [] and fake.pip_calls == []


def test_missing_packages_are_installed_after_one_question_with_torch_pinned(environment):
    requirements, installed = environment
    fake = FakeSlicer(installed)
    assert DependencyInstaller(requirements, slicer_module=fake).ensure()
    assert len(fake.questions) == 1 and "monai>=1.3" in fake.questions[0]
    assert fake.pip_calls == [(["monai>=1.3"], "torch==2.5.1+cu121\n")]
    assert "PIP_CONSTRAINT" not in os.environ


def test_declining_installs_nothing(environment):
    requirements, installed = environment
    fake = FakeSlicer(installed, answer=False)
    assert not DependencyInstaller(requirements, slicer_module=fake).ensure()
    assert fake.pip_calls == [] and "monai" not in installed


def test_testing_mode_installs_without_asking(environment):
    requirements, installed = environment
    fake = FakeSlicer(installed, testing=True)
    assert DependencyInstaller(requirements, slicer_module=fake).ensure()
    assert fake.questions == [] and fake.pip_calls


def test_torch_comes_from_the_pytorch_extension_before_pip_runs(environment, monkeypatch):
    requirements, installed = environment
    installed.discard("torch")
    calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, torchVersionRequirement=None, **kwargs):  # noqa: N802, N803
            calls.append((askConfirmation, torchVersionRequirement, sorted(installed)))
            installed.add("torch")
            return SimpleNamespace(__version__="2.5.1")

    module = ModuleType("PyTorchUtils")
    module.PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setitem(sys.modules, "PyTorchUtils", module)
    fake = FakeSlicer(installed)
    assert DependencyInstaller(requirements, slicer_module=fake).ensure()
    assert "torch>=2.1 (through the PyTorch extension)" in fake.questions[0] and len(fake.questions) == 1
    assert calls == [(False, ">=2.1", ["safetensors"])]  # asked once by us; before monai
    assert fake.pip_calls == [(["monai>=1.3"], "torch==2.5.1+cu121\n")]


def test_a_missing_pytorch_extension_is_explained(environment, monkeypatch):
    requirements, installed = environment
    installed.discard("torch")
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails
    fake = FakeSlicer(installed)
    with pytest.raises(InstallError, match="install 'PyTorch' from the Extensions Manager"):
        DependencyInstaller(requirements, slicer_module=fake).ensure()
    assert fake.pip_calls == []


def test_a_package_still_missing_after_pip_is_an_error(environment):
    requirements, installed = environment
    fake = FakeSlicer(installed)
    fake.util.pip_install = lambda requirements: None  # pip "succeeds" but installs nothing
    with pytest.raises(InstallError, match="still missing after the installation: monai>=1.3"):
        DependencyInstaller(requirements, slicer_module=fake).ensure()


def test_real_environment_satisfies_the_shipped_requirements():
    installer = DependencyInstaller(REPO / "Resources" / "requirements.txt")
    assert installer.missing() == []


@pytest.mark.parametrize(
    "error",
    [subprocess.CalledProcessError(1, ["pip", "install", "torch"]), ImportError("libtorch_cuda.so"), KeyError("x")],
    ids=["CalledProcessError", "ImportError", "unexpected"],
)
def test_any_failure_of_the_pytorch_extension_is_an_install_error(environment, monkeypatch, error):
    requirements, installed = environment
    installed.discard("torch")

    class Logic:
        def installTorch(self, **options):  # noqa: N802 - the PyTorch extension's name
            raise error

    monkeypatch.setitem(sys.modules, "PyTorchUtils", SimpleNamespace(PyTorchUtilsLogic=Logic))
    installer = DependencyInstaller(requirements, slicer_module=FakeSlicer(installed, testing=True))
    with pytest.raises(InstallError, match=rf"^PyTorch could not be installed \({type(error).__name__}"):
        installer.ensure()
