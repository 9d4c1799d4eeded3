"""The real worker process running "refine" jobs with the small HiDiff model of the ``hidiff_dir`` fixture.

One worker serves the module, so the model stays warm between jobs. The data are
three axial slices of grey discs whose mask has a hole and a spur.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from conftest import TEST_THREADS, grey_disc

from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.volume import Volume
from MedSegSuiteLib.worker import WorkerClient

THREADS = str(TEST_THREADS)
SPACING, ORIGIN = (0.8, 0.8, 2.0), (5.0, -3.0, 10.0)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    client = WorkerClient(env={"MEDSEGSUITE_THREADS": THREADS}, temp_root=str(tmp_path_factory.mktemp("worker")))
    yield client
    client.close()


def _discs(count: int = 3, seed: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 as float32) and masks with a hole and a spur, ``count`` axial slices of 32 x 32."""
    images, masks = [], []
    yy, xx = np.mgrid[:32, :32]
    for k in range(count):
        centre = (15 + k % 3, 15 + (2 * k) % 3)
        image, truth = grey_disc(32, centre, 7.5, seed=seed + k)
        mask = truth.copy()
        mask[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= 2.5**2] = False
        mask[centre[0] - 1 : centre[0] + 1, centre[1] + 8 : centre[1] + 14] = True
        images.append(image)
        masks.append(mask)
    return np.stack(images).astype(np.float32), np.stack(masks).astype(np.uint8)


def _write(client, name: str, array: np.ndarray) -> str:
    path = client.temp_dir / name
    write_image(Volume(array, SPACING, ORIGIN), path, overwrite=True, compress=False)
    return str(path)


def _params(client, model_dir, image, mask, output="refined.nrrd", **extra):
    params = {
        "model": str(model_dir),
        "input": _write(client, "image.nrrd", image),
        "mask": _write(client, "mask.nrrd", mask),
        "output": str(client.temp_dir / output),
        "steps": 1,
        "device": "cpu",
    }
    params.update(extra)
    return params


def _wait(client, predicate, timeout=120.0):
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        seen += client.poll()
        if any(predicate(m) for m in seen):
            return seen
        time.sleep(0.01)
    raise AssertionError(f"timed out; got {seen}")


def test_refine_job_writes_labels_on_the_input_grid_holds_kept_voxels_and_keeps_the_model_warm(client, hidiff_dir):
    image, mask = _discs()
    first = client.wait(client.submit("refine", _params(client, hidiff_dir, image, mask)), timeout=300)
    result = first[-1]
    assert result["type"] == "result", result
    refining = [m for m in first if m["type"] == "progress" and m["stage"] == "refining"]
    assert refining and refining[-1]["done"] == refining[-1]["total"] == 3 and refining[-1]["unit"] == "slices"
    info = result["info"]
    assert info["slices"] == [0, 1, 2] and info["steps"] == 1 and info["labels_present"] == [1]
    labels = read_image(result["outputs"]["labels"])
    assert labels.grid.same_as(Volume(image, SPACING, ORIGIN).grid, atol=0) and labels.array.dtype == np.uint8
    assert info["changed"] == int((labels.array != mask).sum())
    assert "uncertainty" not in result["outputs"]

    keep = np.random.default_rng(0).random(mask.shape) < 0.4
    keep |= mask != labels.array  # every voxel the first run changed must now stay
    params = _params(
        client, hidiff_dir, image, mask, "kept.nrrd", keep=_write(client, "keep.nrrd", keep.astype(np.uint8))
    )
    params.update(seed=0, ensemble=2, uncertainty=str(client.temp_dir / "uncertainty.nrrd"))
    second = client.wait(client.submit("refine", params), timeout=300)[-1]
    assert second["type"] == "result", second
    assert second["info"]["cache_hit"] is True and second["info"]["kept"] == int(keep.sum())
    kept = read_image(second["outputs"]["labels"]).array
    assert np.array_equal(kept[keep], mask[keep])
    uncertainty = read_image(second["outputs"]["uncertainty"]).array
    assert uncertainty.shape == mask.shape and 0 <= uncertainty.min() <= uncertainty.max() <= 0.5


def test_refine_job_refines_the_axial_slice_through_a_point_only(client, hidiff_dir):
    image, mask = _discs()
    point = list(Volume(image, SPACING, ORIGIN).grid.index_to_physical((4, 5, 1)))
    messages = client.wait(
        client.submit("refine", _params(client, hidiff_dir, image, mask, scope="slice", point=point)), timeout=300
    )
    result = messages[-1]
    assert result["type"] == "result", result
    assert result["info"]["slices"] == [1]
    labels = read_image(result["outputs"]["labels"]).array
    assert np.array_equal(labels[[0, 2]], mask[[0, 2]])


