"""A yardstick for the shipped ViT: multinomial logistic regression on raw Fashion-MNIST pixels.

    python -m research.linear_baseline      # prints test top-1 (10k held-out images)

Full-batch Adam, 300 steps, on the 60k training images normalised as the ViT sees them; no augmentation, nothing
selected on the test split. It says how much of the ViT's accuracy is more than a linear read-out of the pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spot_compile.data.datasets import load_dataset
from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR, FMNIST_MEAN, FMNIST_STD


def main() -> None:
    torch.manual_seed(0)
    train, test = (load_dataset(FASHION_MNIST_DIR, split) for split in ("train", "test"))
    x, x_test = (((d.images - FMNIST_MEAN) / FMNIST_STD).flatten(1) for d in (train, test))
    linear = torch.nn.Linear(x.shape[1], 10)
    opt = torch.optim.Adam(linear.parameters(), lr=0.01)
    for _ in range(300):
        loss = F.cross_entropy(linear(x), train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = 100.0 * (linear(x_test).argmax(1) == test.labels).float().mean().item()
    print(f"logistic regression on pixels: test top-1 {acc:.2f}% (train loss {loss.item():.3f})")


if __name__ == "__main__":
    main()
