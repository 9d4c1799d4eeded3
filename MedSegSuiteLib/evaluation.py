"""Evaluating segmentations: predicted label maps against reference ones, or a model on labelled cases.

Metrics are computed per case and per label at each case's own resolution and
spacing (see :mod:`MedSegSuiteLib.training.metrics`), then averaged over cases and
labels. A label absent from both the prediction and the reference of a case says
nothing about the model: it is recorded as ``absent`` with no Dice, IoU or HD95 and
left out of the means (it does not count as a perfect Dice). Reference cases
without a prediction are listed in :attr:`Evaluation.missing`. Mask images saved
as 0/255 are read as 0/1.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .errors import InputError
from .inference import Predictor
from .progress import ProgressCallback, check_cancelled, report
from .training.datasets import Case, discover_cases, load_case
from .training.metrics import case_metrics, summarize
from .volume import Volume

__all__ = ["Evaluation", "evaluate_cases", "evaluate_folders", "evaluate_model"]


@dataclass
class Evaluation:
    """Per-case and mean metrics. ``cases`` maps case id -> label value -> {dice, iou, hd95}."""

    cases: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    label_names: dict[int, str] = field(default_factory=dict)
    #: reference case ids that had no prediction (not in the means)
    missing: list[str] = field(default_factory=list)
    #: prediction ids that had no reference (not in the means)
    unmatched: list[str] = field(default_factory=list)

    @property
    def values(self) -> list[int]:
        return sorted({v for case in self.cases.values() for v in case})

    def mean(self) -> dict[str, Any]:
        """Means over all cases and labels, and per label (``per_label`` keyed by value)."""
        result: dict[str, Any] = dict(summarize(list(self.cases.values())))
        result["per_label"] = {v: summarize([{v: c[v]} for c in self.cases.values() if v in c]) for v in self.values}
        result["cases"] = len(self.cases)
        result["missing"] = len(self.missing)
        return result

    def to_json(self) -> dict[str, Any]:
        mean = self.mean()
        return {
            "mean": {k: v for k, v in mean.items() if k != "per_label"},
            "per_label": {
                str(v): {"name": self.label_names.get(v, f"Label {v}"), **m} for v, m in mean["per_label"].items()
            },
            "cases": {cid: {str(v): m for v, m in labels.items()} for cid, labels in self.cases.items()},
            "missing_predictions": list(self.missing),
            "predictions_without_reference": list(self.unmatched),
        }

    def table(self) -> str:
        """A plain-text table: one row per case, then the mean."""
        columns = [f"{self.label_names.get(v, v)} {m}" for v in self.values for m in ("Dice", "HD95")]
        rows = []
        for cid, labels in self.cases.items():
            cells = []
            for v in self.values:
                metrics = labels.get(v, {})
                if metrics.get("absent"):
                    cells += ["absent", "-"]
                else:
                    cells += [_fmt(metrics.get("dice")), _fmt(metrics.get("hd95"), inf="inf")]
            rows.append([cid, *cells])
        mean = self.mean()["per_label"]
        rows.append(["MEAN", *[c for v in self.values for c in (_fmt(mean[v]["dice"]), _fmt(mean[v]["hd95"]))]])
        widths = [max(len(r[i]) for r in rows + [["case", *columns]]) for i in range(len(columns) + 1)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(["case", *columns], widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        return "\n".join(lines)


def _fmt(value: Optional[float], inf: str = "-") -> str:
    return inf if value is None else f"{value:.4f}"


def evaluate_cases(pairs: Sequence[tuple[str, Volume, Volume]], values: Sequence[int]) -> Evaluation:
    """Metrics of (id, prediction, reference) label maps; each pair must share a grid."""
    result = Evaluation()
    for case_id, prediction, truth in pairs:
        if prediction.shape != truth.shape or not prediction.grid.same_as(truth.grid, atol=1e-3):
            raise InputError(
                f"case {case_id}: the prediction's grid ({prediction.grid.describe()}) differs from the reference's "
                f"({truth.grid.describe()})"
            )
        metrics = case_metrics(prediction.array, truth.array, values, truth.spacing)
        for value in values:
            if not np.any(prediction.array == value) and not np.any(truth.array == value):
                metrics[int(value)] = {"dice": None, "iou": None, "hd95": None, "absent": True}
        result.cases[case_id] = metrics
    return result


def _binary_mask_as_one(volume: Volume) -> Volume:
    """A label map holding only 0 and 255 (a mask saved as an 8-bit image) as 0/1."""
    values = np.unique(volume.array)
    if values.size and values.max() == 255 and set(values.tolist()) <= {0, 255}:
        return volume.with_array((volume.array == 255).astype(np.uint8))
    return volume


def _refuse_file(path: Path, role: str) -> None:
    from .io import IMAGE_SUFFIXES
    from .io.atomic import compound_suffix

    if path.is_file() and compound_suffix(path) in IMAGE_SUFFIXES + (".seg.nrrd", ".h5"):
        raise InputError(
            f"{path} is a file: evaluate compares two folders, PRED_DIR GT_DIR, matching files by name; put the "
            f"{role} in a folder of its own (or give a list file)"
        )


def evaluate_folders(
    predictions: Union[str, Path], references: Union[str, Path], values: Optional[Sequence[int]] = None
) -> Evaluation:
    """Compare label maps in ``predictions`` with the references they share a name with.

    ``references`` is anything :func:`discover_cases` reads as labelled data (its
    labels are used) or a folder of label maps. Label values default to those present
    in the references.
    """
    _refuse_file(Path(predictions), "prediction")
    _refuse_file(Path(references), "reference")
    predicted = {c.id: c for c in discover_cases(predictions, require_labels=False)}
    reference_root = Path(references)
    try:
        reference_cases = discover_cases(reference_root, require_labels=True)
        refs = {c.id: c.label for c in reference_cases if not c.hdf5}
    except InputError:
        refs = {c.id: c.image for c in discover_cases(reference_root, require_labels=False)}
    shared = sorted(set(predicted) & set(refs))
    if not shared:
        raise InputError(f"no file in {predictions} has the name of a reference in {references}")
    pairs = []
    for case_id in shared:
        _, prediction = load_case(Case(case_id, predicted[case_id].image, predicted[case_id].image))
        _, truth = load_case(Case(case_id, refs[case_id], refs[case_id]))
        pairs.append((case_id, _binary_mask_as_one(prediction), _binary_mask_as_one(truth)))
    if values is None:
        values = sorted({int(v) for _, _, t in pairs for v in np.unique(t.array) if v})
    result = evaluate_cases(pairs, values)
    result.missing = sorted(set(refs) - set(predicted))
    result.unmatched = sorted(set(predicted) - set(refs))
    return result


def evaluate_model(
    predictor: Predictor,
    cases: Sequence[tuple[str, Volume, Volume]],
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    on_prediction: Optional[Callable[[str, Volume], None]] = None,
) -> Evaluation:
    """Run ``predictor`` on (id, image, reference labels) cases and compare at each case's own resolution.

    ``on_prediction(case_id, labels)`` receives each predicted label map (e.g. to save it).
    """
    values = [label.value for label in predictor.card.labels]
    pairs = []
    for index, (case_id, image, truth) in enumerate(cases):
        check_cancelled(cancel)
        report(progress, index, len(cases), "evaluating")
        labels = predictor.predict(image, cancel=cancel).labels
        if on_prediction is not None:
            on_prediction(case_id, labels)
        pairs.append((case_id, labels, _binary_mask_as_one(truth)))
    report(progress, len(cases), len(cases), "evaluating")
    result = evaluate_cases(pairs, values)
    result.label_names = {label.value: label.name for label in predictor.card.labels}
    return result
