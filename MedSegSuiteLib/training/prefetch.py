"""Drawing the next iteration's first batch on a background thread while the current one trains.

Every recipe starts its step with ``data.labelled_batch(generator)`` on a generator seeded
for that iteration. :class:`BatchPrefetcher` makes that call ahead of time, on the same
freshly seeded generator, and hands the recipe the batch together with the generator in
the state the call left it. A step therefore sees exactly the numbers it would have seen
without prefetching; only the augmentation's wall time moves off the training thread.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch

from .recipes.base import TrainingData

__all__ = ["BatchPrefetcher"]


class _PrefetchedData:
    """``TrainingData`` whose first default-size labelled batch for one generator is already drawn."""

    def __init__(self, data: TrainingData, generator: torch.Generator, batch: Any) -> None:
        self._data, self._generator, self._batch = data, generator, batch

    def labelled_batch(self, generator: torch.Generator, count: Optional[int] = None) -> Any:
        if self._batch is not None and generator is self._generator and count in (None, self._data.batch_size):
            batch, self._batch = self._batch, None
            return batch
        return self._data.labelled_batch(generator, count)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)


class BatchPrefetcher:
    """Prepares iteration ``i + 1``'s first labelled batch while iteration ``i`` runs.

    Args:
        data: the training samples.
        seed_for: the generator seed of an iteration.
    """

    def __init__(self, data: TrainingData, seed_for: Callable[[int], int]) -> None:
        self.data, self.seed_for = data, seed_for
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsegsuite-batches")
        self._pending: Optional[tuple[int, Future]] = None

    def _draw(self, iteration: int) -> tuple[torch.Generator, Any]:
        generator = torch.Generator().manual_seed(self.seed_for(iteration))
        return generator, self.data.labelled_batch(generator)

    def get(self, iteration: int) -> tuple[torch.Generator, Any]:
        """The generator and data for ``iteration``, and start drawing for ``iteration + 1``."""
        if self._pending is not None and self._pending[0] == iteration:
            generator, batch = self._pending[1].result()
        else:
            if self._pending is not None:
                self._pending[1].cancel()
            generator, batch = self._draw(iteration)
        self._pending = (iteration + 1, self._pool.submit(self._draw, iteration + 1))
        return generator, _PrefetchedData(self.data, generator, batch)

    def close(self) -> None:
        """Stop the background thread (a pending draw is finished and dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending = None