def test_refine_job_refines_the_slice_through_a_point_and_its_neighbours_only(client, hidiff_dir):
    image, mask = _discs(count=7)
    point = list(Volume(image, SPACING, ORIGIN).grid.index_to_physical((4, 5, 3)))
    params = _params(client, hidiff_dir, image, mask, scope="neighbours", point=point, neighbours=1)
    result = client.wait(client.submit("refine", params), timeout=300)[-1]
    assert result["type"] == "result", result
    assert result["info"]["slices"] == [2, 3, 4] and result["info"]["neighbours"] == 1
    labels = read_image(result["outputs"]["labels"]).array
    assert np.array_equal(labels[[0, 1, 5, 6]], mask[[0, 1, 5, 6]])
    assert not np.array_equal(labels[2:5], mask[2:5])  # the refiner mends the holes and spurs in scope


def test_refine_job_passes_spread_on_so_an_edited_slice_guides_its_neighbours(client, hidiff_dir):
    image, mask = _discs(count=5)
    keep = np.zeros_like(mask)
    keep[2] = 1  # the clinician corrected slice 2: all of it is theirs
    keep_file = _write(client, "keep-slice.nrrd", keep)
    results = {}
    for spread in (0.0, 1.0):
        params = _params(
            client, hidiff_dir, image, mask, f"spread-{spread}.nrrd", scope="neighbours", slice=2, neighbours=2
        )
        params.update(keep=keep_file, spread=spread, seed=3)
        result = client.wait(client.submit("refine", params), timeout=300)[-1]
        assert result["type"] == "result", result
        assert result["info"]["spread"] == spread and result["info"]["slices"] == [0, 1, 2, 3, 4]
        results[spread] = read_image(result["outputs"]["labels"]).array
    assert np.array_equal(results[0.0][2], mask[2]) and np.array_equal(results[1.0][2], mask[2])  # kept
    for k in (1, 3):  # beside the edited slice, spread 1 starts from slice 2's labels instead of their own
        assert not np.array_equal(results[1.0][k], results[0.0][k]), k


def test_refine_job_stops_when_cancelled_and_writes_nothing(client, hidiff_dir):
    image, mask = _discs(count=24)
    params = _params(client, hidiff_dir, image, mask, "cancelled.nrrd", steps=3, batch_size=1)
    job = client.submit("refine", params)
    _wait(client, lambda m: m.get("job") == job and m["type"] == "progress" and m["stage"] == "refining")
    started = time.monotonic()
    client.cancel(job)
    messages = client.wait(job, timeout=120)
    end = messages[-1]
    assert end["type"] == "cancelled" and not end.get("forced"), end
    assert time.monotonic() - started < 60
    assert all(m["done"] < 24 for m in messages if m["type"] == "progress" and m["stage"] == "refining")
    assert not os.path.exists(params["output"])


def test_refine_job_refuses_bad_requests_with_one_line_reasons(client, hidiff_dir):
    image, mask = _discs(count=1)
    cases = [
        (dict(scope="slice"), "needs the job parameter 'slice'"),
        (dict(scope="roi"), "needs the job parameter 'roi'"),
        (dict(scope="everything"), "'scope' must be one of volume, slice, neighbours, roi"),
        (dict(scope="neighbours"), "scope 'neighbours' needs the job parameter 'slice'"),
        (dict(spread="lots"), "job parameter 'spread' must be a number"),
        (dict(spread=1.5), "spread must be between 0 and 1"),
        (dict(neighbours=1.5), "job parameter 'neighbours' must be int"),
        (dict(point=[1, 2]), "'point' must be three numbers"),
        (dict(steps=99), "steps must be between 0 and 10"),
    ]
    for extra, expected in cases:
        end = client.wait(client.submit("refine", _params(client, hidiff_dir, image, mask, **extra)), timeout=120)[-1]
        assert end["type"] == "error" and expected in end["message"], (extra, end)
    empty = _params(client, hidiff_dir, image, np.zeros_like(mask))
    end = client.wait(client.submit("refine", empty), timeout=120)[-1]
    assert end["type"] == "error" and end["kind"] == "InputError" and "the mask is empty" in end["message"]
