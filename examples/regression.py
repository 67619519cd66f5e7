"""A regression data set for examples/diabetes-regression.yaml: sklearn's diabetes data.

442 patients, 10 standardised features, the target (disease progression after a year)
standardised on the training split, so the RMSE is in units of the target's spread (a
constant guess scores about 1.0). Returned as a (train, test) pair of TensorDatasets.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def diabetes(*, seed: int, test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    x, y = load_diabetes(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed)
    mx, sx = x_tr.mean(axis=0), x_tr.std(axis=0) + 1e-8
    my, sy = y_tr.mean(), y_tr.std()

    def pair(a, b):  # type: ignore[no-untyped-def]
        xs = torch.tensor((a - mx) / sx, dtype=torch.float32)
        ys = torch.tensor((b - my) / sy, dtype=torch.float32)
        return TensorDataset(xs, ys)

    return pair(x_tr, y_tr), pair(x_te, y_te)
