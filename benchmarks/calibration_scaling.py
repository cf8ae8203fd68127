"""Calibration's resident memory against the number of images, and its throughput, this version against an earlier one.

    python -m benchmarks.calibration_scaling --baseline-ref 7f35cc3   # writes docs/results/calibration_scaling/calibration_scaling.{json,md}

Memory: an ImageFolder tree of N and of 4N Fashion-MNIST training images, drawn as 64x64 RGB PNGs, calibrated
for the same few steps on the same model (a 64-pixel, 3-channel ViT in a model file; its weights do not matter to
memory), each run measured as peak RSS by `/usr/bin/time -v`. Throughput: the shipped model on the Fashion-MNIST IDX
files as the shipped recipe runs it (batch 128, compiled), images per second over the steps after the first few
(the compile is not counted). Both are measured for this checkout and, with --baseline-ref, for that commit (checked
out into a temporary git worktree), in one run, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import track

from benchmarks.result_table import write_results
from spot_compile.data.datasets import load_dataset
from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]

MODEL = ("import torch\nfrom spot_compile.models.vit import ViT\ntorch.manual_seed(0)\n"
         "model = ViT(img_size=64, patch_size=8, in_chans=3, dim=64, depth=4, heads=2, num_classes=10)\n")
SHIPPED = "from spot_compile.models.zoo import load_shipped_model\nmodel, _ = load_shipped_model()\n"


def write_folder(root: Path, n: int) -> Path:
    """n Fashion-MNIST training images as 64x64 RGB PNGs in root/CLASS/ (written once, reused)."""
    if (root / ".done").exists():
        return root
    data = load_dataset(FASHION_MNIST_DIR, "train", limit=n)
    for i in track(range(n), description=f"writing {n} PNGs"):
        d = root / str(int(data.labels[i]))
        d.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((data.images[i, 0].numpy() * 255).astype(np.uint8)).resize((64, 64))
        grey.convert("RGB").save(d / f"{i}.png")
    (root / ".done").touch()
    return root


def run(code: Path, args: list[str], env_extra: dict | None = None) -> tuple[int, str]:
    """Peak RSS in MiB of `python -m spot_compile ARGS` with `code` first on the path, and what it printed."""
    env = {**os.environ, "PYTHONPATH": str(code), **(env_extra or {})}
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "spot_compile", *args], capture_output=True,
                          text=True, env=env, cwd=code)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(args[:2])} failed in {code}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return rss_kib // 1024, proc.stdout


def steady_rate(jsonl: Path, skip: int) -> float:
    """Images/s over the steps after the first `skip`, from the log's cumulative rate (steps x batch / elapsed)."""
    steps = [json.loads(line) for line in jsonl.read_text().splitlines() if '"step"' in line]
    batch = 128
    elapsed = [s["step"] * batch / s["images_per_s"] for s in steps]
    return (len(steps) - skip) * batch / (elapsed[-1] - elapsed[skip - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-ref", help="an earlier commit to measure beside this checkout")
    ap.add_argument("--images", type=int, default=2000, help="N: the small data set (the large one is 4N)")
    ap.add_argument("--steps", type=int, default=40, help="steps of the throughput runs")
    ap.add_argument("--work", type=Path, default=Path("runs/calibration_scaling"))
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs/results/calibration_scaling")
    args = ap.parse_args()
    console = Console()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "rgb64.py").write_text(MODEL)
    (work / "shipped.py").write_text(SHIPPED)
    folders = {n: write_folder(work / f"folder{n}", n) for n in (args.images, 4 * args.images)}
    versions = {"this checkout": ROOT}
    tmp = None
    if args.baseline_ref:
        tmp = Path(tempfile.mkdtemp()) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp), args.baseline_ref], check=True,
                       capture_output=True)
        versions[f"baseline {args.baseline_ref}"] = tmp
    rows = []
    try:
        for name, code in versions.items():
            row = {"version": name}
            for n, folder in folders.items():
                # the baseline has no --workers; this checkout's default (2 loader processes) is measured as users get it
                row[f"rss_mib_{n}"], _ = run(code, ["calibrate", str(work / "rgb64.py"), "--data", str(folder), "--val-size", "200",
                                                    "--batch-size", "64", "--max-steps", "10", "--no-compile",
                                                    "--out", str(work / "rss.pt")])
                console.log(f"{name}: {n} images, peak RSS {row[f'rss_mib_{n}']} MiB")
            # this checkout: its default (2 loader workers) and the workers off, the baseline's only way
            for workers in (["2", "0"] if code == ROOT else [None]):
                out = work / "rate.pt"
                _, printed = run(code, ["calibrate", str(work / "shipped.py"), "--data", str(FASHION_MNIST_DIR), "--max-steps",
                                        str(args.steps), "--batch-size", "128", "--finetune", "--backbone-lr", "1e-3",
                                        "--hidden", "16", "--coverage", "2", "--out", str(out),
                                        *(["--workers", workers] if workers else []),
                                        # the older checkout's only fine-tune; this one's default tunes after (twice the steps)
                                        *(["--finetune-graph", "calibration"] if code == ROOT else [])])
                key = f"images_per_s_workers_{workers}" if workers else "images_per_s"
                row[key] = steady_rate(out.with_suffix(".jsonl"), skip=5)
                console.log(f"{name}: {row[key]:.1f} images/s ({key})")
            rows.append(row)
    finally:
        if tmp is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp)], capture_output=True)
    n, big = args.images, 4 * args.images
    cells = []
    for r in rows:
        r["rss_ratio"] = r[f"rss_mib_{big}"] / r[f"rss_mib_{n}"]
        rates = " / ".join(f"{v:.1f} ({k.removeprefix('images_per_s').removeprefix('_').replace('_', ' ') or 'in memory'})"
                           for k, v in r.items() if k.startswith("images_per_s"))
        cells.append([r["version"], str(r[f"rss_mib_{n}"]), str(r[f"rss_mib_{big}"]), f"{r['rss_ratio']:.2f}", rates])
    write_results(console, args.out_dir, "calibration_scaling",
                  f"calibration: peak RSS with {n} vs {big} images (64x64 RGB), throughput of the shipped recipe",
                  ["version", f"peak RSS, {n} images (MiB)", f"peak RSS, {big} images (MiB)", "ratio 4x/1x",
                   "shipped recipe images/s"], cells,
                  f"# Calibration: memory against data size, and throughput\n\n`python -m benchmarks.calibration_scaling"
                  f"{' --baseline-ref ' + args.baseline_ref if args.baseline_ref else ''}` on {os.cpu_count()} CPU cores.",
                  {"cores": os.cpu_count(), "rows": rows})

if __name__ == "__main__":
    main()
