"""Refinement from the module logic (real MRML, fake worker): segment matching, keep-my-edits, undo, scopes,
spread, and the ensemble's "Uncertain (refinement)" segment.

The fake worker's "refine" grows every label by one voxel in each axial slice and
leaves the ``keep`` voxels alone; with an ensemble its uncertainty is 0.3 on the voxels
it changed and 0.1 on the other labelled voxels in scope, so every expectation here is
exact.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import UNET3D_CARD
from slicer_harness.fake_worker import fake_logic, wait_idle

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.io import read_image
from MedSegSuiteLib.models.card import card_from_dict
from MedSegSuiteLib.models.registry import ModelEntry

HIDIFF_CARD = {
    "schema_version": 1,
    "id": "test-hidiff-card",
    "version": "1.0.0",
    "name": "Test disc refiner (HiDiff)",
    "network": "hidiff",
    "preset": "lite",
    "config": {"in_channels": 1, "num_classes": 1},
    "dims": 2,
    "input": {"channels": 1, "normalization": {"kind": "scale", "divisor": 255}, "size_xy": [32, 32]},
    "inference": {"activation": "sigmoid", "batch_size": 4},
    "labels": [
        {
            "value": 1,
            "name": "Disc",
            "color": [250, 200, 40],
            "terminology": {"category": ["SCT", "91723000", "Anatomical Structure"], "type": ["SCT", "7", "Disc"]},
        },
        {
            "value": 2,
            "name": "Cup",
            "color": [40, 200, 250],
            "terminology": {"category": ["SCT", "91723000", "Anatomical Structure"], "type": ["SCT", "8", "Cup"]},
        },
    ],
    "licence": "CC0-1.0",
}


@pytest.fixture
def refiner(tmp_path):
    return ModelEntry(card_from_dict(dict(HIDIFF_CARD, weights={"file": "model.safetensors"})), tmp_path, "user")


def _segmentation(volume, segments):
    """A segmentation node on ``volume`` with ``segments``: name -> (mask, terminology string or None, tags)."""
    import slicer

    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node, set_segment_terminology

    node = create_segmentation_node(volume, name="Painted")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name, (mask, terminology, tags) in segments.items():
        segment_id = node.GetSegmentation().AddEmptySegment(name, name, [0.5, 0.5, 0.5])
        segment = node.GetSegmentation().GetSegment(segment_id)
        if terminology:
            set_segment_terminology(segment, terminology)
        for key, value in (tags or {}).items():
            segment.SetTag(key, value)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segment_id, volume)
    return node


def _mask(node, name, volume):
    from MedSegSuiteLib.slicer.segmentations import segment_mask

    return segment_mask(node, node.GetSegmentation().GetSegmentIdBySegmentName(name), volume)


def _grown(mask):
    from scipy import ndimage

    plane = np.zeros((3, 3, 3), bool)
    plane[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_dilation(mask, plane)


def test_segments_match_model_labels_by_name_type_code_or_own_label_value_tag(scene, refiner):
    from MedSegSuiteLib.io.label_table import terminology_string
    from MedSegSuiteLib.slicer.refinement import match_segments
    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    volume, discs = add_disc_stack_volume("Discs")
    cup = terminology_string(HIDIFF_CARD["labels"][1]["terminology"])
    own = {"MedSegSuite.model": "test-hidiff-card 1.0.0", "MedSegSuite.labelValue": "1"}
    other = {"MedSegSuite.model": "test-unet3d 1.0.0", "MedSegSuite.labelValue": "2"}
    node = _segmentation(
        volume,
        {
            "optic thing": (discs, cup, None),  # by type code
            "Segment_1": (discs, None, own),  # by this model's label value tag
            "DISC": (discs, None, None),  # by name, but Disc is taken by Segment_1 already
            "Ball": (discs, None, other),  # another model's tag does not count
        },
    )
    matches, unknown = match_segments(node, card_from_dict(dict(HIDIFF_CARD, weights={"file": "m"})))
    assert [(m.name, m.label.name, m.how) for m in matches] == [
        ("optic thing", "Cup", "type code"),
        ("Segment_1", "Disc", "label value"),
    ]
    assert unknown == [
        "'DISC' (it matches 'Disc' like 'Segment_1')",
        "'Ball' (no label of Test disc refiner (HiDiff) matches it)",
    ]


def test_refinement_replaces_only_the_matched_segments_and_names_the_others(scene, refiner, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    volume, discs = add_disc_stack_volume("Discs")
    notes = np.zeros_like(discs)
    notes[1, 10:20, 14:18] = 1  # overlaps the disc and its border
    node = _segmentation(volume, {"Disc": (discs, None, None), "Notes": (notes, None, None)})
    logic, factory = fake_logic(tmp_path)
    status = logic.start_refine(node, volume, refiner, steps=3, keep_edits=False)
    assert status.running and status.kind == "refine" and logic.job_kind == "refine"
    sent = factory.last.received[-1]
    assert sent["kind"] == "refine" and sent["params"]["steps"] == 3 and sent["params"]["scope"] == "volume"
    assert "keep" not in sent["params"] and np.array_equal(read_image(sent["params"]["mask"]).array, discs)
    status = wait_idle(logic)
    assert status.state == "done" and status.kind == "refine", status.message
    assert np.array_equal(_mask(node, "Disc", volume), _grown(discs))
    assert np.array_equal(_mask(node, "Notes", volume), notes)
    changed = int(_grown(discs).sum() - discs.sum())
    assert status.message.startswith("Refined 3 slice(s) with 3 step(s)")
    assert f"voxels changed: {changed} in 'Disc'" in status.message
    assert "Left untouched: 'Notes' (no label of Test disc refiner (HiDiff) matches it)." in status.message
    assert not list(logic.client.temp_dir.iterdir())
    logic.shutdown()


def test_keep_my_edits_holds_the_voxels_changed_since_the_last_ai_result(scene, refiner, tmp_path):
    import slicer

    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    volume, _ = add_disc_stack_volume("Discs")
    logic, factory = fake_logic(tmp_path)
    entry = ModelEntry(card_from_dict(dict(HIDIFF_CARD, weights={"file": "m"})), tmp_path, "user")
    logic.start(volume, entry)  # the fake segments voxels brighter than 150 as Disc: an AI result
    status = wait_idle(logic)
    assert status.state == "done", status.message
    node = scene.GetNodeByID(status.output_node_id)
    ai = _mask(node, "Disc", volume)
    edited = ai.copy()
    edited[1, 2:5, 2:5] = True  # painted a blob
    inside = np.argwhere(ai[0])[:4]
    edited[0][tuple(inside.T)] = False  # erased a few voxels
    segment_id = node.GetSegmentation().GetSegmentIdBySegmentName("Disc")
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), node, segment_id, volume)

    logic.start_refine(node, volume, refiner, steps=2, keep_edits=True)
    keep = read_image(factory.last.received[-1]["params"]["keep"]).array.astype(bool)
    assert np.array_equal(keep, edited != ai)
    status = wait_idle(logic)
    assert status.state == "done", status.message
    refined = _mask(node, "Disc", volume)
    assert np.array_equal(refined[keep], edited[keep])
    assert not np.array_equal(refined, edited)  # the rest may move
    assert f"Kept {int(keep.sum())} edited voxel(s)." in status.message

    # the refined result is the new AI result: nothing is edited now, so nothing is held
    logic.start_refine(node, volume, refiner, steps=2, keep_edits=True)
    assert "keep" not in factory.last.received[-1]["params"]
    wait_idle(logic)
    logic.shutdown()


def test_undo_restores_each_refinement_exactly_and_then_has_nothing_to_undo(scene, refiner, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    volume, discs = add_disc_stack_volume("Discs")
    node = _segmentation(volume, {"Disc": (discs, None, None)})
    logic, _ = fake_logic(tmp_path)
    assert not logic.can_undo(node)
    history = [_mask(node, "Disc", volume)]
    for _ in range(2):
        logic.start_refine(node, volume, refiner, steps=1, keep_edits=False)
        assert not logic.can_undo(node)  # not while a job runs
        assert wait_idle(logic).state == "done"
        history.append(_mask(node, "Disc", volume))
    assert not np.array_equal(history[2], history[1]) and logic.can_undo(node)
    status = logic.undo_refinement(node)
    assert np.array_equal(_mask(node, "Disc", volume), history[1]) and "more can be undone" in status.message
    logic.undo_refinement(node)
    assert np.array_equal(_mask(node, "Disc", volume), history[0])
    assert not logic.can_undo(node)
    with pytest.raises(InputError, match="no refinement of 'Painted' to undo"):
        logic.undo_refinement(node)
    logic.start_refine(node, volume, refiner, steps=1, keep_edits=False)
    wait_idle(logic)
    assert logic.can_undo(node) and logic.ai_results.snapshot(node) is not None
    scene.RemoveNode(node)
    other = _segmentation(volume, {"Disc": (discs, None, None)})
    logic.start_refine(other, volume, refiner, steps=1)  # forgets what it kept for removed segmentations
    wait_idle(logic)
    assert not logic.undo_stack.can_undo(node) and logic.ai_results.snapshot(node) is None
    logic.shutdown()


def test_undo_also_restores_what_keep_my_edits_compares_with(scene, refiner, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    volume, discs = add_disc_stack_volume("Discs")
    node = _segmentation(volume, {"Disc": (discs, None, None)})
    logic, factory = fake_logic(tmp_path)
    logic.remember_ai_result(node, volume)
    logic.start_refine(node, volume, refiner, steps=1, keep_edits=True)
    assert "keep" not in factory.last.received[-1]["params"]  # nothing edited since the AI result
    wait_idle(logic)
    logic.undo_refinement(node)
    logic.start_refine(node, volume, refiner, steps=1, keep_edits=True)
    assert "keep" not in factory.last.received[-1]["params"]  # compared with the AI result before the undone one
    wait_idle(logic)
    logic.shutdown()


def test_a_hand_painted_segment_counts_as_the_users_own_voxels(scene, refiner, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    volume, discs = add_disc_stack_volume("Discs")
    node = _segmentation(volume, {"disc": (discs, None, None)})
    logic, factory = fake_logic(tmp_path)
    logic.start_refine(node, volume, refiner, steps=1, keep_edits=True)
    assert np.array_equal(read_image(factory.last.received[-1]["params"]["keep"]).array, discs)
    status = wait_idle(logic)
    assert "'disc' had no AI result" in status.message
    logic.shutdown()


def test_scopes_are_sent_as_a_slice_a_point_or_a_voxel_box(scene, refiner, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    volume, discs = add_disc_stack_volume("Discs")
    node = _segmentation(volume, {"Disc": (discs, None, None)})
    logic, factory = fake_logic(tmp_path)
    logic.start_refine(node, volume, refiner, 2, keep_edits=False, scope="slice", slice_index=2)
    assert factory.last.received[-1]["params"]["slice"] == 2
    wait_idle(logic)
    assert np.array_equal(_mask(node, "Disc", volume)[:2], discs[:2])  # the fake refined slice 2 only
    logic.start_refine(node, volume, refiner, 2, scope="slice", point_lps=(1.0, 2.0, 3.5))
    assert factory.last.received[-1]["params"]["point"] == [1.0, 2.0, 3.5]
    wait_idle(logic)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    roi.SetCenter(*volume.GetOrigin())
    roi.SetSize(0.1, 0.1, 0.1)
    logic.start_refine(node, volume, refiner, 2, scope="roi", roi_node=roi)
    assert factory.last.received[-1]["params"]["roi"] == [0, 0, 0, 1, 1, 1]
    wait_idle(logic)
    logic.shutdown()


def test_impossible_refinements_are_refused_before_anything_is_sent(scene, refiner, tmp_path):
    from MedSegSuiteLib.slicer.segmentations import create_segmentation_node
    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    volume, discs = add_disc_stack_volume("Discs")
    node = _segmentation(volume, {"Disc": (discs, None, None)})
    unet = ModelEntry(card_from_dict(dict(UNET3D_CARD, weights={"file": "m"})), tmp_path, "user")
    logic, factory = fake_logic(tmp_path)
    cases = [
        (dict(model=unet), "cannot run refinement steps; choose a HiDiff model"),
        (dict(steps=11), "steps must be between 1 and 10"),
        (dict(steps=0), "steps must be between 1 and 10"),
        (dict(scope="slice"), "needs a slice index or a point"),
        (dict(scope="slice", slice_index=3), "slice index must be between 0 and 2"),
        (dict(scope="roi"), "choose the region"),
        (dict(scope="everywhere"), "scope must be one of volume, slice, neighbours, roi"),
        (dict(scope="neighbours"), "needs a slice index or a point"),
        (dict(scope="neighbours", slice_index=-1), "slice index must be between 0 and 2"),
        (dict(neighbours=-1), "neighbours must be at least 0"),
        (dict(spread=1.5), "spread must be between 0 and 1"),
        (dict(ensemble=0), "ensemble must be between 1 and 8"),
        (dict(ensemble=9), "ensemble must be between 1 and 8"),
        (dict(segmentation_node=None), "choose a segmentation to refine"),
        (dict(volume_node=None), "choose the input volume"),
    ]
    for overrides, expected in cases:
        kwargs = dict(segmentation_node=node, volume_node=volume, model=refiner, steps=2)
        kwargs.update(overrides)
        with pytest.raises(InputError, match=expected):
            logic.start_refine(**kwargs)
    with pytest.raises(InputError, match="no segment of 'Other' matches a label of Test disc refiner"):
        other = _segmentation(volume, {"Ball": (discs, None, None)})
        other.SetName("Other")
        logic.start_refine(other, volume, refiner, 2)
    empty = create_segmentation_node(volume, name="Empty")
    empty.GetSegmentation().AddEmptySegment("Disc", "Disc", [1.0, 1.0, 0.0])
    with pytest.raises(InputError, match="'Disc' is empty"):
        logic.start_refine(empty, volume, refiner, 2)
    assert factory.processes == []
    logic.start_refine(node, volume, refiner, 2)
    with pytest.raises(InputError, match="already running"):
        logic.start_refine(node, volume, refiner, 2)
    logic.shutdown()


def test_a_result_is_discarded_when_the_segment_was_edited_meanwhile(scene, refiner, tmp_path):
    import slicer

    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    volume, discs = add_disc_stack_volume("Discs")
    node = _segmentation(volume, {"Disc": (discs, None, None)})
    logic, factory = fake_logic(tmp_path, hold=True)
    logic.start_refine(node, volume, refiner, 2, keep_edits=False)
    logic.poll()
    edited = discs.copy()
    edited[0, 0, 0] = 1
    segment_id = node.GetSegmentation().GetSegmentIdBySegmentName("Disc")
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited, node, segment_id, volume)
    factory.last.finish()
    status = wait_idle(logic)
    assert status.state == "failed" and "'Disc' was edited while refining" in status.message
    assert np.array_equal(_mask(node, "Disc", volume), edited) and not logic.can_undo(node)
    logic.shutdown()


def test_cancel_and_worker_errors_leave_the_segmentation_as_it_was(scene, refiner, tmp_path):
    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    volume, discs = add_disc_stack_volume("Discs")
    node = _segmentation(volume, {"Disc": (discs, None, None)})
    logic, factory = fake_logic(tmp_path, hold=True)
    logic.start_refine(node, volume, refiner, 2)
    logic.cancel()
    status = wait_idle(logic)
    assert status.state == "cancelled" and status.kind == "refine"
    assert np.array_equal(_mask(node, "Disc", volume), discs) and not logic.can_undo(node)
    logic.shutdown()
    logic, _ = fake_logic(tmp_path, error=("InputError", "the mask holds label value(s) [7]"))
    logic.start_refine(node, volume, refiner, 2)
    status = wait_idle(logic)
    assert status.state == "failed" and status.message == "Refinement failed: the mask holds label value(s) [7]"
    assert np.array_equal(_mask(node, "Disc", volume), discs)
    logic.shutdown()


def _seven_discs():
    from MedSegSuiteLib.slicer.testing import add_disc_stack_volume

    return add_disc_stack_volume("Seven", centres=tuple((16, 15 + k % 3) for k in range(7)))


def test_the_neighbours_scope_refines_the_current_slice_and_its_neighbours_only(scene, refiner, tmp_path):
    volume, discs = _seven_discs()
    node = _segmentation(volume, {"Disc": (discs, None, None)})
    logic, factory = fake_logic(tmp_path)
    logic.start_refine(node, volume, refiner, 2, keep_edits=False, scope="neighbours", slice_index=3, neighbours=1)
    sent = factory.last.received[-1]["params"]
    assert (sent["scope"], sent["slice"], sent["neighbours"]) == ("neighbours", 3, 1)
    assert wait_idle(logic).state == "done"
    refined = _mask(node, "Disc", volume)
    assert np.array_equal(refined[2:5], _grown(discs)[2:5]) and not np.array_equal(refined[2:5], discs[2:5])
    assert np.array_equal(refined[:2], discs[:2]) and np.array_equal(refined[5:], discs[5:])

    logic.start_refine(node, volume, refiner, 2, scope="neighbours", point_lps=(1.0, 2.0, 13.0))
    sent = factory.last.received[-1]["params"]
    assert sent["point"] == [1.0, 2.0, 13.0] and "slice" not in sent
    assert sent["neighbours"] == 2  # the parameter node's default, as the panel would send
    wait_idle(logic)
    logic.shutdown()


def test_spread_reaches_the_worker_and_its_default_lives_in_the_parameter_defaults(
    scene, refiner, tmp_path, monkeypatch
):
    from MedSegSuiteLib.slicer import parameters

    volume, discs = _seven_discs()
    node = _segmentation(volume, {"Disc": (discs, None, None)})
    logic, factory = fake_logic(tmp_path)
    logic.start_refine(node, volume, refiner, 1, scope="neighbours", slice_index=3, spread=0.5)
    assert factory.last.received[-1]["params"]["spread"] == 0.5
    wait_idle(logic)
    monkeypatch.setitem(parameters.DEFAULTS, parameters.REFINE_SPREAD, "0.25")
    monkeypatch.setitem(parameters.DEFAULTS, parameters.REFINE_NEIGHBOURS, "4")
    logic.start_refine(node, volume, refiner, 1)
    sent = factory.last.received[-1]["params"]
    assert (sent["spread"], sent["neighbours"]) == (0.25, 4)
    wait_idle(logic)
    logic.shutdown()


def _uncertain(node):
    """The ids of the node's segments named "Uncertain (refinement)"."""
    from MedSegSuiteLib.slicer.segmentations import segment_ids

    segmentation = node.GetSegmentation()
    return [sid for sid in segment_ids(node) if segmentation.GetSegment(sid).GetName() == "Uncertain (refinement)"]


