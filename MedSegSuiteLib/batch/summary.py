"""The summary of a batch: one row per case as CSV (for a spreadsheet) and JSON (for programs);
shards write their own summaries, which :func:`merge_summaries` joins into one."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import InputError
from ..io.atomic import atomic_output
from .runner import CaseOutcome

__all__ = ["merge_summaries", "summary_paths", "write_summary"]

_SHARD_FILE = re.compile(r"^summary-shard-(\d+)-of-(\d+)\.json$")
COLUMNS = ("case", "status", "seconds", "outputs", "voxels", "dice", "disagreement", "warnings", "error", "input")


def summary_paths(folder: Path, shard: Optional[tuple[int, int]] = None) -> tuple[Path, Path]:
    """The CSV and JSON summary files of a run (a shard ``(I, N)`` gets its own pair)."""
    stem = "summary" if shard is None else f"summary-shard-{shard[0]}-of-{shard[1]}"
    return folder / f"{stem}.csv", folder / f"{stem}.json"


def _cell(mapping: dict[str, Any], single: bool) -> str:
    if single and len(mapping) == 1:
        value = next(iter(mapping.values()))
        return _cell(value, False) if isinstance(value, dict) else str(value)
    parts = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
            parts.append(f"{key}: {value}")
        else:
            parts.append(f"{key}={'' if value is None else (round(value, 4) if isinstance(value, float) else value)}")
    return "; ".join(parts)


def _rows(records: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    rows = []
    for record in records:
        single = len(record.get("outputs", {})) <= 1
        rows.append(
            {
                "case": record["id"],
                "status": record["status"],
                "seconds": f"{record.get('seconds', 0):.2f}",
                "outputs": _cell(record.get("outputs", {}), single),
                "voxels": _cell({k: v for k, v in record.get("voxels", {}).items()}, single),
                "dice": _cell(record.get("dice", {}), False),
                "disagreement": record.get("disagreement", ""),
                "warnings": " | ".join(record.get("warnings", [])),
                "error": record.get("error", ""),
                "input": record.get("input", ""),
            }
        )
    return rows


def _write(records: Sequence[dict[str, Any]], facts: dict[str, Any], csv_path: Path, json_path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_rows(records))
    counts = {status: sum(r["status"] == status for r in records) for status in ("done", "skipped", "failed")}
    document = {**facts, "counts": counts, "cases": list(records)}
    with atomic_output(csv_path, overwrite=True) as tmp:
        Path(tmp).write_text(text.getvalue(), encoding="utf-8")
    with atomic_output(json_path, overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def write_summary(
    outcomes: Sequence[CaseOutcome],
    folder: Path,
    models: Sequence[str],
    shard: Optional[tuple[int, int]] = None,
) -> tuple[Path, Path]:
    """Write the summary of ``outcomes`` (CSV and JSON, each atomically) into ``folder``; returns both paths."""
    csv_path, json_path = summary_paths(folder, shard)
    facts = {"models": list(models), "shard": None if shard is None else {"index": shard[0], "count": shard[1]}}
    _write([o.to_dict() for o in outcomes], facts, csv_path, json_path)
    return csv_path, json_path


def merge_summaries(folder: Path) -> tuple[Path, Path, dict[str, int]]:
    """Join the shard summaries in ``folder`` into ``summary.csv`` and ``summary.json``.

    Raises InputError when there are none, when they come from different shard counts or
    models, or when a shard is missing (it names which to run). Returns both paths and the
    status counts.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give the output folder the shards wrote into")
    found: dict[int, dict[str, Any]] = {}
    counts: set[int] = set()
    for path in sorted(folder.iterdir()):
        match = _SHARD_FILE.match(path.name)
        if not match:
            continue
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise InputError(f"{path} is not valid JSON ({error}); run that shard again") from None
        found[int(match.group(1))] = document
        counts.add(int(match.group(2)))
    if not found:
        raise InputError(f"{folder} holds no shard summaries (summary-shard-I-of-N.json); run the shards first")
    if len(counts) != 1:
        raise InputError(f"{folder} holds summaries of different shard counts ({sorted(counts)}); keep one run's")
    total = counts.pop()
    missing = sorted(set(range(total)) - set(found))
    if missing:
        raise InputError(
            f"shard(s) {', '.join(f'{i}/{total}' for i in missing)} have no summary in {folder}; run them, then merge"
        )
    models = {tuple(document.get("models", [])) for document in found.values()}
    if len(models) != 1:
        raise InputError(f"the shards in {folder} used different models; run them all with the same -m")
    # shard I holds the cases I, I + N, I + 2N... of the common order: interleave them back into it
    placed = [(index + j * total, record) for index in found for j, record in enumerate(found[index]["cases"])]
    records = [record for _, record in sorted(placed, key=lambda item: item[0])]
    csv_path, json_path = summary_paths(folder)
    facts = {"models": list(models.pop()), "shard": None, "merged_shards": total}
    _write(records, facts, csv_path, json_path)
    status = {s: sum(r["status"] == s for r in records) for s in ("done", "skipped", "failed")}
    return csv_path, json_path, status
