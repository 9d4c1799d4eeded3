"""The typed view of the parameter node: defaults, clamping, unreadable text, node references."""

from __future__ import annotations

import math

import pytest
from slicer_harness.fixtures import slicer_api  # noqa: F401 - a fixture


@pytest.fixture
def parameters(slicer_api):  # noqa: F811 - the fixture imported above
    import slicer

    from MedSegSuiteLib.slicer.parameters import Parameters, get_parameter_node

    yield Parameters(get_parameter_node())
    slicer.mrmlScene.Clear(0)


def test_a_new_node_reads_the_defaults(parameters):
    assert (parameters.refine_steps, parameters.refine_scope, parameters.refine_neighbours) == (1, "neighbours", 2)
    assert parameters.refine_spread == 0.5 and parameters.refine_ensemble == 1
    assert parameters.keep_edits is True and parameters.fast is False and parameters.export_overwrite is False
    assert parameters.device == "auto" and parameters.export_format == "seg.nrrd" and parameters.model_id == ""
    assert parameters.finetune_iterations == 200 and parameters.finetune_labelled == []


def test_values_are_clamped_and_unreadable_text_reads_as_the_default(parameters):
    node = parameters.node
    parameters.refine_spread = 3.0
    parameters.refine_neighbours = -4
    parameters.refine_ensemble = 0
    assert (node.GetParameter("RefineSpread"), parameters.refine_neighbours, parameters.refine_ensemble) == ("1", 0, 1)
    for key in ("RefineSteps", "RefineSpread", "RefineEnsemble", "FinetuneIterations", "KeepEdits", "FastMode"):
        node.SetParameter(key, "garbage")
    assert parameters.refine_steps == 1 and parameters.refine_spread == 0.5 and parameters.refine_ensemble == 1
    assert parameters.finetune_iterations == 200 and parameters.keep_edits is True and parameters.fast is False
    node.SetParameter("RefineSpread", "nan")
    assert not math.isnan(parameters.refine_spread)
    parameters.device = ""
    parameters.export_path = ""
    assert parameters.device == "auto" and parameters.export_path == ""


def test_node_references_round_trip_in_order(parameters):
    from MedSegSuiteLib.slicer.testing import add_ball_volume

    first, second = (add_ball_volume(name, shape=(6, 8, 8), radius=2.0)[0] for name in ("a", "b"))
    parameters.input_volume = first
    parameters.finetune_unlabelled = [second, first]
    assert parameters.input_volume is first and parameters.finetune_unlabelled == [second, first]
    parameters.input_volume = None
    parameters.finetune_unlabelled = []
    assert parameters.input_volume is None and parameters.finetune_unlabelled == []
