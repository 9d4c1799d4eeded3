"""Faults: a long run of jobs through one worker, workers killed while they write, finetuning cancelled anywhere.

* Soak: 200 short jobs (a few of them bad inputs) through one worker process; every
  job gives the right answer and the worker's resident memory stays flat after warm-up.
* Kills: a worker (or the ``medsegsuite`` command) is killed at seeded random moments
  while it writes a segmentation, registers a finetuned model, or exports. Afterwards
  every file is the old one or the complete new one, the model listing is clean and
  every listed model loads; leftover temporary files are hidden ``.partial`` names
  that the registry ignores and the next write to the same target removes.
* Cancel: finetuning cancelled at seeded random progress reports always leaves a
  checkpoint that loads and resumes to a registered model.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import TEST_THREADS, dice, sphere_volume

from MedSegSuiteLib.errors import Cancelled
from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.models import ModelRegistry, load_model
from MedSegSuiteLib.volume import Volume
from MedSegSuiteLib.worker import WorkerClient

THREADS = str(TEST_THREADS)
SOAK_JOBS = 200
# Kills at seeded random moments per fault test; each costs a fresh worker (or CLI) process start.
KILL_TRIALS = 3
SOAK_WARMUP = 40
# Each job moves about 1 MB (a 256 kB image, 512 kB of scores, the labels); leaking that per job
# would add some 160 MB between job 40 and job 200.
RSS_TOLERANCE = 48 * 2**20
PARTIAL = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>\d+)\.[^.]+(\.removing)?\.partial")


def _wait(client: WorkerClient, job: str, timeout: float = 120.0) -> dict:
    return client.wait(job, timeout=timeout)[-1]


def _kill(client: WorkerClient, job: str) -> list[dict]:
    """Kill the worker now; return the job's messages once the client has noticed the death."""
    process = client.process
    process.kill()
    process.wait(timeout=30)
    messages = client.wait(job, timeout=60)  # its result if it had just finished, else "died"
    deadline = time.monotonic() + 10
    while client.process is process and time.monotonic() < deadline:
        messages += client.poll()
        time.sleep(0.02)
    return messages


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".partial" in p.name or ".old-" in p.name]


def _check_leftovers_are_hidden_temporaries_of_dead_processes(folder: Path) -> None:
    for path in _leftovers(folder):
        match = PARTIAL.match(path.name)
        assert match, f"unexpected leftover {path.name}"
        assert not psutil.pid_exists(int(match["pid"])), f"{path.name} belongs to a live process"


# -- soak --------------------------------------------------------------------------------------
def test_200_jobs_through_one_worker_give_right_answers_and_its_memory_stays_flat(unet3d_dir, tmp_path):
    # Every job runs in a new thread, and glibc may give each new thread its own malloc arena, which
    # makes RSS step up by tens of MB at random moments without any leak; two arenas keep it about leaks.
    env = {"MEDSEGSUITE_THREADS": THREADS, "MALLOC_ARENA_MAX": "2"}
    client = WorkerClient(env=env, temp_root=str(tmp_path))
    try:
        balls = []
        for i in range(4):
            image, mask = sphere_volume((16, 64, 64), (8, 12 + 10 * i, 50 - 9 * i), 4.5 + 0.5 * i, seed=40 + i)
            path = client.temp_dir / f"ball{i}.nrrd"
            write_image(Volume(image, (1.0, 0.9, 1.2), (i, -i, 2 * i)), path, compress=False)
            balls.append((path, mask))
        flat = client.temp_dir / "flat.nrrd"
        write_image(Volume(np.full((16, 64, 64), 3.0, np.float32)), flat, compress=False)
        first: dict[int, np.ndarray] = {}
        pid, trace = None, []
        for n in range(SOAK_JOBS):
            if n % 25 == 24:  # a bad input now and then: the error path must not leak either
                params = {"model": str(unet3d_dir), "input": str(flat), "output": str(client.temp_dir / "x.nrrd")}
                end = _wait(client, client.submit("segment", {**params, "device": "cpu"}))
                assert end["type"] == "error" and end["message"].startswith("the image is constant"), end
                continue
            source, mask = balls[n % 4]
            output = client.temp_dir / f"labels{n % 4}.nrrd"
            params = {"model": str(unet3d_dir), "input": str(source), "output": str(output), "device": "cpu"}
            end = _wait(client, client.submit("segment", {**params, "fast": True}))
            assert end["type"] == "result", end
            labels = read_image(output).array
            if n % 4 not in first:
                assert dice(labels == 1, mask) > 0.85
                first[n % 4] = labels
            assert np.array_equal(labels, first[n % 4]), f"job {n} differs from the first run on the same image"
            pid = pid or client.pid
            assert client.pid == pid
            if n % 10 == 0:
                trace.append((n, psutil.Process(pid).memory_info().rss))
        trace.append((SOAK_JOBS, psutil.Process(pid).memory_info().rss))
        rss_warm = next(rss for n, rss in trace if n >= SOAK_WARMUP)
        growth = trace[-1][1] - rss_warm
        summary = ", ".join(f"{n}: {rss / 2**20:.0f}" for n, rss in trace)
        assert growth < RSS_TOLERANCE, f"worker RSS grew {growth / 2**20:.1f} MiB after warm-up (job: MiB) {summary}"
    finally:
        client.close()


