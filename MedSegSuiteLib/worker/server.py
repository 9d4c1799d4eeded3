"""The worker process: reads requests from stdin, runs one job at a time in a thread, answers on stdout.

Started as ``python -m MedSegSuiteLib.worker``. The protocol is described in
:mod:`MedSegSuiteLib.worker.protocol`. stdout carries protocol lines only: at start the
worker moves everything else that would go to stdout (prints, C libraries) to stderr,
where its logs go too. The main thread keeps reading stdin while a job runs, so a
``cancel`` sets the job's event at once; the job stops at its next check. The worker
ends on ``shutdown`` or when stdin closes (its client is gone).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import numbers
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional, TextIO

from .. import __version__
from ..errors import Cancelled, MedSegSuiteError
from .jobs import JobContext, JobHandler, ModelCache, default_handlers
from .protocol import CLIENT_TYPES, PROTOCOL_VERSION, ProtocolError, decode, encode, error_message

__all__ = ["WorkerServer", "main", "ready_message"]

log = logging.getLogger(__name__)

EXIT_MISSING_DEPENDENCY = 3


class _Job:
    def __init__(self, job_id: str, kind: str) -> None:
        self.id, self.kind = job_id, kind
        self.cancel = threading.Event()
        self.thread: Optional[threading.Thread] = None


class WorkerServer:
    """Serves protocol requests read from a line iterator and writes answers to ``out``.

    Args:
        out: text stream for protocol lines (flushed after each message).
        handlers: job kinds (default :func:`~MedSegSuiteLib.worker.jobs.default_handlers`).
        models: the warm-model cache shared by all jobs.
        progress_interval: least seconds between two progress messages of one stage
            (the first and the last of a stage are always sent).
    """

    def __init__(
        self,
        out: TextIO,
        handlers: Optional[Mapping[str, JobHandler]] = None,
        models: Optional[ModelCache] = None,
        progress_interval: float = 0.1,
    ) -> None:
        self.out = out
        self.handlers = dict(default_handlers() if handlers is None else handlers)
        self.models = models if models is not None else ModelCache()
        self.progress_interval = progress_interval
        self._send_lock = threading.Lock()
        self._job_lock = threading.Lock()
        self._job: Optional[_Job] = None
        self._stopping = False

    # -- output ------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        """Write one message; a closed stdout (client gone) is logged, not raised."""
        line = encode(message)
        with self._send_lock:
            try:
                self.out.write(line)
                self.out.flush()
            except (BrokenPipeError, ValueError, OSError) as error:
                log.warning("cannot send %s: %s", message.get("type"), error)

    # -- requests ----------------------------------------------------------------------
    def serve(self, lines: Iterable[str]) -> None:
        """Handle lines until ``shutdown`` or the end of input, then stop any running job."""
        for line in lines:
            if not line.strip():
                continue
            self.handle_line(line)
            if self._stopping:
                break
        self.stop()

    def handle_line(self, line: str) -> None:
        """Act on one request line; bad lines are answered with an ``error`` message, never raised."""
        try:
            message = decode(line, CLIENT_TYPES)
        except ProtocolError as error:
            log.warning("%s", error)
            self.send(error_message(None, error))
            return
        kind = message["type"]
        if kind == "ping":
            with self._job_lock:
                job = self._job
            self.send(
                {
                    "type": "pong",
                    "id": message.get("id"),
                    "busy": job is not None,
                    "job": job.id if job else None,
                    "cached_models": len(self.models),
                }
            )
        elif kind == "start":
            self._start(message)
        elif kind == "cancel":
            self._cancel(message.get("job"))
        elif kind == "shutdown":
            self._stopping = True

    def _start(self, message: dict[str, Any]) -> None:
        job_id, kind, params = message.get("job"), message.get("kind"), message.get("params", {})
        if not isinstance(job_id, str) or not job_id:
            self.send(error_message(None, ProtocolError("'start' needs a string 'job' id")))
            return
        if kind not in self.handlers:
            known = ", ".join(sorted(self.handlers))
            self.send(error_message(job_id, ProtocolError(f"unknown job kind {kind!r}; this worker runs: {known}")))
            return
        if not isinstance(params, dict):
            self.send(error_message(job_id, ProtocolError("'params' must be a JSON object")))
            return
        with self._job_lock:
            if self._job is not None:
                busy = ProtocolError(f"the worker is busy with job {self._job.id}; wait for it or cancel it first")
                self.send(error_message(job_id, busy))
                return
            job = self._job = _Job(job_id, kind)
        job.thread = threading.Thread(
            target=self._run, args=(job, self.handlers[kind], params), name=f"job-{job_id}", daemon=True
        )
        self.send({"type": "started", "job": job_id, "kind": kind})
        job.thread.start()

    def _cancel(self, job_id: Any) -> None:
        with self._job_lock:
            job = self._job
        if job is not None and job.id == job_id:
            log.info("cancelling job %s", job_id)
            job.cancel.set()
        else:
            log.info("cancel for job %s, which is not running (it may have just ended)", job_id)

    # -- jobs --------------------------------------------------------------------------
    def _progress_sender(self, job: _Job) -> Callable[[int, int, str, str], None]:
        last = {"stage": None, "time": 0.0}

        def report(done: int, total: int, stage: str, unit: str) -> None:
            now = time.monotonic()
            final = done >= total
            if stage == last["stage"] and not final and now - last["time"] < self.progress_interval:
                return
            last["stage"], last["time"] = stage, now
            message = {"type": "progress", "job": job.id, "done": done, "total": total, "stage": stage}
            if unit:
                message["unit"] = unit
            self.send(message)

        return report

    def _log_sender(self, job: _Job) -> Callable[[dict[str, Any]], None]:
        def send_log(record: dict[str, Any]) -> None:
            self.send({"type": "log", "job": job.id, "record": _finite(record)})

        return send_log

    def _run(self, job: _Job, handler: JobHandler, params: dict[str, Any]) -> None:
        context = JobContext(job.id, job.cancel, self._progress_sender(job), self.models, self._log_sender(job))
        try:
            outcome = handler(params, context)
            if job.cancel.is_set():
                for path in outcome.outputs.values():
                    _remove_quietly(path)
                raise Cancelled("cancelled by the user; nothing was written")
            reply: dict[str, Any] = {"type": "result", "job": job.id, "outputs": outcome.outputs, "info": outcome.info}
        except Cancelled:
            reply = {"type": "cancelled", "job": job.id}
        except BaseException as error:  # noqa: BLE001 - every failure becomes a message, the worker lives on
            if not isinstance(error, MedSegSuiteError):
                log.exception("job %s (%s) failed", job.id, job.kind)
            reply = error_message(job.id, error)
        with self._job_lock:
            self._job = None
        self.send(reply)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job (if any) and wait up to ``timeout`` seconds for it to end."""
        with self._job_lock:
            job = self._job
        if job is not None:
            job.cancel.set()
            if job.thread is not None:
                job.thread.join(timeout)


