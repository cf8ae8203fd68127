"""Merging beside the pruning policies, no training, on the shipped model and the held-out Fashion-MNIST test split.

    python -m benchmarks.merging          # writes docs/results/merging/merging.{json,md} and accuracy_vs_flops_merging.png

Every policy runs on the same shipped backbone at the same budgets, in one run: merge (ToMe-style, every block after
the first, and at the pruning stages only; and with ToMe's own placement, inside every block between attention and
MLP, `merge_at="attention"`), class attention, random, and the shipped SPOT predictors (calibrated, with
their tuned backbone: the one row here with training, for reference).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import spot_compile as sc
from spot_compile.cli.visualize import save_accuracy_vs_flops
from spot_compile.data.datasets import load_dataset
from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR
from spot_compile.measure.accuracy import accuracy
from spot_compile.models.zoo import SHIPPED_PREDICTORS, load_shipped_model
from spot_compile.policies import default_stages

BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=FASHION_MNIST_DIR)
    ap.add_argument("--out-dir", type=Path, default=Path("docs/results/merging"))
    ap.add_argument("--limit", type=int, default=0, help="first N test images only (0: all 10k)")
    args = ap.parse_args()
    console = Console()
    model, _ = load_shipped_model()
    test = load_dataset(args.data, "test", model.cfg.img_size, model.cfg.in_chans)
    if args.limit:
        test = test.subset(torch.arange(args.limit))
    drop_stages = default_stages(model.cfg.depth)
    variants = {
        "merge": {"policy": "merge"},
        "merge, ToMe's placement (inside every block)": {"policy": sc.MergeConfig(merge_at="attention")},
        f"merge at {','.join(map(str, drop_stages))}": {"policy": "merge", "stages": drop_stages},
        "class-attention": {"policy": "class-attention"},
        "random": {"policy": "random"},
        "spot (calibrated, tuned backbone)": {"policy": "spot", "predictors": str(SHIPPED_PREDICTORS)},
    }
    dense_acc = accuracy(model, test)
    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("evaluating", total=len(variants) * len(BUDGETS))
        for name, change in variants.items():
            for budget in BUDGETS:
                try:
                    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=budget, **change))
                except sc.SpotError as e:  # a budget a variant cannot reach is a result too
                    rows.append({"policy": name, "budget": budget, "error": str(e)})
                    progress.advance(task)
                    continue
                torch.manual_seed(0)  # the random policy draws from the global generator
                rows.append({"policy": name, "budget": budget, "flops_ratio": sparse.plan.flops_ratio,
                             "top1": accuracy(sparse, test), "tokens": [s.tokens_out for s in sparse.plan.stages]})
                progress.advance(task)
    result = {"model": "shipped Fashion-MNIST ViT (dim 64, depth 6, 196 patch tokens + class token)",
              "test_images": len(test), "dense_top1": dense_acc, "rows": rows, "torch": torch.__version__,
              "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "merging.json").write_text(json.dumps(result, indent=2))
    md = ["| policy | " + " | ".join(f"budget {b}" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
    table = Table(title=f"top-1 % @ FLOPs ratio, {len(test)} test images (dense {dense_acc:.2f}%)")
    table.add_column("policy")
    for b in BUDGETS:
        table.add_column(f"budget {b}")
    for name in variants:
        cells = []
        for b in BUDGETS:
            r = next(r for r in rows if r["policy"] == name and r["budget"] == b)
            cells.append("unreachable" if "error" in r else f"{r['top1']:.2f}% @ {r['flops_ratio']:.3f}")
        md.append(f"| {name} | " + " | ".join(cells) + " |")
        table.add_row(name, *cells)
    header = (f"Top-1 on the {len(test)} held-out Fashion-MNIST test images @ FLOPs ratio (FlopCounterMode, the "
              f"policy's own work included); shipped backbone, no training except the SPOT row; dense {dense_acc:.2f}%. "
              f"torch {result['torch']}, {result['date']}; `python -m benchmarks.merging`.\n\n")
    (args.out_dir / "merging.md").write_text(header + "\n".join(md) + "\n")
    console.print(table)
    save_accuracy_vs_flops([r for r in rows if "error" not in r], args.out_dir / "accuracy_vs_flops_merging.png", dense_acc,
                           f"shipped ViT, Fashion-MNIST test ({len(test)} images), no training")


if __name__ == "__main__":
    main()