# -- kills -------------------------------------------------------------------------------------
def test_killing_the_worker_while_it_writes_a_segmentation_leaves_the_old_or_the_new_file(unet3d_dir, tmp_path):
    rng = np.random.default_rng(11)
    client = WorkerClient(env={"MEDSEGSUITE_THREADS": THREADS}, temp_root=str(tmp_path))
    try:
        folder = client.temp_dir
        old_image, _ = sphere_volume((40, 64, 64), (10, 20, 20), 5.0, seed=1)
        new_image, _ = sphere_volume((40, 64, 64), (28, 40, 44), 7.0, seed=2)
        old_source = write_image(Volume(old_image), folder / "old.nrrd", compress=False)
        new_source = write_image(Volume(new_image), folder / "new.nrrd", compress=False)
        output = folder / "labels.nrrd"

        def segment(source: Path) -> str:
            params = {"model": str(unet3d_dir), "input": str(source), "output": str(output), "device": "cpu"}
            return client.submit("segment", params)

        assert _wait(client, segment(new_source))["type"] == "result"
        new_labels = read_image(output).array
        started = time.monotonic()
        assert _wait(client, segment(old_source))["type"] == "result"
        duration = time.monotonic() - started  # the worker is warm: this is one job
        old_labels = read_image(output).array
        assert not np.array_equal(old_labels, new_labels)
        outcomes = set()
        for trial in range(KILL_TRIALS):
            if trial:
                assert _wait(client, segment(old_source))["type"] == "result"  # back to the old file
            job = segment(new_source)
            time.sleep(float(rng.uniform(0.0, 1.3 * duration)))
            _kill(client, job)
            labels = read_image(output).array
            if np.array_equal(labels, new_labels):
                outcomes.add("new")
            else:
                assert np.array_equal(labels, old_labels), f"trial {trial}: the output is neither old nor new"
                outcomes.add("old")
            _check_leftovers_are_hidden_temporaries_of_dead_processes(folder)
        assert outcomes, "no trial ran"
        assert _wait(client, segment(new_source))["type"] == "result"  # a fresh worker; it tidies up
        assert not _leftovers(folder)
    finally:
        client.close()


def _labelled_cases(folder: Path, count: int = 2) -> list[dict]:
    cases = []
    for i in range(count):
        image, mask = sphere_volume((16, 32, 32), (8, 14 + 2 * i, 16), 5.0, seed=60 + i)
        write_image(Volume(image), folder / f"case{i}.nrrd", compress=False)
        write_image(Volume(mask), folder / f"case{i}-label.nrrd", compress=False)
        cases.append(
            {"id": f"case{i}", "image": str(folder / f"case{i}.nrrd"), "label": str(folder / f"case{i}-label.nrrd")}
        )
    return cases


def _assert_registry_clean(user_dir: Path, bundled: Path) -> list[str]:
    registry = ModelRegistry(bundled_dir=bundled, user_dir=user_dir)
    entries = registry.entries()
    assert registry.problems == []
    for entry in entries:
        load_model(entry, registry)  # card valid, weights complete (size and sha256) and fitting
    if user_dir.is_dir():
        _check_leftovers_are_hidden_temporaries_of_dead_processes(user_dir)
        for folder in user_dir.iterdir():
            if not folder.name.startswith(".") and not folder.name.endswith(".training"):
                assert (folder / "card.json").is_file(), f"{folder.name} is listed-looking but has no card"
    return [entry.card.id for entry in entries]


def test_killing_the_worker_while_it_finetunes_never_corrupts_the_user_models(unet3d_dir, tmp_path, capsys):
    from MedSegSuiteLib.cli import main

    rng = np.random.default_rng(12)
    home, bundled = tmp_path / "home", tmp_path / "resources" / "Models"
    bundled.mkdir(parents=True)
    env = {"MEDSEGSUITE_THREADS": THREADS, "MEDSEGSUITE_HOME": str(home), "MEDSEGSUITE_RESOURCES": str(bundled.parent)}
    client = WorkerClient(env=env, temp_root=str(tmp_path))
    user_dir = home / "models"
    try:
        cases = _labelled_cases(client.temp_dir)
        params = {"parent": str(unet3d_dir), "labelled": cases, "unlabelled": [], "iterations": 4, "device": "cpu"}
        started = time.monotonic()
        end = _wait(client, client.submit("finetune", params), timeout=300)
        duration = time.monotonic() - started
        assert end["type"] == "result", end
        registered = {end["info"]["model"]}
        for _ in range(KILL_TRIALS):
            job = client.submit("finetune", params)
            time.sleep(float(rng.uniform(0.3, 1.2)) * duration)
            for message in _kill(client, job):
                if message["type"] == "result":
                    registered.add(message["info"]["model"])
            ids = _assert_registry_clean(user_dir, bundled)
            assert set(ids) >= registered and all(i.startswith("test-unet3d-ft-") for i in ids)
            registered = set(ids)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            assert main(["models"]) == 0
        out, err = capsys.readouterr()
        assert "warning" not in err and all(i in out for i in registered)
        end = _wait(client, client.submit("finetune", params), timeout=300)  # still works afterwards
        assert end["type"] == "result", end
        _assert_registry_clean(user_dir, bundled)
    finally:
        client.close()


