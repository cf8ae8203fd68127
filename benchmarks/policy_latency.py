"""Latency of several token policies side by side at one FLOPs budget: dense, and each policy, eager and compiled,
all timed in one round-robin loop per batch size (spot_compile.timing), so they compare on equal terms.

    python -m benchmarks.policy_latency --model deit_tiny --batches 32              # timm DeiT-T, 224 px
    python -m benchmarks.policy_latency --model shipped --batches 1,8,64            # the shipped Fashion-MNIST ViT

Writes docs/results/policy_latency/policy_latency_<model>.{json,md}. For each policy and mode: median ms, the speedup over the
fastest dense (eager or compiled, whichever is faster at that batch), and that speedup times the FLOPs ratio: the
share of the FLOPs limit reached (1.0: time falls exactly as FLOPs do). The FLOPs count the policy's own work
(scorers, merging's similarity matmul) as FlopCounterMode sees it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from latency import build
from rich.console import Console
from rich.table import Table

import spot_compile as sc
from spot_compile.cli.bench import compiled_fn
from spot_compile.measure.timing import median_ms


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny")
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--policies", default="merge,class-attention")
    ap.add_argument("--batches", default="32")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=Path("docs/results/policy_latency"))
    args = ap.parse_args()
    console = Console()
    torch.manual_seed(0)
    model, size = build(args.model)
    graphs = {"dense": sc.sparsify(model, sc.SparsifyConfig(budget=1.0, input_size=size))}
    for policy in args.policies.split(","):
        start = time.perf_counter()
        graphs[policy] = sc.sparsify(model, sc.SparsifyConfig(budget=args.budget, policy=policy, input_size=size))
        console.log(f"{policy}: FLOPs ratio {graphs[policy].plan.flops_ratio:.3f}, tokens "
                    f"{[s.tokens_out for s in graphs[policy].plan.stages]}, sparsified in {time.perf_counter() - start:.0f} s")
    modes = args.modes.split(",")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        x = graphs["dense"].example(batch)
        torch._dynamo.reset()
        fns = {}
        for name, graph in graphs.items():
            for mode in modes:
                start = time.perf_counter()
                fns[(name, mode)] = compiled_fn(graph, mode, x)
                if mode != "eager":
                    console.log(f"batch {batch}: {name} {mode} in {time.perf_counter() - start:.0f} s")
        ms = dict(zip(fns, median_ms(list(fns.values()), x, args.warmup, args.repeats)))
        fastest_dense = min(v for (name, _), v in ms.items() if name == "dense")
        for (name, mode), v in ms.items():
            ratio = graphs[name].plan.flops_ratio
            rows.append({"batch": batch, "policy": name, "mode": mode, "ms": v, "flops_ratio": ratio,
                         "speedup": fastest_dense / v, "of_flops_limit": fastest_dense / v * ratio})
    meta = {"model": args.model, "budget": args.budget, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "warmup": args.warmup}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"policy_latency_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    columns = ("batch", "policy", "mode", "ms", "FLOPs ratio", "speedup vs fastest dense", "share of FLOPs limit")
    table = Table(title=f"{args.model} at budget {args.budget}: median of {args.repeats} after {args.warmup} warm-up, "
                        f"all interleaved ({meta['threads']} threads, torch {meta['torch']})")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for c in columns:
        table.add_column(c)
    for r in rows:
        cells = [str(r["batch"]), r["policy"], r["mode"], f"{r['ms']:.2f}", f"{r['flops_ratio']:.3f}", f"{r['speedup']:.2f}x",
                 f"{r['of_flops_limit']:.2f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    header = (f"{args.model} at budget {args.budget}, {meta['threads']} CPU threads, torch {meta['torch']}, {meta['date']}; "
              f"median of {args.repeats} runs after {args.warmup} warm-up, every graph interleaved in one loop per batch. "
              "Speedup is over the fastest dense graph at that batch; share of FLOPs limit = speedup x FLOPs ratio.\n\n")
    stem.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")
    console.print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