def test_an_ensemble_shows_where_its_chains_disagree_replaces_it_on_each_run_and_undo_restores_it(
    scene, refiner, tmp_path
):
    from MedSegSuiteLib.slicer.segmentations import segment_mask, segment_tag

    volume, discs = _seven_discs()
    node = _segmentation(volume, {"Disc": (discs, None, None)})
    logic, factory = fake_logic(tmp_path)
    logic.start_refine(node, volume, refiner, 1, keep_edits=False)
    assert "uncertainty" not in factory.last.received[-1]["params"]  # one chain: nothing to disagree
    wait_idle(logic)
    assert _uncertain(node) == []
    first_disc = _mask(node, "Disc", volume)

    logic.start_refine(node, volume, refiner, 1, keep_edits=False, ensemble=3)
    sent = factory.last.received[-1]["params"]
    assert sent["ensemble"] == 3 and sent["uncertainty"].endswith("uncertainty.nrrd")
    status = wait_idle(logic)
    assert status.state == "done", status.message
    second_disc = _mask(node, "Disc", volume)
    (first,) = _uncertain(node)
    segment = node.GetSegmentation().GetSegment(first)
    assert segment_tag(segment, "MedSegSuite.role") == "uncertainty" and tuple(segment.GetColor()) == (1.0, 0.0, 1.0)
    disagree = second_disc & ~first_disc  # 0.3 where the fake changed voxels; its 0.1 stays under the threshold
    assert np.array_equal(segment_mask(node, first, volume), disagree)
    assert f"The 3 chains disagree (uncertainty above 0.2) at {int(disagree.sum())} voxel(s)" in status.message
    assert "see the segment 'Uncertain (refinement)'" in status.message
    assert status.info["uncertain_voxels"] == int(disagree.sum())
    assert np.array_equal(_mask(node, "Disc", volume), _grown(first_disc))  # the Disc kept its overlapping voxels

    logic.start_refine(node, volume, refiner, 1, keep_edits=False, ensemble=2)
    sent = factory.last.received[-1]["params"]
    assert np.array_equal(read_image(sent["mask"]).array, second_disc)  # the uncertain voxels are not sent
    status = wait_idle(logic)
    assert "Left untouched" not in status.message, status.message
    (second,) = _uncertain(node)  # replaced, not added
    assert np.array_equal(segment_mask(node, second, volume), _mask(node, "Disc", volume) & ~second_disc)

    logic.start_refine(node, volume, refiner, 1, keep_edits=False)  # one chain: the old map would mislead
    status = wait_idle(logic)
    assert _uncertain(node) == [] and "disagree" not in status.message
    logic.undo_refinement(node)
    (restored,) = _uncertain(node)
    assert np.array_equal(segment_mask(node, restored, volume), _mask(node, "Disc", volume) & ~second_disc)
    logic.undo_refinement(node)
    (restored,) = _uncertain(node)
    assert np.array_equal(segment_mask(node, restored, volume), disagree)
    logic.undo_refinement(node)
    assert _uncertain(node) == [] and np.array_equal(_mask(node, "Disc", volume), first_disc)
    logic.shutdown()


