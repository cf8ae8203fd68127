"""Where a score's gradient comes from in calibration, measured by the selection it learns (docs/research/mask_gradient.md).

    python -m research.mask_gradient          # -> docs/results/mask_gradient/mask_gradient_cluttered.{json,md}

For each `--gradients` mode of `calibrate(mask_gradient=...)` ("block": the key mask of the stage's block alone;
"downstream": also every later block, for the kept tokens) and each calibration budget of `--calibrate-at`, SPOT's
predictors are calibrated `--steps` steps on the frozen dense backbone (the first phase of fair_policies' "spot then
tune", with its settings). Each set of predictors then selects alone on that same untuned backbone at every budget
of `--budgets`, beside the class token's attention at the same stages and FLOPs: held-out test top-1 and the last
stage's box precision. No backbone fine-tune, so the selection is the only thing that differs. Calibrations are cached
in `--run-dir`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console

import spot_compile as sc
from benchmarks.arguments import add_results_arguments, comma_choices
from benchmarks.result_table import write_results
from research.fair_policies import (
    BATCH,
    DATASETS,
    HIDDEN,
    LOGIT_DISTILL,
    PREDICTOR_LR,
    STAGES,
    boxes_of,
    load_model,
    measure_selection,
    progress_bar,
)
from spot_compile.calibration.trainer import calibrate
from spot_compile.data.datasets import (
    load_dataset,
    training_datasets,
)
from spot_compile.data.preprocessing import model_normalization
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import capture
from spot_compile.graph.inputs import example_input
from spot_compile.passes.soft_pruning import MASK_GRADIENTS
from spot_compile.scorers.spot import PredictorConfig
from spot_compile.serialization.predictors import load_predictor_checkpoint, load_predictor_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="cluttered")
    ap.add_argument("--gradients", default=",".join(MASK_GRADIENTS), help=f"comma-separated, from: {', '.join(MASK_GRADIENTS)}")
    ap.add_argument("--calibrate-at", default="0.4,0.6", help="budgets the predictors are calibrated at")
    ap.add_argument("--budgets", default="0.3,0.4,0.6", help="budgets each selection is tested at")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-every", type=int, help="calibrate(val_every=N): keep the predictors of the best validation")
    ap.add_argument("--keep-ratio-weight", type=float, default=2.0, help="calibrate(keep_ratio_weight=W)")
    ap.add_argument("--logit-distill", type=float, default=LOGIT_DISTILL, help="calibrate(logit_distill=W): 0, labels alone")
    ap.add_argument("--precision-images", type=int, default=2000)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/mask-gradient"))
    add_results_arguments(ap, "mask_gradient_<dataset>", "mask_gradient")
    args = ap.parse_args()
    console = Console()
    gradients = comma_choices(args.gradients, MASK_GRADIENTS, "gradient mode(s)")
    calibrate_at = tuple(float(b) for b in args.calibrate_at.split(","))
    budgets = tuple(float(b) for b in args.budgets.split(","))
    base, data = DATASETS[args.dataset]
    model = load_model(base)
    test = load_dataset(data, "test", model.cfg.img_size, model.cfg.in_chans)
    boxes = boxes_of(data)
    probe = model_normalization(model)(test.images[: args.precision_images])
    args.run_dir.mkdir(parents=True, exist_ok=True)

    calibrated = {}
    for gradient in gradients:
        for at in calibrate_at:
            best = f"-best{args.val_every}" if args.val_every else ""
            ratio = f"-ratio{args.keep_ratio_weight:g}" if args.keep_ratio_weight != 2.0 else ""
            ratio += f"-kl{args.logit_distill:g}" if args.logit_distill != LOGIT_DISTILL else ""
            out = args.run_dir / f"{args.dataset}-{gradient}-at{at:g}-{args.steps}steps-seed{args.seed}{best}{ratio}.pt"
            if not out.is_file():
                console.rule(f"calibrating: {gradient} gradient at budget {at:g}")
                train, val = training_datasets(data, 5000, channels=model.cfg.in_chans)
                calibrate(load_model(base), train, val, at, stages=STAGES, epochs=-(-args.steps // (len(train) // BATCH)),
                          max_steps=args.steps, batch_size=BATCH, lr=PREDICTOR_LR, predictor=PredictorConfig(hidden=HIDDEN),
                          logit_distill=args.logit_distill, mask_gradient=gradient, out=out, console=console, workers=0,
                          seed=args.seed, val_every=args.val_every, keep_ratio_weight=args.keep_ratio_weight)
            calibrated[(gradient, at)] = out

    structure = find_blocks(capture(model, example_input(model, None)))
    runs = [("class attention", None, None), *((g, at, path) for (g, at), path in calibrated.items())]
    rows = []
    with progress_bar(console) as progress:
        task = progress.add_task("evaluating", total=len(runs) * len(budgets))
        for gradient, at, path in runs:
            learned = load_predictor_checkpoint(path, model, structure).predictors if path else None
            metrics = load_predictor_metrics(path) if path else {}
            seconds = float(metrics.get("seconds", 0.0))
            for budget in budgets:
                policy = sc.GivenScorersConfig(learned) if path else "class-attention"
                sparse = sc.sparsify(model, sc.SparsifyConfig(budget=budget, stages=STAGES, policy=policy))
                rows.append({"selection": "spot" if path else "class-attention", "mask_gradient": gradient if path else None,
                             "calibrated_at": at, "budget": budget,
                             **measure_selection(sparse, test, probe, boxes, model.cfg.patch_size),
                             "calibration_seconds": seconds, "selected_step": metrics.get("selected_step"),
                             "val_checks": metrics.get("val_checks")})
                progress.advance(task)
    cells = []
    for gradient, at, _ in runs:
        mine = {r["budget"]: r for r in rows if r["calibrated_at"] == at and (r["mask_gradient"] or "class attention") == gradient}
        label = f"spot, {gradient} gradient, calibrated at {at:g}" if at else gradient
        cells.append([label, *(f"{mine[b]['top1']:.2f}% @ {mine[b]['flops_ratio']:.3f}"
                               + (f" (box {mine[b]['box_precision']:.0f}%)" if boxes is not None else "") for b in budgets)])
    boxed = (f"; in brackets the last stage's box precision ({len(probe)} images; the box holds {rows[0]['box_share']:.0f}% "
             "of the tokens)" if boxes is not None else "")
    preamble = (f"Top-1 on {len(test)} held-out {args.dataset} test images; the untuned dense backbone, stages {STAGES}, "
                f"predictors calibrated {args.steps} steps of {BATCH} on it (frozen), seed {args.seed}{boxed}. "
                f"`python -m research.mask_gradient --dataset {args.dataset} --steps {args.steps} --calibrate-at {args.calibrate_at} "
                f"--budgets {args.budgets} --gradients {','.join(gradients)}{f' --seed {args.seed}' if args.seed else ''}"
                f"{f' --val-every {args.val_every}' if args.val_every else ''}"
                f"{f' --keep-ratio-weight {args.keep_ratio_weight:g}' if args.keep_ratio_weight != 2.0 else ''}"
                f"{f' --logit-distill {args.logit_distill:g}' if args.logit_distill != LOGIT_DISTILL else ''}`.")
    write_results(console, args.out_dir, args.name or f"mask_gradient_{args.dataset}", "mask gradient: selection alone",
                  ["selection", *(f"budget {b:g}" for b in budgets)], cells, preamble,
                  {"rows": rows, "steps": args.steps, "seed": args.seed, "date": time.strftime("%Y-%m-%d"),
                   "torch": torch.__version__})


if __name__ == "__main__":
    main()
