"""The partition of the training set across workers, and each worker's batch schedule.

Worker i of N trains on shard i: the samples at positions i, i+N, ... of a permutation fixed
by the job seed, so shards are disjoint. Each epoch the shard is reshuffled from
(seed, epoch, i); the batch of a given step is a pure function of (seed, worker, step), which
makes a restarted worker recompute exactly the gradient it was computing and a fixed-seed run
reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Partition:
    """Worker ``index``'s share of the training set and its batch schedule."""

    seed: int
    index: int
    indices: np.ndarray  # positions in the training set owned by this worker
    batch_size: int

    @property
    def steps_per_epoch(self) -> int:
        return len(self.indices) // self.batch_size

    def batch(self, step: int) -> np.ndarray:
        """Training-set positions of the batch for ``step`` (drop-last within each epoch)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        rng = np.random.default_rng([self.seed, epoch, self.index])
        order = rng.permutation(len(self.indices))
        lo = within * self.batch_size
        return self.indices[order[lo : lo + self.batch_size]]


def partition_for(
    n_train: int, *, workers: int, index: int, batch_size: int, seed: int
) -> Partition:
    perm = np.random.default_rng([seed, 0xDA7A]).permutation(n_train)
    part = Partition(seed=seed, index=index, indices=perm[index::workers], batch_size=batch_size)
    if part.steps_per_epoch < 1:
        raise ValueError(
            f"worker {index} holds {len(part.indices)} samples, fewer than "
            f"spec.training.batchSize={batch_size}"
        )
    return part


def total_steps(
    *, n_train: int, workers: int, batch_size: int, epochs: int | None, max_steps: int | None
) -> int:
    """Steps per worker: maxSteps, or epochs x the smallest shard's steps per epoch."""
    if max_steps is not None:
        return max_steps
    assert epochs is not None
    smallest = n_train // workers
    return epochs * max(1, smallest // batch_size)
