"""The client side of the worker: starts the process, sends jobs, and hands back its messages without blocking.

Typical use from a GUI timer::

    client = WorkerClient()                  # nothing starts yet
    job = client.submit("segment", params)   # starts the worker if needed
    ...
    for message in client.poll():            # call every 100 ms or so; never blocks
        ...                                  # progress / result / error / cancelled / died

Two reader threads collect the worker's stdout (protocol lines) and stderr (its log,
kept as a short tail for diagnostics); :meth:`WorkerClient.poll` drains what they
collected and notices when the process has ended. If it ended unexpectedly, ``poll``
returns a ``died`` message with a plain-language explanation and the next
:meth:`~WorkerClient.submit` starts a fresh worker. Files travel through a private
temporary folder (:attr:`~WorkerClient.temp_dir`) removed by :meth:`~WorkerClient.close`.

The process is created by a *process factory* (``factory(argv, env, cwd)`` returning an
object with ``stdin``, ``stdout``, ``stderr``, ``pid``, ``returncode``, ``poll()``,
``wait(timeout)`` and ``kill()``, like :class:`subprocess.Popen`), so tests can inject
a fake process.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from .protocol import TERMINAL_TYPES, WORKER_TYPES, ProtocolError, decode, encode

__all__ = [
    "ProcessFactory",
    "WorkerClient",
    "WorkerProcess",
    "describe_exit",
    "library_root",
    "popen_factory",
    "worker_command",
]

log = logging.getLogger(__name__)
worker_log = logging.getLogger("MedSegSuiteLib.worker.process")

_OOM_CODES = {-9, 137, 0xC0000017}  # SIGKILL (the Linux OOM killer), 128+9 from a shell, Windows STATUS_NO_MEMORY


class WorkerProcess(Protocol):
    """What the client needs from a process (a subset of :class:`subprocess.Popen`)."""

    stdin: Any
    stdout: Any
    stderr: Any
    pid: int
    returncode: Optional[int]

    def poll(self) -> Optional[int]: ...

    def wait(self, timeout: Optional[float] = None) -> int: ...

    def kill(self) -> None: ...


ProcessFactory = Callable[[list, dict, str], WorkerProcess]


def library_root() -> Path:
    """The folder that holds the ``MedSegSuiteLib`` package (what the worker needs on ``sys.path``)."""
    return Path(__file__).resolve().parents[2]


def worker_command(python: Optional[str] = None) -> list[str]:
    """The command line that starts a worker with ``python`` (default: this interpreter)."""
    return [python or sys.executable, "-m", "MedSegSuiteLib.worker"]


def popen_factory(argv: list, env: dict, cwd: str) -> WorkerProcess:
    """Start ``argv`` with pipes for stdin/stdout/stderr (UTF-8 text, line buffered)."""
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
    return subprocess.Popen(  # noqa: S603 - argv is our own interpreter and module
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
        env=env,
        cwd=cwd,
        creationflags=flags,
    )


def describe_exit(returncode: Optional[int], detail: str = "") -> str:
    """One line telling the user that the worker stopped, why if known, and that nothing was changed."""
    code = "unknown exit code" if returncode is None else f"exit code {returncode}"
    reason = ""
    if returncode in _OOM_CODES:
        reason = ", possibly out of memory"
    elif returncode is not None and returncode < 0:
        try:
            reason = f", stopped by signal {signal.Signals(-returncode).name}"
        except ValueError:
            reason = f", stopped by signal {-returncode}"
    elif detail:
        reason = f": {detail}"
    return (
        f"the MedSegSuite worker stopped unexpectedly ({code}{reason}); your scene is unchanged; "
        "the next job starts a new worker"
    )


class WorkerClient:
    """Talks to one worker process at a time; see the module docstring.

    Args:
        python: interpreter that runs the worker (default ``sys.executable``; inside
            3D Slicer pass ``PythonSlicer``).
        process_factory: creates the process (default :func:`popen_factory`).
        env: extra environment variables for the worker.
        temp_root: where the private temporary folder is created (default: the system's).
        cancel_grace: seconds a cancelled job may take to stop before the process is ended.
    """

    def __init__(
        self,
        python: Optional[str] = None,
        process_factory: Optional[ProcessFactory] = None,
        env: Optional[dict[str, str]] = None,
        temp_root: Optional[str] = None,
        cancel_grace: float = 10.0,
    ) -> None:
        self.python = python or sys.executable
        self.process_factory = process_factory or popen_factory
        self.extra_env = dict(env or {})
        self.temp_root = temp_root
        self.cancel_grace = cancel_grace
        self.ready: Optional[dict[str, Any]] = None
        self._process: Optional[WorkerProcess] = None
        self._generation = 0
        self._messages: queue.Queue = queue.Queue()
        self._stdout_closed = True
        self._stderr_tail: collections.deque = collections.deque(maxlen=200)
        self._last_error = ""
        self._job: Optional[str] = None
        self._cancel_deadline: Optional[float] = None
        self._exited_at: Optional[float] = None
        self._ids = itertools.count(1)
        self._temp_dir: Optional[Path] = None

    # -- state -------------------------------------------------------------------------
    @property
    def job(self) -> Optional[str]:
        """The id of the job that has been submitted and has not ended yet."""
        return self._job

    @property
    def busy(self) -> bool:
        return self._job is not None

    @property
    def alive(self) -> bool:
        """True while a worker process is running."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    @property
    def process(self) -> Optional[WorkerProcess]:
        """The current worker process (tests end it to check recovery)."""
        return self._process

    @property
    def devices(self) -> Optional[list[str]]:
        """Devices the worker reported (``["cpu", "cuda"]``...), or None before it said ready."""
        return list(self.ready["devices"]) if self.ready else None

    @property
    def stderr_tail(self) -> list[str]:
        """The last lines the worker wrote to stderr."""
        return list(self._stderr_tail)

    @property
    def temp_dir(self) -> Path:
        """A private folder (mode 0700) for the files of this client's jobs, created on first use."""
        if self._temp_dir is None or not self._temp_dir.is_dir():
            self._temp_dir = Path(tempfile.mkdtemp(prefix="medsegsuite-", dir=self.temp_root))
        return self._temp_dir

    def new_job_dir(self) -> Path:
        """A fresh folder inside :attr:`temp_dir` for one job's files."""
        return Path(tempfile.mkdtemp(prefix="job-", dir=self.temp_dir))

    # -- process -----------------------------------------------------------------------
    def start(self) -> None:
        """Start a worker unless one is running (returns at once; the worker says ``ready`` later)."""
        if self.alive:
            return
        self._discard_process()
        env = dict(os.environ)
        env.update(self.extra_env)
        root = str(library_root())
        env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONIOENCODING"] = "utf-8"
        env["PYTHONUNBUFFERED"] = "1"
        self._generation += 1
        self.ready = None
        self._stdout_closed = False
        self._exited_at = None
        self._last_error = ""
        self._stderr_tail.clear()
        process = self.process_factory(worker_command(self.python), env, root)
        self._process = process
        generation = self._generation
        for target, stream in ((self._read_stdout, process.stdout), (self._read_stderr, process.stderr)):
            threading.Thread(target=target, args=(stream, generation), daemon=True, name="medsegsuite-reader").start()
        log.info("started MedSegSuite worker (pid %s)", process.pid)

    def _read_stdout(self, stream: Any, generation: int) -> None:
        try:
            for line in iter(stream.readline, ""):
                if not line.strip():
                    continue
                try:
                    message = decode(line, WORKER_TYPES)
                except ProtocolError as error:
                    worker_log.warning("ignored a line from the worker: %s", error)
                    continue
                self._messages.put((generation, message))
        except (OSError, ValueError) as error:
            worker_log.debug("worker stdout closed: %s", error)
        self._messages.put((generation, None))

    def _read_stderr(self, stream: Any, generation: int) -> None:
        try:
            for line in iter(stream.readline, ""):
                text = line.rstrip()
                if text:
                    if generation == self._generation:
                        self._stderr_tail.append(text)
                    worker_log.debug("%s", text)
        except (OSError, ValueError):
            pass

    def _send(self, message: dict[str, Any]) -> bool:
        process = self._process
        if process is None:
            return False
        try:
            process.stdin.write(encode(message))
            process.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError) as error:
            log.info("cannot send %s to the worker: %s", message["type"], error)
            return False

    def _discard_process(self, kill: bool = False) -> None:
        process, self._process = self._process, None
        self._generation += 1  # late messages of that process are ignored
        self._stdout_closed = True
        self._job, self._cancel_deadline = None, None
        if process is None:
            return
        if kill and process.poll() is None:
            with contextlib.suppress(OSError):
                process.kill()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            process.stdin.close()

    # -- jobs --------------------------------------------------------------------------
    def submit(self, kind: str, params: dict[str, Any]) -> str:
        """Send a job (starting a worker if none runs) and return its id; one job at a time."""
        if self._job is not None:
            raise ProtocolError(f"job {self._job} is still running; wait for it or cancel it first")
        self.start()
        job_id = f"job-{next(self._ids)}"
        self._job, self._cancel_deadline = job_id, None
        self._send({"type": "start", "job": job_id, "kind": kind, "params": params})
        return job_id

    def cancel(self, job_id: Optional[str] = None) -> None:
        """Ask the worker to cancel ``job_id`` (default: the running job); it ends with ``cancelled``.

        If the job has not ended ``cancel_grace`` seconds later, :meth:`poll` ends the
        worker process and reports ``{"type": "cancelled", "forced": true}``.
        """
        job_id = job_id or self._job
        if job_id is None or job_id != self._job:
            return
        if self._cancel_deadline is None:
            self._cancel_deadline = time.monotonic() + self.cancel_grace
        self._send({"type": "cancel", "job": job_id})

    def ping(self) -> None:
        """Send a ping (answered by ``pong``); starts a worker if none runs."""
        self.start()
        self._send({"type": "ping", "id": next(self._ids)})

    def poll(self) -> list[dict[str, Any]]:
        """Messages received since the last call, plus ``died``/forced ``cancelled`` ones; never blocks."""
        events: list[dict[str, Any]] = []
        while True:
            try:
                generation, message = self._messages.get_nowait()
            except queue.Empty:
                break
            if generation != self._generation:
                continue
            if message is None:
                self._stdout_closed = True
                continue
            kind = message["type"]
            if kind == "ready":
                self.ready = message
            elif kind == "error" and message.get("job") is None:
                self._last_error = str(message.get("message", ""))
            if kind in TERMINAL_TYPES and message.get("job") is not None and message.get("job") == self._job:
                self._job, self._cancel_deadline = None, None
            events.append(message)
        if self._job is not None and self._cancel_deadline is not None and time.monotonic() > self._cancel_deadline:
            job = self._job
            log.warning("job %s did not stop %.0f s after cancel; ending the worker", job, self.cancel_grace)
            self._discard_process(kill=True)
            events.append({"type": "cancelled", "job": job, "forced": True})
        process = self._process
        if process is not None and process.poll() is not None:
            # wait for the reader to deliver the last lines, unless a grandchild keeps the pipe open
            self._exited_at = self._exited_at or time.monotonic()
            if not self._stdout_closed and time.monotonic() - self._exited_at < 2.0:
                return events
            job = self._job
            detail = self._last_error or (self._stderr_tail[-1] if self._stderr_tail else "")
            message = describe_exit(process.returncode, detail)
            log.warning("%s", message)
            self._discard_process()
            events.append({"type": "died", "job": job, "returncode": process.returncode, "message": message})
        return events

    def wait(self, job_id: str, timeout: float = 600.0, interval: float = 0.02) -> list[dict[str, Any]]:
        """Block until ``job_id`` ends (or ``timeout`` s pass: TimeoutError); returns its messages in order.

        For scripts and tests; a GUI polls instead.
        """
        deadline = time.monotonic() + timeout
        collected: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            for message in self.poll():
                if message.get("job") == job_id or (message["type"] == "died" and message.get("job") is None):
                    collected.append(message)
                    if message["type"] in (*TERMINAL_TYPES, "died"):
                        return collected
            time.sleep(interval)
        raise TimeoutError(f"job {job_id} did not end within {timeout} s")

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the worker to stop (cancelling any job), ending it after ``timeout`` s; safe to call twice."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            self._send({"type": "shutdown"})
            with contextlib.suppress(OSError, ValueError):
                process.stdin.close()
            try:
                process.wait(timeout)
            except (subprocess.TimeoutExpired, TimeoutError):
                log.warning("the worker did not stop within %.0f s; ending it", timeout)
        self._discard_process(kill=True)

    def close(self) -> None:
        """Stop the worker and remove the temporary folder."""
        self.shutdown()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
