"""Learned predictors against class attention on one and the same backbone: which selection is better?

    python -m research.shared_backbone      # after fair_policies.py; -> docs/results/shared_backbone/shared_backbone_cluttered.{json,md}
    python -m research.shared_backbone --ablations --budgets 0.3,0.4,0.6   # the signal ablations' selections alone

`fair_policies.py` compares policies each on the backbone its own fine-tune made, so a gap between two arms mixes
the selection with how well the backbone adapted to it. Here the selection alone varies: on each backbone (the dense
one, and the tuned arms found in `--run-dir`), the SPOT predictors and the class token's attention each choose the
tokens, at the same stages and FLOPs. The predictors of the "spot then tune" arm were calibrated on the frozen dense
backbone, so they can be put on any backbone; those of the "spot" arm were calibrated with their own.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console

import spot_compile as sc
from benchmarks.result_table import write_results
from research.fair_policies import DATASETS, STAGES, boxes_of, load_model, measure_selection, progress_bar
from spot_compile.data.datasets import load_dataset
from spot_compile.data.preprocessing import model_normalization
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import capture
from spot_compile.graph.inputs import example_input
from spot_compile.serialization.predictors import load_predictor_checkpoint, with_tuned_backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="cluttered")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/fair/cluttered-150steps-tuned0.4"))
    ap.add_argument("--budgets", default="0.4")
    ap.add_argument("--precision-images", type=int, default=2000)
    ap.add_argument("--out-dir", type=Path, default=Path("docs/results/shared_backbone"))
    ap.add_argument("--ablations", action="store_true", help="only the untuned dense backbone, with the predictors of "
                    "'spot then tune' and of each of its signal ablations found in --run-dir: what each signal adds to "
                    "the selection alone")
    args = ap.parse_args()
    console = Console()
    base_path, data = DATASETS[args.dataset]
    dense = load_model(base_path)
    test = load_dataset(data, "test", dense.cfg.img_size, dense.cfg.in_chans)
    boxes = boxes_of(data)
    probe = model_normalization(dense)(test.images[: args.precision_images])
    budgets = tuple(float(b) for b in args.budgets.split(","))
    portable = args.run_dir / "spot-then-tune.pt"  # predictors calibrated on the frozen dense backbone
    backbones = {"dense (untuned)": (dense, portable)}
    for name, predictors in () if args.ablations else (("spot", "spot.pt"), ("spot then tune", "spot-then-tune.pt")):
        if (args.run_dir / predictors).is_file():
            backbones[name] = (with_tuned_backbone(dense, args.run_dir / predictors), args.run_dir / predictors)
    if (args.run_dir / "class-attention.pt").is_file() and not args.ablations:
        backbones["class-attention"] = (load_model(args.run_dir / "class-attention.pt"), portable)
    if not portable.is_file():
        raise SystemExit(f"error: no {portable}: run research/fair_policies.py --arms 'spot then tune' first")
    # (backbone name, selection, predictor file or None for class attention)
    runs = [(name, sel, predictors if sel == "spot" else None) for name, (_, predictors) in backbones.items()
            for sel in ("spot", "class-attention")]
    if args.ablations:
        runs = [("dense (untuned)", "class-attention", None), ("dense (untuned)", "spot", portable),
                *(("dense (untuned)", "spot", p) for p in sorted(args.run_dir.glob("spot-then-tune--*.pt")))]
    rows = []
    with progress_bar(console) as progress:
        task = progress.add_task("evaluating", total=len(runs) * len(budgets))
        for name, selection, predictors in runs:
            backbone = backbones[name][0]
            structure = find_blocks(capture(backbone, example_input(backbone, None)))
            learned = load_predictor_checkpoint(predictors, backbone, structure).predictors if predictors else None
            for budget in budgets:
                policy = sc.GivenScorersConfig(learned) if learned else selection
                sparse = sc.sparsify(backbone, sc.SparsifyConfig(budget=budget, stages=STAGES, policy=policy))
                rows.append({"backbone": name, "selection": selection, "predictors": predictors.name if predictors else None,
                             "budget": budget, **measure_selection(sparse, test, probe, boxes, backbone.cfg.patch_size)})
                progress.advance(task)
    cells = []
    for name, selection, predictors in runs:
        mine = {r["budget"]: r for r in rows if r["backbone"] == name and r["selection"] == selection
                and r["predictors"] == (predictors.name if predictors else None)}
        label = f"spot ({predictors.name})" if predictors else selection
        cells.append([name, label, *(f"{mine[b]['top1']:.2f}% @ {mine[b]['flops_ratio']:.3f} (box {mine[b]['box_precision']:.0f}%)"
                                     for b in budgets)])
    preamble = (f"Top-1 on {len(test)} held-out {args.dataset} test images, each backbone with two selections at the "
                f"same stages {STAGES} and FLOPs; in brackets the last stage's box precision ({len(probe)} images). Tuned "
                f"backbones from {args.run_dir}. `python -m research.shared_backbone --run-dir {args.run_dir}"
                f"{' --budgets ' + args.budgets if args.budgets != '0.4' else ''}{' --ablations' if args.ablations else ''}`.")
    write_results(console, args.out_dir, f"shared_backbone_{args.dataset}" + ("_ablations" if args.ablations else ""),
                  "signal ablations, untuned backbone" if args.ablations else "one backbone, two selections",
                  ["backbone", "selection", *(f"budget {b:g}" for b in budgets)], cells, preamble,
                  {"rows": rows, "run_dir": str(args.run_dir), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__})


if __name__ == "__main__":
    main()
