"""An in-memory worker process for client, logic and panel tests (the injected-process pattern).

:class:`FakeWorkerProcess` has the attributes :class:`~MedSegSuiteLib.worker.client.WorkerClient`
uses from ``subprocess.Popen`` and speaks the real protocol. Its "segment" jobs label
voxels brighter than ``threshold`` as 1 (enough for balls of the synthetic volumes).
Its "refine" jobs grow every label of the mask by one voxel within each axial slice
(only in the slice ``slice``, in the slices ``slice`` +- ``neighbours`` (default 2), or
inside ``roi`` when the scope says so) and leave the ``keep`` voxels as they were; with
``ensemble`` > 1 and an ``uncertainty`` file they write an uncertainty of 0.3 on the
voxels they changed, 0.1 on the other labelled voxels in scope and 0 elsewhere (so a
threshold of 0.2 marks exactly the changed voxels).
Its "finetune" jobs report iteration 1 of ``iterations`` with a loss record; finishing
one registers ``<parent id>-ft-<n>`` (a card only, Dice 0.41 before and 0.86 after on one
held-back case, or ``finetune_dice``, with the library's verdict) in
``$MEDSEGSUITE_HOME/models`` (on ``resume``, the run whose ``.training`` folder is
there), and cancelling a held one leaves ``<parent id>-ft-<n>.training/checkpoint.pt``
and its ``log.json`` there, like the real job. With ``measure`` it reports made-up
timings (0.5 s per iteration, 2 s per validation, 1 s set-up).
With ``hold=True`` a job stops after its first progress message until the test calls
:meth:`~FakeWorkerProcess.finish` or ends the process with :meth:`~FakeWorkerProcess.die`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any, Optional

__all__ = ["FakeWorkerFactory", "FakeWorkerProcess"]


class _Lines:
    """A readable text stream fed line by line; ``readline`` blocks until a line or EOF."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()

    def put(self, line: str) -> None:
        self._queue.put(line)

    def close(self) -> None:
        self._queue.put(None)

    def readline(self) -> str:
        line = self._queue.get()
        if line is None:
            self._queue.put(None)
            return ""
        return line


class _Writer:
    def __init__(self, on_line) -> None:
        self._on_line = on_line
        self._buffer = ""
        self.closed = False

    def write(self, text: str) -> int:
        if self.closed:
            raise BrokenPipeError("the fake worker is gone")
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self._on_line(line)
        return len(text)

    def flush(self) -> None:
        if self.closed:
            raise BrokenPipeError("the fake worker is gone")

    def close(self) -> None:
        self.closed = True


