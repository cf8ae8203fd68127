"""Accuracy vs FLOPs of every token policy on the shipped model, on the held-out Fashion-MNIST test split.

    python -m benchmarks.policies            # writes docs/results/policies/policies.{json,md,png} and token_maps.png

Policies: dense, SPOT (calibrated, shipped predictors), class-attention top-k (training-free, EViT-like), random
tokens, and SPOT with each input signal removed, and without the coverage prior when the recipe uses one (ablations,
calibrated here with the same recipe if not cached in runs/ablation/). SPOT's predictors are calibrated once, at
budget 0.6, and used at every budget: they rank tokens,
and the budget sets how many are kept.
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
from recipes.calibrate_shipped import COVERAGE, calibrate_shipped
from spot_compile.cli.visualize import kept_patches, save_accuracy_vs_flops, save_token_maps
from spot_compile.data.datasets import load_dataset
from spot_compile.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from spot_compile.data.preprocessing import model_normalization
from spot_compile.measure.accuracy import accuracy
from spot_compile.models.zoo import SHIPPED_PREDICTORS, load_shipped_model
from spot_compile.scorers.spot import SIGNALS

BUDGETS = (0.5, 0.6, 0.7, 0.8, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=FASHION_MNIST_DIR)
    ap.add_argument("--out-dir", type=Path, default=Path("docs/results/policies"))
    ap.add_argument("--ablation-dir", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--limit", type=int, default=0, help="first N test images only (0: all 10k)")
    ap.add_argument("--no-ablations", dest="ablations", action="store_false",
                    help="skip the signal ablations (each one not cached in --ablation-dir is a full calibration)")
    args = ap.parse_args()
    console = Console()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    model, metrics = load_shipped_model()
    test = load_dataset(args.data, "test", model.cfg.img_size, model.cfg.in_chans)
    if args.limit:
        test = test.subset(torch.arange(args.limit))
    predictors = {"spot": SHIPPED_PREDICTORS}
    ablations = {dropped: {"signals": tuple(s for s in SIGNALS if s != dropped)} for dropped in SIGNALS}
    if COVERAGE:
        ablations["coverage"] = {"coverage": 0.0}
    for dropped, change in ablations.items() if args.ablations else ():
        path = args.ablation_dir / f"no-{dropped}.pt"
        if not path.is_file():
            console.print(f"calibrating the ablation without {dropped} -> {path}")
            calibrate_shipped(path, data=args.data, console=console, **change)
        predictors[f"spot -{dropped}"] = path

    dense_acc = accuracy(model, test)
    policies = ["spot", "class-attention", "random", *[p for p in predictors if p != "spot"]]
    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("evaluating", total=len(policies) * (len(BUDGETS) - 1))
        for policy in policies:
            for budget in BUDGETS[:-1]:
                base = "spot" if policy.startswith("spot") else policy
                config = sc.SparsifyConfig(budget=budget, policy=base, predictors=str(predictors.get(policy)) if base == "spot" else None)
                sparse = sc.sparsify(model, config)
                torch.manual_seed(0)  # the random policy draws from the global generator
                rows.append({"policy": policy, "budget": budget, "flops_ratio": sparse.plan.flops_ratio,
                             "gflops": sparse.plan.sparse_flops / 1e9, "top1": accuracy(sparse, test),
                             "tokens": [s.tokens_out for s in sparse.plan.stages]})
                progress.advance(task)
            rows.append({"policy": policy, "budget": 1.0, "flops_ratio": 1.0, "gflops": sparse.plan.dense_flops / 1e9,
                         "top1": dense_acc, "tokens": []})

    result = {
        "model": "shipped Fashion-MNIST ViT (dim 64, depth 6, 196 patch tokens + class token)",
        "test_images": len(test), "dense_top1": dense_acc, "dense_gflops": rows[-1]["gflops"], "rows": rows,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (args.out_dir / "policies.json").write_text(json.dumps(result, indent=2))
    md = ["| policy | " + " | ".join(f"budget {b}" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
    for policy in policies:
        cells = []
        for b in BUDGETS:
            r = next(r for r in rows if r["policy"] == policy and r["budget"] == b)
            cells.append(f"{r['top1']:.2f}% @ {r['flops_ratio']:.3f}")
        md.append(f"| {policy} | " + " | ".join(cells) + " |")
    header = (f"Top-1 on the {len(test)} held-out Fashion-MNIST test images @ FLOPs ratio (sparse/dense, "
              f"FlopCounterMode); dense {dense_acc:.2f}% at {result['dense_gflops']:.4f} GFLOPs/image.\n\n")
    (args.out_dir / "policies.md").write_text(header + "\n".join(md) + "\n")
    table = Table(title=f"top-1 % @ FLOPs ratio, {len(test)} test images (dense {dense_acc:.2f}%)")
    table.add_column("policy")
    for b in BUDGETS:
        table.add_column(f"budget {b}")
    for line in md[2:]:
        table.add_row(*[c.strip() for c in line.strip("|").split("|")])
    console.print(table)
    save_accuracy_vs_flops([r for r in rows if r["budget"] < 1.0], args.out_dir / "accuracy_vs_flops.png", dense_acc,
                           f"shipped ViT, Fashion-MNIST test ({len(test)} images)")
    images = test.images[:6]
    maps = {}
    for policy in ("spot", "class-attention"):
        sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy=policy, predictors=str(SHIPPED_PREDICTORS) if policy == "spot" else None))
        maps[policy] = kept_patches(sparse, model_normalization(model)(images))
    titles = [FASHION_MNIST_CLASSES[int(y)] for y in test.labels[:6]]
    save_token_maps(images, maps, args.out_dir / "token_maps.png", titles)
    console.print(f"wrote {args.out_dir}/policies.json, policies.md, accuracy_vs_flops.png, token_maps.png")


if __name__ == "__main__":
    main()
