"""The MedSegSuite module logic: models, devices, and the segmentation and refinement jobs run by the worker.

GUI-free: the panel calls :meth:`SegmentationLogic.start` (or
:meth:`SegmentationLogic.start_refine`) and then :meth:`SegmentationLogic.poll` from a
timer; scripts can call :meth:`SegmentationLogic.wait`. Nothing in the scene changes
until a job's result has arrived and been checked: a failed, cancelled or crashed job
leaves the scene as it was. One job runs at a time.

Finetuning (:meth:`SegmentationLogic.start_finetune`, see :mod:`.finetuning`) sends
the chosen labelled cases as label maps in the parent's label values; its loss and
validation records go to a :class:`~.finetuning.FinetuneCurve` as they arrive, and a
finished run leaves a new model in the user model folder.

Refinement (see :mod:`.refinement`) remembers the last AI result of every segment it
or a segmentation wrote, so "keep my edits" can hold the voxels the user changed
since, and keeps the segmentation as it was before each refinement for
:meth:`SegmentationLogic.undo_refinement`. With an ensemble of chains, the worker
also writes their per-voxel uncertainty, and the result shows where they disagree
as the segment "Uncertain (refinement)" (never taken for a model label). Exporting is
pure file I/O and runs in this process (:mod:`.exporting`).
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import slicer

from ..errors import InputError, MedSegSuiteError
from ..preprocessing import check_channels
from ..worker.client import WorkerClient
from .finetuning import FinetuneCurve, FinetuneTiming, describe_duration, finetune_outcome, parent_label_map
from .messages import _, describe_error
from .parameters import DEFAULTS, REFINE_NEIGHBOURS, REFINE_SPREAD
from .refinement import (
    UNCERTAIN_THRESHOLD,
    AIResults,
    RefinePlan,
    UndoStack,
    apply_refinement,
    describe_left_untouched,
    plan_refinement,
    remove_uncertainty,
    show_uncertainty,
)
from .segmentations import (
    SegmentationBackup,
    create_segmentation_node,
    label_segment_ids,
    place_next_to,
    record_input_warnings,
    remove_node,
    segment_ids,
    segment_mask,
    write_labels,
)
from .volumes import LPS_FROM_RAS, box_from_roi, grid_from_node, input_channels, volume_from_node

__all__ = [
    "DEVICE_TITLES",
    "REFINE_MAX_ENSEMBLE",
    "REFINE_SCOPES",
    "SLICE_SCOPES",
    "SegmentationLogic",
    "TaskStatus",
    "describe_model",
    "diffusion_steps",
    "is_refiner",
    "worker_python",
]

log = logging.getLogger(__name__)

DEVICE_TITLES = {"auto": "Auto (GPU if available)", "cpu": "CPU", "cuda": "CUDA GPU", "mps": "Apple GPU (MPS)"}


def _stage_title(stage: str) -> str:
    """The panel's (translated) title of a worker stage."""
    titles = {
        "loading model": _("Loading the model"),
        "reading image": _("Reading the image"),
        "preprocessing": _("Preparing the image"),
        "segmenting": _("Segmenting"),
        "postprocessing": _("Finishing"),
        "refining": _("Refining"),
        "loading data": _("Loading the cases"),
        "measuring the parent": _("Measuring the starting model"),
        "training": _("Finetuning"),
        "timing": _("Timing iterations"),
    }
    return titles.get(stage, stage.capitalize())


def _job_title(kind: str) -> str:
    """The (translated) name of a job kind for status sentences."""
    titles = {"segment": _("Segmentation"), "refine": _("Refinement"), "finetune": _("Finetuning")}
    return titles.get(kind) or (_("Timing") if kind == "timing" else _("The job"))


FINETUNE_CANCEL_GRACE = 180.0  # seconds a cancelled finetuning may take to write its checkpoint
REFINE_SCOPES = {
    "volume": "Whole volume",
    "slice": "Current axial slice (Red view)",
    "neighbours": "Current slice and its neighbours",
    "roi": "Region (ROI)",
}
#: The scopes that refine around the Red view's axial slice (given as an index or a point on it).
SLICE_SCOPES = ("slice", "neighbours")
#: The most refinement chains one click may run (each costs as much as the first).
REFINE_MAX_ENSEMBLE = 8


