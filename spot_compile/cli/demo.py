"""`spot-compile demo`: the shipped Fashion-MNIST ViT, dense vs sparsified, on the real 10k test split."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from spot_compile.api import sparsify
from spot_compile.cli.bench import quick_latency
from spot_compile.config import SparsifyConfig
from spot_compile.data.datasets import evaluation_images, load_dataset
from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR
from spot_compile.data.idx import find_idx
from spot_compile.data.preprocessing import model_preprocessing
from spot_compile.measure.accuracy import accuracy
from spot_compile.measure.timing import Ratio, round_robin_ms
from spot_compile.models.zoo import SHIPPED_PREDICTORS, load_shipped_model


def run_demo(console: Console, budget: float = 0.6, data: Path | None = None, limit: int = 0) -> dict:
    model, metrics = load_shipped_model()
    if data is None or find_idx(Path(data), "test", "images"):
        test = load_dataset(data or FASHION_MNIST_DIR, "test", model.cfg.img_size, model.cfg.in_chans)
    else:  # an ImageFolder tree: its val/ or test/ split, read as the model's eval transform says
        test = evaluation_images(data, model_preprocessing(model, model.cfg.in_chans, (model.cfg.img_size,) * 2))
    if limit:
        test = test.subset(torch.arange(min(limit, len(test))))
    # merge: the default, training-free; class attention: the pruning peer; spot: the calibrated predictors
    policies = ["merge", "class-attention"] + (["spot"] if SHIPPED_PREDICTORS.is_file() else [])
    table = Table(title=f"shipped ViT on Fashion-MNIST test ({len(test)} held-out images), budget {budget}")
    for col in ("model", "top-1 %", "GFLOPs/image", "FLOPs ratio", "eager latency ratio (batch 8)",
                "compiled latency ratio (batch 64)"):
        table.add_column(col)
    with console.status("dense baseline (accuracy, torch.compile)"):
        dense_acc = accuracy(model, test)
        dense_fast = sparsify(model, SparsifyConfig(budget=1.0)).compiled(batch=64)
    results = {"dense": dense_acc}
    first, tokens, noise = None, {}, []
    for policy in policies:
        with console.status(f"sparsifying ({policy})"):
            sparse = sparsify(model, SparsifyConfig(budget=budget, policy=policy,
                                                    predictors=str(SHIPPED_PREDICTORS) if policy == "spot" else None))
            acc = accuracy(sparse, test)
            eager = quick_latency(model, sparse)
        with console.status(f"torch.compile ({policy})"), torch.no_grad():
            sparse_fast = sparse.compiled(batch=64)
            dense_times, sparse_times, again = round_robin_ms((dense_fast, sparse_fast, dense_fast), sparse.example(64), 2, 7)
        noise += [eager.noise, Ratio.of(again, dense_times)]
        if first is None:
            first = sparse.plan
            table.add_row("dense", f"{dense_acc:.2f}", f"{first.dense_flops / 1e9:.4f}", "1.000", "1.000", "1.000")
        table.add_row(f"sparse, {policy}", f"{acc:.2f}", f"{sparse.plan.sparse_flops / 1e9:.4f}",
                      f"{sparse.plan.flops_ratio:.3f}", eager.ratio.text(3), Ratio.of(sparse_times, dense_times).text(3))
        results[policy] = acc
        tokens[policy] = (f"{sparse.plan.stages[0].tokens_in} -> " + " -> ".join(str(s.tokens_out) for s in sparse.plan.stages)
                          + f" (in front of blocks {', '.join(str(s.block) for s in sparse.plan.stages)})")
    console.print(table)
    for policy, line in tokens.items():
        console.print(f"tokens, {policy}: {line}")
    console.print("latency ratio = sparse / dense time: median (interquartile range) of 7 interleaved rounds; the "
                  "compiled column uses SparseViT.compiled(), which falls back to eager where Inductor is slower")
    worst = max(noise, key=lambda r: abs(r.median - 1.0))
    if worst.too_noisy:
        console.print(f"[yellow]warning: the machine is too noisy to trust the latency ratios: the dense model timed "
                      f"against itself read {worst.median:.3f}, not 1.000; rerun on a quiet machine")
    return results
