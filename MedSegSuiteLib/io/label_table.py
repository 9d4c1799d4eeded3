"""The JSON label table written beside exported label maps, and Slicer's terminology strings.

A label table lists, for every non-zero value of a label map, the segment's name, its
RGB colour (0-255) and its terminology codes, in the same shape as a model card's
``labels``::

    {
      "format": "medsegsuite-label-table",
      "version": 1,
      "labels": [
        {"value": 1, "name": "Liver", "color": [221, 130, 101],
         "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"],
                         "type": ["SCT", "10200004", "Liver"]},
         "terminology_string": "Segmentation category and type - DICOM master list~SCT^123037004^..."}
      ]
    }

:func:`read_label_table` also accepts a bare list of such entries (a model card's
``labels``) and a whole model card. ``terminology_string`` is informative; when
``terminology`` is absent it is parsed instead.

Slicer stores a segment's terminology as one string of seven ``~``-separated fields::

    contextName~category~type~typeModifier~anatomicContextName~region~regionModifier

where each code is ``codingScheme^codeValue^codeMeaning`` (``^^`` when absent).
:func:`terminology_string` builds it and :func:`parse_terminology` reads it back into
the card form ``{"category": [scheme, value, meaning], "type": [...], ...}``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

from ..errors import InputError
from ..jsonfile import read_json
from .atomic import atomic_output

if TYPE_CHECKING:
    from ..models.card import Label

__all__ = [
    "ANATOMIC_CONTEXT",
    "CODE_KEYS",
    "TABLE_FORMAT",
    "TERMINOLOGY_CONTEXT",
    "code_string",
    "label_table_to_json",
    "labels_from_json",
    "parse_terminology",
    "read_label_table",
    "terminology_string",
    "validate_terminology",
    "write_label_table",
]

log = logging.getLogger(__name__)
PathLike = Union[str, Path]

TABLE_FORMAT = "medsegsuite-label-table"
TABLE_VERSION = 1
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
#: Code keys of a terminology dict, in the order of Slicer's string.
CODE_KEYS = ("category", "type", "modifier", "region", "region_modifier")
#: Optional keys holding non-default context names (kept so Slicer's strings round-trip).
CONTEXT_KEYS = ("context", "anatomic_context")


def code_string(code: Optional[Sequence[str]]) -> str:
    """``scheme^value^meaning`` for a ``[scheme, value, meaning]`` code, ``^^`` for none."""
    if not code:
        return "^^"
    scheme, value, meaning = (str(part).replace("~", "-").replace("^", "-") for part in code)
    return f"{scheme}^{value}^{meaning}"


def _terminology_of(item: Any) -> Optional[Mapping[str, Any]]:
    if item is None or isinstance(item, Mapping):
        return item
    return getattr(item, "terminology", None)


def terminology_string(label: Any) -> str:
    """Slicer's terminology string for a label's codes; ``""`` when it has none.

    ``label`` is a :class:`~MedSegSuiteLib.models.card.Label`, a segment (anything with
    a ``terminology`` attribute) or a terminology dict itself. Context names are
    Slicer's DICOM master lists unless the dict carries ``context`` /
    ``anatomic_context`` (as :func:`parse_terminology` returns for other lists).
    """
    terminology = _terminology_of(label)
    if not terminology or not terminology.get("type"):
        return ""
    return "~".join(
        [
            str(terminology.get("context") or TERMINOLOGY_CONTEXT),
            code_string(terminology.get("category")),
            code_string(terminology.get("type")),
            code_string(terminology.get("modifier")),
            str(terminology.get("anatomic_context") or ANATOMIC_CONTEXT),
            code_string(terminology.get("region")),
            code_string(terminology.get("region_modifier")),
        ]
    )


def _parse_code(text: str, where: str, source: str) -> Optional[list[str]]:
    parts = text.split("^")
    if len(parts) != 3:
        raise InputError(f"{source}: terminology {where} {text!r} is not 'scheme^value^meaning'")
    if not parts[0] and not parts[1]:
        return None
    if not parts[0] or not parts[1]:
        raise InputError(f"{source}: terminology {where} {text!r} lacks its coding scheme or code value")
    return parts


def parse_terminology(string: str, source: str = "terminology string") -> dict[str, Any]:
    """The card-form terminology dict of a Slicer terminology string (``{}`` for an empty string).

    Returns ``category``, ``type`` and, when present, ``modifier``, ``region`` and
    ``region_modifier`` as ``[scheme, value, meaning]``, plus ``context`` /
    ``anatomic_context`` when they are not the DICOM master lists. Raises
    :class:`InputError` for a string that does not have Slicer's seven fields.
    """
    string = (string or "").strip()
    if not string:
        return {}
    fields = string.split("~")
    if len(fields) != 7:
        raise InputError(f"{source}: {string!r} has {len(fields)} '~'-separated fields; Slicer's terminology has 7")
    out: dict[str, Any] = {}
    for key, text in zip(CODE_KEYS, (fields[1], fields[2], fields[3], fields[5], fields[6])):
        code = _parse_code(text, key, source)
        if code is not None:
            out[key] = code
    if "type" not in out:
        return {}
    if fields[0] and fields[0] != TERMINOLOGY_CONTEXT:
        out["context"] = fields[0]
    if fields[4] and fields[4] != ANATOMIC_CONTEXT:
        out["anatomic_context"] = fields[4]
    return out


def validate_terminology(value: Any, where: str) -> Optional[dict[str, Any]]:
    """A clean copy of a card-form terminology dict, or InputError naming ``where`` and the bad key."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: terminology must be an object of codes, got {type(value).__name__}")
    out: dict[str, Any] = {}
    for key, code in value.items():
        if key in CONTEXT_KEYS:
            if not isinstance(code, str):
                raise InputError(f"{where}: terminology {key} must be a string")
            out[key] = code
            continue
        if key not in CODE_KEYS:
            raise InputError(f"{where}: unknown terminology key {key!r}; known: {', '.join(CODE_KEYS)}")
        if code is None:
            continue
        if (
            not isinstance(code, (list, tuple))
            or len(code) != 3
            or not all(isinstance(c, str) for c in code)
            or not code[0]
            or not code[1]
        ):
            raise InputError(f"{where}: terminology {key} must be [coding scheme, code value, meaning], got {code}")
        out[key] = list(code)
    if out and ("category" not in out or "type" not in out):
        raise InputError(f"{where}: terminology needs at least a category and a type code")
    return out or None


