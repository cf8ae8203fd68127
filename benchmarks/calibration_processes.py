"""The shipped calibration recipe on one process and on two (torchrun, DistributedDataParallel over gloo), same global
batch (128: 2 x 64) and steps (429), then both predictor sets on the held-out test split.

    python -m benchmarks.calibration_processes     # writes docs/results/calibration_processes/calibration_processes.{json,md}

Each calibration runs as its own command (below), skipped when its checkpoint is already in --run-dir:
    python recipes/calibrate_shipped.py --out RUN/single.pt
    torchrun --standalone --nproc-per-node 2 recipes/calibrate_shipped.py --out RUN/ddp2.pt
The validation figure is the recipe's own (5k images held out of the training split); the test figure is the
sparse model at budget 0.6 on the 10k test images, read once here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

import spot_compile as sc
from benchmarks.result_table import write_results
from spot_compile.data.datasets import load_dataset
from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR
from spot_compile.measure.accuracy import accuracy
from spot_compile.models.zoo import load_shipped_model
from spot_compile.serialization.predictors import load_predictor_metrics

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "1 process, batch 128": ("single.pt", [sys.executable, "recipes/calibrate_shipped.py"]),
    "2 processes (gloo), 2 x 64": ("ddp2.pt", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc-per-node", "2", "recipes/calibrate_shipped.py"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/recipe"))
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs/results/calibration_processes")
    args = ap.parse_args()
    console = Console()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    model, _ = load_shipped_model()
    test = load_dataset(FASHION_MNIST_DIR, "test", model.cfg.img_size, model.cfg.in_chans)
    rows = []
    for name, (file, command) in RUNS.items():
        path = args.run_dir / file
        if not path.is_file():
            console.log(f"calibrating: {name}")
            subprocess.run([*command, "--out", str(path)], check=True, cwd=ROOT, env=os.environ.copy())
        metrics = load_predictor_metrics(path)
        sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy="spot", predictors=str(path)))
        rows.append({"run": name, "val_top1": metrics["history"][-1]["val_top1"], "test_top1": accuracy(sparse, test),
                     "flops_ratio": sparse.plan.flops_ratio, "seconds": metrics["seconds"],
                     "world_size": metrics.get("world_size", 1), "global_batch": metrics.get("global_batch"),
                     "rank_weight_difference": metrics.get("rank_weight_difference")})
        console.log(rows[-1])
    cells = [[r["run"], f"{r['val_top1']:.2f}", f"{r['test_top1']:.2f}", f"{r['flops_ratio']:.3f}", f"{r['seconds']:.0f}",
              "-" if r["world_size"] == 1 else f"{r['rank_weight_difference']:g}"] for r in rows]
    write_results(console, args.out_dir, "calibration_processes",
                  "shipped recipe at budget 0.6: one process vs two, same global batch and steps",
                  ["run", "val top-1 % (5k)", "test top-1 % (10k)", "FLOPs ratio", "seconds", "weight difference between ranks"],
                  cells, f"# The shipped recipe on one process and on two\n\n`python -m benchmarks.calibration_processes` on "
                  f"{os.cpu_count()} CPU cores (both calibrations share them: the seconds are not a speed-up measurement).",
                  {"cores": os.cpu_count(), "rows": rows})

if __name__ == "__main__":
    main()
