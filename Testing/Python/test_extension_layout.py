"""The repository is a buildable Slicer extension and a complete pip package."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
MODULE_CMAKE = REPO / "MedSegSuite" / "CMakeLists.txt"


def _listed(section: str) -> list[str]:
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    block = re.search(rf"# BEGIN {section}\n(.*?)# END {section}", text, re.S)
    assert block, f"no {section} block in {MODULE_CMAKE}"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def _library_files() -> list[str]:
    return sorted(
        str(p.relative_to(REPO)) for p in (REPO / "MedSegSuiteLib").rglob("*.py") if "__pycache__" not in p.parts
    )


def _resource_files() -> list[str]:
    return sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "Resources").rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(REPO).parts)
    )


def test_extension_layout_exists():
    for path in (
        "CMakeLists.txt",
        "MedSegSuite/MedSegSuite.py",
        "MedSegSuiteLib/__init__.py",
        "Resources/Icons/MedSegSuite.png",
        "Resources/UI/MedSegSuite.ui",
        "README.md",
        "pyproject.toml",
        ".ci/run",
    ):
        assert (REPO / path).exists(), path
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in (
        "EXTENSION_HOMEPAGE",
        'EXTENSION_CATEGORY "Segmentation"',
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        'EXTENSION_DEPENDS "PyTorch"',
        "add_subdirectory(MedSegSuite)",
    ):
        assert key in top, key


def test_module_cmake_lists_every_library_file_and_resource():
    listed, present = _listed("LIBRARY"), _library_files()
    assert listed == present, (
        f"MedSegSuite/CMakeLists.txt LIBRARY block: missing {sorted(set(present) - set(listed))}, "
        f"stale {sorted(set(listed) - set(present))}"
    )
    listed, present = _listed("RESOURCES"), _resource_files()
    assert listed == present, (
        f"MedSegSuite/CMakeLists.txt RESOURCES block: missing {sorted(set(present) - set(listed))}, "
        f"stale {sorted(set(listed) - set(present))}"
    )


def test_pyproject_packages_cover_every_library_package():
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    packages = set(config["tool"]["setuptools"]["packages"])
    present = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "MedSegSuiteLib").rglob("__init__.py")}
    assert present | {"MedSegSuiteLib.Resources"} == packages


_FAKE_SLICER = """
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_FOUND TRUE)
"""
_FAKE_USE = """
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(BUILD_TESTING ON)
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(f ${MY_SCRIPTS})
    if(IS_ABSOLUTE ${f})
      file(RELATIVE_PATH rel ${CMAKE_CURRENT_BINARY_DIR} ${f})
    else()
      set(rel ${f})
      set(f ${CMAKE_CURRENT_SOURCE_DIR}/${f})
    endif()
    if(NOT EXISTS ${f})
      message(FATAL_ERROR "missing script ${f}")
    endif()
    file(APPEND ${CMAKE_BINARY_DIR}/scripts.txt "${rel}\\n")
  endforeach()
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(T "" "SCRIPT" "" ${ARGN})
  file(APPEND ${CMAKE_BINARY_DIR}/tests.txt "${T_SCRIPT}\\n")
endmacro()
"""


def test_cmake_configures_against_a_stand_in_slicer(tmp_path):
    """Runs CMake with stand-ins for Slicer's macros that record where each script would be copied."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    fake = tmp_path / "slicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(_FAKE_SLICER)
    (fake / "UseSlicer.cmake").write_text(_FAKE_USE)
    (fake / "empty.cmake").write_text("")
    build = tmp_path / "build"
    done = subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={fake}"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    scripts = (build / "scripts.txt").read_text(encoding="utf-8").split()
    assert scripts[0] == "MedSegSuite.py"
    assert sorted(scripts[1:]) == _library_files(), "every library file lands at qt-scripted-modules/MedSegSuiteLib/..."
    assert (build / "tests.txt").read_text(encoding="utf-8").split() == ["MedSegSuite.py"]
    staged = build / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    for resource in _resource_files():
        assert (staged / resource).is_file(), resource