def test_the_uncertainty_segment_is_no_label_for_refinement_finetuning_or_export(scene, refiner, tmp_path):
    import json

    from MedSegSuiteLib.export import read_segmentation
    from MedSegSuiteLib.slicer.finetuning import parent_label_map
    from MedSegSuiteLib.slicer.refinement import match_segments

    volume, discs = _seven_discs()
    node = _segmentation(volume, {"Disc": (discs, None, None)})
    logic, _ = fake_logic(tmp_path)
    logic.start_refine(node, volume, refiner, 1, keep_edits=False, ensemble=2)
    assert wait_idle(logic).state == "done"
    assert _uncertain(node), "the ensemble added no uncertainty segment"
    disc = _mask(node, "Disc", volume)
    matches, unknown = match_segments(node, refiner.card)
    assert [m.name for m in matches] == ["Disc"] and unknown == []
    assert np.array_equal(parent_label_map(node, volume, refiner.card), disc.astype(np.uint8))

    status = logic.export(node, tmp_path / "case.nrrd", reference_node=volume)
    assert "uncertainty segment is not a label and was left out" in status.message
    assert np.array_equal(read_image(tmp_path / "case.nrrd").array, disc.astype(np.uint8))
    table = json.loads((tmp_path / "case.labels.json").read_text(encoding="utf-8"))["labels"]
    assert [entry["name"] for entry in table] == ["Disc"]
    logic.export(node, tmp_path / "case.seg.nrrd", reference_node=volume)
    assert [segment.name for segment in read_segmentation(tmp_path / "case.seg.nrrd").segments] == ["Disc"]
    assert len(_uncertain(node)) == 1  # the scene keeps it
    plain = _segmentation(volume, {"Disc": (discs, None, None)})
    assert "left out" not in logic.export(plain, tmp_path / "plain.nrrd", reference_node=volume).message
    logic.shutdown()
