"""Data sets and their partition across workers.

A ``Dataset`` holds train and test tensors in memory. Worker i of N trains on shard i: the
samples at positions i, i+N, ... of a permutation fixed by the job seed, so shards are
disjoint. Each epoch the shard is reshuffled from (seed, epoch, i); the batch of a given step
is a pure function of (seed, worker, step), which makes a restarted worker recompute exactly
the gradient it was computing and a fixed-seed run reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sgdjob.api.types import DataSpec
from sgdjob.entrypoints import load_entry_point


@dataclass(frozen=True)
class Dataset:
    """Classification data: float32 features, int64 labels, in memory."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[1])

    def __post_init__(self) -> None:
        for name in ("x_train", "x_test"):
            t = getattr(self, name)
            if t.dtype != torch.float32 or t.dim() != 2:
                raise ValueError(f"Dataset.{name} must be a 2-D float32 tensor")
        for name in ("y_train", "y_test"):
            t = getattr(self, name)
            if t.dtype != torch.int64 or t.dim() != 1:
                raise ValueError(f"Dataset.{name} must be a 1-D int64 tensor")
        if self.x_train.shape[0] != self.y_train.shape[0]:
            raise ValueError("x_train and y_train differ in length")
        if self.x_test.shape[0] != self.y_test.shape[0]:
            raise ValueError("x_test and y_test differ in length")


def digits(*, seed: int, test_fraction: float) -> Dataset:
    """sklearn's 8x8 handwritten digits, pixels scaled to [0, 1], a seeded stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / 16.0)  # noqa: E731
    i = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return Dataset(f(x_tr), i(y_tr), f(x_te), i(y_te), num_classes=10)


def teacher(
    *, seed: int, input_dim: int, hidden_dim: int, classes: int, train: int, test: int
) -> Dataset:
    """Teacher-student task: Gaussian inputs labelled by the argmax of a fixed random MLP."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(input_dim, hidden_dim, generator=g) / input_dim**0.5
    w2 = torch.randn(hidden_dim, classes, generator=g) / hidden_dim**0.5
    x = torch.randn(train + test, input_dim, generator=g)
    y = (torch.relu(x @ w1) @ w2).argmax(dim=1)
    return Dataset(x[:train].contiguous(), y[:train], x[train:].contiguous(), y[train:], classes)


def load_dataset(spec: DataSpec, *, seed: int) -> Dataset:
    if spec.builtin == "digits":
        return digits(seed=seed, test_fraction=spec.test_fraction)
    if spec.builtin == "teacher":
        t = spec.teacher
        return teacher(
            seed=seed,
            input_dim=t.input_dim,
            hidden_dim=t.hidden_dim,
            classes=t.classes,
            train=t.train_samples,
            test=t.test_samples,
        )
    assert spec.entry_point is not None  # validation guarantees one of the two
    fn = load_entry_point(spec.entry_point, field="spec.data.entryPoint")
    ds = fn(seed=seed, **spec.kwargs)
    if not isinstance(ds, Dataset):
        raise TypeError(f"spec.data.entryPoint must return sgdjob.data.Dataset, not {type(ds)}")
    return ds


def dataset_dims(spec: DataSpec, *, seed: int) -> tuple[int, int]:
    """(input_dim, num_classes) without generating built-in data (shards need only these)."""
    if spec.builtin == "digits":
        return 64, 10
    if spec.builtin == "teacher":
        return spec.teacher.input_dim, spec.teacher.classes
    ds = load_dataset(spec, seed=seed)
    return ds.input_dim, ds.num_classes


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
