"""Training on several processes with PyTorch DistributedDataParallel, as started by ``torchrun``.

``torchrun --nproc_per_node N medsegsuite train ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` set;
:func:`start` joins them into one process group (gloo on the CPU, NCCL on CUDA, one
GPU per local rank). What the ranks share:

- every rank draws the same global batch (same seed per iteration) and trains on its own
  equal share of it, so N processes compute what one process does with the same global
  ``--batch-size`` (which must divide by N);
- gradients are averaged by DistributedDataParallel in the backward pass; the logged loss
  parts are averaged over the ranks after each step, so a diverging rank stops them all;
- validation, checkpoints, the best weights and the output model are rank 0's alone; its
  validation result (and with it the best-model decision) is broadcast to the others;
- a resume reads rank 0's checkpoint and broadcasts it.

Nothing here starts processes or keeps state of its own: the process group is PyTorch's.
"""

from __future__ import annotations

import atexit
import logging
import os
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import InputError

__all__ = ["DistributedContext", "RankShare", "current", "start", "wrap_network", "wrap_recipe"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that validates and writes."""
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: dict[str, float], stop: bool = False) -> tuple[dict[str, float], bool]:
        """The mean of each value over the ranks (same keys on every rank), and whether any rank asked to stop."""
        keys = sorted(values)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        numbers = torch.tensor([float(values[k]) for k in keys] + [1.0 if stop else 0.0], dtype=torch.float64)
        numbers = numbers.to(device) if device is not None else numbers
        flag = numbers[-1:].clone()
        dist.all_reduce(numbers)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        means = (numbers[:-1] / self.world_size).tolist()
        return dict(zip(keys, means)), bool(flag.item() > 0)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        dist.barrier()


def current() -> Optional[DistributedContext]:
    """The context of a process group of two or more ranks, or None for an ordinary single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def start(device: str = "auto") -> tuple[Optional[DistributedContext], str]:
    """Join the process group ``torchrun`` set up (when ``WORLD_SIZE`` > 1); returns the context and the device
    this rank trains on (``cuda:<local rank>`` on GPUs, else ``device`` unchanged).

    Without torchrun's variables this does nothing and returns ``(None, device)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world < 2:
        return None, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise InputError(f"--device {device} asks for CUDA, but this machine has none; use --device cpu")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise InputError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); start at most that "
                "many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        # leave the group before the interpreter tears down: gloo's threads otherwise abort the
        # process at exit now and then ("terminate called without an active exception")
        atexit.register(_leave_group)
    context = current()
    log.info("rank %d of %d (local rank %d) trains on %s", dist.get_rank(), world, local_rank, device)
    return context, device


def _leave_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _routed_forward(target: nn.Module, ddp: nn.Module):  # noqa: ANN202
    """A ``forward`` for ``target`` that goes through ``ddp`` while training with gradients.

    Bound as a method, so a deep copy of the network (an EMA teacher) gets a method bound
    to the copy, which then runs its own plain forward. Evaluation (no gradients or eval
    mode: rank 0's validation) runs the plain forward and needs no other rank.
    """
    inside = [False]

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        plain = type(self).forward
        if self is not target or inside[0] or not (self.training and torch.is_grad_enabled()):
            return plain(self, *args, **kwargs)
        inside[0] = True
        try:
            return ddp(*args, **kwargs)
        finally:
            inside[0] = False

    return forward


def wrap_network(network: nn.Module, context: DistributedContext) -> nn.Module:
    """Wrap ``network`` in DistributedDataParallel, keeping the network itself as the object recipes,
    checkpoints and validation use: its training forward passes go through DDP (which averages the
    gradients over the ranks), everything else (state dicts, attributes, evaluation) is unchanged.

    Returns the DDP module. Rank 0's parameters and buffers are copied to every rank here.
    """
    device_ids = [context.local_rank] if next(network.parameters()).is_cuda else None
    ddp = nn.parallel.DistributedDataParallel(network, device_ids=device_ids, find_unused_parameters=True)
    network.forward = types.MethodType(_routed_forward(network, ddp), network)  # type: ignore[method-assign]
    return ddp


def wrap_recipe(recipe: Any, context: DistributedContext) -> list[nn.Module]:
    """Wrap (see :func:`wrap_network`) every network of ``recipe`` that has trainable parameters: the
    validated ``network`` itself, or the student of a mean-teacher recipe whose ``network`` is the
    EMA teacher. Returns the DDP modules; InputError when the recipe trains nothing it exposes."""
    trainable: dict[int, nn.Module] = {}
    for value in vars(recipe).values():
        if isinstance(value, nn.Module) and any(p.requires_grad for p in value.parameters()):
            trainable.setdefault(id(value), value)
    if not trainable:
        raise InputError(f"{type(recipe).__name__} exposes no trainable network; it cannot train under torchrun")
    return [wrap_network(network, context) for network in trainable.values()]


def _share(value: Any, rank: int, world: int, count: int) -> Any:
    """This rank's equal part (along the first axis) of every tensor of ``count`` samples in ``value``."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == count:
        part = count // world
        return value[rank * part : (rank + 1) * part]
    if isinstance(value, tuple):
        return tuple(_share(v, rank, world, count) for v in value)
    if isinstance(value, list):
        return [_share(v, rank, world, count) for v in value]
    if isinstance(value, dict):
        return {k: _share(v, rank, world, count) for k, v in value.items()}
    return value


class RankShare:
    """``TrainingData`` whose batches hold this rank's share of the global batch each rank draws alike.

    A recipe asking for ``count`` samples gets ``count / world_size`` of them: the rank's
    slice of the ``count`` samples every rank draws from the same generator state.
    """

    def __init__(self, data: Any, context: DistributedContext) -> None:
        if data.batch_size % context.world_size:
            raise InputError(
                f"the batch size {data.batch_size} does not divide by the {context.world_size} processes; "
                "give a --batch-size that is a multiple of the number of processes"
            )
        self._data, self._context = data, context

    def _count(self, count: Optional[int]) -> int:
        count = count or self._data.batch_size
        if count % self._context.world_size:
            raise InputError(
                f"a batch of {count} does not divide by the {self._context.world_size} processes; "
                "give a --batch-size that is a multiple of the number of processes"
            )
        return count

    def labelled_batch(self, generator: torch.Generator, count: Optional[int] = None) -> Any:
        count = self._count(count)
        batch = self._data.labelled_batch(generator, count)
        return _share(batch, self._context.rank, self._context.world_size, count)

    def unlabelled_batch(self, generator: torch.Generator, count: Optional[int] = None) -> Any:
        count = self._count(count)
        batch = self._data.unlabelled_batch(generator, count)
        return _share(batch, self._context.rank, self._context.world_size, count)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)
