"""The screenshot script (Testing/Python/screenshots.py) stages nothing: it loads the bundled sample as
Sample Data does, and its one user step, naming the reference's segments, is what makes them match
the bundled model. The script itself (a real worker, about a minute) is run by hand, not here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import screenshots
import slicer_harness

from MedSegSuiteLib.io import read_image
from MedSegSuiteLib.models.card import load_card

SAMPLES = screenshots.REPO / "Resources" / "Samples"


def test_the_sample_loads_as_sample_data_and_its_named_reference_matches_the_bundled_model():
    slicer_harness.install()
    import slicer

    from MedSegSuiteLib.slicer.refinement import match_segments
    from MedSegSuiteLib.slicer.volumes import volume_from_node

    slicer.mrmlScene.Clear(0)
    try:
        volume, reference = screenshots.load_sample()
        assert (volume.GetName(), reference.GetName()) == ("MSD-Hippocampus-sample", "MSD-Hippocampus-sample-reference")
        expected = read_image(SAMPLES / "MSD-Hippocampus-sample.nrrd")
        loaded = volume_from_node(volume)
        assert loaded.grid.same_as(expected.grid) and np.array_equal(loaded.array, expected.array)
        card = load_card(Path(screenshots.REPO / "Resources" / "Models" / screenshots.MODEL_ID / "card.json"))
        matches, unknown = match_segments(reference, card)
        assert not matches and len(unknown) == 2  # as loaded: Segment_1, Segment_2
        screenshots.name_reference_segments(reference)
        matches, unknown = match_segments(reference, card)
        assert not unknown and {(m.name, m.label.value) for m in matches} == {
            ("Anterior hippocampus", 1),
            ("Posterior hippocampus", 2),
        }
        labels = read_image(SAMPLES / "MSD-Hippocampus-sample-label.nrrd").array
        for match in matches:
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(reference, match.segment_id, volume)
            assert np.array_equal(mask > 0, labels == match.label.value)
    finally:
        slicer.mrmlScene.Clear(0)
