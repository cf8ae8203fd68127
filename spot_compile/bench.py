"""Latency of dense vs sparsified models, eager and compiled, measured as ratios in one run.

Runs are interleaved (dense, sparse, dense, ...) so machine noise hits both alike; each figure is the median of
`repeats` timed runs after `warmup` untimed ones. Efficiency = measured speedup x FLOPs ratio (1.0 means the
speedup reaches the FLOPs limit).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .api import sparsify
from .config import SparsifyConfig


@dataclass
class Timing:
    budget: float
    mode: str
    batch: int
    dense_ms: float
    sparse_ms: float
    flops_ratio: float
    peak_rss_mb: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms

    @property
    def efficiency(self) -> float:
        return self.speedup * self.flops_ratio


def _median_pair(fns, x, warmup: int, repeats: int) -> tuple[float, float]:
    times = ([], [])
    for i in range(warmup + repeats):
        for fn, acc in zip(fns, times):
            t = time.perf_counter()
            fn(x)
            if i >= warmup:
                acc.append(time.perf_counter() - t)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def quick_latency(model: torch.nn.Module, sparse, batch: int = 8, repeats: int = 5) -> tuple[float, float]:
    """Median eager latency (seconds) of dense and sparse at one batch size: the quick check of apply and demo."""
    model.eval()
    with torch.no_grad():
        dense_ms, sparse_ms = _median_pair((model, sparse), torch.randn(batch, *sparse.plan.input_shape[1:]), 2, repeats)
    return dense_ms / 1e3, sparse_ms / 1e3


@torch.no_grad()
def run_bench(model: torch.nn.Module, budgets, batches, modes=("eager", "compiled"), input_size=None, warmup: int = 3,
              repeats: int = 10, console: Console | None = None) -> list[Timing]:
    console = console or Console()
    model.eval()
    dense = sparsify(model, SparsifyConfig(budget=1.0, input_size=input_size))
    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("timing", total=len(budgets) * len(batches) * len(modes))
        for budget in budgets:
            sparse = sparsify(model, SparsifyConfig(budget=budget, input_size=input_size))
            for mode in modes:
                if mode == "compiled":
                    torch._dynamo.reset()
                    fns = (dense.compile(), sparse.compile())
                else:
                    fns = (model, sparse)
                for batch in batches:
                    x = torch.randn(batch, *dense.plan.input_shape[1:])
                    d, s = _median_pair(fns, x, warmup, repeats)
                    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                    rows.append(Timing(budget, mode, batch, d, s, sparse.plan.flops_ratio, rss))
                    progress.advance(task)
    return rows


COLUMNS = ("budget", "mode", "batch", "dense ms", "sparse ms", "speedup", "FLOPs ratio", "speedup x FLOPs ratio")


def _cells(r: Timing) -> list[str]:
    return [str(r.budget), r.mode, str(r.batch), f"{r.dense_ms:.1f}", f"{r.sparse_ms:.1f}", f"{r.speedup:.2f}x",
            f"{r.flops_ratio:.3f}", f"{r.efficiency:.2f}"]


def report(rows: list[Timing], name: str, out_dir: Path | None, console: Console, repeats: int, warmup: int) -> None:
    table = Table(title=f"{name}: median latency of {repeats} runs after {warmup} warm-up, dense and sparse interleaved")
    for c in COLUMNS:
        table.add_column(c)
    for r in rows:
        table.add_row(*_cells(r))
    console.print(table)
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu",
            "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    data = {**meta, "rows": [{**asdict(r), "speedup": r.speedup, "efficiency": r.efficiency} for r in rows]}
    (out_dir / f"latency_{name}.json").write_text(json.dumps(data, indent=2))
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] + ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    (out_dir / f"latency_{name}.md").write_text(
        f"{name}, CPU, {meta['threads']} threads, torch {meta['torch']}, {meta['date']}\n\n" + "\n".join(md) + "\n")
    console.print(f"wrote {out_dir}/latency_{name}.json and .md")
