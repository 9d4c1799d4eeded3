"""Running one or several loaded models over many cases: outputs written atomically, complete cases
skipped on a rerun, a failing case recorded with its reason while the others go on."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import InputError
from ..io.atomic import atomic_outputs, compound_suffix
from ..models.card import Label, ModelCard
from ..progress import ProgressCallback, report
from ..volume import Volume
from .cases import BatchCase

__all__ = ["BatchSegmenter", "CaseOutcome", "check_resampled_size", "label_file_for", "write_labels"]

log = logging.getLogger(__name__)
TABLE_SUFFIX = ".labels.json"
DISAGREEMENT = "disagreement"
_DISAGREEMENT_LABELS = (Label(1, "Models disagree", (255, 0, 0)),)


def check_resampled_size(volume: Volume, card: ModelCard, roi: Any = None, overlap: Optional[float] = None) -> None:
    """Refuse, before any work, an image whose size at the model's spacing would not fit in memory
    (an absurd spacing in a header can turn a small image into billions of voxels and windows)."""
    from ..memory import check_fits

    if card.dims != 3 or card.input.spacing is None:
        return
    size_xyz = [b - a for a, b in zip(roi.start, roi.stop)] if roi is not None else list(volume.shape[::-1])
    shape = [max(1, math.ceil(n * s / t)) for n, s, t in zip(size_xyz, volume.spacing, card.input.spacing)]
    voxels = float(math.prod(shape))
    patch = card.input.patch_xyz or (1, 1, 1)
    overlap = card.inference.overlap if overlap is None else overlap
    windows = math.prod(math.ceil(n / max(1, int(p * (1 - overlap)))) for n, p in zip(shape, patch))
    needed = voxels * (4 * card.input.channels + 2 * card.output_channels + 2)  # data, accumulator, labels
    check_fits(
        needed,
        f"segmenting this image at the model's spacing of {'x'.join(f'{v:g}' for v in card.input.spacing)} mm "
        f"({' x '.join(map(str, shape))} voxels, {windows} windows)",
        "check the voxel spacing in the image's header, segment an ROI, or use a machine with more memory",
    )


def write_labels(
    labels: Volume,
    labels_table: Sequence[Label],
    path: Path,
    table_path: Optional[Path],
    source: str = "a segmentation result",
    notes: Sequence[str] = (),
) -> None:
    """Write a result label map: a ``.seg.nrrd`` with the labels' names, colours and terminology, or a
    label map with its JSON label table at ``table_path`` (so ``export`` keeps the names later);
    ``notes`` (e.g. the input did not fit the model) go into the label table."""
    from ..io import write_image

    if compound_suffix(path) == ".seg.nrrd":
        from ..io.seg_nrrd import write_seg_nrrd
        from ..io.segmentation import Segmentation

        segmentation = Segmentation.from_label_map(labels, labels_table, source=source)
        write_seg_nrrd(segmentation, path, overwrite=True)
        return
    write_image(labels, path, overwrite=True)
    if table_path is not None:
        from ..io.label_table import write_label_table

        write_label_table(labels_table, table_path, overwrite=True, notes=notes)


def label_file_for(folder: Path, case: BatchCase, two_d: bool) -> Path:
    """Where a case's label map goes in ``folder``: ``<id>.nii.gz``, or ``<id>.png`` for a 2D photo."""
    photo = compound_suffix(case.path) in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
    return folder / f"{case.id}{'.png' if two_d or photo else '.nii.gz'}"


def _table_for(label_map: Path) -> Path:
    suffix = compound_suffix(label_map)
    return label_map.with_name(label_map.name[: len(label_map.name) - len(suffix)] + TABLE_SUFFIX)


def dice(a: np.ndarray, b: np.ndarray, values: Sequence[int]) -> Optional[float]:
    """Mean Dice of two label arrays over the label ``values`` present in either (None if none is)."""
    scores = []
    for value in values:
        x, y = a == value, b == value
        total = int(x.sum()) + int(y.sum())
        if total:
            scores.append(2.0 * int((x & y).sum()) / total)
    return float(np.mean(scores)) if scores else None


