"""Which tokens should a stage keep? Fixed selection rules against SPOT, on the shipped model at one budget.

    python -m research.selection_rules     # writes docs/results/selection_rules/selection_rules.{json,md}

Every rule prunes the same stages to the same static counts as SPOT at `--budget` (default 0.6); only the choice of
tokens differs. Each rule gives one score per image position, and each stage keeps the best-scored of the tokens still
alive, so the stages' choices nest. Rules:
  * random: uniform scores (the baseline policy);
  * spatially uniform: a fixed farthest-point order of the patch grid, from the centre out (no image needed);
  * foreground first: the patch's pixel mass above the image's minimum (drops plain background first);
  * oracles from the same backbone's *dense* forward, unusable at inference (they need every token through every
    block) but an upper bound for what attention-based relevance could pick: the class token's attention in the last
    block, its mean over all blocks, and attention rollout (Abnar & Zuidema 2020, residual-mixed: 0.5 A + 0.5 I);
  * spot: the shipped predictors (only with the backbone they were calibrated with).
Each rule is run on the dense backbone and on the backbone tuned by the shipped calibration. Accuracy is on the 5k
validation split of the training set (the split recipe choices are made on), not the test split.
The attention maps are read with forward hooks on the shipped ViT's own modules, so this script is for that model only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

import spot_compile as sc
from spot_compile.data.datasets import load_dataset
from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR
from spot_compile.data.imageset import split
from spot_compile.measure.accuracy import accuracy
from spot_compile.models.zoo import SHIPPED_PREDICTORS, load_shipped_model
from spot_compile.scorers.coverage_prior import coverage_prior
from spot_compile.serialization.predictors import with_tuned_backbone

RULES = ("random", "spatially uniform", "foreground first", "oracle: last-block class attention",
         "oracle: mean class attention", "oracle: attention rollout")


class PositionScores(nn.Module):
    """A scorer that reads fixed per-position scores (`self.scores`, (B, P) over the input's patch grid) and returns
    them for the tokens still alive: those are the best-scored ones in raster order, because every earlier stage kept
    the best of the same scores. Before `scores` is set (while the graph is built) it returns zeros."""

    attention = "none"
    history = 0

    def __init__(self, num_special: int) -> None:
        super().__init__()
        self.num_special = num_special
        self.scores: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.scores is None:
            return tokens.sum(-1) * 0
        alive, total = tokens.shape[1] - self.num_special, self.scores.shape[1]
        pos = self.scores.topk(alive, dim=1).indices.sort(dim=1).values if alive < total else None
        patch = self.scores if pos is None else self.scores.gather(1, pos)
        special = torch.zeros(patch.shape[0], self.num_special, dtype=patch.dtype)
        return torch.cat([special, patch], dim=1)


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's attention probabilities (B, N, N), mean over heads, from the dense forward of the shipped ViT."""
    inputs = []
    hooks = [b.attn.register_forward_hook(lambda m, i, o: inputs.append(i[0])) for b in model.blocks]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for block, h in zip(model.blocks, inputs):
        a = block.attn
        q, k, _ = a.qkv(h).reshape(*h.shape[:2], 3, a.heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        maps.append((q @ k.transpose(-2, -1) * a.head_dim**-0.5).softmax(-1).mean(1))
    return maps


def rule_scores(rule: str, model: nn.Module, x: torch.Tensor, patch: int, gen: torch.Generator) -> torch.Tensor:
    b, side = x.shape[0], x.shape[-1] // patch
    if rule == "random":
        return torch.rand(b, side * side, generator=gen)
    if rule == "spatially uniform":
        return coverage_prior(side * side).expand(b, -1)
    if rule == "foreground first":
        mass = F.avg_pool2d(x.mean(1, keepdim=True), patch).flatten(1)
        return mass - mass.amin(1, keepdim=True) + 1e-4 * torch.rand(mass.shape, generator=gen)  # random among background
    return oracle_scores(model, x)[rule]


_ORACLES: dict[tuple[int, str], dict[str, torch.Tensor]] = {}


def oracle_scores(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every oracle rule's scores for the batch `x`, from one dense forward; kept per (model, batch content), so the
    three oracle rules, each evaluated in its own pass over the data, share it."""
    key = (id(model), hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest())
    if key not in _ORACLES:
        maps = attention_maps(model, x)
        eye = torch.eye(maps[0].shape[-1])
        rollout = eye.expand_as(maps[0])
        for m in maps:
            rollout = (0.5 * m + 0.5 * eye) @ rollout
        _ORACLES[key] = {"oracle: last-block class attention": maps[-1][:, 0, 1:],
                         "oracle: mean class attention": torch.stack([m[:, 0, 1:] for m in maps]).mean(0),
                         "oracle: attention rollout": rollout[:, 0, 1:]}
    return _ORACLES[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=FASHION_MNIST_DIR)
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--predictors", type=Path, default=SHIPPED_PREDICTORS)
    ap.add_argument("--out-dir", type=Path, default=Path("docs/results/selection_rules"))
    ap.add_argument("--limit", type=int, default=0, help="first N validation images only (0: all 5k)")
    args = ap.parse_args()
    console = Console()
    torch.manual_seed(0)
    dense, _ = load_shipped_model()
    if dense.cfg.pool != "cls":
        raise SystemExit("the class-attention oracles need a class token; the shipped model has one")
    _, val = split(load_dataset(args.data, "train", dense.cfg.img_size, dense.cfg.in_chans), 5000)
    if args.limit:
        val = val.subset(torch.arange(args.limit))
    tuned = with_tuned_backbone(dense, args.predictors)
    spot = sc.sparsify(tuned, sc.SparsifyConfig(budget=args.budget, policy="spot", predictors=str(args.predictors)))
    stages = tuple(s.block for s in spot.plan.stages)
    keep = tuple(s.keep for s in spot.plan.stages)
    backbones = {"dense backbone": dense, "SPOT-tuned backbone": tuned}
    results: dict[str, dict[str, float]] = {name: {} for name in (*RULES, "spot (shipped predictors)", "no pruning")}
    with Progress(console=console) as progress:
        task = progress.add_task("selection rules", total=len(backbones) * (len(RULES) + 1) + 1)
        for bname, backbone in backbones.items():
            scorer = PositionScores(1)
            sparse = sc.sparsify(backbone, sc.SparsifyConfig(keep=keep, stages=stages, policy=sc.GivenScorersConfig({s: scorer for s in stages})))
            results["no pruning"][bname] = accuracy(backbone, val)
            progress.advance(task)
            for rule in RULES:
                gen = torch.Generator().manual_seed(0)

                def run(x, rule=rule, gen=gen):
                    scorer.scores = rule_scores(rule, backbone, x, dense.cfg.patch_size, gen)
                    return sparse(x)

                results[rule][bname] = accuracy(run, val)
                progress.advance(task)
        results["spot (shipped predictors)"]["SPOT-tuned backbone"] = accuracy(spot, val)
        progress.advance(task)

    table = Table(title=f"top-1 % on the 5k validation split, budget {args.budget}: stages {list(stages)}, keep {list(keep)}")
    table.add_column("selection rule")
    for bname in backbones:
        table.add_column(bname, justify="right")
    md = [f"| selection rule | {' | '.join(backbones)} |", "|---" * (len(backbones) + 1) + "|"]
    for rule, row in results.items():
        cells = [f"{row[b]:.2f}" if b in row else "-" for b in backbones]
        table.add_row(rule, *cells)
        md.append(f"| {rule} | {' | '.join(cells)} |")
    console.print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"budget": args.budget, "stages": list(stages), "keep": list(keep), "split": f"validation ({len(val)} images of the training split)",
            "predictors": str(args.predictors), "torch": torch.__version__}
    (args.out_dir / "selection_rules.json").write_text(json.dumps({**meta, "top1": results}, indent=2))
    header = (f"# Selection rules at budget {args.budget} (stages {list(stages)}, keep {list(keep)})\n\n"
              f"`python -m research.selection_rules`; top-1 % on the {meta['split']}.\n\n")
    (args.out_dir / "selection_rules.md").write_text(header + "\n".join(md) + "\n")
    console.print(f"wrote {args.out_dir}/selection_rules.json, selection_rules.md")


if __name__ == "__main__":
    main()
