"""Which way does the calibration's gradient push each token's score? Kept or dropped, on the garment or not.

    python -m research.mask_gradient                 # first: the calibrated predictors in runs/mask-gradient
    python -m research.mask_gradient_directions      # -> docs/results/mask_gradient_directions/mask_gradient_directions_cluttered.{json,md}

On `--images` held-out cluttered test canvases, the calibration graph (noise 0) of the untuned backbone at each
budget, with SPOT predictors as they start (`make_predictors`, seed 0) and as the "block" calibration at that budget
left them, is run forward and backward on the calibration's loss (cross-entropy + 0.5 KL to the dense model; the
keep-ratio term, the same push for every token of a stage, is left out). For each stage and mask gradient mode, the
table gives the mean of -dL/dscore (what a step of gradient descent adds to a score, up to the learning rate; x1e6)
over four groups of the stage's tokens: kept or dropped by the stage, inside the garment's box or not. A selection
learns to find the object when kept-or-dropped garment tokens are pushed up more than background ones.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

import spot_compile as sc
from benchmarks.result_table import write_results
from research.boxes import patches_in_box
from research.fair_policies import DATASETS, HIDDEN, LOGIT_DISTILL, STAGES, boxes_of, load_model
from spot_compile.data.datasets import load_dataset
from spot_compile.data.preprocessing import model_normalization
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import capture
from spot_compile.graph.inputs import example_input
from spot_compile.measure.accuracy import logits_of
from spot_compile.passes.soft_pruning import MASK_GRADIENTS, build_calibration_graph, kept_positions
from spot_compile.scorers.spot import PredictorConfig, make_predictors
from spot_compile.serialization.predictors import load_predictor_checkpoint

GROUPS = ("kept garment", "kept background", "dropped garment", "dropped background")


def pushes(model, captured, predictors, keep, x, y, teacher, inside, mode) -> dict[int, dict[str, float]]:
    """Per stage, the mean -dL/dscore x1e6 of each of GROUPS."""
    structure = find_blocks(captured)
    special = structure.num_special
    graph, keepers = build_calibration_graph(captured, STAGES, keep, predictors, noise=0.0, mask_gradient=mode)
    graph.train()
    scores = {}
    hooks = [predictors[s].register_forward_hook(lambda m, i, o, s=s: scores.__setitem__(s, o) or o.retain_grad())
             for s in STAGES]
    logits = logits_of(graph(x))
    for h in hooks:
        h.remove()
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    (F.cross_entropy(logits, y) + LOGIT_DISTILL * kl).backward()
    chain, out = [keepers[s] for s in STAGES], {}
    for j, s in enumerate(STAGES):
        pos = kept_positions(chain[:j], inside.shape[1]).expand(len(x), -1)
        garment = inside.gather(1, pos)
        push = -scores[s].grad[:, special:] * 1e6
        kept = torch.zeros_like(garment).scatter(1, keepers[s].kept, True)
        out[s] = {f"{'kept' if k else 'dropped'} {'garment' if g else 'background'}": float(push[(kept == k) & (garment == g)].mean())
                  for k in (True, False) for g in (True, False)}
    for p in model.parameters():
        p.grad = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["cluttered"], default="cluttered")
    ap.add_argument("--budgets", default="0.4,0.6")
    ap.add_argument("--steps", type=int, default=150, help="of the calibrations to read from --run-dir")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/mask-gradient"))
    ap.add_argument("--out-dir", type=Path, default=Path("docs/results/mask_gradient_directions"))
    args = ap.parse_args()
    console = Console()
    base, data = DATASETS[args.dataset]
    model = load_model(base)
    test = load_dataset(data, "test", model.cfg.img_size, model.cfg.in_chans)
    x, y = model_normalization(model)(test.images[: args.images]), test.labels[: args.images]
    captured = capture(model, example_input(model, None))
    structure = find_blocks(captured)
    inside = patches_in_box(boxes_of(data)[: args.images], structure.tokens - structure.num_special, model.cfg.patch_size)
    with torch.no_grad():
        teacher = logits_of(model(x)).float()
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        calibrated = args.run_dir / f"{args.dataset}-block-at{budget:g}-{args.steps}steps-seed0.pt"
        if not calibrated.is_file():
            raise SystemExit(f"error: no {calibrated}: run research/mask_gradient.py first")
        torch.manual_seed(0)
        states = {"at start": make_predictors(structure, STAGES, PredictorConfig(hidden=HIDDEN)),
                  "calibrated (block)": load_predictor_checkpoint(calibrated, model, structure).predictors}
        for state, predictors in states.items():
            plan = sc.sparsify(model, sc.SparsifyConfig(budget=budget, stages=STAGES, policy=sc.GivenScorersConfig(predictors))).plan
            keep = tuple(s.keep for s in plan.stages)
            for mode in MASK_GRADIENTS:
                for stage, groups in pushes(model, captured, predictors, keep, x, y, teacher, inside, mode).items():
                    rows.append({"budget": budget, "predictors": state, "mask_gradient": mode, "stage": stage,
                                 "keep": keep, **groups})
    cells = [[f"{r['budget']:g}", r["predictors"], r["mask_gradient"], str(r["stage"]), *(f"{r[g]:+.2f}" for g in GROUPS)]
             for r in rows]
    preamble = (f"Mean push on a score (-dL/dscore x1e6: what gradient descent adds, up to the learning rate) on "
                f"{args.images} held-out {args.dataset} test canvases, untuned backbone, stages {STAGES}, calibration loss "
                f"without the keep-ratio term, noise 0. `python -m research.mask_gradient_directions`.")
    write_results(console, args.out_dir, f"mask_gradient_directions_{args.dataset}", "which way the mask gradient pushes",
                  ["budget", "predictors", "mask gradient", "stage", *GROUPS], cells, preamble,
                  {"rows": rows, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__})


if __name__ == "__main__":
    main()
