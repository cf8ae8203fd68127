"""Does tuning the backbone with the predictors close the gap to dense? With an honest control.

    python -m research.finetune      # writes docs/results/finetune/finetune.{json,md}; checkpoints in runs/finetune/

1. SPOT with the backbone tuned: the shipped predictors (recipes/calibrate_shipped.py, whose default is --finetune),
   against SPOT with the backbone frozen (the same recipe with --freeze-backbone, calibrated here).
2. Control: the dense shipped model fine-tuned for the same steps, batch, learning rate, augmentation and loss
   (cross-entropy + 0.5 KL to the same frozen teacher), without pruning. The shipped baseline is trained for only
   6 epochs on 2 CPU cores, so any extra training may raise accuracy; SPOT+finetune must be compared with this control, not
   only with the shipped dense model.
3. Control: random tokens on a backbone tuned the same way with random masks (the SPOT recipe with Gumbel noise so
   large that the training selections are uniformly random), so that SPOT's lead over random is not only the tuning.
Every accuracy is on the 10k held-out test split; nothing here was selected on it.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import spot_compile as sc
from recipes.train_dense import augment
from spot_compile.calibration.schedule import cosine_lr
from spot_compile.data.datasets import load_dataset
from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR
from spot_compile.data.imageset import (
    batches,
    split,
)
from spot_compile.data.preprocessing import model_normalization
from spot_compile.measure.accuracy import accuracy
from spot_compile.models.zoo import SHIPPED_PREDICTORS, load_shipped_model
from spot_compile.serialization.predictors import load_predictor_metrics, with_tuned_backbone

BUDGETS = (0.5, 0.6, 0.7, 0.8)
RANDOM_NOISE = 1e4  # Gumbel scale that drowns the predictors' O(1) logits: training selections become uniform


def finetune_dense(model, train, steps: int, lr: float, batch_size: int = 128, seed: int = 0, console=None):
    """The control: the calibration recipe's loop and loss on the dense model, backbone only."""
    teacher = copy.deepcopy(model).eval()
    student = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    step = 0
    with Progress(console=console) as progress:
        task = progress.add_task("dense control", total=steps)
        while step < steps:
            for x, y in batches(train, batch_size, shuffle=True, normalization=model_normalization(model), generator=gen):
                if step >= steps or len(y) < batch_size:
                    break
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(step, steps, warmup=max(1, steps // 20), base=lr)
                x = augment(x, gen)
                with torch.no_grad():
                    t = teacher(x)
                logits = student(x)
                kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
                loss = F.cross_entropy(logits, y) + 0.5 * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                progress.advance(task)
    return model.eval()


def main() -> None:
    from recipes.calibrate_shipped import BACKBONE_LR, LR, STEPS, calibrate_shipped

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=FASHION_MNIST_DIR)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/finetune"))
    ap.add_argument("--out-dir", type=Path, default=Path("docs/results/finetune"))
    args = ap.parse_args()
    console = Console()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    frozen_path = args.run_dir / "spot_frozen.pt"
    if not frozen_path.is_file():
        calibrate_shipped(frozen_path, data=args.data, console=console, finetune=False)
    random_path = args.run_dir / "random_finetune.pt"
    if not random_path.is_file():
        calibrate_shipped(random_path, data=args.data, console=console, finetune=True, noise=RANDOM_NOISE)
    seconds = {name: load_predictor_metrics(path)["seconds"] for name, path in (("frozen", frozen_path), ("finetune", SHIPPED_PREDICTORS))}
    shipped, _ = load_shipped_model()
    tuned = with_tuned_backbone(shipped, SHIPPED_PREDICTORS)
    control_path = args.run_dir / "dense_control.pt"
    if control_path.is_file():
        control = copy.deepcopy(shipped)
        control.load_state_dict(torch.load(control_path, weights_only=True))
    else:
        train, _ = split(load_dataset(args.data, "train", shipped.cfg.img_size, shipped.cfg.in_chans), 5000)
        control = finetune_dense(copy.deepcopy(shipped), train, STEPS, BACKBONE_LR, console=console)
        torch.save(control.state_dict(), control_path)
    test = load_dataset(args.data, "test", shipped.cfg.img_size, shipped.cfg.in_chans)
    rows = [{"model": "shipped dense", "policy": "dense", "budget": 1.0, "flops_ratio": 1.0, "top1": accuracy(shipped, test)},
            {"model": "dense control (same fine-tuning, no pruning)", "policy": "dense", "budget": 1.0, "flops_ratio": 1.0,
             "top1": accuracy(control, test)},
            {"model": "shipped, tuned with the predictors", "policy": "dense (all tokens)", "budget": 1.0, "flops_ratio": 1.0,
             "top1": accuracy(tuned, test)}]
    random_tuned = with_tuned_backbone(shipped, random_path)
    cases = [("shipped dense", shipped, "spot", frozen_path, "spot, backbone frozen"),
             ("shipped, tuned with random masks", random_tuned, "random", None, "random"),
             ("shipped, tuned with the predictors", shipped, "spot", SHIPPED_PREDICTORS, f"spot --finetune (shipped, backbone lr {BACKBONE_LR})"),
             ("dense control (same fine-tuning, no pruning)", control, "class-attention", None, "class-attention"),
             ("dense control (same fine-tuning, no pruning)", control, "random", None, "random")]
    for name, model, policy, predictors, label in cases:
        for budget in BUDGETS:
            sparse = sc.sparsify(model, sc.SparsifyConfig(budget=budget, policy=policy,
                                                          predictors=str(predictors) if predictors else None))
            torch.manual_seed(0)
            rows.append({"model": name, "policy": label, "budget": budget, "flops_ratio": sparse.plan.flops_ratio,
                         "top1": accuracy(sparse, test)})
    table = Table(title=f"top-1 on {len(test)} test images @ FLOPs ratio")
    for col in ("backbone", "policy", *[f"budget {b}" for b in (*BUDGETS, 1.0)]):
        table.add_column(col)
    md = ["| backbone | policy | " + " | ".join(f"budget {b}" for b in (*BUDGETS, 1.0)) + " |", "|---|---|" + "---|" * (len(BUDGETS) + 1)]
    for key in dict.fromkeys((r["model"], r["policy"]) for r in rows):
        cells = []
        for b in (*BUDGETS, 1.0):
            r = next((r for r in rows if (r["model"], r["policy"]) == key and r["budget"] == b), None)
            cells.append("-" if r is None else f"{r['top1']:.2f}% @ {r['flops_ratio']:.3f}")
        table.add_row(*key, *cells)
        md.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    console.print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "finetune.json").write_text(json.dumps({"rows": rows, "steps": STEPS, "predictor_lr": LR,
                                                            "backbone_lr": BACKBONE_LR,
                                                            "calibration_seconds": seconds}, indent=2))
    (args.out_dir / "finetune.md").write_text(
        f"Top-1 on the {len(test)} held-out test images @ FLOPs ratio; {STEPS} steps of 128 images for the SPOT "
        f"calibrations and the dense control, backbone lr {BACKBONE_LR}; calibration took {seconds['frozen']:.0f} s "
        f"(frozen) and {seconds['finetune']:.0f} s (--finetune).\n\n" + "\n".join(md) + "\n")
    console.print(f"wrote {args.out_dir}/finetune.json and .md")


if __name__ == "__main__":
    main()
