"""What SPOT's predictors cost in wall-clock time, on the shipped model or a timm DeiT.

    python -m benchmarks.predictor_cost                        # writes docs/results/predictor_cost/predictor_cost.{json,md}
    python -m benchmarks.predictor_cost --model deit_small     # timm DeiT-S, predictors with random weights

For each batch size and mode (eager, torch.compile, AOTInductor), round-robin in one process (median of `--repeats`
after warm-up), compiled with the same options as `spot-compile bench`:
  * dense: the captured model;
  * spot: SPOT with the shipped predictors at budget 0.6 (taps, predictors, top-k, gather); for a timm model,
    uncalibrated predictors of the same architecture (their cost does not depend on their weights);
  * bare pruning: the same stages and keep counts, scored by a free scorer (one channel of the token state), so it
    pays for top-k and gather but for no predictor;
  * class attention at the same keep counts, for reference.
Predictor share: the median over rounds of (spot - bare) / median spot, each round timing the graphs back to back,
with its interquartile range in brackets: the fraction of SPOT's time spent in taps and predictors (target: 3 %).

    python -m benchmarks.predictor_cost --split --modes aot --batches 1,8 --repeats 80 --warmup 5 --tag split

`--split` adds a fifth graph, SPOT with its attention descriptor replaced by zeros of the same shape (same
predictors, stages and keep counts; its selections are meaningless, its cost is what remains without the taps), and
a column with the descriptor's share: the median over rounds of (spot - spot without descriptor) / median spot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

import spot_compile as sc
from spot_compile import ops
from spot_compile.cli.bench import MODES, compiled_fn, cpu_name
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import capture
from spot_compile.graph.inputs import example_input
from spot_compile.measure.timing import round_robin_ms
from spot_compile.models.zoo import SHIPPED_PREDICTORS, load_shipped_model
from spot_compile.policies import default_stages
from spot_compile.scorers.spot import PredictorConfig, make_predictors


class FreeScorer(nn.Module):
    """Scores tokens by one channel of their state: the cheapest scorer there is, to time pruning alone."""

    attention = "none"
    history = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[..., 0]


def _zero_descriptor(q, k, scale, batch, num_special, cls, mask=None):
    """Zeros shaped like `ops.interaction_descriptor`'s output, (B, N, heads * 4)."""
    n = q.shape[-2]
    return q.new_zeros(batch, n, q.reshape(batch, -1, n, q.shape[-1]).shape[1] * 4)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shipped", choices=["shipped", "deit_tiny", "deit_small"])
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--predictors", type=Path, default=SHIPPED_PREDICTORS, help="predictor checkpoint for the shipped model")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="eager,compiled,aot", help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--split", action="store_true", help="also time SPOT without its descriptor taps (see above)")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--out-dir", type=Path, default=Path("docs/results/predictor_cost"))
    args = ap.parse_args()
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        ap.error(f"unknown mode(s) {sorted(set(modes) - set(MODES))}; choose from {', '.join(MODES)}")
    console = Console()
    torch.manual_seed(0)
    if args.model == "shipped":
        model, _ = load_shipped_model()
        spot = sc.sparsify(model, sc.SparsifyConfig(budget=args.budget, policy="spot", predictors=str(args.predictors)))
    else:
        import timm

        model = timm.create_model(f"{args.model}_patch16_224", pretrained=False).eval()
        structure = find_blocks(capture(model, example_input(model, None)))
        stages = default_stages(len(structure.blocks))
        spot = sc.sparsify(model, sc.SparsifyConfig(budget=args.budget, stages=stages,
                                                    policy=sc.GivenScorersConfig(make_predictors(structure, stages, PredictorConfig()))))
    shape = spot.plan.input_shape[1:]
    stages = tuple(s.block for s in spot.plan.stages)
    keep = tuple(s.keep for s in spot.plan.stages)
    same = dict(stages=stages, keep=keep)
    graphs = {
        "dense": sc.sparsify(model, sc.SparsifyConfig(budget=1.0)),
        "spot": spot,
        "bare pruning": sc.sparsify(model, sc.SparsifyConfig(**same, policy=sc.GivenScorersConfig({s: FreeScorer() for s in stages}))),
        "class attention": sc.sparsify(model, sc.SparsifyConfig(policy="class-attention", **same)),
    }
    if args.split:
        # The pruning pass emits `_zero_descriptor` wherever it would emit the descriptor taps.
        with mock.patch.object(ops, "interaction_descriptor", _zero_descriptor):
            predictors = {s: spot.scorers[f"given_scorer_{s}"] for s in stages}  # the same modules, timing only
            graphs["spot without descriptor"] = sc.sparsify(model, sc.SparsifyConfig(**same, policy=sc.GivenScorersConfig(predictors)))
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("timing", total=len(batches) * len(modes))
        for batch in batches:
            x = torch.randn(batch, *shape)
            torch._dynamo.reset()
            for mode in modes:
                fns = [compiled_fn(g, mode, x) for g in graphs.values()]
                times = dict(zip(graphs, round_robin_ms(fns, x, args.warmup, args.repeats)))
                ms = {k: statistics.median(v) for k, v in times.items()}
                # Each round runs spot and bare pruning back to back: their per-round difference is far less noisy
                # than the difference of two medians taken minutes apart.
                shares = [(s - b) / ms["spot"] for s, b in zip(times["spot"], times["bare pruning"])]
                q1, share, q3 = statistics.quantiles(shares, n=4)
                row = {"batch": batch, "mode": mode, **{f"{k} ms": v for k, v in ms.items()},
                       "predictor share": share, "share q1": q1, "share q3": q3}
                if args.split:
                    split = [(s - n) / ms["spot"] for s, n in zip(times["spot"], times["spot without descriptor"])]
                    row["descriptor q1"], row["descriptor share"], row["descriptor q3"] = statistics.quantiles(split, n=4)
                rows.append(row)
                progress.advance(task)
    flops = {name: g.plan.sparse_flops for name, g in graphs.items()}
    cols = ["batch", "mode", *[f"{k} ms" for k in graphs], "predictor share"] + (["descriptor share"] if args.split else [])
    table = Table(title=f"{args.model}, budget {args.budget}, keep {list(keep)}: median of {args.repeats}")
    for c in cols:
        table.add_column(c)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r["batch"]), r["mode"], *[f"{r[f'{k} ms']:.2f}" for k in graphs],
                 f"{100 * r['predictor share']:.1f} % ({100 * r['share q1']:.1f} to {100 * r['share q3']:.1f})"]
        if args.split:
            cells.append(f"{100 * r['descriptor share']:.1f} % ({100 * r['descriptor q1']:.1f} to {100 * r['descriptor q3']:.1f})")
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    pred_flops = (flops["spot"] - flops["bare pruning"]) / flops["dense"]
    console.print(f"predictor FLOPs (FlopCounterMode): {100 * pred_flops:.2f} % of dense")
    meta = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "budget": args.budget, "keep": list(keep), "stages": list(stages),
            "repeats": args.repeats, "warmup": args.warmup, "flops": flops, "predictor_flops_share": pred_flops}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = ("predictor_cost" if args.model == "shipped" else f"predictor_cost_{args.model}") + (f"_{args.tag}" if args.tag else "")
    (args.out_dir / f"{name}.json").write_text(json.dumps({**meta, "model": args.model, "rows": rows}, indent=2))
    header = (f"{args.model} model, SPOT at budget {args.budget} (stages {list(stages)}, keep {list(keep)}), {meta['cpu']}, "
              f"{meta['threads']} threads, torch {meta['torch']}, {meta['date']}; median of {args.repeats} after "
              f"{args.warmup} warm-up, all {len(graphs)} graphs round-robin. Predictor share = median over rounds of (spot - bare) / "
              f"median spot, interquartile range in brackets. "
              + ("Descriptor share: the same with spot without descriptor (its taps replaced by zeros) in place of bare. "
                 if args.split else "")
              + f"Predictor FLOPs: {100 * pred_flops:.2f} % of dense.\n\n")
    (args.out_dir / f"{name}.md").write_text(header + "\n".join(md) + "\n")
    console.print(f"wrote {args.out_dir}/{name}.json and .md")


if __name__ == "__main__":
    main()