def _finite(value: Any) -> Any:
    """``value`` (JSON-like) with NaN and infinities replaced by None and numpy numbers by Python's."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def ready_message() -> dict[str, Any]:
    """The ``ready`` message (imports torch to list the usable devices)."""
    import torch

    from ..inference.device import available_devices

    return {
        "type": "ready",
        "protocol": PROTOCOL_VERSION,
        "version": __version__,
        "pid": os.getpid(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "devices": available_devices(),
    }


def _claim_stdout() -> TextIO:
    """A private text stream on the original stdout; fd 1 and ``sys.stdout`` then point to stderr."""
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return open(protocol_fd, "w", encoding="utf-8", newline="\n", buffering=1)  # noqa: SIM115 - lives as long as us


def main(argv: Optional[list[str]] = None) -> int:
    """Run the worker on this process's stdin/stdout; returns the exit status."""
    out = _claim_stdout()
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("MEDSEGSUITE_WORKER_LOG", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    threads = os.environ.get("MEDSEGSUITE_THREADS")
    server = WorkerServer(out)
    try:
        ready = ready_message()
    except ImportError as error:
        server.send(
            error_message(
                None,
                ProtocolError(
                    f"the worker cannot start: {error}; install MedSegSuite's Python packages "
                    "(in 3D Slicer: click Segment and accept the installation)"
                ),
            )
        )
        return EXIT_MISSING_DEPENDENCY
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    server.send(ready)
    log.info("MedSegSuite worker %s ready (pid %d, devices %s)", __version__, os.getpid(), ready["devices"])
    lines = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline=None)
    server.serve(iter(lines.readline, ""))
    server.send({"type": "bye"})
    return 0
