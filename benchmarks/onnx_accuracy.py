"""Top-1 of the shipped model's sparse graphs run from their ONNX files in ONNX Runtime, beside PyTorch's, on the
held-out Fashion-MNIST test split: what `SparseViT.to_onnx` writes is the model that was measured.

    python -m benchmarks.onnx_accuracy     # docs/results/onnx/onnx_accuracy.{json,md}; needs pip install 'spot-compile[onnx]'

Each policy at one budget: the file is written by `to_onnx` (which already compares two random batches), then every
test image runs through ONNX Runtime (CPU) and through the PyTorch sparse model; the table gives both top-1 figures,
how many predictions agree and the largest logit difference over the whole split.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from rich.console import Console

import spot_compile as sc
from benchmarks.arguments import add_results_arguments
from benchmarks.result_table import write_results
from spot_compile.data.datasets import load_dataset
from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR
from spot_compile.data.preprocessing import model_normalization
from spot_compile.models.zoo import SHIPPED_PREDICTORS, load_shipped_model

POLICIES = {
    "merge": {"policy": "merge"},
    "merge, ToMe's placement": {"policy": sc.MergeConfig(merge_at="attention")},
    "class-attention": {"policy": "class-attention"},
    "spot (shipped predictors)": {"policy": "spot", "predictors": str(SHIPPED_PREDICTORS)},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=FASHION_MNIST_DIR)
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--batch", type=int, default=250)
    add_results_arguments(ap, "onnx_accuracy", "onnx")
    args = ap.parse_args()
    console = Console(width=200)
    model, _ = load_shipped_model()
    test = load_dataset(args.data, "test", model.cfg.img_size, model.cfg.in_chans)
    normalize = model_normalization(model)
    cells, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, change in POLICIES.items():
            sparse = sc.sparsify(model, sc.SparsifyConfig(budget=args.budget, **change))
            path = Path(tmp) / "sparse.onnx"
            sparse.to_onnx(path)
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = session.get_inputs()[0].name
            ort_pred, torch_pred, worst = [], [], 0.0
            for start in range(0, len(test), args.batch):
                x = normalize(test.images[start : start + args.batch])
                ort_logits = session.run(None, {feed: x.numpy()})[0]
                with torch.no_grad():
                    torch_logits = sparse(x).numpy()
                worst = max(worst, float(np.abs(ort_logits - torch_logits).max()))
                ort_pred.append(ort_logits.argmax(-1))
                torch_pred.append(torch_logits.argmax(-1))
            ort_pred, torch_pred = np.concatenate(ort_pred), np.concatenate(torch_pred)
            labels = test.labels.numpy()
            row = {"policy": name, "flops_ratio": sparse.plan.flops_ratio, "onnx_top1": 100 * float((ort_pred == labels).mean()),
                   "torch_top1": 100 * float((torch_pred == labels).mean()), "agreement": 100 * float((ort_pred == torch_pred).mean()),
                   "max_abs_logit_diff": worst}
            rows.append(row)
            cells.append([name, f"{row['flops_ratio']:.3f}", f"{row['torch_top1']:.2f}", f"{row['onnx_top1']:.2f}",
                          f"{row['agreement']:.2f}", f"{worst:.1e}"])
    preamble = (f"Shipped Fashion-MNIST ViT, budget {args.budget}, the {len(test)} held-out test images through PyTorch and "
                f"through the ONNX file `SparseViT.to_onnx` wrote (ONNX Runtime {onnxruntime.__version__}, CPU); "
                "`python -m benchmarks.onnx_accuracy`.")
    write_results(console, args.out_dir, args.name or "onnx_accuracy", "PyTorch vs ONNX Runtime on the test split",
                  ["policy", "FLOPs ratio", "PyTorch top-1 %", "ONNX Runtime top-1 %", "predictions agreeing %", "max |logit diff|"],
                  cells, preamble, {"budget": args.budget, "test_images": len(test), "rows": rows})


if __name__ == "__main__":
    main()
