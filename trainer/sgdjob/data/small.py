"""The small built-ins: sklearn's 8x8 digits and the synthetic teacher-student task."""

from __future__ import annotations

import numpy as np
import torch

from sgdjob.data.dataset import Dataset


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