def _label_from_json(item: Any, index: int, source: str) -> Label:
    from ..models.card import Label

    where = f"{source}: labels[{index}]"
    if not isinstance(item, Mapping):
        raise InputError(f"{where} must be an object with value, name and color")
    value = item.get("value")
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise InputError(f"{where}: value must be an integer 1-65535 (0 is background), got {value!r}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{where}: name must be a non-empty string")
    color = item.get("color", item.get("colour"))
    if color is None:
        color = [128, 128, 128]
    if (
        not isinstance(color, (list, tuple))
        or len(color) != 3
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
    ):
        raise InputError(f"{where}: color must be three integers 0-255 (R, G, B), got {color!r}")
    terminology = item.get("terminology")
    if terminology is None and item.get("terminology_string"):
        terminology = parse_terminology(str(item["terminology_string"]), where) or None
    return Label(value, name.strip(), tuple(color), validate_terminology(terminology, where))  # type: ignore[arg-type]


def labels_from_json(data: Any, source: str = "label table") -> tuple[Label, ...]:
    """Validated labels from a label table object, a bare list of label entries, or a model card."""
    items = data.get("labels") if isinstance(data, Mapping) else data
    if not isinstance(items, list):
        raise InputError(f"{source}: expected a label table (an object with 'labels') or a list of labels")
    labels = tuple(_label_from_json(item, index, source) for index, item in enumerate(items))
    values: set[int] = set()
    names: set[str] = set()
    for label in labels:
        if label.value in values:
            raise InputError(f"{source}: value {label.value} is listed twice")
        if label.name.lower() in names:
            raise InputError(f"{source}: name {label.name!r} is listed twice")
        values.add(label.value)
        names.add(label.name.lower())
    return labels


def read_label_table(path: PathLike) -> tuple[Label, ...]:
    """Read a JSON label table (see the module docstring); InputError for a missing or invalid file."""
    return labels_from_json(read_json(path, "label table", InputError), str(path))


def label_table_to_json(labels: Sequence[Label]) -> dict[str, Any]:
    """The JSON-ready label table of ``labels`` (sorted by value)."""
    entries = []
    for label in sorted(labels, key=lambda item: item.value):
        entry: dict[str, Any] = {"value": int(label.value), "name": label.name, "color": [int(c) for c in label.color]}
        if label.terminology:
            entry["terminology"] = {
                k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in label.terminology.items()
            }
            entry["terminology_string"] = terminology_string(label)
        entries.append(entry)
    return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "labels": entries}


def write_label_table(
    labels: Sequence[Label], path: PathLike, overwrite: bool = False, notes: Sequence[str] = ()
) -> Path:
    """Write ``labels`` as a JSON label table atomically; refuses an existing file unless ``overwrite``.

    ``notes`` (e.g. warnings that the input did not fit the model) go under ``input_warnings``.
    """
    path = Path(path)
    table = label_table_to_json(labels)
    if notes:
        table["input_warnings"] = list(notes)
    text = json.dumps(table, indent=2) + "\n"
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
