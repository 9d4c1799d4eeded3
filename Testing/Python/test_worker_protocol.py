"""The worker protocol, the server's job handling (in-process) and the client against an injected fake process."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time

import pytest
from slicer_harness.fake_worker import FakeWorkerFactory

from MedSegSuiteLib.errors import Cancelled, InputError
from MedSegSuiteLib.worker.client import WorkerClient, describe_exit, library_root, worker_command
from MedSegSuiteLib.worker.jobs import JobOutcome, ModelCache
from MedSegSuiteLib.worker.protocol import CLIENT_TYPES, ProtocolError, decode, encode, error_message
from MedSegSuiteLib.worker.server import WorkerServer


# -- protocol -----------------------------------------------------------------------------
def test_messages_are_single_json_lines_and_round_trip():
    message = {"type": "progress", "job": "job-1", "done": 3, "total": 8, "stage": "segmenting", "path": "/tmp/ä b"}
    line = encode(message)
    assert line.endswith("\n") and line.count("\n") == 1
    assert decode(line) == message


@pytest.mark.parametrize(
    "line, reason",
    [
        ("not json\n", "not valid JSON"),
        ("[1, 2]\n", "expected a JSON object"),
        ('{"job": "x"}\n', "no string 'type'"),
        ('{"type": "explode"}\n', "unknown message type"),
        ("   \n", "empty line"),
    ],
)
def test_malformed_lines_raise_a_one_line_protocol_error(line, reason):
    with pytest.raises(ProtocolError, match=reason) as caught:
        decode(line, CLIENT_TYPES)
    assert "\n" not in str(caught.value)


def test_error_messages_name_the_error_kind_in_one_line():
    assert error_message("j", InputError("the image is\nconstant")) == {
        "type": "error",
        "job": "j",
        "kind": "InputError",
        "message": "the image is constant",
    }
    assert error_message(None, MemoryError())["kind"] == "OutOfMemory"
    unexpected = error_message("j", KeyError("x"))
    assert unexpected["kind"] == "InternalError" and "KeyError" in unexpected["message"]


def test_exit_descriptions_say_what_happened_in_plain_words():
    assert describe_exit(-9) == (
        "the MedSegSuite worker stopped unexpectedly (exit code -9, possibly out of memory); your scene is unchanged; "
        "the next job starts a new worker"
    )
    assert "signal SIGSEGV" in describe_exit(-11)
    assert "(exit code 1: ModuleNotFoundError: No module named 'torch')" in describe_exit(
        1, "ModuleNotFoundError: No module named 'torch'"
    )


def test_worker_command_runs_the_worker_module_with_the_given_python():
    python = "/opt/Slicer/bin/PythonSlicer"
    assert worker_command(python) == [python, "-m", "MedSegSuiteLib.worker"]
    assert (library_root() / "MedSegSuiteLib" / "worker" / "__main__.py").is_file()


def test_worker_keeps_stdout_for_protocol_lines_only():
    """Prints and C-level writes to fd 1 land on stderr once the worker has claimed stdout."""
    code = (
        "import os\n"
        "from MedSegSuiteLib.worker.server import _claim_stdout\n"
        "out = _claim_stdout()\n"
        "print('python noise')\n"
        "os.write(1, b'c-level noise\\n')\n"
        'out.write(\'{"type": "bye"}\\n\'); out.flush()\n'
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=library_root())
    assert done.returncode == 0, done.stderr
    assert done.stdout == '{"type": "bye"}\n'
    assert "python noise" in done.stderr and "c-level noise" in done.stderr


# -- server, in-process with stand-in job handlers ---------------------------------------
class _Server:
    def __init__(self, handlers):
        self.out = io.StringIO()
        self.server = WorkerServer(self.out, handlers=handlers, models=ModelCache(), progress_interval=0.0)

    def send(self, message):
        self.server.handle_line(json.dumps(message) if isinstance(message, dict) else message)

    def messages(self):
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def wait_for(self, kind, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.messages() if m["type"] == kind]
            if found:
                return found[-1]
            time.sleep(0.01)
        raise AssertionError(f"no {kind!r} message; got {self.messages()}")


def _slow_job(params, context):
    for step in range(1000):
        if context.cancel.is_set():
            raise Cancelled("cancelled")
        context.progress(step, 1000, "segmenting", "windows")
        time.sleep(0.005)
    return JobOutcome({"labels": "x"})


def test_server_answers_ping_and_runs_a_job_to_its_result():
    calls = []

    def job(params, context):
        calls.append((params, threading.current_thread().name))
        context.progress(1, 2, "segmenting", "windows")
        return JobOutcome({"labels": "/tmp/out.nrrd"}, {"cache_hit": False})

    server = _Server({"segment": job})
    server.send({"type": "ping", "id": 1})
    server.send({"type": "start", "job": "j1", "kind": "segment", "params": {"a": 1}})
    result = server.wait_for("result")
    assert result == {
        "type": "result",
        "job": "j1",
        "outputs": {"labels": "/tmp/out.nrrd"},
        "info": {"cache_hit": False},
    }
    kinds = [m["type"] for m in server.messages()]
    assert kinds == ["pong", "started", "progress", "result"]
    assert calls[0][0] == {"a": 1} and calls[0][1] == "job-j1"  # ran in its own thread


def test_cancel_is_read_while_a_job_runs_and_ends_it_quickly():
    server = _Server({"segment": _slow_job})
    server.send({"type": "start", "job": "j1", "kind": "segment", "params": {}})
    server.wait_for("progress")
    sent = time.monotonic()
    server.send({"type": "cancel", "job": "j1"})
    assert server.wait_for("cancelled", timeout=2.0) == {"type": "cancelled", "job": "j1"}
    assert time.monotonic() - sent < 2.0
    assert not [m for m in server.messages() if m["type"] == "result"]


def test_a_second_job_is_refused_while_one_runs_and_unknown_kinds_are_errors():
    server = _Server({"segment": _slow_job})
    server.send({"type": "start", "job": "j1", "kind": "segment", "params": {}})
    server.send({"type": "start", "job": "j2", "kind": "segment", "params": {}})
    server.send({"type": "start", "job": "j3", "kind": "refine", "params": {}})
    errors = {m["job"]: m for m in server.messages() if m["type"] == "error"}
    assert "busy with job j1" in errors["j2"]["message"]
    assert "unknown job kind 'refine'" in errors["j3"]["message"] and "segment" in errors["j3"]["message"]
    server.server.stop()
    assert server.wait_for("cancelled")["job"] == "j1"


def test_failing_jobs_and_malformed_lines_become_error_messages_and_the_server_lives_on():
    def broken(params, context):
        raise InputError("the image is constant (every voxel is 0): there is nothing to segment")

    server = _Server({"segment": broken})
    server.send("{this is not json")
    server.send({"type": "start", "job": "j1", "kind": "segment", "params": {}})
    server.wait_for("error")
    time.sleep(0.05)
    server.send({"type": "ping", "id": 2})
    messages = server.messages()
    assert messages[0] == {
        "type": "error",
        "job": None,
        "kind": "ProtocolError",
        "message": "malformed line, not valid JSON (Expecting property name enclosed in double quotes at column 2)",
    }
    job_error = next(m for m in messages if m["type"] == "error" and m["job"] == "j1")
    assert job_error["kind"] == "InputError" and job_error["message"].startswith("the image is constant")
    assert messages[-1]["type"] == "pong" and messages[-1]["busy"] is False


def test_progress_messages_are_throttled_but_keep_the_last_one():
    def quick(params, context):
        for step in range(101):
            context.progress(step, 100, "segmenting", "windows")
        return JobOutcome({})

    server = _Server({"segment": quick})
    server.server.progress_interval = 10.0
    server.send({"type": "start", "job": "j1", "kind": "segment", "params": {}})
    server.wait_for("result")
    progress = [(m["done"], m["total"]) for m in server.messages() if m["type"] == "progress"]
    assert progress == [(0, 100), (100, 100)]


# -- client, with an injected fake process ------------------------------------------------
def _drain(client, until, timeout=5.0):
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        seen += client.poll()
        if any(until(m) for m in seen):
            return seen
        time.sleep(0.01)
    raise AssertionError(f"timed out; got {seen}")


def test_client_starts_the_worker_lazily_and_collects_its_messages(tmp_path):
    factory = FakeWorkerFactory()
    client = WorkerClient(python="/opt/PythonSlicer", process_factory=factory, temp_root=str(tmp_path))
    assert factory.processes == [] and not client.alive
    client.ping()
    messages = _drain(client, lambda m: m["type"] == "pong")
    assert [m["type"] for m in messages][:2] == ["ready", "pong"]
    assert client.devices == ["cpu"] and client.alive
    assert factory.commands == [["/opt/PythonSlicer", "-m", "MedSegSuiteLib.worker"]]
    assert client.temp_dir.parent == tmp_path and (client.temp_dir.stat().st_mode & 0o777) == 0o700
    client.close()
    assert not client.alive and not list(tmp_path.iterdir())


def test_client_reports_a_dead_worker_in_plain_words_and_starts_a_new_one(tmp_path):
    factory = FakeWorkerFactory(hold=True)
    client = WorkerClient(process_factory=factory, temp_root=str(tmp_path))
    job = client.submit("segment", {})
    _drain(client, lambda m: m["type"] == "progress")
    factory.last.die(-9)
    died = _drain(client, lambda m: m["type"] == "died")[-1]
    assert died["job"] == job and died["returncode"] == -9
    assert died["message"].startswith(
        "the MedSegSuite worker stopped unexpectedly (exit code -9, possibly out of memory)"
    )
    assert not client.busy and not client.alive
    client.submit("segment", {})
    assert len(factory.processes) == 2 and client.pid == factory.last.pid
    client.close()


def test_client_explains_a_worker_that_could_not_start(tmp_path):
    factory = FakeWorkerFactory()
    client = WorkerClient(process_factory=factory, temp_root=str(tmp_path))
    client.start()
    factory.last.die(1, stderr="ModuleNotFoundError: No module named 'torch'")
    died = _drain(client, lambda m: m["type"] == "died")[-1]
    assert died["job"] is None
    assert "(exit code 1: ModuleNotFoundError: No module named 'torch')" in died["message"]


def test_client_ends_a_worker_that_ignores_cancel_after_the_grace_period(tmp_path):
    factory = FakeWorkerFactory(hold=True)
    client = WorkerClient(process_factory=factory, temp_root=str(tmp_path), cancel_grace=0.2)
    job = client.submit("segment", {})
    factory.last.held.clear()  # the fake will not answer the cancel
    client.cancel(job)
    cancelled = _drain(client, lambda m: m["type"] == "cancelled", timeout=3.0)[-1]
    assert cancelled == {"type": "cancelled", "job": job, "forced": True}
    assert factory.last.returncode == -9 and not client.busy
    assert not [m for m in client.poll() if m["type"] == "died"]  # an intended end is not reported as a crash


def test_client_runs_one_job_at_a_time(tmp_path):
    client = WorkerClient(process_factory=FakeWorkerFactory(hold=True), temp_root=str(tmp_path))
    client.submit("segment", {})
    with pytest.raises(ProtocolError, match="still running"):
        client.submit("segment", {})
    client.close()
