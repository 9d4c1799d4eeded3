"""``medsegsuite train`` under ``torchrun``: two gloo processes on the CPU compute what one process does
with the same global batch, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import disc_image
from PIL import Image

from MedSegSuiteLib.models.weights import read_weights


@pytest.fixture(scope="module")
def discs(tmp_path_factory) -> Path:
    """8 small RGB photos with one disc each, and 0/255 masks."""
    root = tmp_path_factory.mktemp("ddp-discs")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(3)
    for i in range(8):
        image, mask = disc_image(40, tuple(rng.uniform(12, 28, 2)), rng.uniform(5, 9), seed=50 + i)
        Image.fromarray(np.moveaxis(image[:, 0], 0, -1)).save(root / "images" / f"case{i}.png")
        Image.fromarray(mask[0] * 255).save(root / "masks" / f"case{i}.png")
    return root


def _train(data: Path, output: Path, processes: int, home: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["train", "--network", "unet", "--data", str(data), "-o", str(output), "--iterations", "4"]
    args += ["--batch-size", "4", "--size", "32,32", "--validate-every", "2", "--device", "cpu", "-q"]
    args += ["--labels", "1:Disc", "--seed", "3", *extra]
    if processes == 1:
        command = [sys.executable, "-m", "MedSegSuiteLib", *args]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = [*launcher, "-m", "MedSegSuiteLib", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MEDSEGSUITE_HOME": str(home)}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=240
    )


def _log(model: Path) -> list[dict]:
    return json.loads((model / "training_log.json").read_text(encoding="utf-8"))


def test_two_gloo_processes_match_one_process_and_write_one_model(discs, tmp_path):
    single = _train(discs, tmp_path / "one" / "model", 1, tmp_path / "home")
    assert single.returncode == 0, single.stderr
    (tmp_path / "two").mkdir()
    double = _train(discs, tmp_path / "two" / "model", 2, tmp_path / "home")
    assert double.returncode == 0, double.stderr + double.stdout
    assert double.stdout.count("wrote ") == 1, "only rank 0 reports (and writes) the model"
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert written == ["model"], f"one model folder and no leftovers (work folder, temporaries): {written}"
    assert sorted(p.name for p in (tmp_path / "two" / "model").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "model").iterdir()
    )
    one, two = _log(tmp_path / "one" / "model"), _log(tmp_path / "two" / "model")
    losses_one = [entry["loss"] for entry in one if "loss" in entry]
    losses_two = [entry["loss"] for entry in two if "loss" in entry]
    assert len(losses_one) == len(losses_two) == 4
    # same global batch: the loss is the mean of the two halves' losses (Dice over half batches differs a little)
    np.testing.assert_allclose(losses_two, losses_one, rtol=0.02, atol=1e-3)
    assert losses_one[0] != losses_one[-1], "the network trains"
    dice_one = [entry["val_dice"] for entry in one if "val_dice" in entry]
    dice_two = [entry["val_dice"] for entry in two if "val_dice" in entry]
    assert len(dice_two) == 2, "validation runs once per validation point, not once per process"
    np.testing.assert_allclose(dice_two, dice_one, atol=0.05)
    # the losses of 4 Adam steps hardly tell synced from unsynced ranks; the weights do (measured: 0.006 relative
    # difference with DDP's gradient averaging, 0.05 when each rank steps on its own half batch)
    a = read_weights(tmp_path / "one" / "model" / "model.safetensors")
    b = read_weights(tmp_path / "two" / "model" / "model.safetensors")
    difference = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in a) ** 0.5
    assert difference / sum(float(a[k].float().norm() ** 2) for k in a) ** 0.5 < 0.02


def test_two_processes_resume_a_checkpoint_and_finish_like_an_uninterrupted_run(discs, tmp_path, single_thread):
    import threading

    from MedSegSuiteLib.errors import Cancelled
    from MedSegSuiteLib.training.jobs import TrainOptions, train_model

    def options(output: Path) -> TrainOptions:  # what `_train`'s command line asks for
        return TrainOptions(
            network="unet",
            data=discs,
            output=output,
            model_id=output.name,
            labels=[{"value": 1, "name": "Disc"}],
            iterations=4,
            batch_size=4,
            size_xy=(32, 32),
            device="cpu",
            validate_every=2,
            seed=3,
        )

    reference = train_model(options(tmp_path / "full" / "model"))
    cancel = threading.Event()

    def stop_after_two(done: int, total: int, stage: str) -> None:
        if stage == "training" and done == 2:
            cancel.set()

    (tmp_path / "two").mkdir()
    with pytest.raises(Cancelled):
        train_model(options(tmp_path / "two" / "model"), progress=stop_after_two, cancel=cancel)
    assert (tmp_path / "two" / "model.training" / "checkpoint.pt").is_file()
    resumed = _train(discs, tmp_path / "two" / "model", 2, tmp_path / "home", "--resume")
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["model"], "the work folder is gone"
    full = [e["loss"] for e in _log(reference.directory) if "loss" in e]
    after = [e["loss"] for e in _log(tmp_path / "two" / "model") if "loss" in e]
    assert len(after) == 4, "the resumed run keeps the first two iterations' records and adds two"
    np.testing.assert_allclose(after, full, rtol=0.01)


def test_finetuning_under_torchrun_registers_one_model(discs, tmp_path, single_thread):
    from MedSegSuiteLib.training.jobs import TrainOptions, train_model

    parent = train_model(
        TrainOptions(
            network="unet",
            data=discs,
            output=tmp_path / "parent",
            model_id="parent",
            labels=[{"value": 1, "name": "Disc"}],
            iterations=2,
            batch_size=4,
            size_xy=(32, 32),
            device="cpu",
        )
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = ["finetune", "-m", str(parent.directory), "--labelled", str(discs), "--unlabelled", str(discs / "images")]
    args += ["--iterations", "4", "--batch-size", "4", "--device", "cpu", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSEGSUITE_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [*launcher, "-m", "MedSegSuiteLib", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("registered parent-ft-1") == 1, done.stdout
    models = sorted(p.name for p in (tmp_path / "home" / "models").iterdir())
    assert models == ["parent-ft-1"], models
    card = json.loads((tmp_path / "home" / "models" / "parent-ft-1" / "card.json").read_text(encoding="utf-8"))
    assert card["training"]["finetune"]["verdict"] is not None
