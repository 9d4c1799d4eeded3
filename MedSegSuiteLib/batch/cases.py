"""The cases of a batch: from a folder, a list file or a CSV, in a stable order, and a shard of them."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from ..errors import InputError
from ..io.atomic import compound_suffix

__all__ = ["BatchCase", "find_cases", "is_batch_input", "parse_shard", "select_shard"]

IMAGE_SUFFIXES = (
    ".nii",
    ".nii.gz",
    ".nrrd",
    ".mha",
    ".mhd",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".bmp",
    ".gif",
)
LIST_SUFFIXES = (".txt", ".lst", ".list", ".csv")
_PATH_COLUMNS = ("image", "input", "path", "file")
_ID_COLUMNS = ("id", "case", "case_id")


@dataclass(frozen=True)
class BatchCase:
    """One case of a batch: its id (names its outputs) and its image file or DICOM series folder."""

    id: str
    path: Path


def _is_dicom_file(path: Path) -> bool:
    if compound_suffix(path) in (".dcm", ".dicom", ".ima"):
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _holds_dicom(folder: Path) -> bool:
    return any(p.is_file() and _is_dicom_file(p) for p in folder.iterdir())


def is_batch_input(source: Union[str, Path]) -> bool:
    """Whether ``source`` names many cases: a list or CSV file, or a folder that is not itself a DICOM series."""
    source = Path(source)
    if source.is_file():
        return compound_suffix(source) in LIST_SUFFIXES
    if source.is_dir():
        try:
            return not _holds_dicom(source)
        except OSError:
            return False
    return False


def _case_id(path: Path) -> str:
    suffix = compound_suffix(path) if path.is_file() else ""
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def _from_folder(folder: Path) -> list[BatchCase]:
    """Every image file of ``folder`` and every sub-folder holding a DICOM series, sorted by name."""
    cases = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith("."):
            continue
        if path.is_file() and compound_suffix(path) in IMAGE_SUFFIXES:
            cases.append(BatchCase(_case_id(path), path))
        elif path.is_dir() and _holds_dicom(path):
            cases.append(BatchCase(path.name, path))
    if not cases:
        raise InputError(
            f"{folder} holds no images (NIfTI, NRRD, MetaImage, photos) and no DICOM series folders; "
            "give a folder of images, a list file or a CSV"
        )
    return cases


def _resolve(entry: str, base: Path) -> Path:
    path = Path(entry.strip())
    return path if path.is_absolute() else base / path


def _from_list(listing: Path) -> list[BatchCase]:
    """One path per line (relative to the list's folder); blank lines and ``#`` comments are skipped."""
    lines = listing.read_text(encoding="utf-8").splitlines()
    paths = [_resolve(line, listing.parent) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [BatchCase(_case_id(path), path) for path in paths]


def _from_csv(table: Path) -> list[BatchCase]:
    """A CSV with a header: an ``image`` (or ``input``/``path``/``file``) column and an optional ``id`` column."""
    with open(table, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise InputError(f"{table} has no rows; give a header line (image[,id]) and one line per case")
    columns = {name.strip().lower(): name for name in rows[0] if name is not None}
    path_column = next((columns[c] for c in _PATH_COLUMNS if c in columns), None)
    if path_column is None:
        raise InputError(f"{table} has no 'image' column; name the column of image paths 'image' (and ids 'id')")
    id_column = next((columns[c] for c in _ID_COLUMNS if c in columns), None)
    cases = []
    for number, row in enumerate(rows, start=2):
        entry = (row.get(path_column) or "").strip()
        if not entry:
            raise InputError(f"{table} line {number}: the image path is empty")
        path = _resolve(entry, table.parent)
        case_id = (row.get(id_column) or "").strip() if id_column else ""
        cases.append(BatchCase(case_id or _case_id(path), path))
    return cases


def find_cases(source: Union[str, Path]) -> list[BatchCase]:
    """The cases named by ``source`` in a stable order (a folder sorted by name, a list or CSV in its order).

    A DICOM series folder counts as one case. Raises InputError for an empty source or
    two cases with the same id (their outputs would collide).
    """
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source} does not exist; give an image, a folder of images, a list file or a CSV")
    if source.is_dir():
        cases = _from_folder(source)
    elif compound_suffix(source) == ".csv":
        cases = _from_csv(source)
    elif compound_suffix(source) in LIST_SUFFIXES:
        cases = _from_list(source)
    else:
        cases = [BatchCase(_case_id(source), source)]
    if not cases:
        raise InputError(f"{source} names no cases")
    seen: dict[str, Path] = {}
    for case in cases:
        if case.id in seen:
            raise InputError(
                f"two cases are called {case.id!r} ({seen[case.id]} and {case.path}); their outputs would "
                "collide: give ids in a CSV id column or rename one"
            )
        if not case.id or "/" in case.id or case.id in (".", ".."):
            raise InputError(f"{case.id!r} cannot name an output file; give the case another id")
        seen[case.id] = case.path
    return cases


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N) as ``(I, N)``; InputError otherwise."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise InputError(f"--shard takes I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got {text!r}")
    return i, n


def select_shard(cases: Sequence[BatchCase], index: int, count: int) -> list[BatchCase]:
    """Every ``count``-th case starting at ``index`` (the shards of 0..count-1 cover every case once)."""
    return list(cases[index::count])
