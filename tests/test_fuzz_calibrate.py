"""Random (seeded) `spot-compile calibrate` command lines on a tiny IDX data set: every run either trains exactly the
steps its settings say (counted in its JSON-lines log) and writes the predictors, or refuses in one line; a refusal
of a setting (a NaN, a negative rate, a batch larger than the data) comes before the model is captured."""

import gzip
import json
import random
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from spot_compile.calibration import trainer
from spot_compile.cli.main import main

IMAGES = 24
CASES = 10
MODEL = "from spot_compile.models.vit import ViT\nmodel = ViT(img_size=16, patch_size=2, dim=32, depth=4, heads=2)\n"


def _idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_calibrate")
    rng = np.random.default_rng(0)
    _idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (IMAGES, 16, 16)))
    _idx(d / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (IMAGES,)))
    (d / "m.py").write_text(MODEL)
    return d


def _draw(rng: random.Random) -> tuple[dict, bool]:
    """Options, and whether one of them is a value the config must refuse (before the capture)."""
    opts = {"--budget": rng.choice([0.6, 0.8, 0.5]), "--batch-size": rng.choice([4, 8]), "--epochs": rng.choice([1, 2]),
            "--max-steps": rng.choice([None, 1, 3]), "--val-size": rng.choice([4, 8]), "--seed": rng.choice([0, 1, 7]),
            "--lr": 3e-3, "--noise": rng.choice([0.3, 0.0]), "--logit-distill": rng.choice([0.5, 0.0])}
    if rng.random() < 0.3:
        opts["--finetune"] = True
    bad = rng.random() < 0.4
    if bad:
        key, value = rng.choice([("--lr", "nan"), ("--lr", "-1"), ("--keep-ratio-weight", "nan"), ("--logit-distill", "inf"),
                                 ("--noise", "nan"), ("--batch-size", 64), ("--budget", "nan"), ("--backbone-lr", "0")])
        opts[key] = value
    return opts, bad


def _args(opts: dict, workdir, out) -> list[str]:
    args = ["calibrate", str(workdir / "m.py"), "--data", str(workdir), "--out", str(out), "--no-compile"]
    for key, value in opts.items():
        if value is True:
            args.append(key)
        elif value is not None:
            args += [key, str(value)]
    return args


@pytest.mark.parametrize("seed", range(CASES))
def test_random_calibrate_command_lines_train_what_they_say_or_refuse_in_one_line(workdir, tmp_path, monkeypatch, seed):
    opts, bad = _draw(random.Random(seed))
    captured = []
    real_capture = trainer.capture
    monkeypatch.setattr(trainer, "capture", lambda *a: captured.append(1) or real_capture(*a))
    out = tmp_path / "p.pt"
    result = CliRunner().invoke(main, _args(opts, workdir, out))
    if result.exit_code != 0:
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        message = result.output.strip().splitlines()
        assert len(message) == 1 or message[0].startswith("Usage:"), result.output
        assert not captured, f"{opts}: refused after the capture: {result.output}"
        assert bad, f"{opts}: a valid command line was refused: {result.output}"
        return
    assert not bad, f"{opts}: a bad value was accepted"
    steps_per_epoch = (IMAGES - opts["--val-size"]) // opts["--batch-size"]
    every = steps_per_epoch * opts["--epochs"]
    per_phase = min(opts["--max-steps"] or every, every)
    phases = 2 if opts.get("--finetune") else 1
    log = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "step" in r and "validation" not in r]
    assert steps == list(range(1, per_phase * phases + 1)), f"{opts}: trained {len(steps)} steps"
    assert out.is_file() and not out.with_suffix(".partial").exists() and not out.with_suffix(".lock").exists()


def test_the_draws_cover_both_outcomes():
    assert {_draw(random.Random(seed))[1] for seed in range(CASES)} == {True, False}