def _export_command(source: Path, output: Path) -> list[str]:
    script = Path(sys.executable).with_name("medsegsuite")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "MedSegSuiteLib"]
    return [*command, "export", str(source), "-o", str(output), "--overwrite", "-q"]


def test_killing_an_export_leaves_the_old_or_the_new_file(tmp_path):
    from MedSegSuiteLib.export import table_path_for
    from MedSegSuiteLib.io.label_table import read_label_table
    from MedSegSuiteLib.io.seg_nrrd import read_seg_nrrd

    rng = np.random.default_rng(13)
    shape = (60, 128, 128)
    old_mask = np.zeros(shape, np.uint8)
    old_mask[10:20, 30:60, 30:60] = 1
    new_mask = np.zeros(shape, np.uint8)
    new_mask[30:50, 60:120, 20:100] = 2
    new_mask[35:40, 10:30, 10:30] = 1
    old_source = write_image(Volume(old_mask), tmp_path / "old.nii.gz")
    new_source = write_image(Volume(new_mask), tmp_path / "new.nii.gz")
    folder = tmp_path / "exports"
    folder.mkdir()
    for target in ("case.seg.nrrd", "case.nrrd"):
        output = folder / target

        def content(path: Path = output, target: str = target) -> np.ndarray:
            if target.endswith(".seg.nrrd"):
                return read_seg_nrrd(path).to_label_map()[0].array
            assert read_label_table(table_path_for(path))  # the table beside a label map reads too
            return read_image(path).array

        subprocess.run(_export_command(new_source, output), check=True, timeout=120)
        new = content()
        started = time.monotonic()
        subprocess.run(_export_command(old_source, output), check=True, timeout=120)
        duration = time.monotonic() - started
        old = content()
        assert np.array_equal(new, new_mask) and np.array_equal(old, old_mask)
        for trial in range(KILL_TRIALS):
            process = subprocess.Popen(_export_command(new_source, output))
            time.sleep(float(rng.uniform(0.5, 1.2)) * duration)
            process.kill()
            process.wait(timeout=30)
            now = content()
            assert np.array_equal(now, old) or np.array_equal(now, new), f"{target} trial {trial}: neither old nor new"
            _check_leftovers_are_hidden_temporaries_of_dead_processes(folder)
            subprocess.run(_export_command(old_source, output), check=True, timeout=120)  # tidies up and resets
            assert not _leftovers(folder)
            assert np.array_equal(content(), old)


# -- cancel ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetune_cases(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cancel-cases")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for i in range(2):
        image, mask = sphere_volume((16, 32, 32), (8, 14 + 2 * i, 16), 5.0, seed=80 + i)
        write_image(Volume(image), root / "images" / f"c{i}.nrrd")
        write_image(Volume(mask), root / "labels" / f"c{i}.nrrd")
    return root


@pytest.mark.parametrize(("iterations", "seed"), [(1, 0), (5, 1), (5, 2), (10, 3)])
def test_cancelled_finetuning_leaves_a_checkpoint_that_loads_and_resumes(
    unet3d_dir, finetune_cases, tmp_path, iterations, seed
):
    """Cancel at a seeded random progress report of the training stage (a step or a validation)."""
    from MedSegSuiteLib.training.finetune import FinetuneOptions, finetune_model

    bundled = tmp_path / "bundled"
    bundled.mkdir()
    registry = ModelRegistry(bundled_dir=bundled, user_dir=tmp_path / "models")
    options = FinetuneOptions(
        parent=str(unet3d_dir), labelled=finetune_cases, iterations=iterations, batch_size=1, device="cpu", seed=seed
    )
    stop_at = int(np.random.default_rng(seed).integers(1, iterations + 1))
    cancel = threading.Event()

    def progress(done: int, total: int, stage: str) -> None:
        if stage == "training" and done >= stop_at:
            cancel.set()

    with pytest.raises(Cancelled, match="can be resumed"):
        finetune_model(options, registry, progress=progress, cancel=cancel)
    checkpoint = registry.user_dir / "test-unet3d-ft-1.training" / "checkpoint.pt"
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    assert state["iteration"] == stop_at
    assert registry.entries() == []  # nothing registered by a cancelled run
    entry = finetune_model(options, registry, resume=True)
    assert entry.card.id == "test-unet3d-ft-1" and [e.card.id for e in registry.entries()] == ["test-unet3d-ft-1"]
    assert load_model(entry, registry).card.parent == "test-unet3d"
    assert not checkpoint.parent.exists()
