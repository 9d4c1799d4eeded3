"""What the worker can do: job kinds, their parameters, and the cache of warm models.

A job handler is ``handler(params, context) -> JobOutcome``. It reads its inputs from
files named in ``params``, reports progress through ``context.progress(done, total,
stage)``, checks ``context.cancel`` between units of work (raising
:class:`~MedSegSuiteLib.errors.Cancelled`), writes its outputs atomically, and returns
their paths. It must write nothing when it fails or is cancelled.

Job kinds (:func:`default_handlers`):

``segment``
    ``params``: ``model`` (model folder or id), ``input`` (image file), ``output``
    (label file to write; ``.nrrd`` recommended), ``device`` (``auto``/``cpu``/``cuda``/
    ``mps``, default ``auto``), ``roi`` (``[x0, y0, z0, x1, y1, z1]`` voxel box, end
    exclusive, or null), ``fast`` (bool), ``roi_hint`` (how the caller's user chooses a region,
    named by a fit warning that suggests one; default ``--roi``). ``outputs``: ``{"labels": output}``.
    ``info``: model id and version, device, ``cache_hit``, ``labels_present``, ``warnings`` (plain-words
    sentences on how the image, or its ``roi``, is far from what the model was trained on; see
    :func:`~MedSegSuiteLib.inference.fit_check.fit_warnings`) and timings.

``refine``
    HiDiff refinement steps starting from a (corrected) label map; see
    :class:`~MedSegSuiteLib.refine.refinement.Refiner`. ``params``: ``model`` (a HiDiff
    model folder or id), ``input`` (image file), ``mask`` (label map on the image's grid,
    in the model's label values), ``keep`` (optional label map: non-zero voxels never
    change), ``output`` (label file to write), ``uncertainty`` (optional file for the
    per-voxel uncertainty, written when ``ensemble`` > 1), ``steps`` (int, 1..T),
    ``scope`` (``volume``, ``slice``, ``neighbours`` or ``roi``), ``slice`` (canonical
    axial index for ``slice`` and ``neighbours``) or ``point`` (``[x, y, z]`` LPS mm: the
    axial slice through it), ``neighbours`` (slices on either side for ``neighbours``,
    and how far ``spread`` reaches; default 2), ``spread`` (0 to 1: how strongly slices
    with ``keep`` voxels guide the slices beside them; default 0), ``roi`` (voxel box as
    for ``segment``, for ``roi``), ``seed`` (int, default 0), ``ensemble`` (int, default
    1), ``device``, ``batch_size`` (slices per network call; default 1 on the CPU, where
    it costs no speed and lets a cancel act after every slice, else 4).
    ``outputs``: ``{"labels": output}`` plus
    ``"uncertainty"`` when written. ``info``: model id and version, device,
    ``cache_hit``, ``slices`` (canonical axial indices refined), ``neighbours``,
    ``spread``, ``ensemble``, ``changed`` (voxels that differ from the mask), ``kept``
    (voxels held by ``keep``), ``labels_present`` and timings.

``finetune``
    Semi-supervised finetuning (:func:`~MedSegSuiteLib.training.finetune.finetune_model`):
    a new model ``<parent id>-ft-<n>`` is registered in the user model folder; the
    parent never changes. ``params``: ``parent`` (model folder or id), ``labelled``
    (list of ``{"id", "image", "label"}``: image files and label maps on the same grid
    in the parent's label values), ``unlabelled`` (list of ``{"id", "image"}``, may be
    empty), ``unlabelled_folder`` (optional folder of more unlabelled images),
    ``iterations`` (default 200), ``device``, ``held_out`` (labelled cases kept for the
    before/after Dice; default as the library's), ``seed``, ``batch_size``, ``lr``
    (defaults from the parent's recipe), ``resume`` (bool: continue the newest
    unfinished run of this parent from its checkpoint; its earlier records are sent
    again first, marked ``"replayed": true``) and ``measure`` (int, default 0: with
    ``n`` > 0 nothing is trained or registered; the job times ``n`` iterations after
    a first, warm-up one on this data and device). Labels are checked against the
    parent's label table before anything else. Progress stages: ``loading data``
    (cases), ``measuring the parent``, ``training`` (iterations; ``timing`` when
    measuring). ``log`` records: ``{"iteration", "loss", ...}`` every few iterations,
    ``{"iteration", "val_dice", "val_hd95"}`` after each validation, and on cancel
    ``{"event": "checkpoint", "model", "iteration"}`` when a resumable checkpoint was
    written. ``outputs``: ``{"model": folder}`` (none when measuring). ``info``: model
    id, version and folder, parent, device, iterations, resumed, case counts,
    ``dice_before`` / ``dice_after`` and their ``split``, ``verdict`` (the held-back check,
    see :class:`~MedSegSuiteLib.training.verdict.FinetuneVerdict`), ``selected`` (whether the
    new model should replace its parent), seconds; when measuring
    ``seconds_per_iteration``, ``seconds_per_validation`` (an upper bound: it includes
    setting the training up), ``seconds_setup`` (reading data and model).

All kinds share :class:`ModelCache` through the context, so a refinement step reuses
the model that is already warm (finetuning loads its own copy, which it trains).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..errors import InputError
from ..geometry import Box
from ..progress import ProgressCallback
from .protocol import ProtocolError

__all__ = [
    "JobContext",
    "JobHandler",
    "JobOutcome",
    "ModelCache",
    "default_handlers",
    "finetune_job",
    "refine_job",
    "segment_job",
]

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    """What a finished job returns: output files by role, and facts for the client (JSON-ready)."""

    outputs: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)


class ModelCache:
    """Loaded models kept warm between jobs, least recently used dropped first.

    The key is (resolved model folder, device, weights sha256 from the card), so a
    model whose weights were replaced on disk is loaded again.

    Args:
        capacity: how many models to keep (at least 1).
    """

    def __init__(self, capacity: int = 2) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._models: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._models)

    def get(self, model: str, device: str = "auto") -> tuple[Any, Any, bool]:
        """``(loaded_model, torch_device, cache_hit)`` for a model folder or id on ``device``."""
        from ..inference.device import resolve_device
        from ..models import ModelRegistry, load_model

        entry = ModelRegistry().resolve(model)
        torch_device = resolve_device(device)
        key = (str(entry.directory.resolve()), str(torch_device), str(entry.card.weights.get("sha256", "")))
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key], torch_device, True
        loaded = load_model(entry, device=torch_device)
        with self._lock:
            self._models[key] = loaded
            while len(self._models) > self.capacity:
                dropped_key, _ = self._models.popitem(last=False)
                log.info("dropped model %s on %s from the cache", dropped_key[0], dropped_key[1])
        return loaded, torch_device, False


@dataclass
class JobContext:
    """What a running job gets from the worker.

    ``report(done, total, stage, unit)`` sends a progress message (throttled by the
    worker); ``unit`` names what is counted ("windows", "slices", "iterations").
    ``send_log(record)`` sends a ``log`` message (never throttled); None drops records.
    """

    job_id: str
    cancel: threading.Event
    report: Callable[[int, int, str, str], None]
    models: ModelCache
    send_log: Optional[Callable[[dict[str, Any]], None]] = None

    def progress(self, done: int, total: int, stage: str, unit: str = "") -> None:
        """Report ``done`` of ``total`` units of ``stage``."""
        self.report(int(done), int(total), str(stage), unit)

    def log(self, record: dict[str, Any]) -> None:
        """Send one record (JSON-ready; non-finite numbers become null) to the client."""
        if self.send_log is not None:
            self.send_log(dict(record))

    def progress_in(self, unit: str) -> ProgressCallback:
        """A ``(done, total, stage)`` callback (as the Predictor takes) that reports in ``unit``."""
        return lambda done, total, stage: self.progress(done, total, stage, unit)


JobHandler = Callable[[Mapping[str, Any], JobContext], JobOutcome]


def _param(params: Mapping[str, Any], key: str, kind: Any, default: Any = ..., what: str = "") -> Any:
    if key not in params or params[key] is None:
        if default is ...:
            raise ProtocolError(f"job parameter {key!r} is missing{what}")
        return default
    value = params[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        name = getattr(kind, "__name__", str(kind))
        raise ProtocolError(f"job parameter {key!r} must be {name}, got {type(value).__name__}")
    return value


def _number(params: Mapping[str, Any], key: str, default: float) -> float:
    """A number parameter (an int or a float in JSON), ``default`` when missing."""
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"job parameter {key!r} must be a number, got {type(value).__name__}")
    return float(value)


def _roi(value: Any) -> Optional[Box]:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 6 or not all(isinstance(v, int) for v in value):
        raise ProtocolError(f"job parameter 'roi' must be six integers x0,y0,z0,x1,y1,z1, got {value!r}")
    return Box(tuple(value[:3]), tuple(value[3:]))  # type: ignore[arg-type]


def segment_job(params: Mapping[str, Any], context: JobContext) -> JobOutcome:
    """Segment ``params['input']`` with a (cached) model; see the module docstring for the parameters."""
    import numpy as np

    from ..geometry import crop
    from ..inference import Predictor
    from ..inference.fit_check import fit_warnings
    from ..io import read_image, write_image
    from ..preprocessing import check_channels

    model = _param(params, "model", str)
    source = Path(_param(params, "input", str))
    target = Path(_param(params, "output", str))
    device = _param(params, "device", str, "auto")
    fast = _param(params, "fast", bool, False)
    roi_hint = _param(params, "roi_hint", str, "--roi")
    roi = _roi(params.get("roi"))
    if not target.parent.is_dir():
        raise InputError(f"cannot write the result: folder {target.parent} does not exist")

    started = time.perf_counter()
    context.progress(0, 1, "loading model")
    loaded, torch_device, hit = context.models.get(model, device)
    loaded_at = time.perf_counter()
    context.progress(0, 1, "reading image")
    volume = read_image(source)
    check_channels(volume.channels, loaded.card.input.channels, model=f"model {loaded.card.id!r}")
    warnings = fit_warnings(crop(volume, roi) if roi is not None else volume, loaded.card, roi_hint=roi_hint)
    unit = "slices" if loaded.card.dims == 2 else "windows"
    predictor = Predictor(loaded, device=torch_device, fast=fast)
    prediction = predictor.predict(volume, roi=roi, progress=context.progress_in(unit), cancel=context.cancel)
    predicted_at = time.perf_counter()
    write_image(prediction.labels, target, overwrite=True, compress=False)
    present = [int(v) for v in np.unique(prediction.labels.array) if v != 0]
    return JobOutcome(
        outputs={"labels": str(target)},
        info={
            "model": loaded.card.id,
            "version": loaded.card.version,
            "device": str(torch_device),
            "cache_hit": hit,
            "labels_present": present,
            "warnings": warnings,
            "seconds": {
                "load": round(loaded_at - started, 3),
                "predict": round(predicted_at - loaded_at, 3),
                "total": round(time.perf_counter() - started, 3),
            },
        },
    )


def _point(value: Any) -> Optional[tuple[float, float, float]]:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ProtocolError(f"job parameter 'point' must be three numbers x,y,z (LPS mm), got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def refine_job(params: Mapping[str, Any], context: JobContext) -> JobOutcome:
    """Refine ``params['mask']`` with a (cached) HiDiff model; see the module docstring for the parameters."""
    import numpy as np

    from ..io import read_image, write_image
    from ..refine.refinement import SCOPES, Refiner, axial_index

    model = _param(params, "model", str)
    source = Path(_param(params, "input", str))
    mask_path = Path(_param(params, "mask", str))
    keep_path = _param(params, "keep", str, None)
    target = Path(_param(params, "output", str))
    uncertainty_path = _param(params, "uncertainty", str, None)
    steps = _param(params, "steps", int)
    scope = _param(params, "scope", str, "volume")
    slice_index = _param(params, "slice", int, None)
    point = _point(params.get("point"))
    roi = _roi(params.get("roi"))
    seed = _param(params, "seed", int, 0)
    ensemble = _param(params, "ensemble", int, 1)
    neighbours = _param(params, "neighbours", int, 2)
    spread = _number(params, "spread", 0.0)
    device = _param(params, "device", str, "auto")
    batch_size = _param(params, "batch_size", int, None)
    if scope not in SCOPES:
        raise ProtocolError(f"job parameter 'scope' must be one of {', '.join(SCOPES)}, got {scope!r}")
    if scope in ("slice", "neighbours") and slice_index is None and point is None:
        raise ProtocolError(f"scope {scope!r} needs the job parameter 'slice' (axial index) or 'point' (LPS mm)")
    if scope == "roi" and roi is None:
        raise ProtocolError("scope 'roi' needs the job parameter 'roi'")
    for path in [target] + ([Path(uncertainty_path)] if uncertainty_path else []):
        if not path.parent.is_dir():
            raise InputError(f"cannot write the result: folder {path.parent} does not exist")

    started = time.perf_counter()
    context.progress(0, 1, "loading model")
    loaded, torch_device, hit = context.models.get(model, device)
    if batch_size is None:
        batch_size = 1 if torch_device.type == "cpu" else 4
    refiner = Refiner(loaded, device=torch_device, batch_size=batch_size)
    loaded_at = time.perf_counter()
    context.progress(0, 1, "reading image")
    volume = read_image(source)
    mask = read_image(mask_path)
    keep = read_image(keep_path) if keep_path else None
    if scope in ("slice", "neighbours") and slice_index is None:
        slice_index = axial_index(volume, point)
    result = refiner.refine(
        volume,
        mask,
        steps,
        keep=keep,
        scope=scope,
        slice_index=slice_index,
        roi=roi,
        seed=seed,
        ensemble=ensemble,
        progress=context.progress_in("slices"),
        cancel=context.cancel,
        neighbours=neighbours,
        spread=spread,
    )
    refined_at = time.perf_counter()
    outputs = {"labels": str(target)}
    write_image(result.labels, target, overwrite=True, compress=False)
    if uncertainty_path and result.uncertainty is not None:
        write_image(result.uncertainty, uncertainty_path, overwrite=True, compress=False)
        outputs["uncertainty"] = str(uncertainty_path)
    labels = result.labels.array
    return JobOutcome(
        outputs=outputs,
        info={
            "model": loaded.card.id,
            "version": loaded.card.version,
            "device": str(torch_device),
            "cache_hit": hit,
            "steps": steps,
            "scope": scope,
            "slices": [int(z) for z in result.slices],
            "neighbours": neighbours,
            "spread": spread,
            "ensemble": ensemble,
            "changed": int((labels != mask.array).sum()),
            "kept": int((keep.array != 0).sum()) if keep is not None else 0,
            "labels_present": [int(v) for v in np.unique(labels) if v != 0],
            "seconds": {
                "load": round(loaded_at - started, 3),
                "refine": round(refined_at - loaded_at, 3),
                "total": round(time.perf_counter() - started, 3),
            },
        },
    )


class _EitherEvent(threading.Event):
    """An event that also counts as set when ``other`` (the user's cancel) is set."""

    def __init__(self, other: threading.Event) -> None:
        super().__init__()
        self._other = other

    def is_set(self) -> bool:
        return super().is_set() or self._other.is_set()


def _case_list(params: Mapping[str, Any], key: str, labelled: bool) -> list[tuple[str, str, Optional[str]]]:
    value = params.get(key) or []
    if not isinstance(value, list):
        raise ProtocolError(f"job parameter {key!r} must be a list of cases")
    cases = []
    for index, item in enumerate(value):
        ok = isinstance(item, dict) and isinstance(item.get("image"), str)
        if not ok or (labelled and not isinstance(item.get("label"), str)):
            what = "'image' and 'label' file paths" if labelled else "an 'image' file path"
            raise ProtocolError(f"job parameter {key!r} item {index} must be an object with {what}")
        case_id = str(item.get("id") or f"{key}-{index + 1}")
        cases.append((case_id, item["image"], item.get("label") if labelled else None))
    return cases


def _load_finetune_cases(
    labelled: list[tuple[str, str, Optional[str]]],
    unlabelled: list[tuple[str, str, Optional[str]]],
    folder: Optional[str],
    card: Any,
    context: JobContext,
) -> tuple[list[Any], list[Any]]:
    """(labelled items, unlabelled items) read from disk; labels outside the card's table are refused."""
    import numpy as np

    from ..io import read_image
    from ..progress import check_cancelled
    from ..training.datasets import Case, discover_cases, load_case
    from ..volume import Volume

    folder_cases = discover_cases(folder, require_labels=False) if folder else []
    total = len(labelled) + len(unlabelled) + len(folder_cases)
    known = {label.value for label in card.labels}
    table = ", ".join(f"{label.value} {label.name}" for label in card.labels)
    items: list[Any] = []
    extra: list[Any] = []
    for case_id, image_path, label_path in labelled:
        check_cancelled(context.cancel)
        context.progress(len(items), total, "loading data", "cases")
        image = read_image(image_path)
        label = read_image(label_path)  # type: ignore[arg-type]
        unknown = {int(v) for v in np.unique(label.array)} - known - {0}
        if unknown:
            raise InputError(
                f"case {case_id}: label value(s) {sorted(unknown)} are not in model {card.id!r}'s label table ({table})"
            )
        if label.shape != image.shape or not label.grid.same_as(image.grid, atol=1e-3):
            raise InputError(f"case {case_id}: the segmentation's grid differs from its image's")
        items.append((case_id, image, Volume.on_grid(label.array, image.grid)))
    for case_id, image_path, _ in unlabelled:
        check_cancelled(context.cancel)
        context.progress(len(items) + len(extra), total, "loading data", "cases")
        extra.append((case_id, read_image(image_path), None))
    for case in folder_cases:
        check_cancelled(context.cancel)
        context.progress(len(items) + len(extra), total, "loading data", "cases")
        image, _ = load_case(Case(case.id, case.image, None, case.hdf5))
        extra.append((f"folder:{case.id}", image, None))
    context.progress(total, total, "loading data", "cases")
    return items, extra


def _time_finetuning(options: Any, measure: int, context: JobContext, started: float) -> JobOutcome:
    """Run ``measure`` + 1 iterations in a scratch folder and report how long they took (nothing is kept)."""
    import tempfile

    from ..errors import Cancelled
    from ..inference.device import resolve_device
    from ..models import ModelRegistry
    from ..training.finetune import finetune_model

    marks: dict[Any, float] = {}
    stop = _EitherEvent(context.cancel)

    def progress(done: int, total: int, stage: str) -> None:
        now = time.perf_counter()
        if stage == "training":
            marks.setdefault(done, now)
            context.progress(min(done, measure + 1), measure + 1, "timing", "iterations")
            if done >= measure + 1:
                stop.set()
        else:
            marks.setdefault(stage, now)
            context.progress(done, total, stage, "cases" if stage == "loading data" else "")

    options.iterations = 1_000_000  # validations come every iterations // 5: none while timing
    with tempfile.TemporaryDirectory(prefix="medsegsuite-timing-") as scratch:
        options.output = Path(scratch) / "timing"
        options.model_id = "timing"
        try:
            finetune_model(options, ModelRegistry(user_dir=scratch), progress, stop)
        except Cancelled:
            if context.cancel.is_set():
                raise
    first, last, parent = marks.get(1), marks.get(measure + 1), marks.get("measuring the parent")
    if first is None or last is None or parent is None:
        raise InputError("timing the finetuning failed: the training did not start")
    per_iteration = (last - first) / measure
    return JobOutcome(
        outputs={},
        info={
            "measured": True,
            "device": str(resolve_device(options.device)),
            "iterations_timed": measure,
            "seconds_per_iteration": round(per_iteration, 4),
            "seconds_per_validation": round(max(0.0, first - parent - per_iteration), 3),
            "seconds_setup": round(parent - started, 3),
            "labelled": len(options.labelled),
            "unlabelled": len(options.unlabelled or []),
        },
    )


def finetune_job(params: Mapping[str, Any], context: JobContext) -> JobOutcome:
    """Finetune ``params['parent']`` on the given cases (or time it); see the module docstring for the parameters."""
    import json

    from ..errors import Cancelled
    from ..models import ModelRegistry
    from ..training.finetune import FinetuneOptions, finetune_model, next_finetune_id

    parent = _param(params, "parent", str)
    labelled = _case_list(params, "labelled", True)
    unlabelled = _case_list(params, "unlabelled", False)
    folder = _param(params, "unlabelled_folder", str, None)
    iterations = _param(params, "iterations", int, 200)
    device = _param(params, "device", str, "auto")
    held_out = _param(params, "held_out", int, None)
    seed = _param(params, "seed", int, 0)
    batch_size = _param(params, "batch_size", int, None)
    lr = _param(params, "lr", (int, float), None)
    resume = _param(params, "resume", bool, False)
    measure = _param(params, "measure", int, 0)
    if not labelled:
        raise InputError("finetuning needs at least one labelled case (an image with its segmentation)")
    if iterations < 1:
        raise ProtocolError(f"job parameter 'iterations' must be at least 1, got {iterations}")
    if measure < 0 or (measure and resume):
        raise ProtocolError("job parameter 'measure' must be 0 or more, and cannot be combined with 'resume'")

    started = time.perf_counter()
    registry = ModelRegistry()
    entry = registry.resolve(parent)
    card = entry.card
    items, extra = _load_finetune_cases(labelled, unlabelled, folder, card, context)
    options = FinetuneOptions(
        parent=str(entry.directory),
        labelled=items,
        unlabelled=extra or None,
        iterations=iterations,
        batch_size=batch_size,
        lr=float(lr) if lr is not None else None,
        device=device,
        seed=seed,
        held_out=held_out,
    )
    if measure:
        return _time_finetuning(options, measure, context, started)

    options.model_id = model_id = next_finetune_id(card.id, registry, resume=resume)
    workdir = registry.user_dir / f"{model_id}.training"
    if resume:
        try:
            history = json.loads((workdir / "log.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            history = []
        for record in history if isinstance(history, list) else []:
            context.log({**record, "replayed": True})
    reached = {"iteration": 0}

    def progress(done: int, total: int, stage: str) -> None:
        if stage == "training":
            reached["iteration"] = done
            context.progress(done, total, stage, "iterations")
        else:
            context.progress(done, total, stage, "cases" if stage == "loading data" else "")

    try:
        new = finetune_model(options, registry, progress, context.cancel, resume=resume, on_log=context.log)
    except Cancelled:
        if (workdir / "checkpoint.pt").is_file():
            context.log({"event": "checkpoint", "model": model_id, "iteration": reached["iteration"]})
        raise
    metrics = {m["name"]: m["value"] for m in new.card.metrics}
    facts = dict(new.card.training.get("finetune", {}))
    return JobOutcome(
        outputs={"model": str(new.directory)},
        info={
            "model": new.card.id,
            "version": new.card.version,
            "directory": str(new.directory),
            "parent": card.id,
            "device": str(new.card.training.get("device", device)),
            "iterations": iterations,
            "resumed": resume,
            "labelled": len(items),
            "unlabelled": len(extra),
            "dice_before": metrics.get("dice_before_finetuning"),
            "dice_after": metrics.get("dice"),
            "split": facts.get("split", ""),
            "verdict": facts.get("verdict"),
            "selected": bool((facts.get("verdict") or {}).get("selected", False)),
            "seconds": {"total": round(time.perf_counter() - started, 3)},
        },
    )


def default_handlers() -> dict[str, JobHandler]:
    """The job kinds this worker runs, by name."""
    return {"segment": segment_job, "refine": refine_job, "finetune": finetune_job}
