"""The built-in `digits`: scikit-learn's 8x8 handwritten digits (shipped with sklearn)."""

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
