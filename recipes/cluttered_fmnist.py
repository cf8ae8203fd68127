"""Cluttered Fashion-MNIST: the construction of cluttered MNIST (Mnih et al. 2014, "Recurrent models of visual
attention"; Ba et al. 2015) applied to Fashion-MNIST, so that where the object sits varies per image.

    python recipes/cluttered_fmnist.py                 # writes runs/cluttered-fmnist/ (IDX files + garment boxes)

Each 28x28 garment is placed at a uniformly random position on a 56x56 canvas, over 6 to 8 distractors: random 8x8
crops of other garments of the same split, each at a uniformly random position (pixels combine by maximum, as
cluttered MNIST overlays its patches). Train canvases are built from the train split only, test canvases from the
test split only; everything is drawn from one generator seeded per split, so the data is the same on every machine.
With 4x4 patches the canvas is a 14x14 token grid and the garment's 28x28 box covers a quarter of the image.

The output is an IDX directory (`train-images-idx3-ubyte.gz`, ... as the original), which every spot-compile
command reads with `--data`, plus `train-boxes.npy` / `t10k-boxes.npy`: each canvas's garment box (top, left,
height, width) in pixels, for the kept-token precision of benchmarks that ask whether a policy finds the object.
"""

from __future__ import annotations

import argparse
import gzip
import struct
import time
from pathlib import Path

import numpy as np
import torch

from spot_compile.data.datasets import load_dataset
from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR

CANVAS, GARMENT, CROP = 56, 28, 8
DISTRACTORS = (6, 8)  # inclusive range per canvas
SEEDS = {"train": 1, "test": 2}
PREFIX = {"train": "train", "test": "t10k"}


def make_cluttered(images: torch.Tensor, seed: int, canvas: int = CANVAS, crop: int = CROP,
                   distractors: tuple[int, int] = DISTRACTORS) -> tuple[torch.Tensor, torch.Tensor]:
    """(canvases (N, 1, canvas, canvas) uint8, boxes (N, 4) int: top, left, height, width of the garment) from
    `images` (N, 1, 28, 28) uint8 of one split. Deterministic in `seed`."""
    n, _, h, w = images.shape
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, 1, canvas, canvas, dtype=torch.uint8)
    top = torch.randint(0, canvas - h + 1, (n,), generator=gen)
    left = torch.randint(0, canvas - w + 1, (n,), generator=gen)
    count = torch.randint(distractors[0], distractors[1] + 1, (n,), generator=gen)
    most = distractors[1]
    source = torch.randint(0, n - 1, (n, most), generator=gen)
    source += (source >= torch.arange(n)[:, None]).long()  # another garment, never the canvas's own
    crop_y, crop_x = (torch.randint(0, h - crop + 1, (n, most), generator=gen) for _ in range(2))
    at_y, at_x = (torch.randint(0, canvas - crop + 1, (n, most), generator=gen) for _ in range(2))
    for i in range(n):
        c = out[i, 0]
        for j in range(int(count[i])):
            patch = images[source[i, j], 0, crop_y[i, j]:crop_y[i, j] + crop, crop_x[i, j]:crop_x[i, j] + crop]
            region = c[at_y[i, j]:at_y[i, j] + crop, at_x[i, j]:at_x[i, j] + crop]
            region.copy_(torch.maximum(region, patch))
        region = c[top[i]:top[i] + h, left[i]:left[i] + w]
        region.copy_(torch.maximum(region, images[i, 0]))
    boxes = torch.stack([top, left, torch.full_like(top, h), torch.full_like(left, w)], dim=1)
    return out, boxes


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb", compresslevel=6) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def build(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        data = load_dataset(source, split)
        images = (data.images * 255).round().to(torch.uint8)
        canvases, boxes = make_cluttered(images, SEEDS[split])
        _write_idx(out / f"{PREFIX[split]}-images-idx3-ubyte.gz", canvases[:, 0].numpy())
        _write_idx(out / f"{PREFIX[split]}-labels-idx1-ubyte.gz", data.labels.numpy().astype(np.uint8))
        np.save(out / f"{PREFIX[split]}-boxes.npy", boxes.numpy())


def load_boxes(root: Path, split: str) -> torch.Tensor:
    """The garment boxes (N, 4: top, left, height, width) written beside the canvases of `split`."""
    return torch.from_numpy(np.load(Path(root) / f"{PREFIX[split]}-boxes.npy"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=FASHION_MNIST_DIR)
    ap.add_argument("--out", type=Path, default=Path("runs/cluttered-fmnist"))
    args = ap.parse_args()
    start = time.time()
    build(args.source, args.out)
    print(f"wrote {args.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