@dataclass
class CaseOutcome:
    """What happened to one case: ``status`` is ``done``, ``skipped`` (complete outputs of an earlier run
    kept) or ``failed`` (``error`` says why); ``voxels`` and ``outputs`` are keyed by model id, ``dice``
    by model pair ``"a vs b"``."""

    id: str
    input: str
    status: str
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    voxels: dict[str, dict[str, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    dice: dict[str, Optional[float]] = field(default_factory=dict)
    disagreement: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _WarningCollector(logging.Handler):
    """Collects the library's warnings (log records and ``warnings.warn``) issued while one case runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class BatchSegmenter:
    """Segments cases with models loaded once.

    Args:
        predictors: one :class:`~MedSegSuiteLib.inference.Predictor` per model (ids unique).
        output: the output folder; with several models each writes into ``output/<model id>/``
            and the disagreement maps go to ``output/disagreement/``.
        overwrite: recompute cases whose outputs are already complete (else they are skipped).
        progress: ``(done, total, stage)`` for the cases (stage ``cases``).
        window_progress: ``(done, total, stage)`` within a case (slices or windows).
        on_case: called with each :class:`CaseOutcome` as soon as it is known.
    """

    def __init__(
        self,
        predictors: Sequence[Any],
        output: Path,
        overwrite: bool = False,
        progress: Optional[ProgressCallback] = None,
        window_progress: Optional[ProgressCallback] = None,
        on_case: Optional[Callable[[CaseOutcome], None]] = None,
    ) -> None:
        if not predictors:
            raise InputError("give at least one model")
        ids = [p.card.id for p in predictors]
        if len(set(ids)) != len(ids):
            raise InputError(f"a model is named twice ({', '.join(ids)}); give each model once")
        self.predictors = list(predictors)
        self.output = Path(output)
        self.overwrite = overwrite
        self.progress, self.window_progress, self.on_case = progress, window_progress, on_case
        self.compare = len(self.predictors) > 1

    def folder_for(self, model_id: str) -> Path:
        """The folder a model's results go to."""
        return self.output / model_id if self.compare else self.output

    def _targets(self, case: BatchCase) -> dict[str, Path]:
        two_d = all(p.card.dims == 2 for p in self.predictors)
        targets = {p.card.id: label_file_for(self.folder_for(p.card.id), case, two_d) for p in self.predictors}
        if self.compare:
            targets[DISAGREEMENT] = label_file_for(self.output / DISAGREEMENT, case, two_d)
        return targets

    def run(self, cases: Sequence[BatchCase]) -> list[CaseOutcome]:
        """Segment every case (KeyboardInterrupt stops the run; written outputs stay complete)."""
        for folder in {self.folder_for(p.card.id) for p in self.predictors} | (
            {self.output / DISAGREEMENT} if self.compare else set()
        ):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise InputError(f"cannot create {folder}: {error.strerror or error}; choose another folder") from None
        outcomes = []
        report(self.progress, 0, len(cases), "cases")
        for number, case in enumerate(cases, start=1):
            outcome = self.segment_case(case)
            outcomes.append(outcome)
            report(self.progress, number, len(cases), "cases")
            if self.on_case is not None:
                self.on_case(outcome)
        return outcomes

    def segment_case(self, case: BatchCase) -> CaseOutcome:
        """One case, never raising for a bad case: its outcome says what happened."""
        targets = self._targets(case)
        started = time.monotonic()
        if not self.overwrite and all(path.is_file() for path in targets.values()):
            try:
                outcome = self._from_outputs(case, targets)
            except Exception as error:  # an unreadable earlier output: compute the case again
                log.warning("recomputing %s: its earlier output cannot be read (%s)", case.id, error)
            else:
                outcome.seconds = round(time.monotonic() - started, 3)
                return outcome
        collector = _WarningCollector()
        library = logging.getLogger("MedSegSuiteLib")
        library.addHandler(collector)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outcome = self._compute(case, targets)
            outcome.warnings += collector.messages + [str(w.message) for w in caught]
        except Exception as error:  # one bad case never stops the others
            reason = str(error) if isinstance(error, (InputError, OSError)) or str(error) else type(error).__name__
            if not isinstance(error, InputError) and type(error).__name__ not in reason:
                reason = f"{type(error).__name__}: {reason}"
            if isinstance(error, MemoryError):
                reason = "ran out of memory; use a machine with more memory or a smaller --batch-size"
            outcome = CaseOutcome(case.id, str(case.path), "failed", error=reason, warnings=collector.messages)
            log.warning("case %s failed: %s", case.id, reason)
        finally:
            library.removeHandler(collector)
        outcome.seconds = round(time.monotonic() - started, 3)
        return outcome

    def _compute(self, case: BatchCase, targets: dict[str, Path]) -> CaseOutcome:
        from ..inference.fit_check import fit_warnings
        from ..io import read_image
        from ..io.photos import prepare_photo
        from ..preprocessing import check_channels

        volume = read_image(case.path)
        for predictor in self.predictors:  # before any model runs, so a refused case writes nothing
            check_channels(volume.channels, predictor.card.input.channels, model=f"model {predictor.card.id!r}")
        outcome = CaseOutcome(case.id, str(case.path), "done")
        results: dict[str, np.ndarray] = {}
        reference: Optional[Volume] = None
        for predictor in self.predictors:
            card = predictor.card
            check_resampled_size(volume, card)
            shown, put_back, changes = prepare_photo(case.path, volume, card.input.normalization)
            outcome.warnings += changes
            fit = fit_warnings(shown, card)
            outcome.warnings += [f"{card.id}: {w}" for w in fit] if self.compare else fit
            labels = put_back(predictor.predict(shown, progress=self.window_progress).labels)
            target = targets[card.id]
            table = None if compound_suffix(target) == ".seg.nrrd" else _table_for(target)
            paths = [target] + ([table] if table else [])
            with atomic_outputs(paths, overwrite=True) as temps:
                write_labels(
                    labels, card.labels, temps[0], temps[1] if table else None, f"the result of {card.id}", fit
                )
            outcome.outputs[card.id] = str(target)
            outcome.voxels[card.id] = {label.name: int((labels.array == label.value).sum()) for label in card.labels}
            results[card.id] = labels.array
            reference = labels
        if self.compare and reference is not None:
            self._compare(outcome, results, reference, targets[DISAGREEMENT])
        return outcome

    def _compare(self, outcome: CaseOutcome, results: dict[str, np.ndarray], reference: Volume, target: Path) -> None:
        values = sorted({label.value for p in self.predictors for label in p.card.labels if label.value != 0})
        differ = np.zeros(reference.array.shape, dtype=bool)
        for a, b in itertools.combinations(results, 2):
            outcome.dice[f"{a} vs {b}"] = dice(results[a], results[b], values)
            differ |= results[a] != results[b]
        mask = dataclasses.replace(reference, array=differ.astype(np.uint8))
        with atomic_outputs([target, _table_for(target)], overwrite=True) as temps:
            write_labels(mask, _DISAGREEMENT_LABELS, temps[0], temps[1])
        outcome.disagreement = str(target)
        outcome.voxels[DISAGREEMENT] = {_DISAGREEMENT_LABELS[0].name: int(differ.sum())}

    def _from_outputs(self, case: BatchCase, targets: dict[str, Path]) -> CaseOutcome:
        """The outcome of a case an earlier run completed, read back from its outputs."""
        from ..export import read_label_map

        outcome = CaseOutcome(case.id, str(case.path), "skipped")
        results = {}
        for predictor in self.predictors:
            card = predictor.card
            labels = read_label_map(targets[card.id]).array
            outcome.outputs[card.id] = str(targets[card.id])
            outcome.voxels[card.id] = {label.name: int((labels == label.value).sum()) for label in card.labels}
            results[card.id] = labels
        if self.compare:
            values = sorted({label.value for p in self.predictors for label in p.card.labels if label.value != 0})
            for a, b in itertools.combinations(results, 2):
                outcome.dice[f"{a} vs {b}"] = dice(results[a], results[b], values)
            differ = read_label_map(targets[DISAGREEMENT]).array
            outcome.disagreement = str(targets[DISAGREEMENT])
            outcome.voxels[DISAGREEMENT] = {_DISAGREEMENT_LABELS[0].name: int((differ != 0).sum())}
        return outcome
