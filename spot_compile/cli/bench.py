"""Latency of dense vs sparsified models, eager and compiled, measured as ratios in one run.

Runs are interleaved (for one budget and batch: dense and sparse of every mode, round-robin) so machine noise hits
them all alike; each figure is the median of `repeats` timed runs after `warmup` untimed ones (`timing.py`).
Efficiency = measured speedup x FLOPs ratio (1.0 means the
speedup reaches the FLOPs limit). Modes: "eager" (the model itself vs the sparse GraphModule), "compiled"
(`torch.compile`, Inductor defaults), "frozen" (the same with Inductor's weight freezing, which constant-folds and
pre-packs the weights: inference only), "aot" (AOTInductor: `SparseViT.aot_compile`, one shared library per graph,
no Python or guards between kernels; weights copied in, inference only) and, on a GPU, "cudagraphs" (`mode="reduce-overhead"`: the whole forward
replayed as one CUDA graph, which removes the launch cost that dominates small batches).
The benchmark runs where the model's weights are: move the model to a GPU first to time it there (each timed call
then ends with a device synchronisation, and peak memory is read from the CUDA allocator).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from spot_compile.api import sparsify
from spot_compile.config import SparsifyConfig
from spot_compile.errors import UsageError, first_line
from spot_compile.measure.timing import Ratio, round_robin_ms
from spot_compile.serialization.files import atomic_file, write_text

MODES = ("eager", "compiled", "frozen", "aot", "cudagraphs")
DEFAULT_MODES = {"cpu": ("eager", "compiled"), "cuda": ("eager", "compiled", "cudagraphs")}


@dataclass
class Timing:
    budget: float
    mode: str
    batch: int
    dense_ms: float
    sparse_ms: float
    flops_ratio: float
    dense_peak_mb: float | None = None
    sparse_peak_mb: float | None = None
    # interquartile range of the per-round speedups (dense / sparse, the two timed in the same round)
    speedup_low: float | None = None
    speedup_high: float | None = None

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms

    @property
    def efficiency(self) -> float:
        return self.speedup * self.flops_ratio

    @property
    def sparse_images_per_s(self) -> float:
        return self.batch / self.sparse_ms * 1e3

    @property
    def noise_check(self) -> bool:
        """A budget-1.0 row times the dense graph against itself (its capture, in eager): 1.00 on a quiet machine."""
        return self.budget >= 1.0

    @property
    def too_noisy(self) -> bool:
        return self.noise_check and self.speedup_low is not None and Ratio(self.speedup, self.speedup_low, self.speedup_high).too_noisy

    def as_dict(self) -> dict:
        """The row as the JSON reports write it: the measured fields and the figures derived from them."""
        return {**asdict(self), "speedup": self.speedup, "efficiency": self.efficiency,
                "sparse_images_per_s": self.sparse_images_per_s, "too_noisy": self.too_noisy}


@dataclass(frozen=True)
class QuickLatency:
    """Eager latency of dense and sparse at one batch: medians, the sparse / dense ratio with its spread, and the
    dense model timed against itself in the same rounds (`noise`: 1.00 on a quiet machine)."""

    batch: int
    repeats: int
    dense_ms: float
    sparse_ms: float
    ratio: Ratio
    noise: Ratio


def quick_latency(model: torch.nn.Module, sparse, batch: int = 8, repeats: int = 7) -> QuickLatency:
    """The quick latency check of apply and demo (`QuickLatency`)."""
    model.eval()
    with torch.no_grad():
        dense, sparse_t, again = round_robin_ms((model, sparse, model), sparse.example(batch), 2, repeats)
    return QuickLatency(batch, repeats, statistics.median(dense), statistics.median(sparse_t), Ratio.of(sparse_t, dense),
                        Ratio.of(again, dense))


_LIBC = ctypes.CDLL(None) if platform.system() == "Linux" else None


def _rss_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def peak_memory_mb(fn: Callable, x: torch.Tensor, tries: int = 3) -> float | None:
    """Peak resident memory a call of `fn(x)` adds to the process, in MB (Linux; None elsewhere).

    Returns freed heap to the OS (`malloc_trim`), resets the kernel's high-water mark (`/proc/self/clear_refs` 5),
    runs `fn`, and reads VmHWM - VmRSS before. This sees every allocation, eager or Inductor's own buffers, which
    torch's profiler does not. Median of `tries` calls.
    """
    if x.is_cuda:
        return _cuda_peak_mb(fn, x)
    if _LIBC is None:
        return None
    peaks = []
    for _ in range(tries):
        _LIBC.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return None
        base = _rss_mb("VmRSS")
        fn(x)
        peaks.append(_rss_mb("VmHWM") - base)
    return statistics.median(peaks)


def _cuda_peak_mb(fn: Callable, x: torch.Tensor) -> float:
    """Peak CUDA memory a call of `fn(x)` allocates above what was allocated before it, in MB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def compiled_fn(graph, mode: str, example: torch.Tensor) -> Callable:
    """One captured graph as `mode` runs it: its GraphModule for "eager", AOTInductor for "aot", else `torch.compile`
    (frozen weights for "frozen", CUDA graphs for "cudagraphs"), specialised to the example's batch size (as a server
    with a fixed batch would run it) and compiled now, so that timing excludes compilation."""
    if mode == "eager":
        return graph.graph_module
    if mode == "aot":
        return graph.aot_compile(batch=len(example))
    options = {"mode": "reduce-overhead"} if mode == "cudagraphs" else {}
    return graph.compiled(freezing=mode == "frozen", verify=False, dynamic=False, batch=len(example), **options)


