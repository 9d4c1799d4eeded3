"""Property-based tests of the label-map conversions (random label maps, tables, overlaps)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from MedSegSuiteLib.inference.predictor import decode_scores
from MedSegSuiteLib.io.seg_nrrd import read_seg_nrrd, write_seg_nrrd
from MedSegSuiteLib.io.segmentation import Segmentation
from MedSegSuiteLib.models.card import Label, card_from_dict
from MedSegSuiteLib.training.data import class_index_map
from MedSegSuiteLib.volume import Volume

label_maps = st.builds(
    lambda shape, values, seed, oblique: Volume(
        np.random.default_rng(seed)
        .choice([0, *values], size=shape)
        .astype(np.uint16 if max(values) > 255 else np.uint8),
        (0.5 + seed % 3, 1.0, 2.5),
        (seed % 7, -3.0, 4.0),
        Rotation.random(random_state=seed).as_matrix() if oblique else None,
    ),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)),
    values=st.lists(st.integers(1, 300), min_size=1, max_size=5, unique=True),
    seed=st.integers(0, 10_000),
    oblique=st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(label_maps)
def test_label_map_to_segmentation_and_back_is_exact(volume):
    values = sorted(int(v) for v in np.unique(volume.array) if v)
    labels = [Label(v, f"Structure {v}", (v % 256, 10, 20)) for v in values] or [Label(1, "Empty", (1, 2, 3))]
    segmentation = Segmentation.from_label_map(volume, labels)
    back, table = segmentation.to_label_map()
    assert np.array_equal(back.array, volume.array)
    assert back.grid.same_as(volume.grid, atol=0)
    assert [label.value for label in table] == [label.value for label in labels]


@settings(max_examples=25, deadline=None)
@given(label_maps)
def test_seg_nrrd_round_trip_keeps_voxels_names_and_geometry(tmp_path_factory, volume):
    values = sorted(int(v) for v in np.unique(volume.array) if v)
    labels = [Label(v, f"S{v}", (v % 256, 0, 255 - v % 256)) for v in values] or [Label(1, "None", (0, 0, 0))]
    path = write_seg_nrrd(Segmentation.from_label_map(volume, labels), tmp_path_factory.mktemp("seg") / "x.seg.nrrd")
    back, table = read_seg_nrrd(path).to_label_map()
    assert np.array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-6)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-6)
    assert [label.name for label in table] == [label.name for label in labels]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=6, unique=True), st.integers(0, 10_000))
def test_class_index_map_is_the_inverse_of_the_label_table(values, seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, *values], size=(3, 5, 7)).astype(np.uint16)
    classes = class_index_map(labels, values, "case")
    lut = np.array([0, *values])
    assert np.array_equal(lut[classes], labels)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10_000), st.sampled_from(["softmax", "sigmoid"]))
def test_decoded_labels_are_the_best_label_or_background(count, seed, activation):
    card = card_from_dict(
        {
            "id": "p",
            "version": "1.0.0",
            "network": "unet",
            "dims": 2,
            "weights": {"file": "m.safetensors"},
            "input": {"channels": 1, "normalization": {"kind": "none"}},
            "inference": {"activation": activation, "threshold": 0.5},
            "labels": [{"value": 10 * (i + 1), "name": f"L{i}", "color": [0, 0, 0]} for i in range(count)],
        }
    )
    channels = card.output_channels
    scores = np.random.default_rng(seed).random((channels, 2, 3, 4)).astype(np.float32)
    if activation == "softmax":
        scores /= scores.sum(0, keepdims=True)
    decoded = decode_scores(scores, card, card.inference)
    values = np.array([0, *[10 * (i + 1) for i in range(count)]])
    if activation == "softmax":
        assert np.array_equal(decoded, values[np.argmax(scores, 0)])
    else:
        best = np.argmax(scores, 0)
        expected = np.where(np.max(scores, 0) > 0.5, values[1:][best], 0)
        assert np.array_equal(decoded, expected)
