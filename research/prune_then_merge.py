"""Trial: prune with class attention at the pruning stages and merge at every other block, against merging alone.

    python -m research.prune_then_merge      # writes docs/results/prune_then_merge/prune_then_merge.{json,md}

Issue 22 asked to try it and keep it if it measures better. The hybrid is built here, not registered, from the
library's own passes: at the drop stages (1/4, 1/2, 3/4 of the depth) `insert_pruning` with the class-attention
scorer, and the token sizes that proportional attention reads follow the same selection; at every other block after
the first, `insert_merging`. Same shipped backbone, same budgets, no training, test split, one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

import spot_compile as sc
from benchmarks.result_table import write_results
from spot_compile.data.datasets import load_dataset
from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR
from spot_compile.measure.accuracy import accuracy
from spot_compile.models.zoo import load_shipped_model
from spot_compile.passes.insert_merging import SIZES_TAG, insert_merging, latest_sizes, rewire_size_bias
from spot_compile.passes.insert_pruning import insert_pruning
from spot_compile.policies import default_stages
from spot_compile.policies.merge import MergePolicy
from spot_compile.policies.registry import register
from spot_compile.scorers.training_free import ClassAttentionScorer


class PruneThenMerge(MergePolicy):
    name = "trial-prune-then-merge"
    summary = "class-attention pruning at the drop stages, merging at the other blocks (a trial)"

    def reduce(self, gm, structure, before_block, keep):
        if before_block not in default_stages(len(structure.blocks)):
            return insert_merging(gm, structure, before_block, keep)
        stream_tokens = int(structure.blocks[before_block].input.meta["val"].shape[1])
        if keep == stream_tokens - structure.num_special:
            return None
        sizes = latest_sizes(gm)

        def carry_sizes(select):  # the sizes of the surviving tokens, rewired before shapes are re-derived
            kept = select(sizes)
            kept.meta[SIZES_TAG] = before_block
            rewire_size_bias(gm, structure, before_block, kept)

        scorer = ClassAttentionScorer(structure.has_class_token)
        return insert_pruning(gm, structure, before_block, keep, scorer, carry=carry_sizes if sizes is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path("docs/results/prune_then_merge"))
    ap.add_argument("--budgets", default="0.5,0.6,0.7")
    args = ap.parse_args()
    register(PruneThenMerge)
    console = Console()
    model, _ = load_shipped_model()
    test = load_dataset(FASHION_MNIST_DIR, "test", model.cfg.img_size, model.cfg.in_chans)
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        for policy in ("merge", PruneThenMerge.name):
            sparse = sc.sparsify(model, sc.SparsifyConfig(budget=budget, policy=policy))
            rows.append({"policy": policy, "budget": budget, "flops_ratio": sparse.plan.flops_ratio,
                         "top1": accuracy(sparse, test), "tokens": [s.tokens_out for s in sparse.plan.stages]})
            console.log(rows[-1])
    cells = [[r["policy"], str(r["budget"]), f"{r['flops_ratio']:.3f}", f"{r['top1']:.2f}", " -> ".join(map(str, r["tokens"]))]
             for r in rows]
    write_results(console, args.out_dir, "prune_then_merge", f"prune then merge vs merge, {len(test)} test images, no training",
                  ["policy", "budget", "FLOPs ratio", "top-1 %", "tokens per stage"], cells,
                  f"Shipped model, Fashion-MNIST test split, no training; `python -m research.prune_then_merge`, "
                  f"{time.strftime('%Y-%m-%d')}.", {"date": time.strftime("%Y-%m-%d"), "rows": rows})

if __name__ == "__main__":
    main()
