"""Reading the project's small JSON files (model cards, label tables) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

__all__ = ["read_json"]


def read_json(path: Union[str, Path], what: str, error: type[Exception]) -> Any:
    """The JSON value stored in ``path`` (UTF-8).

    Raises ``error`` with a one-line reason that names the file as ``what`` (e.g. "model
    card") when it does not exist, cannot be read, or is not valid JSON.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as failure:
        raise error(f"cannot read {what} {path}: {failure.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as failure:
        raise error(f"{what} {path} is not valid JSON (line {failure.lineno}: {failure.msg})") from None
