"""The real worker process (``python -m MedSegSuiteLib.worker``) driven through WorkerClient.

Uses an untrained 3D U-Net with the test card: these tests are about the process and
its protocol, not about segmentation quality. One worker serves the module; the crash
test ends it and checks that the next job gets a fresh one.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from conftest import TEST_THREADS, UNET3D_CARD, sphere_volume
from scipy.spatial.transform import Rotation

from MedSegSuiteLib import networks
from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.models import save_model
from MedSegSuiteLib.volume import Volume
from MedSegSuiteLib.worker import WorkerClient

THREADS = str(TEST_THREADS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    network = networks.create("unet", "lite", spatial_dims=3, in_channels=1, out_channels=2)
    directory = tmp_path_factory.mktemp("worker-models") / "untrained-unet3d"
    save_model(directory, network, UNET3D_CARD)
    return directory


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    client = WorkerClient(env={"MEDSEGSUITE_THREADS": THREADS}, temp_root=str(tmp_path_factory.mktemp("worker")))
    yield client
    client.close()


def _write(client, name, array, direction=None) -> str:
    path = client.temp_dir / name
    write_image(Volume(array, (0.9, 0.8, 1.5), (10.0, -20.0, 5.0), direction), path, overwrite=True, compress=False)
    return str(path)


def _segment(client, model_dir, source, output="labels.nrrd", **extra):
    params = {"model": str(model_dir), "input": source, "output": str(client.temp_dir / output), "device": "cpu"}
    params.update(extra)
    return client.submit("segment", params)


def _wait(client, predicate, timeout=120.0):
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        seen += client.poll()
        if any(predicate(m) for m in seen):
            return seen
        time.sleep(0.01)
    raise AssertionError(f"timed out; got {seen}")


def test_worker_starts_and_reports_its_devices(client):
    client.ping()
    messages = _wait(client, lambda m: m["type"] == "pong")
    ready = next(m for m in messages if m["type"] == "ready")
    assert ready["protocol"] == 1 and ready["pid"] == client.pid and "cpu" in ready["devices"]
    assert next(m for m in messages if m["type"] == "pong")["busy"] is False


def test_segment_job_reports_progress_writes_labels_on_the_input_grid_and_keeps_the_model_warm(client, model_dir):
    image, _ = sphere_volume((24, 48, 40), (12, 24, 20), 6.0)
    source = _write(client, "oblique.nrrd", image, Rotation.from_euler("xz", [20, 35], degrees=True).as_matrix())
    first = client.wait(_segment(client, model_dir, source, "first.nrrd"), timeout=300)
    assert [m["type"] for m in first][0] == "started" and first[-1]["type"] == "result", first[-1]
    windows = [m for m in first if m["type"] == "progress" and m["stage"] == "segmenting"]
    assert windows and windows[-1]["done"] == windows[-1]["total"] > 1 and windows[-1]["unit"] == "windows"
    assert [m["done"] for m in windows] == sorted(m["done"] for m in windows)
    labels = read_image(first[-1]["outputs"]["labels"])
    assert labels.grid.same_as(read_image(source).grid, atol=0)
    assert labels.array.dtype == np.uint8 and set(np.unique(labels.array)) <= {0, 1}

    second = client.wait(_segment(client, model_dir, source, "second.nrrd"), timeout=300)
    assert first[-1]["info"]["cache_hit"] is False and second[-1]["info"]["cache_hit"] is True
    assert second[-1]["info"]["seconds"]["load"] < first[-1]["info"]["seconds"]["load"]
    assert np.array_equal(read_image(second[-1]["outputs"]["labels"]).array, labels.array)


def test_cancel_stops_the_job_at_the_next_batch_and_leaves_no_result(client, model_dir):
    """The job ends with ``cancelled`` after at most the batch in flight (about a second on a free CPU)."""
    image, _ = sphere_volume((64, 96, 96), (32, 48, 48), 8.0, seed=1)
    source = _write(client, "big.nrrd", image)
    job = _segment(client, model_dir, source, "cancelled.nrrd", roi=None)
    seen = _wait(
        client, lambda m: m["type"] == "progress" and m["stage"] == "segmenting" and 0 < m["done"] < m["total"]
    )
    assert not [m for m in seen if m["type"] in ("result", "cancelled")]
    asked = time.monotonic()
    client.cancel(job)
    after = client.wait(job, timeout=30)
    assert after[-1] == {"type": "cancelled", "job": job}
    assert time.monotonic() - asked < 10.0  # generous: CI machines are shared
    later = [(m["done"], m["total"]) for m in after if m["type"] == "progress" and m["stage"] == "segmenting"]
    assert all(done < total for done, total in later)  # it stopped instead of running to the end
    assert not (client.temp_dir / "cancelled.nrrd").exists()
    assert not [p for p in client.temp_dir.iterdir() if ".partial" in p.name]


def test_bad_input_is_a_one_line_error_and_the_worker_lives_on(client, model_dir):
    pid = client.pid
    missing = client.wait(_segment(client, model_dir, str(client.temp_dir / "missing.nrrd")), timeout=60)[-1]
    assert missing["type"] == "error" and missing["kind"] == "InputError" and "does not exist" in missing["message"]
    flat = _write(client, "flat.nrrd", np.zeros((8, 16, 16), np.float32))
    constant = client.wait(_segment(client, model_dir, flat), timeout=60)[-1]
    assert constant["kind"] == "InputError" and constant["message"].startswith("the image is constant")
    bad_roi = client.wait(_segment(client, model_dir, flat, roi=[0, 0]), timeout=60)[-1]
    assert bad_roi["kind"] == "ProtocolError" and "roi" in bad_roi["message"]
    assert client.pid == pid and client.alive


def test_malformed_json_line_gets_an_error_not_a_crash(client):
    client.process.stdin.write("{'type': 'ping'}\n")
    client.process.stdin.flush()
    client.ping()
    messages = _wait(client, lambda m: m["type"] == "pong")
    error = next(m for m in messages if m["type"] == "error")
    assert error["job"] is None and error["kind"] == "ProtocolError" and "not valid JSON" in error["message"]
    assert client.alive


def test_killed_worker_is_reported_and_the_next_job_starts_a_new_one(client, model_dir):
    image, _ = sphere_volume((64, 96, 96), (32, 48, 48), 8.0, seed=2)
    source = _write(client, "big2.nrrd", image)
    job = _segment(client, model_dir, source, "killed.nrrd")
    _wait(client, lambda m: m["type"] == "progress" and m["stage"] == "segmenting")
    old_pid = client.pid
    client.process.kill()
    died = client.wait(job, timeout=30)[-1]
    assert died["type"] == "died" and died["job"] == job
    if os.name != "nt":
        assert died["returncode"] == -9 and "possibly out of memory" in died["message"]
    assert died["message"].endswith("your scene is unchanged; the next job starts a new worker")
    small, _ = sphere_volume((16, 32, 32), (8, 16, 16), 5.0)
    again = client.wait(_segment(client, model_dir, _write(client, "small.nrrd", small)), timeout=300)[-1]
    assert again["type"] == "result" and client.pid != old_pid


def test_shutdown_ends_the_worker_cleanly(client):
    client.ping()
    _wait(client, lambda m: m["type"] == "pong")
    process = client.process
    client.shutdown()
    assert process.returncode == 0 and not client.alive
