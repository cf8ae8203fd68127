"""Latency of dense vs sparsified models, eager and compiled, as ratios measured in one run.

    python benchmarks/latency.py --model deit_tiny --budgets 1.0,0.6 --batches 8
    python benchmarks/latency.py --model shipped

Runs are interleaved (dense, sparse, dense, ...) so machine noise hits both alike; each figure is the median of
`--repeats` timed runs after `--warmup` untimed ones. Writes docs/results/latency_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import spot_compile as sc


def build(name: str) -> tuple[torch.nn.Module, int]:
    if name == "shipped":
        from spot_compile.zoo import load_shipped_model

        return load_shipped_model()[0], 28
    import timm

    timm_name = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224"}.get(name, name)
    return timm.create_model(timm_name, pretrained=False).eval(), 224


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny")
    ap.add_argument("--budgets", default="0.6")
    ap.add_argument("--batches", default="8")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    console = Console()
    torch.manual_seed(0)
    model, size = build(args.model)
    budgets = [float(b) for b in args.budgets.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    dense = sc.sparsify(model, sc.SparsifyConfig(budget=1.0, input_size=size))
    rows = []
    with torch.no_grad(), Progress(console=console) as progress:
        task = progress.add_task("timing", total=len(budgets) * len(batches) * len(modes))
        for budget in budgets:
            sparse = sc.sparsify(model, sc.SparsifyConfig(budget=budget, input_size=size))
            for mode in modes:
                if mode == "compiled":
                    torch._dynamo.reset()
                    fns = (dense.compile(), sparse.compile())
                else:
                    fns = (model, sparse)
                for batch in batches:
                    x = torch.randn(batch, *dense.plan.input_shape[1:])
                    times = ([], [])
                    for i in range(args.warmup + args.repeats):
                        for fn, acc in zip(fns, times):
                            t = time.perf_counter()
                            fn(x)
                            if i >= args.warmup:
                                acc.append(time.perf_counter() - t)
                    d, s = statistics.median(times[0]), statistics.median(times[1])
                    rows.append({"budget": budget, "mode": mode, "batch": batch, "dense_ms": d * 1e3, "sparse_ms": s * 1e3,
                                 "speedup": d / s, "flops_ratio": sparse.plan.flops_ratio,
                                 "efficiency": (d / s) * sparse.plan.flops_ratio})
                    progress.advance(task)
    table = Table(title=f"{args.model}: median latency, {args.repeats} runs after {args.warmup} warm-up, interleaved")
    cols = ("budget", "mode", "batch", "dense ms", "sparse ms", "speedup", "FLOPs ratio", "speedup / FLOPs limit")
    for c in cols:
        table.add_column(c)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r["budget"]), r["mode"], str(r["batch"]), f"{r['dense_ms']:.1f}", f"{r['sparse_ms']:.1f}",
                 f"{r['speedup']:.2f}x", f"{r['flops_ratio']:.3f}", f"{r['efficiency']:.2f}"]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": "cpu", "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    (args.out_dir / f"latency_{args.model}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (args.out_dir / f"latency_{args.model}.md").write_text(
        f"{args.model}, CPU, {meta['threads']} threads, torch {meta['torch']}, {meta['date']}\n\n" + "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
