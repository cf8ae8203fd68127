"""What the tokens a selection keeps hold: the garment's box, other ink (the distractors), or blank canvas.

    python -m research.kept_content --predictors runs/mask-gradient/cluttered-downstream-at0.6-150steps-seed0.pt
        # -> docs/results/kept_content/kept_content_cluttered.{json,md}

Box precision says how often a kept token lies on the garment's box; this splits the rest. A patch is "inked" when its
mean pixel (in [0, 1], before normalisation) exceeds `--ink` (0.05: the box's tokens are then about two thirds inked,
the rest of the box being blank corners of the garment's 28x28 frame). Per selection and budget, over the first
`--images` test canvases on the untuned dense backbone: the share of the patch tokens kept after each stage that are
in the box, inked outside it (distractors) and blank outside it, against those shares among all patch tokens.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

import spot_compile as sc
from benchmarks.arguments import add_results_arguments
from benchmarks.result_table import write_results
from research.boxes import patches_in_box
from research.fair_policies import DATASETS, STAGES, boxes_of, load_model
from spot_compile.cli.visualize import kept_patches
from spot_compile.data.datasets import load_dataset
from spot_compile.data.preprocessing import model_normalization
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import capture
from spot_compile.graph.inputs import example_input
from spot_compile.serialization.predictors import load_predictor_checkpoint

KINDS = ("box", "distractor ink", "blank")


def token_kinds(images: torch.Tensor, boxes: torch.Tensor, patch: int, ink: float) -> torch.Tensor:
    """(B, patches) long: 0 in the box, 1 inked outside it, 2 blank outside it (images (B, C, H, W) in [0, 1])."""
    inked = F.avg_pool2d(images.float().mean(1, keepdim=True), patch).flatten(1) > ink
    inside = patches_in_box(boxes, inked.shape[1], patch)
    return torch.where(inside, 0, torch.where(inked, 1, 2))


def shares(kinds: torch.Tensor, kept: torch.Tensor | None = None) -> list[float]:
    """% of the (kept) patch tokens of each kind."""
    chosen = kinds if kept is None else kinds[kept.bool()]
    return [100.0 * float((chosen == k).float().mean()) for k in range(len(KINDS))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["cluttered"], default="cluttered")
    ap.add_argument("--predictors", action="append", type=Path, default=[], help="SPOT predictor checkpoints (repeat)")
    ap.add_argument("--budgets", default="0.4,0.6")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--ink", type=float, default=0.05)
    add_results_arguments(ap, "kept_content_<dataset>", "kept_content")
    args = ap.parse_args()
    console = Console()
    missing = [p for p in args.predictors if not p.is_file()]
    if missing:
        raise SystemExit(f"error: no predictor checkpoint {missing[0]}; calibrate it first (research/mask_gradient.py)")
    budgets = tuple(float(b) for b in args.budgets.split(","))
    base, data = DATASETS[args.dataset]
    model = load_model(base)
    test = load_dataset(data, "test", model.cfg.img_size, model.cfg.in_chans)
    images, boxes = test.images[: args.images], boxes_of(data)[: args.images]
    kinds = token_kinds(images, boxes, model.cfg.patch_size, args.ink)
    probe = model_normalization(model)(images)
    structure = find_blocks(capture(model, example_input(model, None)))
    selections = [("class attention", None), *((p.stem, p) for p in args.predictors)]
    rows, cells = [], [["all patch tokens", "-", *(f"{s:.0f}%" for s in shares(kinds)), "-"]]
    for name, path in selections:
        learned = load_predictor_checkpoint(path, model, structure).predictors if path else None
        for budget in budgets:
            config = sc.SparsifyConfig(budget=budget, stages=STAGES, policy=sc.GivenScorersConfig(learned) if path else "class-attention")
            sparse = sc.sparsify(model, config)
            with torch.no_grad():
                kept = kept_patches(sparse, probe)
            per_stage = [shares(kinds, k) for k in kept]
            rows.append({"selection": name, "budget": budget, "stages": list(STAGES), "shares": per_stage,
                         "kept_per_stage": [int(k[0].sum()) for k in kept]})
            last = per_stage[-1]
            cells.append([name, f"{budget:g}", *(f"{s:.0f}%" for s in last),
                          " / ".join(f"{s[2]:.0f}" for s in per_stage)])
    preamble = (f"The tokens kept after the last stage ({STAGES}) on the first {args.images} held-out {args.dataset} test "
                f"canvases, untuned dense backbone: % in the garment's box, % inked outside it (distractors, mean pixel "
                f"> {args.ink:g}), % blank outside it; the last column: % blank after each stage. "
                f"`python -m research.kept_content {' '.join(f'--predictors {p}' for p in args.predictors)}`.")
    write_results(console, args.out_dir, args.name or f"kept_content_{args.dataset}", "what the kept tokens hold",
                  ["selection", "budget", *KINDS, "blank per stage"], cells, preamble,
                  {"rows": rows, "ink": args.ink, "images": args.images, "date": time.strftime("%Y-%m-%d"),
                   "torch": torch.__version__})


if __name__ == "__main__":
    main()
