"""Latency of dense vs sparsified built-in models (see spot_compile.bench for how it measures).

    python -m benchmarks.latency --model deit_small                 # budgets 1.0,0.8,0.6,0.5; batches 1,8,64
    python -m benchmarks.latency --model shipped --policy spot      # the shipped ViT with its SPOT predictors
    python -m benchmarks.latency --model deit_small --device cuda   # on a GPU: eager, Inductor/Triton, CUDA graphs
    python -m benchmarks.latency --model shipped --modes eager,compiled,aot --batches 1 --repeats 100 --tag batch1

Writes docs/results/latency/latency_<model>[_<policy>][_<tag>].{json,md} and speedup_<...>.png (and, while it runs,
latency_<...>.partial.json with the rows so far, removed at the end). For a model of your own:
spot-compile bench mymodel.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console

from spot_compile.cli.bench import DEFAULT_MODES, report, run_bench


def build(name: str) -> tuple[torch.nn.Module, int]:
    if name == "shipped":
        from spot_compile.models.zoo import load_shipped_model

        return load_shipped_model()[0], 28
    import timm

    timm_name = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224"}.get(name, name)
    return timm.create_model(timm_name, pretrained=False).eval(), 224


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny")
    ap.add_argument("--budgets", default="1.0,0.8,0.6,0.5")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--modes", default=None, help="default: eager,compiled,frozen on CPU; eager,compiled,cudagraphs on CUDA")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--policy", default="class-attention", choices=["class-attention", "random", "spot"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=Path("docs/results/latency"))
    ap.add_argument("--tag", default="", help="appended to the output names, e.g. batch1 for a run with --batches 1")
    args = ap.parse_args()
    torch.manual_seed(0)
    console = Console()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here")
    model, size = build(args.model)
    model = model.to(args.device)
    modes = tuple(args.modes.split(",")) if args.modes else DEFAULT_MODES[args.device]
    config = {"policy": args.policy}
    if args.policy == "spot":
        if args.model != "shipped":
            ap.error("--policy spot needs calibrated predictors: only the shipped model has them")
        from spot_compile.models.zoo import SHIPPED_PREDICTORS

        config["predictors"] = str(SHIPPED_PREDICTORS)
    name = args.model if args.policy == "class-attention" else f"{args.model}_{args.policy}"
    name += "_cuda" if args.device == "cuda" else ""
    name += f"_{args.tag}" if args.tag else ""
    partial = args.out_dir / f"latency_{name}.partial.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def save_partial(rows) -> None:  # what a run cut short by a time limit leaves behind
        partial.write_text(json.dumps([r.as_dict() for r in rows], indent=1))

    rows = run_bench(model, [float(b) for b in args.budgets.split(",")], [int(b) for b in args.batches.split(",")],
                     modes, size, args.warmup, args.repeats, console, config, on_rows=save_partial)
    partial.unlink(missing_ok=True)
    report(rows, name, args.out_dir, console, args.repeats, args.warmup, args.policy, args.device)


if __name__ == "__main__":
    main()
