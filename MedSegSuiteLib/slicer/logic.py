"""The MedSegSuite module logic: models, devices, and segmentation jobs run by the worker.

GUI-free: the panel calls :meth:`SegmentationLogic.start` and then
:meth:`SegmentationLogic.poll` from a timer; scripts can call
:meth:`SegmentationLogic.wait`. Nothing in the scene changes until a job's result has
arrived and been checked: a failed, cancelled or crashed job leaves the scene as it
was.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import slicer

from ..errors import InputError, MedSegSuiteError
from ..worker.client import WorkerClient
from .segmentations import create_segmentation_node, place_next_to, write_labels
from .volumes import box_from_roi, grid_from_node, volume_from_node

__all__ = ["DEVICE_TITLES", "SegmentationLogic", "TaskStatus", "describe_model", "worker_python"]

log = logging.getLogger(__name__)

DEVICE_TITLES = {"auto": "Auto (GPU if available)", "cpu": "CPU", "cuda": "CUDA GPU", "mps": "Apple GPU (MPS)"}
_STAGE_TITLES = {
    "loading model": "Loading the model",
    "reading image": "Reading the image",
    "preprocessing": "Preparing the image",
    "segmenting": "Segmenting",
    "postprocessing": "Finishing",
}


def worker_python() -> str:
    """The interpreter for the worker: ``PythonSlicer`` inside 3D Slicer, else this interpreter."""
    if getattr(slicer, "app", None) is not None:
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def _resource_hint(card: Any) -> str:
    res = dict(card.resources or {})
    parts = []
    if "ram_gb" in res:
        parts.append(f"RAM about {res.pop('ram_gb')} GB")
    if "vram_gb" in res:
        parts.append(f"GPU memory about {res.pop('vram_gb')} GB")
    times = []
    if "cpu_seconds" in res:
        times.append(f"{res.pop('cpu_seconds')} s on CPU")
    if "gpu_seconds" in res:
        times.append(f"{res.pop('gpu_seconds')} s on GPU")
    if times:
        parts.append("about " + ", ".join(times))
    device = str(res.pop("device", res.pop("recommended_device", ""))).lower()
    parts += [f"{key.replace('_', ' ')}: {value}" for key, value in sorted(res.items())]
    if device in ("gpu", "cuda"):
        hint = "a GPU is recommended"
    elif device == "cpu":
        hint = "runs well on a CPU"
    elif card.dims == 2 or str(card.preset).lower() == "lite":
        hint = "small enough for a CPU"
    else:
        hint = "a GPU makes it much faster"
    return "; ".join([hint] + parts)


def describe_model(card: Any) -> str:
    """A short rich-text summary of a model card for the panel (network, labels, licence, resources, metrics)."""
    from html import escape

    labels = ", ".join(escape(label.name) for label in card.labels)
    lines = [
        f"<b>{escape(card.name)}</b> {escape(card.version)}",
        f"{escape(card.network)} ({escape(card.preset)}), {card.dims}D, {card.input.channels} channel(s)",
        f"Labels: {labels}",
        f"Licence: {escape(card.licence)}",
        f"Hardware: {escape(_resource_hint(card))}",
    ]
    metrics = [m for m in card.metrics if isinstance(m.get("value"), (int, float))]
    if metrics:
        shown = ", ".join(f"{escape(str(m['name']))} {m['value']:.3g} ({escape(str(m['split']))})" for m in metrics[:3])
        lines.append(f"Measured: {shown}")
    return "<br>".join(lines)


@dataclass
class TaskStatus:
    """Where the current (or last) job stands; ``state`` is idle, running, done, failed or cancelled."""

    state: str = "idle"
    message: str = ""
    stage: str = ""
    done: int = 0
    total: int = 0
    unit: str = ""
    output_node_id: Optional[str] = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state == "running"


@dataclass
class _Task:
    job: str
    input_node_id: str
    output_node_id: Optional[str]
    entry: Any
    job_dir: Path
    started: float
    cancel_requested: bool = False


class SegmentationLogic:
    """Runs segmentation jobs in the worker and turns results into segmentation nodes.

    Args:
        client: the worker client (default: one that starts :func:`worker_python`).
        scene: the MRML scene (default ``slicer.mrmlScene`` at call time).
    """

    def __init__(self, client: Optional[WorkerClient] = None, scene: Optional[Any] = None) -> None:
        self._client = client
        self._scene = scene
        self._task: Optional[_Task] = None
        self.status = TaskStatus()
        self.problems: list[str] = []
        self.packages_missing = False

    # -- collaborators -----------------------------------------------------------------
    @property
    def scene(self) -> Any:
        return self._scene or slicer.mrmlScene

    @property
    def client(self) -> WorkerClient:
        if self._client is None:
            self._client = WorkerClient(python=worker_python())
        return self._client

    def models(self) -> list[Any]:
        """Installed models (bundled first); problems with broken cards go to ``problems``."""
        try:
            from ..models.registry import ModelRegistry
        except ImportError as error:
            self.packages_missing = True
            self.problems = [
                f"MedSegSuite's Python packages are not installed yet ({error}); click Segment to install them."
            ]
            return []
        self.packages_missing = False
        registry = ModelRegistry()
        entries = registry.entries()
        self.problems = list(registry.problems)
        return entries

    def devices(self) -> list[str]:
        """Device choices: ``auto`` and ``cpu``, plus GPUs once a worker has reported them."""
        reported = self.client.devices or []
        return ["auto", "cpu"] + [d for d in ("cuda", "mps") if d in reported]

    def warm_up(self) -> None:
        """Start the worker in the background (it loads torch and reports the devices)."""
        try:
            self.client.start()
        except OSError as error:
            log.warning("cannot start the MedSegSuite worker: %s", error)

    @property
    def busy(self) -> bool:
        return self._task is not None

    # -- jobs --------------------------------------------------------------------------
    def _resolve(self, model: Union[str, Any]) -> Any:
        if hasattr(model, "card"):
            return model
        from ..models.registry import ModelRegistry

        return ModelRegistry().resolve(model)

    def start(
        self,
        input_node: Any,
        model: Union[str, Any],
        device: str = "auto",
        region_node: Optional[Any] = None,
        output_node: Optional[Any] = None,
        fast: bool = False,
    ) -> TaskStatus:
        """Send a segmentation job to the worker and return the new status (``running``).

        ``model`` is a registry entry, a model id or a model folder. Raises
        :class:`~MedSegSuiteLib.errors.InputError` (nothing started) when the choices
        cannot work: no input, a busy worker, a 3D model on a 2D image, a region that
        misses the volume.
        """
        if self._task is not None:
            raise InputError("a segmentation is already running: wait for it or cancel it")
        if input_node is None:
            raise InputError("choose an input volume")
        entry = self._resolve(model)
        card = entry.card
        grid = grid_from_node(input_node)
        if card.dims == 3 and grid.shape[0] == 1:
            raise InputError(
                f"{card.name} segments 3D volumes and {input_node.GetName()!r} is a single 2D image: choose a 2D model"
            )
        box = box_from_roi(region_node, input_node) if region_node is not None else None
        job_dir = self.client.new_job_dir()
        try:
            from ..io import write_image

            source = write_image(volume_from_node(input_node, copy=False), job_dir / "input.nrrd", compress=False)
            params = {
                "model": str(entry.directory),
                "input": str(source),
                "output": str(job_dir / "labels.nrrd"),
                "device": device or "auto",
                "roi": [*box.start, *box.stop] if box is not None else None,
                "fast": bool(fast),
            }
            job = self.client.submit("segment", params)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        self._task = _Task(
            job,
            input_node.GetID(),
            output_node.GetID() if output_node is not None else None,
            entry,
            job_dir,
            time.monotonic(),
        )
        self.status = TaskStatus("running", f"Starting {card.name}...")
        return self.status

    def cancel(self) -> None:
        """Ask the running job to stop; its result, if one still arrives, is discarded."""
        if self._task is None:
            return
        self._task.cancel_requested = True
        self.client.cancel(self._task.job)
        self.status = TaskStatus("running", "Cancelling...", self.status.stage, self.status.done, self.status.total)

    def poll(self) -> TaskStatus:
        """Process the worker's messages (never blocks) and return the current status."""
        for message in self.client.poll():
            task = self._task
            if task is None or message.get("job") != task.job:
                if message["type"] == "died":
                    log.info("idle worker ended: %s", message["message"])
                continue
            kind = message["type"]
            if kind == "progress":
                stage, done, total, unit = message["stage"], message["done"], message["total"], message.get("unit", "")
                title = _STAGE_TITLES.get(stage, stage.capitalize())
                text = f"{title}: {done} / {total} {unit}" if total > 1 else f"{title}..."
                if task.cancel_requested:
                    text = "Cancelling..."
                self.status = TaskStatus("running", text, stage, done, total, unit if total > 1 else "")
            elif kind == "result":
                self._finish(self._apply(task, message) if not task.cancel_requested else self._cancelled())
            elif kind == "cancelled":
                self._finish(self._cancelled())
            elif kind == "error":
                self._finish(TaskStatus("failed", f"Segmentation failed: {message['message']}"))
            elif kind == "died":
                self._finish(TaskStatus("failed", message["message"][0].upper() + message["message"][1:] + "."))
        return self.status

    @staticmethod
    def _cancelled() -> TaskStatus:
        return TaskStatus("cancelled", "Cancelled; nothing was changed.")

    def _finish(self, status: TaskStatus) -> None:
        task, self._task = self._task, None
        if task is not None:
            shutil.rmtree(task.job_dir, ignore_errors=True)
        self.status = status

    def _apply(self, task: _Task, message: dict[str, Any]) -> TaskStatus:
        from ..io import read_image

        scene = self.scene
        input_node = scene.GetNodeByID(task.input_node_id)
        if input_node is None:
            return TaskStatus("failed", "The input volume was removed while segmenting; the result was discarded.")
        try:
            labels = read_image(message["outputs"]["labels"])
            if not labels.grid.same_as(grid_from_node(input_node)):
                raise InputError("the input volume changed while segmenting; the result was discarded: run again")
            output = scene.GetNodeByID(task.output_node_id) if task.output_node_id else None
            created = output is None or not output.IsA("vtkMRMLSegmentationNode")
            if created:
                output = create_segmentation_node(input_node, scene=scene)
            card = task.entry.card
            array = labels.array if labels.array.ndim == 3 else labels.array[0]
            write_labels(output, array, input_node, card.labels, model_tag=f"{card.id} {card.version}")
            if created:
                place_next_to(output, input_node)
            self._show(input_node)
        except MedSegSuiteError as error:
            return TaskStatus("failed", f"Segmentation failed: {error}")
        info = dict(message.get("info", {}))
        found = [label.name for label in card.labels if label.value in info.get("labels_present", [])]
        seconds = time.monotonic() - task.started
        device = str(info.get("device", "?")).replace("cpu", "CPU")
        text = (
            f"Done in {seconds:.1f} s on {device}: "
            + (", ".join(found) if found else "nothing found")
            + f" in {output.GetName()!r}."
        )
        return TaskStatus("done", text, output_node_id=output.GetID(), info=info)

    @staticmethod
    def _show(input_node: Any) -> None:
        app = getattr(slicer, "app", None)
        layout = app.layoutManager() if app is not None and hasattr(app, "layoutManager") else None
        if layout is not None:
            slicer.util.setSliceViewerLayers(background=input_node)

    def wait(self, timeout: float = 600.0, interval: float = 0.05) -> TaskStatus:
        """Block until the running job ends (for scripts; the panel polls instead)."""
        deadline = time.monotonic() + timeout
        while self._task is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the segmentation did not finish within {timeout} s")
            self.poll()
            time.sleep(interval)
        return self.status

    def shutdown(self) -> None:
        """Cancel any job, stop the worker and remove its temporary files."""
        if self._task is not None:
            self.cancel()
            self._finish(self._cancelled())
        if self._client is not None:
            self._client.close()
