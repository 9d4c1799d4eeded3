"""The real worker process running "finetune" jobs with the small 3D U-Net of the ``unet3d_dir`` fixture.

One worker serves the module, with its own MEDSEGSUITE_HOME (the user model folder the
new models go to). The cases are faint balls beside bright ones, written as NRRD files
the way the Slicer panel sends them.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import TEST_THREADS

from MedSegSuiteLib.io import write_image
from MedSegSuiteLib.volume import Volume
from MedSegSuiteLib.worker import WorkerClient

THREADS = str(TEST_THREADS)
SHAPE = (18, 34, 34)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-worker")
    (root / "resources" / "Models").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def client(home):
    env = {
        "MEDSEGSUITE_THREADS": THREADS,
        "MEDSEGSUITE_HOME": str(home / "home"),
        "MEDSEGSUITE_RESOURCES": str(home / "resources"),
    }
    client = WorkerClient(env=env, temp_root=str(home))
    yield client
    client.close()


def _faint_ball(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")

    def ball(centre):
        return (kk - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (ii - centre[2]) ** 2 <= 4.5**2

    faint = ball((rng.uniform(6, 12), rng.uniform(7, 14), rng.uniform(7, 27)))
    bright = ball((rng.uniform(6, 12), rng.uniform(21, 27), rng.uniform(7, 27))) & ~faint
    image = 100.0 + 10.0 * rng.standard_normal(SHAPE) + 40.0 * faint + 80.0 * bright
    return image.astype(np.float32), faint.astype(np.uint8)


def _cases(client, count: int = 2, label_value: int = 1) -> tuple[list[dict], list[dict]]:
    labelled, unlabelled = [], []
    folder = client.temp_dir
    for i in range(count):
        image, mask = _faint_ball(i)
        write_image(Volume(image), folder / f"case{i}.nrrd", overwrite=True, compress=False)
        write_image(Volume(mask * label_value), folder / f"case{i}-label.nrrd", overwrite=True, compress=False)
        labelled.append(
            {"id": f"case {i}", "image": str(folder / f"case{i}.nrrd"), "label": str(folder / f"case{i}-label.nrrd")}
        )
    write_image(Volume(_faint_ball(50)[0]), folder / "spare.nrrd", overwrite=True, compress=False)
    unlabelled.append({"id": "spare", "image": str(folder / "spare.nrrd")})
    return labelled, unlabelled


def _params(client, parent, iterations, count=2, **extra):
    labelled, unlabelled = _cases(client, count)
    params = {"parent": str(parent), "labelled": labelled, "unlabelled": unlabelled, "iterations": iterations}
    params.update(device="cpu", **extra)
    return params


def _models(home) -> list[str]:
    folder = home / "home" / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_finetune_job_streams_progress_and_loss_records_and_registers_a_new_model(client, home, unet3d_dir):
    messages = client.wait(client.submit("finetune", _params(client, unet3d_dir, 5)), timeout=600)
    result = messages[-1]
    assert result["type"] == "result", result
    stages = [m["stage"] for m in messages if m["type"] == "progress"]
    assert stages[0] == "loading data" and "measuring the parent" in stages and stages[-1] == "training"
    training = [m for m in messages if m["type"] == "progress" and m["stage"] == "training"]
    assert training[-1]["done"] == training[-1]["total"] == 5 and training[-1]["unit"] == "iterations"
    records = [m["record"] for m in messages if m["type"] == "log"]
    losses = [r for r in records if "loss" in r]
    validations = [r for r in records if "val_dice" in r]
    assert losses[0]["iteration"] == 1 and losses[-1]["iteration"] == 5 and all(r["loss"] > 0 for r in losses)
    # iteration 0 is the parent on the held-back cases: the checkpoint to beat
    assert [r["iteration"] for r in validations] == [0, 1, 2, 3, 4, 5] and 0 <= validations[-1]["val_dice"] <= 1

    info = result["info"]
    assert info["model"] == "test-unet3d-ft-1" and info["parent"] == "test-unet3d" and info["resumed"] is False
    assert info["labelled"] == 2 and info["unlabelled"] == 1 and info["device"] == "cpu"
    assert 0 <= info["dice_before"] <= 1 and 0 <= info["dice_after"] <= 1
    assert info["split"] == "the 2 labelled training cases (too few to hold any back)"
    assert info["verdict"]["outcome"] == "not checked" and info["selected"] is False  # nothing held back to check
    card = json.loads((home / "home" / "models" / "test-unet3d-ft-1" / "card.json").read_text(encoding="utf-8"))
    assert result["outputs"]["model"] == info["directory"] == str(home / "home" / "models" / "test-unet3d-ft-1")
    assert card["parent"] == "test-unet3d" and card["training"]["finetune"]["unlabelled"] == 1
    assert _models(home) == ["test-unet3d-ft-1"]


def test_finetune_job_cancel_leaves_a_checkpoint_that_resume_finishes(client, home, unet3d_dir):
    before = _models(home)
    job = client.submit("finetune", _params(client, unet3d_dir, 10, held_out=1))
    seen = []
    deadline = time.monotonic() + 600
    while not any(m["type"] == "progress" and m["stage"] == "training" and m["done"] >= 2 for m in seen):
        assert time.monotonic() < deadline, seen
        seen += [m for m in client.poll() if m.get("job") == job]
        time.sleep(0.01)
    client.cancel(job)
    messages = seen + client.wait(job, timeout=300)
    end = messages[-1]
    assert end["type"] == "cancelled" and not end.get("forced"), end
    checkpoint = [m["record"] for m in messages if m["type"] == "log" and m["record"].get("event") == "checkpoint"]
    assert len(checkpoint) == 1 and checkpoint[0]["iteration"] >= 2, checkpoint
    model_id = checkpoint[0]["model"]
    workdir = home / "home" / "models" / f"{model_id}.training"
    assert (workdir / "checkpoint.pt").is_file() and _models(home) == sorted(before + [workdir.name])
    logged = [m["record"] for m in messages if m["type"] == "log" and "loss" in m["record"]]

    resumed = client.wait(client.submit("finetune", _params(client, unet3d_dir, 10, held_out=1, resume=True)), 600)
    result = resumed[-1]
    assert result["type"] == "result", result
    records = [m["record"] for m in resumed if m["type"] == "log"]
    replayed = [r for r in records if r.pop("replayed", False)]
    assert [r for r in replayed if "loss" in r] == logged  # the earlier curve comes back first
    fresh = [r for r in records if r not in replayed and "loss" in r]
    assert fresh[0]["iteration"] > checkpoint[0]["iteration"] and fresh[-1]["iteration"] == 10
    assert result["info"]["model"] == model_id and result["info"]["resumed"] is True
    assert "held-out: 1 of the 2 labelled cases" in result["info"]["split"]
    assert not workdir.exists() and _models(home) == sorted(before + [model_id])


def test_finetune_job_can_time_iterations_without_registering_anything(client, home, unet3d_dir):
    before = _models(home)
    messages = client.wait(client.submit("finetune", _params(client, unet3d_dir, 200, count=1, measure=2)), timeout=600)
    result = messages[-1]
    assert result["type"] == "result" and result["outputs"] == {}, result
    info = result["info"]
    assert info["measured"] is True and info["iterations_timed"] == 2 and info["device"] == "cpu"
    assert info["seconds_per_iteration"] > 0 and info["seconds_per_validation"] >= 0 and info["seconds_setup"] > 0
    timing = [m for m in messages if m["type"] == "progress" and m["stage"] == "timing"]
    assert timing[-1]["done"] == timing[-1]["total"] == 3
    assert _models(home) == before


def test_finetune_job_refuses_labels_outside_the_parents_table_before_training(client, home, unet3d_dir):
    before = _models(home)
    labelled, _ = _cases(client, count=1, label_value=3)
    params = {"parent": str(unet3d_dir), "labelled": labelled, "iterations": 5, "device": "cpu"}
    messages = client.wait(client.submit("finetune", params), timeout=300)
    end = messages[-1]
    assert end["type"] == "error" and end["kind"] == "InputError", end
    assert end["message"] == ("case case 0: label value(s) [3] are not in model 'test-unet3d''s label table (1 Ball)")
    assert not [m for m in messages if m["type"] == "progress" and m["stage"] != "loading data"]
    end = client.wait(client.submit("finetune", dict(params, labelled=[])), timeout=60)[-1]
    assert end["type"] == "error" and "at least one labelled case" in end["message"]
    assert _models(home) == before