def compiled_pair(dense, sparse, mode: str, example: torch.Tensor) -> tuple[Callable, Callable]:
    """Both graphs as `mode` runs them (see `compiled_fn`)."""
    return compiled_fn(dense, mode, example), compiled_fn(sparse, mode, example)


@torch.no_grad()
def run_bench(model: torch.nn.Module, budgets, batches, modes=MODES, input_size=None, warmup: int = 3,
              repeats: int = 10, console: Console | None = None, config: dict | None = None,
              on_rows: Callable[[list[Timing]], None] | None = None) -> list[Timing]:
    """Times dense vs sparse for every budget x mode x batch; `config` holds extra SparsifyConfig fields (policy...).

    `on_rows`, if given, is called with all rows so far after each budget and batch, so a run cut short (a time limit
    on a lent GPU) still leaves what it measured."""
    console = console or Console()
    unknown = set(modes) - set(MODES)
    if unknown:
        raise UsageError(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    for name, values, least in (("batch sizes", batches, 1), ("repeats", [repeats], 1), ("warmup", [warmup], 0)):
        if not values or any(not isinstance(v, int) or v < least for v in values):
            raise UsageError(f"{name} must be whole numbers >= {least}, got {values}")
    for b in budgets:
        SparsifyConfig(budget=b)  # budgets in range, before the first slow sparsify
    model.eval()
    dense = sparsify(model, SparsifyConfig(budget=1.0, input_size=input_size))
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"), TimeElapsedColumn(),
               TextColumn("left"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("timing", total=len(budgets) * len(batches) * len(modes))
        for budget in budgets:
            start = time.perf_counter()
            # Budget 1.0 is the dense graph: compiled once and timed against itself, the run's noise check.
            sparse = dense if budget >= 1.0 else sparsify(model, SparsifyConfig(budget=budget, input_size=input_size, **(config or {})))
            # Timestamps with durations: a run cut short by a time limit then says where its time went.
            console.log(f"budget {budget}: sparsified in {time.perf_counter() - start:.0f} s")
            for batch in batches:
                rows += _time_budget_batch(model, dense, sparse, budget, batch, modes, warmup, repeats, console, progress, task)
                if on_rows is not None:
                    on_rows(list(rows))
    return rows


def _time_budget_batch(model, dense, sparse, budget: float, batch: int, modes, warmup: int, repeats: int,
                       console: Console, progress: Progress, task) -> list[Timing]:
    """Every mode of one budget and batch, timed in one round-robin loop, so that modes compare with each other
    (compiled vs eager) as fairly as dense compares with sparse."""
    progress.update(task, description=f"budget {budget} batch {batch}: compiling")
    x = sparse.example(batch)
    torch._dynamo.reset()  # drop the previous batch's compiled graphs
    pairs = {}
    for mode in modes:
        start = time.perf_counter()
        try:
            if mode == "eager":
                pairs[mode] = (model, sparse)
            elif sparse is dense:
                fn = compiled_fn(dense, mode, x)
                pairs[mode] = (fn, fn)
            else:
                pairs[mode] = compiled_pair(dense, sparse, mode, x)
        except Exception as e:  # one mode's compiler failure must not lose the other modes' figures
            console.print(f"[yellow]budget {budget} batch {batch}: {mode} failed to compile, left out ({first_line(e)})")
            progress.advance(task)
            continue
        if mode != "eager":
            console.log(f"budget {budget} batch {batch}: {mode} mode compiled in {time.perf_counter() - start:.0f} s")
    progress.update(task, description=f"budget {budget} batch {batch}: timing")
    times = round_robin_ms([fn for pair in pairs.values() for fn in pair], x, warmup, repeats)
    rows = []
    for i, (mode, (d_fn, s_fn)) in enumerate(pairs.items()):
        dense_t, sparse_t = times[2 * i], times[2 * i + 1]
        speedup = Ratio.of(dense_t, sparse_t)
        # CUDA graphs replay in a memory pool allocated at capture: the allocator sees no new memory
        peak = (None, None) if mode == "cudagraphs" else (peak_memory_mb(d_fn, x), peak_memory_mb(s_fn, x))
        rows.append(Timing(budget, mode, batch, statistics.median(dense_t), statistics.median(sparse_t),
                           sparse.plan.flops_ratio, *peak, speedup.low, speedup.high))
        progress.advance(task)
    return rows


COLUMNS = ("budget", "mode", "batch", "dense ms", "sparse ms", "speedup (IQR)", "FLOPs ratio", "speedup x FLOPs ratio",
           "sparse img/s", "peak MB dense / sparse")


def _ms(ms: float) -> str:
    # Two decimals below 10 ms: GPU latencies of a small model are fractions of a millisecond.
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def _cells(r: Timing) -> list[str]:
    mem = "-" if r.dense_peak_mb is None else f"{r.dense_peak_mb:.0f} / {r.sparse_peak_mb:.0f}"
    spread = "" if r.speedup_low is None else f" ({r.speedup_low:.2f}-{r.speedup_high:.2f})"
    flag = " noisy!" if r.too_noisy else ""
    return [str(r.budget), r.mode, str(r.batch), _ms(r.dense_ms), _ms(r.sparse_ms), f"{r.speedup:.2f}x{spread}{flag}",
            f"{r.flops_ratio:.3f}", f"{r.efficiency:.2f}", f"{r.sparse_images_per_s:.0f}", mem]


def best_paths(rows: list[Timing]) -> list[dict]:
    """Per budget and batch: the fastest mode for dense and for sparse, and the speedup between those two."""
    out = []
    for key in sorted({(r.budget, r.batch) for r in rows}):
        group = [r for r in rows if (r.budget, r.batch) == key]
        d = min(group, key=lambda r: r.dense_ms)
        s = min(group, key=lambda r: r.sparse_ms)
        out.append({"budget": key[0], "batch": key[1], "dense_mode": d.mode, "dense_ms": d.dense_ms,
                    "sparse_mode": s.mode, "sparse_ms": s.sparse_ms, "speedup": d.dense_ms / s.sparse_ms,
                    "flops_ratio": s.flops_ratio, "efficiency": d.dense_ms / s.sparse_ms * s.flops_ratio})
    return out


def save_speedup_plot(rows: list[Timing], path: Path, title: str) -> None:
    """Speedup vs budget, one line per mode and batch, with the FLOPs limit (dense / sparse FLOPs) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    limit = sorted({(r.budget, 1 / r.flops_ratio) for r in rows})
    ax.plot([b for b, _ in limit], [v for _, v in limit], "k--", lw=2, label="FLOPs limit")
    for mode in dict.fromkeys(r.mode for r in rows):
        for batch in sorted({r.batch for r in rows if r.mode == mode}):
            pts = sorted((r.budget, r.speedup) for r in rows if r.mode == mode and r.batch == batch)
            ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=f"{mode}, batch {batch}")
    ax.set_xlabel("budget (target fraction of dense FLOPs)")
    ax.set_ylabel("speedup (dense ms / sparse ms, same mode)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_file(path, "the speedup plot") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


def noise_lines(rows: list[Timing]) -> list[str]:
    """What the budget-1.0 rows (the dense graph timed against itself) say of the machine, as lines for the report."""
    checks = [r for r in rows if r.noise_check]
    if not checks:
        return ["no noise check: add 1.0 to --budgets to time the dense graph against itself beside the ratios"]
    noisy = [r for r in checks if r.too_noisy]
    if not noisy:
        worst = max(checks, key=lambda r: abs(r.speedup - 1.0))
        return [f"noise check passed: the dense graph timed against itself reads {worst.speedup:.2f}x at worst "
                f"({worst.mode}, batch {worst.batch})"]
    return [f"warning: the machine is too noisy to trust these ratios: the dense graph timed against itself reads "
            f"{r.speedup:.2f}x ({r.speedup_low:.2f}-{r.speedup_high:.2f}), not 1.00, in {r.mode} at batch {r.batch}; rerun "
            "on a quiet machine or with more --repeats" for r in noisy]


def report(rows: list[Timing], name: str, out_dir: Path | None, console: Console, repeats: int, warmup: int,
           policy: str = "class-attention", device: torch.device | str = "cpu", plot: bool = True, quiet: bool = False) -> None:
    """The rows as tables on the console and, with `out_dir`, as JSON, Markdown and (with `plot`) a PNG; `quiet`
    writes the files only (a run writes them after every batch, so that an interrupted one keeps its rows)."""
    noise = noise_lines(rows)
    table = Table(title=f"{name} ({policy}): median latency of {repeats} runs after {warmup} warm-up, dense and sparse interleaved")
    for c in COLUMNS:
        table.add_column(c)
    for r in rows:
        table.add_row(*_cells(r))
    best = best_paths(rows)
    if not quiet:
        console.print(table)
    best_table = Table(title="fastest path: best dense mode vs best sparse mode")
    for c in ("budget", "batch", "dense", "sparse", "speedup", "x FLOPs ratio"):
        best_table.add_column(c)
    for b in best:
        best_table.add_row(str(b["budget"]), str(b["batch"]), f"{b['dense_mode']} {_ms(b['dense_ms'])} ms",
                           f"{b['sparse_mode']} {_ms(b['sparse_ms'])} ms", f"{b['speedup']:.2f}x", f"{b['efficiency']:.2f}")
    if not quiet:
        console.print(best_table)
        for line in noise:
            console.print(line, style="yellow" if line.startswith(("warning", "no noise")) else None)
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    meta = {"model": name, "policy": policy, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": device.type, "cpu": cpu_name(), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
            "repeats": repeats, "warmup": warmup}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    where = meta.get("gpu", f"{meta['cpu']}, {meta['threads']} threads")
    data = {**meta, "rows": [r.as_dict() for r in rows], "best": best, "noise": noise}
    write_text(out_dir / f"latency_{name}.json", json.dumps(data, indent=2), "--out-dir")
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] + ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    md += ["", "Fastest path (best dense mode vs best sparse mode):", "",
           "| budget | batch | dense | sparse | speedup | speedup x FLOPs ratio |", "|---|---|---|---|---|---|"]
    md += [f"| {b['budget']} | {b['batch']} | {b['dense_mode']} {_ms(b['dense_ms'])} ms | {b['sparse_mode']} {_ms(b['sparse_ms'])} ms "
           f"| {b['speedup']:.2f}x | {b['efficiency']:.2f} |" for b in best]
    header = (f"{name}, policy {policy}, {where}, torch {meta['torch']}, {meta['date']}; "
              f"median of {repeats} after {warmup} warm-up; peak MB = "
              f"{'CUDA memory one forward allocates' if device.type == 'cuda' else 'resident memory one forward adds'}\n\n")
    md += [""] + noise
    write_text(out_dir / f"latency_{name}.md", header + "\n".join(md) + "\n", "--out-dir")
    if plot:
        save_speedup_plot(rows, out_dir / f"speedup_{name}.png", f"{name} ({policy}), {where}")
    if not quiet:
        console.print(f"wrote {out_dir}/latency_{name}.json, .md" + (f" and speedup_{name}.png" if plot else ""))


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"
