"""Where a worker's batches come from: in process, or from loader processes running ahead.

``BatchSource.get(step)`` returns the batch of ``step``: the positions come from the worker's
``Partition`` (a pure function of seed, worker and step), so loader processes change only
when a batch is built, never which batch it is. With ``loader_workers`` > 0 a torch
``DataLoader`` builds batches step, step+1, ... in that many processes, in order; a jump (a
backup worker skipping closed steps, a replay after a shard restart) restarts it at the new
step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from sgdjob.data.dataset import gather
from sgdjob.data.partition import Partition


class _ByBatch(TorchDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Indexed by a whole batch of positions (the DataLoader's batching is turned off)."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return gather(self.ds, torch.as_tensor(indices))


class _Steps(Sampler[Any]):
    def __init__(self, part: Partition, start: int, stop: int) -> None:
        self.part, self.start, self.stop = part, start, stop

    def __iter__(self) -> Iterator[Any]:
        for step in range(self.start, self.stop):
            yield self.part.batch(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class BatchSource:
    """The batches of one worker's steps ``[0, steps)``."""

    def __init__(self, ds: Any, part: Partition, *, steps: int, loader_workers: int) -> None:
        self.ds, self.part, self.steps = ds, part, steps
        self.loader_workers = loader_workers
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._next = -1

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.loader_workers == 0:
            return gather(self.ds, torch.from_numpy(self.part.batch(step)))
        if self._it is None or step != self._next:
            self.close()
            loader = DataLoader(
                _ByBatch(self.ds),
                sampler=_Steps(self.part, step, self.steps),
                batch_size=None,
                num_workers=self.loader_workers,
                prefetch_factor=2,
            )
            self._it = iter(loader)
        self._next = step + 1
        x, y = next(self._it)
        return x, y

    def close(self) -> None:
        # Dropping the iterator stops its processes (torch joins them on shutdown).
        it, self._it = self._it, None
        if it is not None:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def eval_batches(
    ds: Any, *, limit: int | None, batch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``limit`` (or all) test items in order, ``batch`` at a time."""
    n = len(ds) if limit is None else min(limit, len(ds))
    for lo in range(0, n, batch):
        yield gather(ds, torch.arange(lo, min(n, lo + batch)))
