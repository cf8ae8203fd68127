"""Calibration on several processes through torchrun (gloo on the CPU), and the device and precision options."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

from spot_compile.serialization.predictors import load_predictor_metrics

MODEL = ("import torch\nfrom spot_compile.models.vit import ViT\ntorch.manual_seed(0)\n"
         "model = ViT(img_size=16, patch_size=2, dim=32, depth=4, heads=2, num_classes=2)\n")


def _setup(tmp_path, per_class=20):
    g = torch.Generator().manual_seed(0)
    for label in "ab":
        (tmp_path / "data" / "train" / label).mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(16, 16, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr, mode="L").save(tmp_path / "data" / "train" / label / f"{i}.png")
    (tmp_path / "m.py").write_text(MODEL)
    return ["calibrate", str(tmp_path / "m.py"), "--data", str(tmp_path / "data"), "--val-size", "8", "--no-compile",
            "--workers", "0", "--budget", "0.6"]


def _torchrun(args, nproc=2, timeout=400):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "spot_compile", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("tuned", [None, "deployed", "calibration"], ids=["predictors", "then-backbone", "jointly"])
def test_two_gloo_processes_train_identical_predictors_and_rank_0_alone_writes(tmp_path, tuned):
    out = tmp_path / "p.pt"
    run = _torchrun([*_setup(tmp_path), "--batch-size", "4", "--epochs", "2", "--out", str(out), "--save-every", "2",
                     *(["--finetune", "--finetune-graph", tuned] if tuned else [])])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = load_predictor_metrics(out)
    assert metrics["world_size"] == 2 and metrics["global_batch"] == 8
    assert metrics["rank_weight_difference"] == 0.0, "DistributedDataParallel must keep the replicas identical"
    assert metrics["finetune"] == bool(tuned) and metrics["finetune_graph"] == tuned
    assert run.stdout.count("calibration took") == 1, "rank 0 alone prints"
    assert "on 2 processes" in run.stdout
    steps = [line for line in out.with_suffix(".jsonl").read_text().splitlines() if '"step"' in line]
    phases = 2 if tuned == "deployed" else 1  # the backbone's fine-tune after the predictors' calibration
    assert len(steps) == phases * 2 * (32 // 8), "32 training images, global batch 8: 4 steps an epoch, logged once each"
    assert not out.with_suffix(".partial").exists()


def test_more_processes_than_the_data_can_feed_are_refused_in_one_line(tmp_path):
    run = _torchrun([*_setup(tmp_path, per_class=6), "--batch-size", "4", "--out", str(tmp_path / "p.pt")])
    assert run.returncode != 0
    said = run.stderr + run.stdout
    assert "error: 4 training images are fewer than one batch of 4 per process x 2 processes" in said
    assert "spot_compile/" not in said, "no traceback through spot-compile's code (torchrun reports the exit code on its own)"


def test_device_cuda_without_a_gpu_is_refused_before_any_work(tmp_path):
    from click.testing import CliRunner

    from spot_compile.cli.main import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(main, [*_setup(tmp_path), "--device", "cuda", "--out", str(tmp_path / "p.pt")])
    assert result.exit_code == 2 and "torch sees no CUDA GPU" in result.output and len(result.output.strip().splitlines()) == 1


def test_bf16_calibration_runs_and_records_its_precision(tmp_path):
    from spot_compile.calibration.trainer import calibrate
    from spot_compile.data.imageset import ImageSet

    from .conftest import small_vit

    data = ImageSet(torch.rand(32, 1, 16, 16), torch.randint(0, 10, (32,)), tuple("0123456789"))
    result = calibrate(small_vit(), data, data.subset(torch.arange(8)), 0.6, epochs=1, batch_size=8, compile=False,
                       precision="bf16", out=tmp_path / "p.pt")
    assert result.checkpoint.metrics["precision"] == "bf16" and len(result.history) == 1
    assert all(torch.isfinite(p).all() for m in result.checkpoint.predictors.values() for p in m.parameters())
