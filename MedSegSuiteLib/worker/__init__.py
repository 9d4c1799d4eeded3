"""The background worker that runs MedSegSuite jobs for the 3D Slicer panel.

The panel (or any client) starts ``python -m MedSegSuiteLib.worker`` and exchanges
newline-delimited JSON with it (:mod:`.protocol`); images travel as files. The worker
keeps models warm between jobs (:mod:`.jobs`) and runs each job in a thread so that it
can be cancelled (:mod:`.server`). :class:`~.client.WorkerClient` is the non-blocking
client. Importing this package does not import torch.
"""

from .client import WorkerClient, describe_exit, worker_command
from .protocol import PROTOCOL_VERSION, ProtocolError

__all__ = ["PROTOCOL_VERSION", "ProtocolError", "WorkerClient", "describe_exit", "worker_command"]