class FakeWorkerProcess:
    """A pretend ``python -m MedSegSuiteLib.worker``.

    Args:
        devices: what its ``ready`` message reports.
        hold: stop each job after its first progress message (see :meth:`finish`).
        threshold: intensity above which "segment" labels a voxel 1.
        error: if set, every job ends with this ``(kind, message)`` error.
        pid: the pretend process id.
    """

    def __init__(
        self,
        devices: tuple[str, ...] = ("cpu",),
        hold: bool = False,
        threshold: float = 150.0,
        error: Optional[tuple[str, str]] = None,
        pid: int = 4242,
        finetune_dice: tuple[float, float] = (0.41, 0.86),
    ) -> None:
        self.finetune_dice = finetune_dice
        self.stdin = _Writer(self._on_line)
        self.stdout = _Lines()
        self.stderr = _Lines()
        self.pid = pid
        self.returncode: Optional[int] = None
        self.hold = hold
        self.threshold = threshold
        self.error = error
        self.received: list[dict[str, Any]] = []
        self.held: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.emit({"type": "ready", "protocol": 1, "version": "fake", "pid": pid, "devices": list(devices)})

    # -- process API ----------------------------------------------------------------------
    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            self.die(0)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            self.die(-9)

    # -- behaviour ------------------------------------------------------------------------
    def emit(self, message: dict[str, Any]) -> None:
        if self.returncode is None:
            self.stdout.put(json.dumps(message) + "\n")

    def die(self, returncode: int, stderr: str = "") -> None:
        """End the pretend process with ``returncode`` (after writing ``stderr``)."""
        with self._lock:
            if stderr:
                self.stderr.put(stderr + "\n")
            self.returncode = returncode
            self.stdin.closed = True
            self.stdout.close()
            self.stderr.close()

    def _on_line(self, line: str) -> None:
        message = json.loads(line)
        self.received.append(message)
        kind = message.get("type")
        if kind == "ping":
            self.emit({"type": "pong", "id": message.get("id"), "busy": bool(self.held), "job": None})
        elif kind == "shutdown":
            self.emit({"type": "bye"})
            self.die(0)
        elif kind == "cancel":
            held = self.held.pop(message.get("job"), None)
            if held is not None:
                if held.get("kind") == "finetune" and not held["params"].get("measure"):
                    self._checkpoint(held)
                self.emit({"type": "cancelled", "job": message["job"]})
        elif kind == "start":
            job = message["job"]
            self.emit({"type": "started", "job": job, "kind": message.get("kind")})
            if message.get("kind") == "finetune":
                self._start_finetune(job, message["params"])
            else:
                stage, unit = ("refining", "slices") if message.get("kind") == "refine" else ("segmenting", "windows")
                self.emit({"type": "progress", "job": job, "done": 1, "total": 4, "stage": stage, "unit": unit})
            if self.hold:
                self.held[job] = message
            else:
                self.finish(job, message)

    def finish(self, job: Optional[str] = None, message: Optional[dict[str, Any]] = None) -> None:
        """Complete a (held) job: write its labels and send ``result`` (or the configured error)."""
        if message is None:
            job = job or next(iter(self.held))
            message = self.held.pop(job)
        job = message["job"]
        if self.error is not None:
            self.emit({"type": "error", "job": job, "kind": self.error[0], "message": self.error[1]})
            return
        import numpy as np

        from MedSegSuiteLib.io import read_image, write_image

        params = message["params"]
        if message.get("kind") == "refine":
            self._refine(job, params)
            return
        if message.get("kind") == "finetune":
            self._finish_finetune(job, params)
            return
        image = read_image(params["input"])
        channels = image.channel_first()
        labels = (channels.mean(axis=0) > self.threshold).astype(np.uint8)
        roi = params.get("roi")
        if roi:
            keep = np.zeros_like(labels)
            keep[roi[2] : roi[5], roi[1] : roi[4], roi[0] : roi[3]] = 1
            labels *= keep
        write_image(image.with_array(labels), params["output"], overwrite=True, compress=False)
        self.emit({"type": "progress", "job": job, "done": 4, "total": 4, "stage": "segmenting", "unit": "windows"})
        present = [1] if labels.any() else []
        self.emit(
            {
                "type": "result",
                "job": job,
                "outputs": {"labels": params["output"]},
                "info": {"model": "fake", "device": "cpu", "cache_hit": False, "labels_present": present},
            }
        )

    def _refine(self, job: str, params: dict[str, Any]) -> None:
        import numpy as np
        from scipy import ndimage

        from MedSegSuiteLib.io import read_image, write_image

        mask = read_image(params["mask"])
        labels = mask.array
        grown = labels.copy()
        plane = np.zeros((3, 3, 3), bool)
        plane[1] = ndimage.generate_binary_structure(2, 1)
        for value in [int(v) for v in np.unique(labels) if v != 0]:
            grown[ndimage.binary_dilation(labels == value, plane) & (grown == 0)] = value
        scope = np.zeros(labels.shape, bool)
        if params.get("scope") == "slice" and params.get("slice") is not None:
            scope[params["slice"]] = True
        elif params.get("scope") == "neighbours" and params.get("slice") is not None:
            reach = int(params.get("neighbours", 2))
            scope[max(0, params["slice"] - reach) : params["slice"] + reach + 1] = True
        elif params.get("scope") == "roi":
            roi = params["roi"]
            scope[roi[2] : roi[5], roi[1] : roi[4], roi[0] : roi[3]] = True
        else:
            scope[:] = True
        refined = np.where(scope, grown, labels)
        if params.get("keep"):
            keep = read_image(params["keep"]).array != 0
            refined[keep] = labels[keep]
        write_image(mask.with_array(refined), params["output"], overwrite=True, compress=False)
        outputs = {"labels": params["output"]}
        if params.get("uncertainty") and params.get("ensemble", 1) > 1:
            uncertainty = np.where(scope & (labels != 0), 0.1, 0.0).astype(np.float32)
            uncertainty[refined != labels] = 0.3
            write_image(mask.with_array(uncertainty), params["uncertainty"], overwrite=True)
            outputs["uncertainty"] = params["uncertainty"]
        self.emit({"type": "progress", "job": job, "done": 4, "total": 4, "stage": "refining", "unit": "slices"})
        slices = [int(k) for k in np.nonzero(scope.any(axis=(1, 2)) & labels.any(axis=(1, 2)))[0]]
        present = [int(v) for v in np.unique(refined) if v != 0]
        info = {"model": "fake", "device": "cpu", "cache_hit": True, "slices": slices, "labels_present": present}
        info["changed"] = int((refined != labels).sum())
        self.emit({"type": "result", "job": job, "outputs": outputs, "info": info})

    # -- finetuning -----------------------------------------------------------------------
    @staticmethod
    def _models_dir():
        import os
        from pathlib import Path

        return Path(os.environ["MEDSEGSUITE_HOME"]) / "models"

    @staticmethod
    def _parent_card(params: dict[str, Any]) -> dict[str, Any]:
        from pathlib import Path

        return json.loads((Path(params["parent"]) / "card.json").read_text(encoding="utf-8"))

    def _run_id(self, parent_id: str, resume: bool) -> str:
        models = self._models_dir()
        if resume:
            pending = sorted(models.glob(f"{parent_id}-ft-*.training"))
            return pending[-1].name[: -len(".training")]
        n = 1
        while any(models.glob(f"{parent_id}-ft-{n}*")):
            n += 1
        return f"{parent_id}-ft-{n}"

    def _start_finetune(self, job: str, params: dict[str, Any]) -> None:
        if params.get("measure"):
            total = params["measure"] + 1
            self.emit(
                {"type": "progress", "job": job, "done": 1, "total": total, "stage": "timing", "unit": "iterations"}
            )
            return
        total = params["iterations"]
        self.emit(
            {"type": "progress", "job": job, "done": 1, "total": total, "stage": "training", "unit": "iterations"}
        )
        self.emit({"type": "log", "job": job, "record": {"iteration": 1, "loss": 0.9, "supervised": 0.9}})

    def _checkpoint(self, message: dict[str, Any]) -> None:
        params = message["params"]
        parent_id = self._parent_card(params)["id"]
        model_id = self._run_id(parent_id, bool(params.get("resume")))
        workdir = self._models_dir() / f"{model_id}.training"
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "checkpoint.pt").write_bytes(b"fake")
        (workdir / "log.json").write_text(json.dumps([{"iteration": 1, "loss": 0.9}]))
        self.emit(
            {"type": "log", "job": message["job"], "record": {"event": "checkpoint", "model": model_id, "iteration": 1}}
        )

    def _finish_finetune(self, job: str, params: dict[str, Any]) -> None:
        import shutil

        if params.get("measure"):
            info = {
                "measured": True,
                "device": "cpu",
                "iterations_timed": params["measure"],
                "seconds_per_iteration": 0.5,
                "seconds_per_validation": 2.0,
                "seconds_setup": 1.0,
            }
            self.emit({"type": "result", "job": job, "outputs": {}, "info": info})
            return
        card = self._parent_card(params)
        resume = bool(params.get("resume"))
        model_id = self._run_id(card["id"], resume)
        total = params["iterations"]
        if resume:
            self.emit({"type": "log", "job": job, "record": {"iteration": 1, "loss": 0.9, "replayed": True}})
        self.emit(
            {"type": "progress", "job": job, "done": total, "total": total, "stage": "training", "unit": "iterations"}
        )
        self.emit({"type": "log", "job": job, "record": {"iteration": total, "loss": 0.3}})
        from MedSegSuiteLib.training.verdict import FinetuneVerdict

        before, after = self.finetune_dice
        verdict = FinetuneVerdict.judge(before, after, held_back=1).to_dict()
        self.emit({"type": "log", "job": job, "record": {"iteration": total, "val_dice": after, "val_hd95": None}})
        split = f"held-out: 1 of the {len(params['labelled'])} labelled cases"
        card.update(
            id=model_id,
            parent=card["id"],
            name=card["name"] + " (finetuned)",
            metrics=[
                {"name": "dice_before_finetuning", "value": before, "split": split},
                {"name": "dice", "value": after, "split": "validation"},
            ],
            training={
                "finetune": {
                    "parent": card["id"],
                    "split": split,
                    "labelled": len(params["labelled"]),
                    "verdict": verdict,
                }
            },
        )
        folder = self._models_dir() / model_id
        folder.mkdir(parents=True)
        (folder / "card.json").write_text(json.dumps(card))
        shutil.rmtree(self._models_dir() / f"{model_id}.training", ignore_errors=True)
        info = {
            "model": model_id,
            "version": card["version"],
            "directory": str(folder),
            "parent": card["parent"],
            "device": "cpu",
            "iterations": total,
            "resumed": resume,
            "dice_before": before,
            "dice_after": after,
            "split": split,
            "verdict": verdict,
            "selected": verdict["selected"],
        }
        self.emit({"type": "result", "job": job, "outputs": {"model": str(folder)}, "info": info})


