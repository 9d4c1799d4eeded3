"""The module's own self-test (MedSegSuiteTest in MedSegSuite.py), run through the Slicer harness.

The same test class runs unchanged inside 3D Slicer (``Slicer --testing``); here it
drives the real panel (PySide6, offscreen) on the real MRML library, with the small
trained 3D U-Net of the ``unet3d_dir`` fixture and the small HiDiff model of the
``hidiff_dir`` fixture imported into an isolated MEDSEGSUITE_HOME, and a real worker
process. The U-Net is also the parent of the finetuning steps. It runs once per Slicer API
generation the harness presents (Slicer 5.8, where segments have no ``SetTerminology`` /
``GetTerminology``, and the current API).
"""

from __future__ import annotations

import pytest
import slicer_harness
from conftest import TEST_THREADS
from slicer_harness.fixtures import slicer_api  # noqa: F401 - a fixture: once per Slicer API generation


@pytest.fixture
def installed_model(home, unet3d_dir, monkeypatch):
    from MedSegSuiteLib.models import ModelRegistry

    monkeypatch.setenv("MEDSEGSUITE_THREADS", str(TEST_THREADS))
    return ModelRegistry().import_model(unet3d_dir)


@pytest.fixture
def installed_refiner(home, hidiff_dir):
    from MedSegSuiteLib.models import ModelRegistry

    return ModelRegistry().import_model(hidiff_dir)


@pytest.mark.usefixtures("slicer_api")
def test_module_self_test_segments_cancels_recovers_refines_undoes_finetunes_and_exports(
    installed_model, installed_refiner, monkeypatch
):
    monkeypatch.setenv("MEDSEGSUITE_SELFTEST_REQUIRE_MODEL", "1")
    monkeypatch.setenv("MEDSEGSUITE_SELFTEST_REQUIRE_REFINER", "1")
    monkeypatch.setenv("MEDSEGSUITE_SELFTEST_REQUIRE_FINETUNE", "1")
    slicer_harness.install()
    module = slicer_harness.load_module()
    try:
        test = module.python_module.MedSegSuiteTest()
        test.runTest()
        assert test.entry.card.id == installed_model.card.id
        assert test.refiner.card.id == installed_refiner.card.id
        assert test.finetuned["model"] == "test-unet3d-ft-1" and test.finetuned["parent"] == installed_model.card.id
        assert test.finetuned["resumed"] is True
    finally:
        slicer_harness.unload_modules()
