"""Bring your own model and data: a CNN over (1, 28, 28) images and a map-style Dataset.

Named in examples/byo-cnn.yaml. The trainer calls

- ``images(seed=..., **spec.data.kwargs)``, which returns a ``(train, test)`` pair of
  map-style ``torch.utils.data.Dataset``s whose items are ``(input, target)`` tensors;
- ``cnn(input_shape=(1, 28, 28), num_classes=10, **spec.model.kwargs)`` (``input_shape``
  comes from the first training item, ``num_classes`` from ``spec.data.numClasses`` or the
  largest training label + 1), which returns a ``torch.nn.Module``.

The data here is sklearn's 8x8 digits scaled up to 28x28: nothing to download. Run
`sgdjob run examples/byo-cnn.yaml` from the repository root (the module must be importable
by every trainer process; in a cluster, bake it into the trainer image).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset


class Digits28(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """sklearn digits as (1, 28, 28) float32 images in [0, 1] and int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        small = self.images[i].view(1, 1, 8, 8)
        big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
        return big[0], self.labels[i]


def images(*, seed: int, test_fraction: float = 0.25) -> tuple[Digits28, Digits28]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    t = lambda a: torch.tensor(a / 16.0, dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return Digits28(t(x_tr), i(y_tr)), Digits28(t(x_te), i(y_te))


class CNN(nn.Module):
    def __init__(self, channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7x7
        )
        self.head = nn.Linear(2 * width * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def cnn(*, input_shape: tuple[int, ...], num_classes: int, width: int = 8, **_: Any) -> nn.Module:
    channels, height, w = input_shape
    if (height, w) != (28, 28):
        raise ValueError(f"this CNN is for 28x28 images, not {height}x{w}")
    return CNN(channels, num_classes, width)