class FakeWorkerFactory:
    """A process factory that makes :class:`FakeWorkerProcess` objects and remembers them."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.processes: list[FakeWorkerProcess] = []
        self.commands: list[list[str]] = []

    def __call__(self, argv: list, env: dict, cwd: str) -> FakeWorkerProcess:
        self.commands.append(list(argv))
        process = FakeWorkerProcess(pid=4242 + len(self.processes), **self.options)
        self.processes.append(process)
        return process

    @property
    def last(self) -> FakeWorkerProcess:
        return self.processes[-1]


def fake_logic(temp_root: Any, **options: Any) -> tuple[Any, FakeWorkerFactory]:
    """A ``SegmentationLogic`` whose worker is a :class:`FakeWorkerFactory` built with ``options``, and the factory."""
    from MedSegSuiteLib.slicer.logic import SegmentationLogic
    from MedSegSuiteLib.worker.client import WorkerClient

    factory = FakeWorkerFactory(**options)
    return SegmentationLogic(WorkerClient(process_factory=factory, temp_root=str(temp_root))), factory


def wait_idle(logic: Any, timeout: float = 10.0) -> Any:
    """Poll ``logic`` until its job ends (or ``timeout`` seconds pass); returns its status."""
    deadline = time.monotonic() + timeout
    while logic.busy and time.monotonic() < deadline:
        logic.poll()
        time.sleep(0.01)
    return logic.status