def _case_id(node: Any, taken: set[str]) -> str:
    """The node's name, made unique among ``taken`` (which it joins)."""
    name = node.GetName() or node.GetID()
    case_id, n = name, 2
    while case_id in taken:
        case_id, n = f"{name} ({n})", n + 1
    taken.add(case_id)
    return case_id


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
    for provenance in ("weights_dtype", "fp16_dice_change"):  # how the weights were stored, not hardware
        res.pop(provenance, None)
    times = []
    if "cpu_seconds" in res:
        times.append(f"{res.pop('cpu_seconds')} s on CPU")
    if "cpu_seconds_per_case" in res:  # measured by the packaging of bundled models
        threads = res.pop("cpu_threads", None)
        on = f"on {threads} CPU threads" if threads else "on CPU"
        times.append(f"{res.pop('cpu_seconds_per_case')} s per image {on}")
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
    if card.parent:
        found = {m["name"]: m for m in metrics}
        before, after = found.get("dice_before_finetuning"), found.get("dice")
        line = f"Finetuned from {escape(card.parent)}"
        if before is not None and after is not None:
            split = (card.training or {}).get("finetune", {}).get("split") or before.get("split", "")
            line += f": Dice {before['value']:.3f} before, {after['value']:.3f} after ({escape(str(split))})"
        verdict = (card.training or {}).get("finetune", {}).get("verdict")
        if isinstance(verdict, dict) and not verdict.get("selected", True):
            outcome = "its gain was not checked" if verdict.get("outcome") == "not checked" else "not better"
            line += f"; <b>{outcome}, not selected</b>"
        lines.append(line)
        metrics = [m for m in metrics if m["name"] not in ("dice_before_finetuning", "dice")]
    if metrics:
        shown = ", ".join(f"{escape(str(m['name']))} {m['value']:.3g} ({escape(str(m['split']))})" for m in metrics[:3])
        lines.append(f"Measured: {shown}")
    return "<br>".join(lines)


def is_refiner(card: Any) -> bool:
    """True for models that can run refinement steps (HiDiff: a segmentor plus a diffusion refiner)."""
    return str(card.network) == "hidiff"


