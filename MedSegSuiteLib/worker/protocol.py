"""The worker protocol: newline-delimited JSON objects on the worker's stdin and stdout.

Every message is one JSON object on one line (UTF-8, no NaN/Infinity) with a ``type``.
Job messages carry the client's ``job`` id. Version :data:`PROTOCOL_VERSION`.

Client -> worker::

    {"type": "ping", "id": 7}
    {"type": "start", "job": "job-1", "kind": "segment", "params": {...}}
    {"type": "cancel", "job": "job-1"}
    {"type": "shutdown"}

Worker -> client::

    {"type": "ready", "protocol": 1, "version": "0.1.0", "pid": 123, "python": "3.11.7",
     "torch": "2.13.0", "devices": ["cpu", "cuda"]}
    {"type": "pong", "id": 7, "busy": false, "job": null, "cached_models": 1}
    {"type": "started", "job": "job-1", "kind": "segment"}
    {"type": "progress", "job": "job-1", "done": 3, "total": 8, "stage": "segmenting", "unit": "windows"}
    {"type": "log", "job": "job-1", "record": {"iteration": 20, "loss": 0.41}}
    {"type": "result", "job": "job-1", "outputs": {"labels": "/tmp/.../labels.nrrd"}, "info": {...}}
    {"type": "cancelled", "job": "job-1"}
    {"type": "error", "job": "job-1", "kind": "InputError", "message": "one line for the user"}
    {"type": "bye"}

``log`` messages carry a job's records (a finetuning's loss and validation values),
in order and never throttled; non-finite numbers travel as null.

A job ends with exactly one of ``result``, ``cancelled`` or ``error``. An ``error``
with ``"job": null`` answers a line that was not a valid request (malformed JSON, an
unknown type); the worker keeps running. The client adds two messages of its own that
never travel on the wire: ``{"type": "died", "job": ..., "returncode": -9, "message":
...}`` when the process ends unexpectedly, and ``{"type": "cancelled", "job": ...,
"forced": true}`` when a cancelled job had to be stopped by ending the process.

Job kinds and their ``params`` are documented in :mod:`MedSegSuiteLib.worker.jobs`.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from ..errors import MedSegSuiteError

__all__ = [
    "CLIENT_TYPES",
    "MAX_LINE_CHARS",
    "PROTOCOL_VERSION",
    "TERMINAL_TYPES",
    "WORKER_TYPES",
    "ProtocolError",
    "decode",
    "encode",
    "error_message",
    "one_line",
]

PROTOCOL_VERSION = 1
MAX_LINE_CHARS = 1_000_000
CLIENT_TYPES = ("ping", "start", "cancel", "shutdown")
WORKER_TYPES = ("ready", "pong", "started", "progress", "log", "result", "cancelled", "error", "bye")
TERMINAL_TYPES = ("result", "cancelled", "error")


class ProtocolError(MedSegSuiteError):
    """A line that is not a valid message, or a request the worker cannot act on."""


def one_line(text: str, limit: int = 500) -> str:
    """``text`` squeezed onto one line of at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def encode(message: dict[str, Any]) -> str:
    """One protocol line (with its trailing newline) for ``message``; raises ProtocolError if it has no type."""
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError(f"a message must be an object with a string 'type', got {message!r}")
    try:
        text = json.dumps(message, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ProtocolError(f"message {message.get('type')!r} cannot be sent as JSON: {error}") from None
    return text + "\n"


def decode(line: str, allowed: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
    """The message on one protocol line; raises ProtocolError (one line) for anything else.

    ``allowed`` limits the accepted ``type`` values (e.g. :data:`CLIENT_TYPES`).
    """
    text = line.strip()
    if not text:
        raise ProtocolError("empty line: expected one JSON object")
    if len(text) > MAX_LINE_CHARS:
        raise ProtocolError(f"line of {len(text)} characters is too long (at most {MAX_LINE_CHARS})")
    try:
        message = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProtocolError(f"malformed line, not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"malformed line: expected a JSON object, got {type(message).__name__}")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("malformed message: it has no string 'type'")
    if allowed is not None and kind not in allowed:
        raise ProtocolError(f"unknown message type {kind!r}; expected one of {', '.join(allowed)}")
    return message


def error_message(job: Optional[str], error: BaseException) -> dict[str, Any]:
    """The ``error`` message for ``error``: its class name as ``kind`` and its text on one line."""
    if isinstance(error, MedSegSuiteError):
        kind, text = type(error).__name__, str(error)
    elif isinstance(error, MemoryError):
        kind, text = "OutOfMemory", "not enough memory for this job; try a smaller region (ROI), fast mode or the CPU"
    else:
        kind, text = "InternalError", f"unexpected {type(error).__name__}: {error}"
    return {"type": "error", "job": job, "kind": kind, "message": one_line(text or kind)}
