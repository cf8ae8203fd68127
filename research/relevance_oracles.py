"""Which per-image relevance would a perfect predictor have to learn? Oracle selections on the frozen backbone.

    python -m research.relevance_oracles      # -> docs/results/relevance_oracles/relevance_oracles_cluttered.{json,md}

A predictor at an early stage can at best reproduce some relevance that is known only later, or only from outside the
model. This script hands the pruning pass such relevance directly (a scorer that reads it, per image, at each
token's grid position) and measures the selection alone on the untuned dense backbone at the same stages and FLOPs
as SPOT, beside the class token's attention at each stage (EViT's criterion, what the stage itself can see):
  * "box": the garment's box from the data (1 inside, a random tie-break): where the object is, known from outside;
  * "last-layer class attention": the class token's attention row in the last block of the dense model;
  * "rollout": attention rollout (Abnar & Zuidema 2020) of the class token through every block of the dense model;
  * "gradient x input": |<token, dL/dtoken>| at the input of the first stage's block in the dense model, L the
    log-probability of the dense model's own prediction (no labels): the first-order cost of removing the token.
Every oracle needs a dense forward (and one a backward) before the sparse one, so none is a policy; each says what a
distillation target for the predictors could be worth. Top-1 on the held-out test split, and the last stage's box
precision.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console

import spot_compile as sc
from benchmarks.arguments import add_results_arguments, comma_choices
from benchmarks.result_table import write_results
from research.boxes import patches_in_box
from research.fair_policies import DATASETS, STAGES, boxes_of, load_model, progress_bar
from spot_compile.cli.visualize import kept_patches
from spot_compile.data.datasets import load_dataset
from spot_compile.data.imageset import batches
from spot_compile.data.preprocessing import model_normalization
from spot_compile.measure.accuracy import accuracy

ORACLES = ("box", "last-layer class attention", "rollout", "gradient x input")


class OracleScorer(torch.nn.Module):
    """Reads `relevance` (B, patch tokens), set before each forward, at the grid position of each live token."""

    attention = "none"
    history = 0
    positions = True

    def __init__(self) -> None:
        super().__init__()
        self.relevance: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        pos = positions.squeeze(-1)
        if self.relevance is None:  # the pass's shape propagation runs it before any image is known
            return pos.clone()
        scores = self.relevance.gather(1, pos.clamp(min=0).round().long())
        return torch.where(pos >= 0, scores, torch.full_like(scores, float("inf")))


def attention_maps(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's attention probabilities (B, H, N, N) in the dense model, formed from its q and k."""
    maps = []

    def hook(attn, inputs, output):
        (h,) = inputs
        b, n, c = h.shape
        q, k, _ = attn.qkv(h).reshape(b, n, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        maps.append(((q * attn.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1))

    handles = [blk.attn.register_forward_hook(hook) for blk in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return maps


def gradient_x_input(model, x: torch.Tensor, block: int) -> torch.Tensor:
    """|<token, dL/dtoken>| at the input of `block`, L = log p(the dense prediction): (B, N)."""
    held = {}

    def hook(module, inputs):
        (t,) = inputs
        t.retain_grad()
        held["t"] = t

    handle = model.blocks[block].register_forward_pre_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x)
            logp = logits.log_softmax(-1)
            logp.gather(1, logp.argmax(-1, keepdim=True)).sum().backward()
    finally:
        handle.remove()
    t = held["t"]
    return (t * t.grad).sum(-1).abs().detach()


def relevance(oracle: str, model, x: torch.Tensor, boxes: torch.Tensor, special: int) -> torch.Tensor:
    """(B, patch tokens) for `oracle`, higher = keep."""
    patches = model.pos_embed.shape[1]
    if oracle == "box":
        return patches_in_box(boxes, patches, model.cfg.patch_size).float() + 0.5 * torch.rand(len(x), patches)
    if oracle == "gradient x input":
        return gradient_x_input(model, x, STAGES[0])[:, special:]
    maps = [a.mean(1) for a in attention_maps(model, x)]  # (B, N, N), mean over heads
    if oracle == "last-layer class attention":
        return maps[-1][:, 0, special:]
    if oracle == "rollout":
        eye = torch.eye(maps[0].shape[-1])
        joint = None
        for a in maps:
            a = 0.5 * a + 0.5 * eye
            a = a / a.sum(-1, keepdim=True)
            joint = a if joint is None else a @ joint
        return joint[:, 0, special:]
    raise ValueError(oracle)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["cluttered"], default="cluttered")
    ap.add_argument("--oracles", default=",".join(ORACLES), help=f"comma-separated, from: {', '.join(ORACLES)}")
    ap.add_argument("--budgets", default="0.4,0.6")
    ap.add_argument("--limit", type=int, default=0, help="first N test images only (0: all 10k)")
    add_results_arguments(ap, "relevance_oracles_<dataset>", "relevance_oracles")
    args = ap.parse_args()
    console = Console()
    oracles = comma_choices(args.oracles, ORACLES, "oracle(s)")
    budgets = tuple(float(b) for b in args.budgets.split(","))
    base, data = DATASETS[args.dataset]
    model = load_model(base)
    test = load_dataset(data, "test", model.cfg.img_size, model.cfg.in_chans)
    boxes = boxes_of(data)
    if args.limit:
        test, boxes = test.subset(torch.arange(args.limit)), boxes[: args.limit]
    normalize = model_normalization(model)
    special = 1
    torch.manual_seed(0)
    rows = []
    with progress_bar(console) as progress:
        task = progress.add_task("evaluating", total=(len(oracles) + 1) * len(budgets))
        for budget in budgets:
            for name in ("class attention at the stage", *oracles):
                scorer = OracleScorer()
                if name in ORACLES:
                    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=budget, stages=STAGES,
                                                                       policy=sc.GivenScorersConfig({s: scorer for s in STAGES})))
                else:
                    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=budget, stages=STAGES, policy="class-attention"))
                correct = kept_box = kept_all = in_box = start = 0
                for x, y in batches(test, 250, shuffle=False, normalization=normalize):
                    box = boxes[start : start + len(x)]
                    start += len(x)
                    if name in ORACLES:
                        scorer.relevance = relevance(name, model, x, box, special)
                    with torch.no_grad():
                        correct += int((sparse(x).argmax(-1) == y).sum())
                        kept = kept_patches(sparse, x)[-1]
                    inside = patches_in_box(box, kept.shape[1], model.cfg.patch_size)
                    kept_box += int((kept.bool() & inside).sum())
                    kept_all += int(kept.sum())
                    in_box += float(inside.float().mean(1).sum())
                rows.append({"selection": name, "budget": budget, "flops_ratio": sparse.plan.flops_ratio,
                             "top1": 100.0 * correct / len(test), "box_precision": 100.0 * kept_box / kept_all,
                             "box_share": 100.0 * in_box / len(test)})
                progress.advance(task)
    dense = accuracy(model, test)
    cells = []
    for name in ("class attention at the stage", *oracles):
        mine = {r["budget"]: r for r in rows if r["selection"] == name}
        cells.append([name, *(f"{mine[b]['top1']:.2f}% @ {mine[b]['flops_ratio']:.3f} (box {mine[b]['box_precision']:.0f}%)"
                              for b in budgets)])
    preamble = (f"Top-1 on {len(test)} held-out {args.dataset} test images; the untuned dense backbone "
                f"({dense:.2f}% dense), stages {STAGES}, the same relevance read at every stage. "
                "In brackets the last stage's box precision (chance: the box's share of the tokens, ~25%). "
                f"`python -m research.relevance_oracles --budgets {args.budgets}"
                f"{f' --limit {args.limit}' if args.limit else ''}`.")
    write_results(console, args.out_dir, args.name or f"relevance_oracles_{args.dataset}", "relevance oracles: selection alone",
                  ["selection", *(f"budget {b:g}" for b in budgets)], cells, preamble,
                  {"rows": rows, "dense_top1": dense, "date": time.strftime("%Y-%m-%d"),
                   "torch": torch.__version__})


if __name__ == "__main__":
    main()