def diffusion_steps(card: Any) -> int:
    """The diffusion length ``T`` of a HiDiff model card: the most refinement steps it can run."""
    try:
        return max(1, int((card.config or {}).get("num_steps", 10)))
    except (TypeError, ValueError):
        return 10


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
    kind: str = ""

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
    kind: str = "segment"
    plan: Optional[RefinePlan] = None
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class SegmentationLogic:
    """Runs segmentation jobs in the worker and turns results into segmentation nodes.

    Args:
        client: the worker client (default: one that starts :func:`worker_python`).
        scene: the MRML scene (default ``slicer.mrmlScene`` at call time).
        undo_levels: refinements that can be undone, per segmentation.
    """

    def __init__(
        self, client: Optional[WorkerClient] = None, scene: Optional[Any] = None, undo_levels: int = 5
    ) -> None:
        self._client = client
        self._scene = scene
        self._task: Optional[_Task] = None
        self.status = TaskStatus()
        self.problems: list[str] = []
        self.packages_missing = False
        self.ai_results = AIResults()
        self.undo_stack = UndoStack(undo_levels)
        self.finetune_latest: dict[str, Any] = {}
        self.finetune_timing: Optional[FinetuneTiming] = None

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

    @property
    def job_kind(self) -> str:
        """The kind of the running job (``segment``, ``refine``, ``finetune`` or ``timing``), "" when idle."""
        return self._task.kind if self._task is not None else ""

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
        cannot work: no input, a busy worker, a 3D model on a 2D image, channels the
        channel rule cannot map onto the model's (see :func:`.volumes.input_channels`),
        a region that misses the volume. The result's status names, after the usual
        sentence, how the image is far from what the model was trained on (the worker's
        ``warnings``); the result node keeps them in its ``MedSegSuite.inputWarnings``
        attribute.
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
        have = input_channels(input_node)
        check_channels(
            have,
            card.input.channels,
            image=f"volume {input_node.GetName()!r}",
            model=card.name,
            remedy=f"choose a model for {have}-channel images, or a grey or RGB volume "
            "(Vector to Scalar Volume makes a one-channel copy)",
        )
        box = box_from_roi(region_node, input_node) if region_node is not None else None
        self._prune()
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
                "roi_hint": _("choose it as Region"),
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
        self.status = TaskStatus("running", _("Starting {model}...").format(model=card.name), kind="segment")
        return self.status

    def start_refine(
        self,
        segmentation_node: Any,
        volume_node: Any,
        model: Union[str, Any],
        steps: int,
        keep_edits: bool = True,
        scope: str = "volume",
        slice_index: Optional[int] = None,
        point_lps: Optional[tuple[float, float, float]] = None,
        roi_node: Optional[Any] = None,
        device: str = "auto",
        seed: int = 0,
        ensemble: int = 1,
        neighbours: Optional[int] = None,
        spread: Optional[float] = None,
    ) -> TaskStatus:
        """Send ``steps`` refinement steps of a HiDiff model to the worker and return the new status (``running``).

        Works on the segments of ``segmentation_node`` that match the model's labels
        (see :func:`.refinement.match_segments`) on ``volume_node``'s grid. With
        ``keep_edits`` the voxels changed since the last AI result are held. ``scope``:
        ``volume``; ``slice`` with ``slice_index`` (canonical axial index, 0 = most
        inferior) or ``point_lps`` (the axial slice through that LPS point, mm, in the
        volume's own coordinates); ``neighbours``: that slice and ``neighbours`` slices
        on either side of it; ``roi`` with ``roi_node``. ``spread`` (0 to 1) lets the
        slices with edits guide the slices beside them (up to ``neighbours`` away) at
        weight ``spread ** distance``. ``neighbours`` and ``spread`` default to the
        parameter node's defaults (:data:`.parameters.DEFAULTS`). ``ensemble`` chains
        (1 to :data:`REFINE_MAX_ENSEMBLE`) are averaged; with 2 or more, the result
        also replaces the segment "Uncertain (refinement)" with the voxels where the
        chains disagree (see :func:`.refinement.show_uncertainty`), and a refinement
        without an ensemble removes that segment. Raises InputError (nothing started)
        when the request cannot work.
        """
        if self._task is not None:
            raise InputError("a job is already running: wait for it or cancel it")
        if volume_node is None:
            raise InputError("choose the input volume the segmentation belongs to")
        if segmentation_node is None:
            raise InputError("choose a segmentation to refine (segment first, or paint one in Segment Editor)")
        entry = self._resolve(model)
        card = entry.card
        if not is_refiner(card):
            raise InputError(f"{card.name} cannot run refinement steps; choose a HiDiff model")
        limit = diffusion_steps(card)
        if not 1 <= int(steps) <= limit:
            raise InputError(f"steps must be between 1 and {limit} for {card.name}, got {steps}")
        if scope not in REFINE_SCOPES:
            raise InputError(f"scope must be one of {', '.join(REFINE_SCOPES)}, got {scope!r}")
        neighbours = int(DEFAULTS[REFINE_NEIGHBOURS]) if neighbours is None else int(neighbours)
        spread = float(DEFAULTS[REFINE_SPREAD]) if spread is None else float(spread)
        if neighbours < 0:
            raise InputError(f"neighbours must be at least 0, got {neighbours}")
        if not 0.0 <= spread <= 1.0:
            raise InputError(f"spread must be between 0 and 1, got {spread}")
        if not 1 <= int(ensemble) <= REFINE_MAX_ENSEMBLE:
            raise InputError(f"ensemble must be between 1 and {REFINE_MAX_ENSEMBLE}, got {ensemble}")
        grid = grid_from_node(volume_node)
        params: dict[str, Any] = {"scope": scope, "neighbours": neighbours, "spread": spread}
        if scope in SLICE_SCOPES:
            if slice_index is None and point_lps is None:
                raise InputError("refining the current slice needs a slice index or a point on the slice")
            if slice_index is not None:
                if not 0 <= int(slice_index) < grid.shape[0]:
                    raise InputError(f"slice index must be between 0 and {grid.shape[0] - 1}, got {slice_index}")
                params["slice"] = int(slice_index)
            else:
                params["point"] = [float(v) for v in point_lps]  # type: ignore[union-attr]
        elif scope == "roi":
            if roi_node is None:
                raise InputError("choose the region (ROI) to refine")
            box = box_from_roi(roi_node, volume_node)
            params["roi"] = [*box.start, *box.stop]
        self._prune()
        plan = plan_refinement(segmentation_node, volume_node, card, self.ai_results, keep_edits)
        job_dir = self.client.new_job_dir()
        try:
            from ..io import write_image
            from ..volume import Volume

            source = write_image(volume_from_node(volume_node, copy=False), job_dir / "input.nrrd", compress=False)
            mask = write_image(Volume.on_grid(plan.labels, grid), job_dir / "mask.nrrd", compress=False)
            params.update(
                {
                    "model": str(entry.directory),
                    "input": str(source),
                    "mask": str(mask),
                    "output": str(job_dir / "refined.nrrd"),
                    "steps": int(steps),
                    "seed": int(seed),
                    "ensemble": int(ensemble),
                    "device": device or "auto",
                }
            )
            if plan.keep is not None and plan.keep.any():
                keep = Volume.on_grid(plan.keep.astype("uint8"), grid)
                params["keep"] = str(write_image(keep, job_dir / "keep.nrrd", compress=False))
            if int(ensemble) > 1:
                params["uncertainty"] = str(job_dir / "uncertainty.nrrd")
            job = self.client.submit("refine", params)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        self._task = _Task(
            job,
            volume_node.GetID(),
            segmentation_node.GetID(),
            entry,
            job_dir,
            time.monotonic(),
            kind="refine",
            plan=plan,
            steps=int(steps),
            extra={"ensemble": int(ensemble)},
        )
        self.status = TaskStatus("running", _("Starting {model} refinement...").format(model=card.name), kind="refine")
        return self.status

    def can_undo(self, segmentation_node: Optional[Any]) -> bool:
        """True when a refinement of this segmentation can be undone."""
        return self._task is None and self.undo_stack.can_undo(segmentation_node)

    def undo_refinement(self, segmentation_node: Any) -> TaskStatus:
        """Put the segmentation back exactly as it was before its last refinement."""
        if self._task is not None:
            raise InputError("wait for the running job to end before undoing")
        if segmentation_node is None:
            raise InputError("choose the segmentation whose refinement to undo")
        ai_snapshot = self.undo_stack.pop(segmentation_node)
        self.ai_results.restore(segmentation_node, ai_snapshot)
        left = " (more can be undone)" if self.undo_stack.can_undo(segmentation_node) else ""
        self.status = TaskStatus(
            "done",
            f"Undid the last refinement of {segmentation_node.GetName()!r}{left}.",
            output_node_id=segmentation_node.GetID(),
            kind="undo",
        )
        return self.status

    def remember_ai_result(self, segmentation_node: Any, volume_node: Any) -> None:
        """Take the segmentation's current content as the last AI result (what "keep my edits" compares with)."""
        masks = {sid: segment_mask(segmentation_node, sid, volume_node) for sid in label_segment_ids(segmentation_node)}
        self.ai_results.remember(segmentation_node, grid_from_node(volume_node), masks, replace=True)

    # -- finetuning ------------------------------------------------------------------------
    @staticmethod
    def finetune_key(
        parent: Any, pairs: Sequence[tuple[Any, Any]], unlabelled: Sequence[Any], folder: str, device: str
    ) -> tuple:
        """What a time estimate depends on: the parent, the cases (as sent), the folder and the device."""
        card = parent.card if hasattr(parent, "card") else None
        in_pairs = {volume.GetID() for _segmentation, volume in pairs}
        return (
            card.id if card is not None else str(parent),
            tuple(segmentation.GetID() for segmentation, _ in pairs),
            tuple(node.GetID() for node in unlabelled if node is not None and node.GetID() not in in_pairs),
            str(folder or "").strip(),
            device or "auto",
        )

    def start_finetune(
        self,
        parent: Union[str, Any],
        pairs: Sequence[tuple[Any, Any]],
        unlabelled_nodes: Sequence[Any] = (),
        unlabelled_folder: str = "",
        iterations: int = 200,
        device: str = "auto",
        resume: bool = False,
        measure: int = 0,
        curve: Optional[FinetuneCurve] = None,
        held_out: Optional[int] = None,
        seed: int = 0,
        resample: bool = False,
    ) -> TaskStatus:
        """Send a finetuning of ``parent`` to the worker (or, with ``measure`` > 0, a timing of it).

        ``pairs`` are the labelled cases, ``(segmentation node, volume node)``; their
        segments are matched to the parent's labels (see :func:`.finetuning.parent_label_map`)
        and travel as label maps. ``unlabelled_nodes`` (volumes; those already in a pair
        are skipped) and the images in ``unlabelled_folder`` are the unlabelled cases.
        ``resume`` continues the newest unfinished run of the parent. ``curve`` receives
        the loss and validation records (cleared first). Raises InputError (nothing is
        sent) when a choice cannot work, e.g. a segment that matches no label of the parent
        or a segmentation that does not lie on its volume; raises
        :class:`~.finetuning.GridQuestion` for a segmentation on another grid over the
        same region as its volume unless ``resample`` (nearest neighbour) is allowed.
        """
        if self._task is not None:
            raise InputError("a job is already running: wait for it or cancel it")
        entry = self._resolve(parent)
        card = entry.card
        pairs = [(segmentation, volume) for segmentation, volume in pairs]
        if not pairs:
            raise InputError(_("check at least one labelled case (a volume with its segmentation) to learn from"))
        if int(iterations) < 1:
            raise InputError(_("iterations must be at least 1, got {iterations}").format(iterations=iterations))
        folder = str(unlabelled_folder or "").strip()
        if folder and not Path(folder).is_dir():
            raise InputError(_("the unlabelled folder {folder} does not exist").format(folder=folder))
        in_pairs = {volume.GetID() for _segmentation, volume in pairs}
        extra = [node for node in unlabelled_nodes if node is not None and node.GetID() not in in_pairs]
        for node in [volume for _segmentation, volume in pairs] + extra:
            if card.dims == 3 and grid_from_node(node).shape[0] == 1:
                raise InputError(
                    _("{model} is a 3D model and {volume} is a single 2D image").format(
                        model=card.name, volume=repr(node.GetName())
                    )
                )
        label_maps = [parent_label_map(segmentation, volume, card, resample) for segmentation, volume in pairs]
        if not any(labels.any() for labels in label_maps):
            raise InputError(_("every checked segmentation is empty: paint the structures to learn first"))
        key = self.finetune_key(entry, pairs, extra, folder, device)
        self._prune()
        job_dir = self.client.new_job_dir()
        try:
            from ..io import write_image
            from ..volume import Volume

            names: set[str] = set()
            labelled, unlabelled = [], []
            for n, ((_segmentation, volume), labels) in enumerate(zip(pairs, label_maps), 1):
                image = write_image(
                    volume_from_node(volume, copy=False), job_dir / f"labelled-{n}.nrrd", compress=False
                )
                label = write_image(
                    Volume.on_grid(labels, grid_from_node(volume)), job_dir / f"labelled-{n}-label.nrrd", compress=False
                )
                labelled.append({"id": _case_id(volume, names), "image": str(image), "label": str(label)})
            for n, node in enumerate(extra, 1):
                image = write_image(
                    volume_from_node(node, copy=False), job_dir / f"unlabelled-{n}.nrrd", compress=False
                )
                unlabelled.append({"id": _case_id(node, names), "image": str(image)})
            params: dict[str, Any] = {
                "parent": str(entry.directory),
                "labelled": labelled,
                "unlabelled": unlabelled,
                "iterations": int(iterations),
                "device": device or "auto",
                "resume": bool(resume),
                "measure": int(measure),
                "seed": int(seed),
            }
            if folder:
                params["unlabelled_folder"] = folder
            if held_out is not None:
                params["held_out"] = int(held_out)
            job = self.client.submit("finetune", params)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        kind = "timing" if measure else "finetune"
        self._task = _Task(
            job,
            pairs[0][1].GetID(),
            None,
            entry,
            job_dir,
            time.monotonic(),
            kind=kind,
            extra={"iterations": int(iterations), "resume": bool(resume), "key": key, "curve": curve},
        )
        self.finetune_latest = {}
        if curve is not None and not measure:
            curve.clear()
            curve.set_title(_("Finetuning {model}").format(model=card.name))
            curve.show()
        if measure:
            text = _("Timing {model} on {count} labelled case(s)...")
        elif resume:
            text = _("Resuming to finetune {model} on {count} labelled case(s)...")
        else:
            text = _("Starting to finetune {model} on {count} labelled case(s)...")
        text = text.format(model=card.name, count=len(pairs))
        self.status = TaskStatus("running", text, kind=kind)
        return self.status

    def unfinished_finetune(self, parent: Union[str, Any]) -> Optional[tuple[str, int]]:
        """``(model id, last logged iteration)`` of a resumable finetuning of ``parent``, or None."""
        from .finetuning import unfinished_run

        card = parent.card if hasattr(parent, "card") else None
        try:
            return unfinished_run(card.id if card is not None else str(parent))
        except ImportError:
            return None

    def export(
        self,
        segmentation_node: Any,
        output: Union[str, Path],
        reference_node: Optional[Any] = None,
        overwrite: bool = False,
        dicom_folder: Optional[Union[str, Path]] = None,
    ) -> TaskStatus:
        """Write the segmentation to ``output`` (format from its extension) in this process; returns a ``done`` status.

        See :func:`.exporting.export_segmentation`; ``dicom_folder`` is the source
        series of a DICOM SEG when the volume did not come from Slicer's DICOM
        database. Raises InputError with a one-line reason (nothing is written).
        """
        from .exporting import export_segmentation

        started = time.monotonic()
        written = export_segmentation(
            segmentation_node, output, reference_node, overwrite=overwrite, dicom_folder=dicom_folder
        )
        names = " and ".join(str(path) for path in written)
        text = _("Exported {segmentation} to {files} in {seconds} s.").format(
            segmentation=repr(segmentation_node.GetName()), files=names, seconds=f"{time.monotonic() - started:.1f}"
        )
        left_out = len(segment_ids(segmentation_node)) - len(label_segment_ids(segmentation_node))
        if left_out:
            text += " " + _("The refinement's uncertainty segment is not a label and was left out.")
        return TaskStatus("done", text, output_node_id=segmentation_node.GetID(), kind="export")

    def _prune(self) -> None:
        """Forget AI results and undo copies of segmentations no longer in the scene."""
        scene = self.scene
        self.ai_results.prune(lambda node_id: scene.GetNodeByID(node_id) is not None)
        self.undo_stack.prune(lambda node_id: scene.GetNodeByID(node_id) is not None)

    def forget(self) -> None:
        """Forget remembered AI results and undo copies (the scene is closing)."""
        self.ai_results.forget()
        self.undo_stack.forget()

    def cancel(self) -> None:
        """Ask the running job to stop; its result, if one still arrives, is discarded."""
        if self._task is None:
            return
        self._task.cancel_requested = True
        client = self.client
        if self._task.kind == "finetune":  # give the run time to write its checkpoint
            grace, client.cancel_grace = client.cancel_grace, max(client.cancel_grace, FINETUNE_CANCEL_GRACE)
            try:
                client.cancel(self._task.job)
            finally:
                client.cancel_grace = grace
        else:
            client.cancel(self._task.job)
        self.status = TaskStatus(
            "running", _("Cancelling..."), self.status.stage, self.status.done, self.status.total, kind=self._task.kind
        )

    def poll(self) -> TaskStatus:
        """Process the worker's messages (never blocks) and return the current status.

        Never raises: an unexpected error while reading or applying a message ends the
        running job (see :meth:`fail`), the scene as it was before the result.
        """
        try:
            messages = self.client.poll()
        except Exception as error:
            if self._task is not None:
                self.fail(error)
            else:
                log.warning("reading the MedSegSuite worker's messages failed", exc_info=True)
            return self.status
        for message in messages:
            task = self._task
            try:
                if task is None or message.get("job") != task.job:
                    if message.get("type") == "died":
                        log.info("idle worker ended: %s", message.get("message"))
                    continue
                self._handle(task, message)
            except Exception as error:
                if self._task is task:
                    self.fail(error)
        return self.status

    def fail(self, error: BaseException) -> TaskStatus:
        """End the running job after an unexpected error: the worker is told to stop, the status says so in one
        sentence, and the traceback goes to the log. Without a running job only the status changes."""
        log.error("MedSegSuite job ended by an unexpected error", exc_info=error)
        task = self._task
        title = _job_title(task.kind if task is not None else "")
        if task is not None:
            try:
                self.client.cancel(task.job)
            except Exception:  # the worker may be the problem: the job ends here anyway
                log.warning("could not cancel job %s", task.job, exc_info=True)
        text = _(
            "{job} stopped by an unexpected error ({error}); nothing was changed in the scene. "
            "Details are in the Python console."
        ).format(job=title, error=describe_error(error))
        self._finish(TaskStatus("failed", text))
        return self.status

    def _handle(self, task: _Task, message: dict[str, Any]) -> None:
        """Act on one message of the running job."""
        kind = message["type"]
        if kind == "progress":
            stage, done, total, unit = message["stage"], message["done"], message["total"], message.get("unit", "")
            title = _stage_title(stage)
            text = f"{title}: {done} / {total} {unit}" if total > 1 else f"{title}..."
            if task.kind == "finetune" and stage == "training":
                text += self._time_left(task, done, total)
            if task.cancel_requested:
                text = _("Cancelling...") if task.kind != "finetune" else _("Cancelling (writing a checkpoint)...")
            self.status = TaskStatus("running", text, stage, done, total, unit if total > 1 else "", kind=task.kind)
        elif kind == "log":
            self._finetune_record(task, message.get("record") or {})
        elif kind == "result":
            if task.kind == "finetune":  # registered even when a cancel came too late
                self._finish(self._apply_finetune(task, message))
            elif task.cancel_requested:
                self._finish(self._cancelled())
            elif task.kind == "timing":
                self._finish(self._apply_timing(task, message))
            elif task.kind == "refine":
                self._finish(self._apply_refinement(task, message))
            else:
                self._finish(self._apply(task, message))
        elif kind == "cancelled":
            self._finish(self._finetune_stopped(task, "") if task.kind == "finetune" else self._cancelled())
        elif kind == "error":
            text = self._name_job_files(task, str(message["message"]))
            self._finish(TaskStatus("failed", _("{job} failed: {error}").format(job=_job_title(task.kind), error=text)))
        elif kind == "died":
            text = message["message"][0].upper() + message["message"][1:] + "."
            self._finish(self._finetune_stopped(task, text) if task.kind == "finetune" else TaskStatus("failed", text))

    def _name_job_files(self, task: _Task, text: str) -> str:
        """A worker's error with the job's copy of the input volume called by the volume's name, not its file."""
        node = self.scene.GetNodeByID(task.input_node_id)
        if node is None or task.kind not in ("segment", "refine"):
            return text
        copy = str(task.job_dir / "input.nrrd")
        return re.sub(r"(?<![\w.-])input\.nrrd\b", f"volume {node.GetName()!r}", text.replace(copy, "input.nrrd"))

    @staticmethod
    def _time_left(task: _Task, done: int, total: int) -> str:
        """The suffix ", about 3 min left" from the pace of this run so far (validations included), or ""."""
        now = time.monotonic()
        first = task.extra.setdefault("first_training", (done, now))
        if done - first[0] < 2 or done >= total:
            return ""
        seconds = (now - first[1]) / (done - first[0]) * (total - done)
        return ", " + _("about {duration} left").format(duration=describe_duration(seconds))

    def _finetune_record(self, task: _Task, record: dict[str, Any]) -> None:
        if task.kind != "finetune" or not isinstance(record, dict):
            return
        if record.get("event") == "checkpoint":
            task.extra["checkpoint"] = record
            return
        curve = task.extra.get("curve")
        if curve is not None:
            curve.add(record)
        latest = self.finetune_latest
        if isinstance(record.get("val_dice"), (int, float)):
            latest.update(val_dice=float(record["val_dice"]), val_iteration=record.get("iteration"))
        elif isinstance(record.get("loss"), (int, float)):
            latest.update(loss=float(record["loss"]), iteration=record.get("iteration"))

    def _finetune_stopped(self, task: _Task, crash: str) -> TaskStatus:
        """Cancelled (``crash`` "") or crashed: say whether and where the run can be resumed."""
        total = task.extra.get("iterations", 0)
        checkpoint = task.extra.get("checkpoint")
        found = None if checkpoint else self.unfinished_finetune(task.entry)
        if checkpoint:
            text = _(
                "Finetuning cancelled at iteration {iteration} of {total}; the checkpoint of "
                "{model} is kept: click Resume to continue."
            ).format(iteration=checkpoint.get("iteration"), total=total, model=checkpoint.get("model"))
        elif crash:
            text = crash
            if found:
                text += " " + _(
                    "The last checkpoint of {model} (logged up to iteration {iteration}) can be resumed."
                ).format(model=found[0], iteration=found[1])
        else:
            text = _("Finetuning cancelled before training started; nothing was saved.")
        return TaskStatus("failed" if crash else "cancelled", text, info={"checkpoint": checkpoint or found})

    def _apply_finetune(self, task: _Task, message: dict[str, Any]) -> TaskStatus:
        info = dict(message.get("info", {}))
        card = task.entry.card
        seconds = time.monotonic() - task.started
        device = str(info.get("device", "?")).replace("cpu", "CPU")
        words, info["selected"] = finetune_outcome(info, card.name)
        self.finetune_latest["outcome"] = words
        text = _("Finetuned {model} into {new_model} in {duration} on {device}.").format(
            model=card.name, new_model=info.get("model"), duration=describe_duration(seconds), device=device
        )
        text += " " + words
        return TaskStatus("done", text, info=info)

    def _apply_timing(self, task: _Task, message: dict[str, Any]) -> TaskStatus:
        from .finetuning import estimate_seconds

        info = dict(message.get("info", {}))
        try:
            timing = FinetuneTiming.from_info(task.extra["key"], info)
        except (KeyError, TypeError, ValueError):
            return TaskStatus("failed", _("Timing failed: the worker sent no timings."))
        self.finetune_timing = timing
        iterations = task.extra.get("iterations", 1)
        device = timing.device.replace("cpu", "CPU")
        text = _(
            "Timed on {device}: {per_iteration} s per iteration, about "
            "{per_validation} per validation; {iterations} iterations take about {duration}."
        ).format(
            device=device,
            per_iteration=f"{timing.per_iteration:.2f}",
            per_validation=describe_duration(timing.per_validation),
            iterations=iterations,
            duration=describe_duration(estimate_seconds(timing, iterations)),
        )
        return TaskStatus("done", text, info=info)

    @staticmethod
    def _cancelled() -> TaskStatus:
        return TaskStatus("cancelled", _("Cancelled; nothing was changed."))

    def _finish(self, status: TaskStatus) -> None:
        task, self._task = self._task, None
        if task is not None:
            shutil.rmtree(task.job_dir, ignore_errors=True)
            status.kind = task.kind
        self.status = status

    def _apply(self, task: _Task, message: dict[str, Any]) -> TaskStatus:
        from ..io import read_image

        scene = self.scene
        input_node = scene.GetNodeByID(task.input_node_id)
        if input_node is None:
            return TaskStatus("failed", _("The input volume was removed while segmenting; the result was discarded."))
        card = task.entry.card
        created, backup = None, None
        try:
            labels = read_image(message["outputs"]["labels"])
            if not labels.grid.same_as(grid_from_node(input_node)):
                raise InputError("the input volume changed while segmenting; the result was discarded: run again")
            output = scene.GetNodeByID(task.output_node_id) if task.output_node_id else None
            if output is None or not output.IsA("vtkMRMLSegmentationNode"):
                output = created = create_segmentation_node(input_node, scene=scene)
            else:
                backup = SegmentationBackup(output)
            array = labels.array if labels.array.ndim == 3 else labels.array[0]
            ids = write_labels(output, array, input_node, card.labels, model_tag=f"{card.id} {card.version}")
            if created is not None:
                place_next_to(output, input_node)
            masks = {sid: array == label.value for sid, label in zip(ids, card.labels)}
            self._show(input_node)
        except Exception as error:  # nothing half-made stays: a new node goes, an existing one is put back
            if created is not None:
                remove_node(created)
            elif backup is not None:
                backup.restore()
            if isinstance(error, MedSegSuiteError):
                return TaskStatus("failed", _("Segmentation failed: {error}").format(error=error))
            raise
        self.undo_stack.forget(output)  # a new result: earlier refinements cannot be undone into it
        self.ai_results.remember(output, labels.grid, masks, replace=True)
        info = dict(message.get("info", {}))
        warnings = [str(w) for w in info.get("warnings") or []]
        record_input_warnings(output, warnings)
        for warning in warnings:
            log.warning("%s with %s: %s", input_node.GetName(), card.id, warning)
        found = [label.name for label in card.labels if label.value in info.get("labels_present", [])]
        seconds = time.monotonic() - task.started
        device = str(info.get("device", "?")).replace("cpu", "CPU")
        text = _("Done in {seconds} s on {device}: {found} in {segmentation}.").format(
            seconds=f"{seconds:.1f}",
            device=device,
            found=", ".join(found) if found else _("nothing found"),
            segmentation=repr(output.GetName()),
        )
        if warnings:
            text += " " + _("Check the result: {warnings}.").format(warnings="; ".join(warnings))
        return TaskStatus("done", text, output_node_id=output.GetID(), info=info)

    def _apply_refinement(self, task: _Task, message: dict[str, Any]) -> TaskStatus:
        from ..io import read_image

        scene = self.scene
        volume_node = scene.GetNodeByID(task.input_node_id)
        segmentation_node = scene.GetNodeByID(task.output_node_id) if task.output_node_id else None
        if volume_node is None or segmentation_node is None:
            return TaskStatus(
                "failed", _("The volume or the segmentation was removed while refining; nothing was changed.")
            )
        plan = task.plan
        assert plan is not None
        ensemble = int(task.extra.get("ensemble", 1))
        uncertain: Optional[int] = None
        try:
            refined = read_image(message["outputs"]["labels"])
            if not refined.grid.same_as(grid_from_node(volume_node)):
                raise InputError("the input volume changed while refining; the result was discarded: run again")
            array = refined.array if refined.array.ndim == 3 else refined.array[0]
            spread_map = None
            if ensemble > 1 and message["outputs"].get("uncertainty"):
                spread_map = read_image(message["outputs"]["uncertainty"])
                if not spread_map.grid.same_as(refined.grid):
                    raise InputError("the uncertainty map does not lie on the volume's grid; the result was discarded")
            ai_before = self.ai_results.snapshot(segmentation_node)
            self.undo_stack.push(segmentation_node, ai_before)  # the uncertainty segment too: undo puts it back
            try:
                masks, changed = apply_refinement(segmentation_node, volume_node, plan, array)
                if spread_map is not None:
                    values = spread_map.array if spread_map.array.ndim == 3 else spread_map.array[0]
                    _segment, uncertain = show_uncertainty(
                        segmentation_node, volume_node, values, name=_("Uncertain (refinement)")
                    )
                else:  # an uncertainty segment left from an earlier run would describe an older result
                    remove_uncertainty(segmentation_node)
                self.ai_results.remember(segmentation_node, refined.grid, masks)
            except BaseException:  # the segmentation and the AI results go back to how they were
                self.ai_results.restore(segmentation_node, self.undo_stack.pop(segmentation_node))
                raise
        except MedSegSuiteError as error:  # apply_refinement changed nothing, or the undo copy put it back
            return TaskStatus("failed", _("Refinement failed: {error}").format(error=error))
        info = dict(message.get("info", {}))
        seconds = time.monotonic() - task.started
        device = str(info.get("device", "?")).replace("cpu", "CPU")
        slices = len(info.get("slices", []))
        names = {match.segment_id: match.name for match in plan.matches}
        parts = [f"{changed[sid]} in {names[sid]!r}" for sid in names]
        kept = int(plan.keep.sum()) if plan.keep is not None else 0
        text = _(
            "Refined {slices} slice(s) with {steps} step(s) in {seconds} s on {device}: voxels changed: {parts}."
        ).format(slices=slices, steps=task.steps, seconds=f"{seconds:.1f}", device=device, parts=", ".join(parts))
        if plan.keep is not None:
            text += f" Kept {kept} edited voxel(s)"
            if plan.hand_painted:
                text += (
                    " ("
                    + ", ".join(repr(n) for n in plan.hand_painted)
                    + " had no AI result: all its voxels count as yours)"
                )
            text += "."
        text += describe_left_untouched(plan.unknown)
        if uncertain is not None:
            text += " " + _(
                "The {chains} chains disagree (uncertainty above {threshold}) at {count} voxel(s): "
                "see the segment {segment}."
            ).format(
                chains=ensemble,
                threshold=UNCERTAIN_THRESHOLD,
                count=uncertain,
                segment=repr(_("Uncertain (refinement)")),
            )
            info["uncertain_voxels"] = uncertain
        info["changed_by_segment"] = {names[sid]: n for sid, n in changed.items()}
        info["left_untouched"] = list(plan.unknown)
        return TaskStatus("done", text, output_node_id=segmentation_node.GetID(), info=info)

    @staticmethod
    def current_slice_point(volume_node: Any, view: str = "Red") -> Optional[tuple[float, float, float]]:
        """The centre of a slice view in the volume's own LPS coordinates (mm), or None without a layout manager."""
        app = getattr(slicer, "app", None)
        layout = app.layoutManager() if app is not None and hasattr(app, "layoutManager") else None
        if layout is None:
            return None
        widget = layout.sliceWidget(view)
        if widget is None:
            return None
        matrix = widget.mrmlSliceNode().GetSliceToRAS()
        world = [matrix.GetElement(r, 3) for r in range(3)]
        import vtk

        to_node = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volume_node.GetParentTransformNode(), to_node)
        local = to_node.TransformPoint(*world)
        lps = LPS_FROM_RAS @ [float(v) for v in local]
        return (float(lps[0]), float(lps[1]), float(lps[2]))

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
                raise TimeoutError(f"the job did not finish within {timeout} s")
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
