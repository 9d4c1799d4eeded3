"""Sliding-window inference over a 3D volume, streamed slab by slab along z.

Window positions, padding and the Gaussian blending weights are MONAI's
(``sliding_window_inference``); the result equals MONAI's to float precision. Unlike
MONAI's, this loop hands finished z-slabs to a ``sink`` as soon as no later window
can touch them, so the full-resolution per-class scores are never held at once; it
can also step by exact per-axis strides (CANet's paper protocol), and it runs in
batches that shrink on out-of-memory errors.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import OutOfMemory
from ..progress import ProgressCallback, check_cancelled, report
from .device import is_out_of_memory

__all__ = ["SlidingWindow", "run_in_batches", "scan_starts"]

log = logging.getLogger(__name__)

Sink = Callable[[int, int, np.ndarray], None]


def scan_starts(size: int, roi: int, step: int) -> list[int]:
    """Window starts along one axis of ``size`` voxels (``size >= roi``), MONAI's rule.

    Starts are multiples of ``step``; the last is moved back so the window ends at ``size``.
    """
    if size <= roi:
        return [0]
    count = math.ceil((size - roi) / step) + 1
    return [min(i * step, size - roi) for i in range(count)]


def run_in_batches(
    count: int,
    batch_size: int,
    run_batch: Callable[[int, int], None],
    progress: Optional[ProgressCallback] = None,
    cancel=None,  # noqa: ANN001 - threading.Event
    stage: str = "segmenting",
    on_oom: Optional[Callable[[], None]] = None,
) -> None:
    """Call ``run_batch(start, stop)`` over ``range(count)`` in batches, halving the batch on OOM.

    ``run_batch`` must leave no partial effect when it raises. Progress is reported
    after each batch and the cancel event checked before each; a batch of one that
    still runs out of memory raises :class:`OutOfMemory`.
    """
    start, size = 0, max(1, int(batch_size))
    report(progress, 0, count, stage)
    while start < count:
        check_cancelled(cancel)
        stop = min(start + size, count)
        try:
            run_batch(start, stop)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            if on_oom is not None:
                on_oom()
            if size == 1:
                raise OutOfMemory(
                    "ran out of memory even with one slice/window at a time; use a smaller ROI, the CPU "
                    "(--device cpu), or close other programs"
                ) from None
            size = max(1, size // 2)
            log.warning("out of memory; retrying with batch size %d", size)
            continue
        start = stop
        report(progress, start, count, stage)


class SlidingWindow:
    """Windows of ``roi`` (z, y, x) over a grid of ``shape`` (z, y, x).

    Args:
        shape: spatial shape of the image (z, y, x).
        roi: window size (z, y, x). Axes where the image is smaller are zero-padded
            symmetrically, as MONAI does.
        overlap: fraction of a window shared with its neighbour (MONAI's step
            ``int(roi * (1 - overlap))``); ignored where ``stride`` is given.
        stride: exact steps (z, y, x) in voxels, or None.
        blend: ``"gaussian"`` (MONAI weights, sigma = 0.125 x roi) or ``"constant"`` (plain mean).
    """

    def __init__(
        self,
        shape: Sequence[int],
        roi: Sequence[int],
        overlap: float = 0.5,
        stride: Optional[Sequence[int]] = None,
        blend: str = "gaussian",
    ) -> None:
        from monai.data.utils import compute_importance_map

        if len(shape) != 3 or len(roi) != 3:
            raise ValueError("shape and roi need three sizes (z, y, x)")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.shape = tuple(int(s) for s in shape)
        self.roi = tuple(int(r) for r in roi)
        self.pad = []
        for size, r in zip(self.shape, self.roi):
            extra = max(r - size, 0)
            self.pad.append((extra // 2, extra - extra // 2))
        self.padded = tuple(s + a + b for s, (a, b) in zip(self.shape, self.pad))
        steps = []
        for axis in range(3):
            if stride is not None:
                steps.append(max(1, int(stride[axis])))
            elif self.roi[axis] == self.padded[axis]:
                steps.append(self.roi[axis])
            else:
                steps.append(max(1, int(self.roi[axis] * (1 - overlap))))
        starts = [scan_starts(self.padded[a], self.roi[a], steps[a]) for a in range(3)]
        self.windows = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
        self.weight = compute_importance_map(self.roi, mode=blend, sigma_scale=0.125, device="cpu").float()

    def __len__(self) -> int:
        return len(self.windows)

    def buffer_bytes(self, channels: int, accumulator: torch.dtype = torch.float32) -> int:
        """Bytes of the streaming buffers :meth:`run` holds for ``channels`` output channels."""
        plane = self.roi[0] * self.padded[1] * self.padded[2]
        return plane * (channels * torch.finfo(accumulator).bits // 8 + 4)

    def run(
        self,
        image: torch.Tensor,
        infer: Callable[[torch.Tensor], torch.Tensor],
        sink: Sink,
        batch_size: int = 1,
        progress: Optional[ProgressCallback] = None,
        cancel=None,  # noqa: ANN001
        on_oom: Optional[Callable[[], None]] = None,
        accumulator: torch.dtype = torch.float32,
    ) -> None:
        """Run ``infer`` over all windows of ``image`` (``[C, z, y, x]``, CPU) and stream the blended result.

        ``infer(batch[B, C, *roi]) -> scores[B, K, *roi]`` (float, any device).
        ``sink(z0, z1, scores[K, z1 - z0, y, x])`` receives consecutive, finished
        z-slabs of the blended scores on the unpadded grid, each exactly once, in order.
        ``accumulator`` is the dtype of the running per-class sums: float16 halves the
        largest buffer when only labels are needed (the weights stay float32).
        """
        (za, zb), (ya, yb), (xa, xb) = self.pad
        if any(self.pad[a] != (0, 0) for a in range(3)):
            image = torch.nn.functional.pad(image, (xa, xb, ya, yb, za, zb))
        state = {"lo": 0, "scores": None, "weights": torch.zeros(self.roi[0], *self.padded[1:])}
        rz = self.roi[0]

        def flush(until: int) -> None:
            lo, scores, weights = state["lo"], state["scores"], state["weights"]
            if scores is None or until <= lo:
                state["lo"] = max(lo, until)
                return
            n = until - lo
            averaged = scores[:, :n].float() / weights[:n].clamp_min(1e-12)
            z0, z1 = max(lo - za, 0), min(until - za, self.shape[0])
            if z1 > z0:
                part = averaged[:, z0 + za - lo : z1 + za - lo, ya : ya + self.shape[1], xa : xa + self.shape[2]]
                sink(z0, z1, part.numpy())
            keep = rz - n
            if keep > 0:
                scores[:, :keep] = scores[:, n:].clone()
                weights[:keep] = weights[n:].clone()
            scores[:, keep:] = 0
            weights[keep:] = 0
            state["lo"] = until

        def run_batch(start: int, stop: int) -> None:
            batch = self.windows[start:stop]
            patches = torch.stack([image[:, z : z + rz, y : y + self.roi[1], x : x + self.roi[2]] for z, y, x in batch])
            out = infer(patches).float().cpu() * self.weight
            for (z, y, x), scores in zip(batch, out):
                if z > state["lo"]:
                    flush(z)
                if state["scores"] is None:
                    state["scores"] = torch.zeros(scores.shape[0], rz, *self.padded[1:], dtype=accumulator)
                region = (
                    slice(z - state["lo"], z - state["lo"] + rz),
                    slice(y, y + self.roi[1]),
                    slice(x, x + self.roi[2]),
                )
                state["scores"][(slice(None), *region)] += scores.to(accumulator)
                state["weights"][region] += self.weight

        run_in_batches(len(self), batch_size, run_batch, progress, cancel, "segmenting", on_oom)
        flush(self.padded[0])
