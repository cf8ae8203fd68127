"""What the streaming data path costs a training step, against the in-memory path it replaced, in one process.

    python -m benchmarks.data_path          # writes docs/results/data_path/data_path.{json,md}

The shipped model's compiled training step (forward, backward, AdamW; batch 128, the recipe's size) is fed by:
  in memory: the Fashion-MNIST training split decoded into one float tensor, indexed, normalised and augmented
    batch-wide (`recipes/train_dense.augment`, as calibration did before the streaming path);
  streaming, image by image: `streaming.Prepared` over the IDX file through a DataLoader without workers (the CPU
    default), each image read and augmented on its own (how calibration streamed at first);
  streaming, batch-wise: the same images, seeds and augmentation, the batch fetched at once and transformed by a few
    batch-wide ops (`Prepared.__getitems__`, `TrainTransform.batch`): what calibration does now.
Rounds interleave the three (a few steps each, after a warm-up), so drift in the machine hits all alike; the table
gives the median seconds per step of each and its images/s. The data alone (no step) is timed the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track

from benchmarks.result_table import write_results
from recipes.train_dense import augment
from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR
from spot_compile.data.idx import (
    IdxImages,
    load_dataset,
)
from spot_compile.data.imageset import batches
from spot_compile.data.loading import Prepared, SeededSampler, loader
from spot_compile.data.preprocessing import model_normalization, model_preprocessing
from spot_compile.data.transforms import TrainTransform
from spot_compile.models.zoo import load_shipped_model

BATCH = 128


def in_memory(model):
    data = load_dataset(FASHION_MNIST_DIR, "train", model.cfg.img_size, model.cfg.in_chans)
    gen = torch.Generator().manual_seed(0)
    norm = model_normalization(model)
    while True:
        for x, y in batches(data, BATCH, shuffle=True, normalization=norm, generator=gen):
            if len(y) == BATCH:
                yield augment(x, gen), y


def streaming(model, batched: bool):
    data = IdxImages(FASHION_MNIST_DIR, "train")
    pre = model_preprocessing(model, model.cfg.in_chans, (model.cfg.img_size,) * 2)
    sampler = SeededSampler(data, 1, 0, 0)
    epoch = 0
    while True:
        sampler.start(epoch)
        yield from loader(Prepared(data, TrainTransform(pre), batched=batched), BATCH, sampler=sampler, drop_last=True)
        epoch += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="steps of each path per round")
    ap.add_argument("--out-dir", type=Path, default=Path("docs/results/data_path"))
    args = ap.parse_args()
    console = Console()
    model, _ = load_shipped_model()
    model.train()
    step_fn = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step(x, y):
        loss = F.cross_entropy(step_fn(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    paths = {"in memory": in_memory(model), "streaming, image by image": streaming(model, False),
             "streaming, batch-wise": streaming(model, True)}
    for source in paths.values():  # warm-up: the compile, and each path's first batches
        for _ in range(2):
            train_step(*next(source))
    step_times = {name: [] for name in paths}
    data_times = {name: [] for name in paths}
    for _ in track(range(args.rounds), description="interleaved rounds"):
        for name, source in paths.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(*next(source))
            step_times[name].append((time.perf_counter() - t0) / args.steps)
        for name, source in paths.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                next(source)
            data_times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(step_times["in memory"])
    cells, rows = [], []
    for name in paths:
        step, data = statistics.median(step_times[name]), statistics.median(data_times[name])
        rows.append({"path": name, "seconds_per_step": step, "images_per_s": BATCH / step, "data_seconds_per_batch": data,
                     "step_times": step_times[name], "data_times": data_times[name]})
        cells.append([name, f"{step:.3f}", f"{BATCH / step:.1f}", f"{step / base:.3f}", f"{1000 * data:.1f}"])
    write_results(console, args.out_dir, "data_path", "training step by data path (median of interleaved rounds)",
                  ["data path", "s / step", "images/s", "step vs in memory", "data alone, ms / batch"], cells,
                  f"# The data path's cost to a training step\n\n`python -m benchmarks.data_path` on {os.cpu_count()} CPU "
                  f"cores, torch {torch.__version__}: the shipped model's compiled training step at batch {BATCH}, "
                  f"{args.rounds} interleaved rounds of {args.steps} steps per path after a warm-up; medians.",
                  {"cores": os.cpu_count(), "torch": torch.__version__, "rounds": args.rounds, "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
