"""The built-in `fashionMnist`: Zalando's Fashion-MNIST (MIT), from the Debian package
``dataset-fashion-mnist``, which installs gzip IDX files into /usr/share/datasets/fashion-mnist."""

from __future__ import annotations

from sgdjob.data.dataset import Data
from sgdjob.data.images import FASHION_DIRS, find_dir, image_data, load_idx_dir


def fashion_mnist() -> Data:
    """Fashion-MNIST: 60,000 / 10,000 images of 10 kinds of clothing (the official split)."""
    d = find_dir(
        FASHION_DIRS,
        "SGDJOB_FASHION_MNIST_DIR",
        package="the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
    )
    return image_data(load_idx_dir(d), mean=0.2860, std=0.3530)
