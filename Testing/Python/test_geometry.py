"""Volume validation, canonical reorientation round trips, ROI boxes and resampling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.geometry import Box, crop, paste, resample, resampled_grid, to_canonical
from MedSegSuiteLib.volume import Grid, Volume


def _direction(seed: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "oblique":
        matrix = Rotation.random(random_state=seed).as_matrix()
    else:  # axis-aligned: a signed permutation
        matrix = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], 3)
    if kind != "axis" and rng.random() < 0.5:
        matrix[:, 0] *= -1  # left-handed grids exist (some NIfTI files)
    return matrix


volumes = st.builds(
    lambda shape, spacing, origin, seed, kind, channels: Volume(
        np.random.default_rng(seed)
        .integers(-1000, 3000, ((channels,) if channels > 1 else ()) + shape)
        .astype(np.int16),
        spacing,
        origin,
        _direction(seed, kind),
    ),
    shape=st.tuples(*[st.integers(1, 9)] * 3),
    spacing=st.tuples(*[st.floats(0.1, 7.0)] * 3),
    origin=st.tuples(*[st.floats(-500, 500)] * 3),
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["axis", "oblique"]),
    channels=st.sampled_from([1, 3]),
)


@settings(max_examples=150, deadline=None)
@given(volumes)
def test_canonical_round_trip_returns_input_bit_for_bit(volume):
    canonical, transform = to_canonical(volume)
    restored = transform.restore(np.array(canonical.array))
    assert restored.array.dtype == volume.array.dtype
    assert np.array_equal(restored.array, volume.array)
    assert restored.spacing == volume.spacing and restored.origin == volume.origin
    assert np.array_equal(restored.direction, volume.direction)


@settings(max_examples=100, deadline=None)
@given(volumes)
def test_canonical_voxels_keep_their_physical_positions(volume):
    canonical, transform = to_canonical(volume)
    rng = np.random.default_rng(0)
    source_index = [rng.integers(0, n) for n in (volume.shape[2], volume.shape[1], volume.shape[0])]
    # Find where that voxel went by marking it.
    marker = np.zeros(volume.shape, dtype=np.uint8)
    marker[source_index[2], source_index[1], source_index[0]] = 1
    k, j, i = np.argwhere(transform.apply(marker))[0]
    np.testing.assert_allclose(
        canonical.grid.index_to_physical((i, j, k)), volume.grid.index_to_physical(source_index), atol=1e-6
    )


@settings(max_examples=100, deadline=None)
@given(volumes)
def test_canonical_direction_is_closest_to_lps(volume):
    canonical, _ = to_canonical(volume)
    diagonal = np.diag(canonical.direction)
    assert np.all(diagonal >= 0)
    # No other assignment of voxel axes to L, P, S is better aligned.
    best = max(sum(abs(volume.direction[a, p[a]]) for a in range(3)) for p in itertools.permutations(range(3)))
    assert diagonal.sum() >= best - 1e-9


def test_axis_aligned_canonical_is_identity_direction():
    # Columns are the i, j, k axes: i points anterior, j superior, k right (a sagittal acquisition).
    direction = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], dtype=float)
    volume = Volume(np.arange(2 * 3 * 4).reshape(2, 3, 4), (1.0, 2.0, 3.0), (5, 6, 7), direction)
    canonical, transform = to_canonical(volume)
    np.testing.assert_array_equal(canonical.direction, np.eye(3))
    assert canonical.spacing == (3.0, 1.0, 2.0)
    assert transform.perm == (2, 0, 1) and transform.flip == (True, True, False)
    assert canonical.shape == (3, 4, 2)  # (S from j, P from i, L from k)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing must be positive"),
        ({"spacing": (1.0, -2.0, 1.0)}, "spacing must be positive"),
        ({"direction": [[1, 0, 0], [0.5, 1, 0], [0, 0, 1]]}, "not orthonormal"),
        ({"origin": (0, float("nan"), 0)}, "origin must be three finite"),
    ],
)
def test_volume_refuses_broken_geometry(kwargs, message):
    with pytest.raises(InputError, match=message):
        Volume(np.zeros((2, 2, 2)), **kwargs)


def test_volume_refuses_wrong_dimensionality():
    with pytest.raises(InputError, match="got 2 dimensions"):
        Volume(np.zeros((4, 4)))
    with pytest.raises(InputError, match="got 5 dimensions"):
        Volume(np.zeros((2, 2, 2, 2, 2)))
    with pytest.raises(InputError, match="time series"):
        Volume(np.zeros((40, 2, 2, 2)))


def test_grid_index_physical_round_trip():
    grid = Grid((5, 6, 7), (0.5, 0.8, 2.0), (10, -20, 30), Rotation.random(random_state=3).as_matrix())
    ijk = np.array([1.5, 2.0, 3.25])
    np.testing.assert_allclose(grid.physical_to_index(grid.index_to_physical(ijk)), ijk, atol=1e-12)
    np.testing.assert_allclose(grid.index_to_physical_matrix @ [*ijk, 1], [*grid.index_to_physical(ijk), 1])


def test_roi_box_parse_validate_crop_and_paste():
    volume = Volume(np.arange(4 * 5 * 6).reshape(4, 5, 6), (1, 2, 3), (0, 0, 0))
    box = Box.parse("1,2,0,4,5,2")
    part = crop(volume, box)
    assert part.shape == (2, 3, 3)
    np.testing.assert_array_equal(part.array, volume.array[0:2, 2:5, 1:4])
    np.testing.assert_allclose(part.origin, volume.grid.index_to_physical((1, 2, 0)))
    back = paste(part.array, box, volume.grid, fill=-1)
    assert back[0, 2, 1] == volume.array[0, 2, 1] and back[3, 0, 0] == -1
    for text, message in [
        ("1,2,3", "six integers"),
        ("a,b,c,d,e,f", "six integers"),
    ]:
        with pytest.raises(InputError, match=message):
            Box.parse(text)
    with pytest.raises(InputError, match="outside the image"):
        crop(volume, Box.parse("0,0,0,7,5,4"))
    with pytest.raises(InputError, match="is empty"):
        crop(volume, Box.parse("3,0,0,3,5,4"))


def test_resample_to_same_grid_is_identity_and_spacing_changes_size():
    grid = Grid((6, 8, 10), (1.0, 1.0, 2.0))
    array = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    np.testing.assert_allclose(resample(array, grid, grid), array, atol=1e-6)
    target = resampled_grid(grid, (0.5, 0.5, 1.0))
    assert target.shape == (12, 16, 20)
    np.testing.assert_allclose(
        target.index_to_physical(np.array(target.shape[::-1]) / 2 - 0.5),
        grid.index_to_physical(np.array(grid.shape[::-1]) / 2 - 0.5),
        atol=1e-9,
    )
    labels = (array > 0.5).astype(np.uint8)
    assert resample(labels, grid, target, order=0).dtype == np.uint8
