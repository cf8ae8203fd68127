"""A calibration stopped mid-epoch and started again ends where an uninterrupted one ends, bit for bit."""

import pytest
import torch

from spot_compile.calibration import trainer as calibration
from spot_compile.data.imageset import ImageSet

from .conftest import small_vit

ARGS = dict(budget=0.6, epochs=2, batch_size=4, compile=False, noise=0.3)  # 4 steps an epoch, 8 in all


def _data():
    torch.manual_seed(3)
    train = ImageSet(torch.rand(18, 1, 16, 16), torch.randint(0, 10, (18,)), tuple("0123456789"))  # a ragged batch
    return train, train.subset(torch.arange(6))


def _weights(result):
    return {f"{s}.{k}": v for s, p in result.checkpoint.predictors.items() for k, v in p.state_dict().items()}


@pytest.mark.parametrize("stop_at", [5, 4], ids=["mid-epoch", "epoch-end"])
def test_a_run_stopped_and_started_again_ends_as_one_that_was_not(tmp_path, monkeypatch, stop_at):
    import io
    import json

    from rich.console import Console

    train, val = _data()
    printed = io.StringIO()  # not a terminal, as a cluster job's log: plain progress lines instead of a live bar
    whole = calibration.calibrate(small_vit(), train, val, console=Console(file=printed, width=200), **ARGS)
    assert "step 8/8 (100 %), epoch 2, loss" in printed.getvalue() and "img/s" in printed.getvalue()
    out = tmp_path / "p.pt"

    real_lr = calibration.cosine_lr

    def dies_at_step(step, *args, **kwargs):  # the process dies as step `stop_at` begins (as a SIGKILL would)
        if step == stop_at:
            raise KeyboardInterrupt
        return real_lr(step, *args, **kwargs)

    monkeypatch.setattr(calibration, "cosine_lr", dies_at_step)
    with pytest.raises(KeyboardInterrupt):
        calibration.calibrate(small_vit(), train, val, out=out, save_every=1, **ARGS)
    assert out.with_suffix(".partial").exists() and not out.exists()
    monkeypatch.setattr(calibration, "cosine_lr", real_lr)
    resumed = calibration.calibrate(small_vit(), train, val, out=out, save_every=1, **ARGS)
    assert not out.with_suffix(".partial").exists() and out.exists()
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in whole.history], rel=1e-6)
    assert [r["val_top1"] for r in resumed.history] == [r["val_top1"] for r in whole.history]
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == list(range(1, 9)), "each step once, across the stop"
    assert set(steps[0]) >= {"loss", "ce", "kl", "ratio_loss", "lr", "keep_ratio", "images_per_s"}
    assert [r["validation"]["epoch"] for r in records if "validation" in r] == [1, 2]


def test_a_cli_run_killed_with_sigkill_finishes_when_started_again(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from PIL import Image

    for label in "ab":
        (tmp_path / "data" / "train" / label).mkdir(parents=True)
        for i in range(12):
            Image.fromarray((torch.rand(16, 16) * 255).to(torch.uint8).numpy(), mode="L").save(tmp_path / "data" / "train" / label / f"{i}.png")
    model = tmp_path / "m.py"
    model.write_text("import torch\nfrom spot_compile.models.vit import ViT\ntorch.manual_seed(0)\n"
                     "model = ViT(img_size=16, patch_size=2, dim=32, depth=4, heads=2, num_classes=2)\n")
    out = tmp_path / "p.pt"
    command = [sys.executable, "-m", "spot_compile", "calibrate", str(model), "--data", str(tmp_path / "data"), "--out", str(out),
               "--val-size", "4", "--batch-size", "4", "--epochs", "40", "--save-every", "1", "--no-compile"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not out.with_suffix(".partial").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if first.poll() is None:  # on a busy machine a short run could end before the first partial is seen
        os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL and not out.exists(), "the first run ended before it could be killed"
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming calibration at step" in second.stdout and out.exists() and not out.with_suffix(".partial").exists()


def test_val_every_returns_the_predictors_of_the_best_validation_and_survives_a_resume(tmp_path, monkeypatch):
    # Validation is scripted to peak at the third of eight checks (one a step): the run must hand back the weights it
    # had then, not the last ones, and a run stopped after five checks and resumed must keep them across the stop.
    train, val = _data()
    args = {**ARGS, "val_every": 1, "lr": 0.05}
    script = [10.0, 20.0, 50.0, 40.0, 30.0, 20.0, 10.0, 5.0]
    seen = []  # the pruned model's weights at each check

    def scripted(model, *rest):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return script[len(seen) - 1]

    monkeypatch.setattr(calibration, "_shared_accuracy", scripted)
    whole = calibration.calibrate(small_vit(), train, val, **args)
    assert [c["val_top1"] for c in whole.checkpoint.metrics["val_checks"]] == script
    assert whole.checkpoint.metrics["selected_step"] == 3
    kept, last = whole.sparse.state_dict(), seen[-1]
    assert all(torch.equal(kept[k], seen[2][k]) for k in kept)
    assert any(not torch.equal(kept[k], last[k]) for k in kept), "the last weights equal the best: the test could not fail"

    seen.clear()
    out = tmp_path / "p.pt"
    real_lr = calibration.cosine_lr

    def dies_at_step(step, *a, **kw):
        if step == 5:
            raise KeyboardInterrupt
        return real_lr(step, *a, **kw)

    monkeypatch.setattr(calibration, "cosine_lr", dies_at_step)
    with pytest.raises(KeyboardInterrupt):
        calibration.calibrate(small_vit(), train, val, out=out, save_every=1, **args)
    assert len(seen) == 5
    monkeypatch.setattr(calibration, "cosine_lr", real_lr)
    resumed = calibration.calibrate(small_vit(), train, val, out=out, save_every=1, **args)
    assert resumed.checkpoint.metrics["val_checks"] == whole.checkpoint.metrics["val_checks"]
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
