"""Fashion-MNIST, the project's real images: where Debian's `dataset-fashion-mnist` package installs it, its class
names and its pixel statistics. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


# Fashion-MNIST's pixel statistics on its training split.
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
