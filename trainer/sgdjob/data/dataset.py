"""The in-memory shapes data takes: the legacy ``Dataset`` and map-style tensor datasets.

A job's data is a ``Data``: a (train, test) pair of map-style ``torch.utils.data.Dataset``s
whose items are ``(input, target)`` tensors, plus what the model and the task need to know
(one input's shape, one target's shape, the number of classes). Datasets that can gather a
whole batch at once (``Batchable``: they have ``take(indices)``) are read without a Python
loop over items; any other map-style Dataset is read item by item and collated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset, default_collate


class DataError(ValueError):
    """Data cannot be loaded or does not fit the job; the message says what to do."""


@runtime_checkable
class Batchable(Protocol):
    """A dataset that returns a whole batch ``(inputs, targets)`` for a list of positions."""

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __len__(self) -> int: ...


class TensorPair(TorchDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Inputs and targets held as two tensors with the same first dimension."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{x.shape[0]} inputs but {y.shape[0]} targets")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], self.y[indices]


@dataclass(frozen=True)
class Dataset:
    """Classification data: float32 features, int64 labels, in memory (the original form)."""

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


@dataclass(frozen=True)
class Data:
    """A job's train and test sets and the shapes the model and the task are built for."""

    train: Any  # a map-style torch Dataset of (input, target); Batchable when possible
    test: Any
    input_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    num_classes: int | None  # classes, or vocabulary size; None when targets are not labels

    @property
    def n_train(self) -> int:
        return len(self.train)


def batchable(ds: Any) -> Batchable | None:
    """``ds`` itself, or a fast view of a two-tensor ``TensorDataset``, or None."""
    if isinstance(ds, Batchable):
        return ds
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        return TensorPair(ds.tensors[0], ds.tensors[1])
    return None


def gather(ds: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch ``(inputs, targets)`` at ``indices`` of any map-style dataset."""
    fast = batchable(ds)
    if fast is not None:
        return fast.take(indices)
    items = [ds[int(i)] for i in indices]
    batch = default_collate(items)
    if not isinstance(batch, Sequence) or len(batch) != 2:
        raise DataError("dataset items must be (input, target) pairs of tensors")
    return batch[0], batch[1]


def from_legacy(ds: Dataset) -> Data:
    return Data(
        train=TensorPair(ds.x_train, ds.y_train),
        test=TensorPair(ds.x_test, ds.y_test),
        input_shape=(ds.input_dim,),
        target_shape=(),
        num_classes=ds.num_classes,
    )


def _first_item(ds: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        n = len(ds)
    except TypeError:
        raise DataError(f"the {what} set must be a map-style Dataset (with __len__)") from None
    if n == 0:
        raise DataError(f"the {what} set is empty")
    item = ds[0]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(f"{what} items must be (input, target) pairs, got {type(item).__name__}")
    x, y = item
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError(f"{what} items must be (input, target) tensors")
    return x, y


def max_label(ds: Any) -> int:
    """The largest target value of the training set (every item read once if need be)."""
    fast = batchable(ds)
    if isinstance(fast, TensorPair):
        return int(fast.y.max())
    return max(int(torch.as_tensor(ds[i][1]).max()) for i in range(len(ds)))


def from_pair(pair: Any, *, task: str, num_classes: int | None) -> Data:
    """``Data`` from a user's (train, test) pair; shapes from the first training item."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise DataError("expected sgdjob.data.Dataset or a (train, test) pair of Datasets")
    train, test = pair
    x, y = _first_item(train, "training")
    _first_item(test, "test")
    if task in ("classification", "languageModel"):
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise DataError(f"a {task} task needs integer targets, the data has {y.dtype}")
        if num_classes is None:
            num_classes = max_label(train) + 1
    return Data(
        train=batchable(train) or train,
        test=batchable(test) or test,
        input_shape=tuple(int(d) for d in x.shape),
        target_shape=tuple(int(d) for d in y.shape),
        num_classes=num_classes,
    )
