import textwrap

import pytest
import torch
from click.testing import CliRunner

import spot_compile as sc
from spot_compile.cli import main

MODEL_FILE = """
from spot_compile.models.vit import ViT
model = ViT(img_size=16, patch_size=2, dim=32, depth=4, heads=2)
"""


def _write(tmp_path, body, name="mymodel.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_apply_reports_plan_dump_and_saves(tmp_path):
    path = _write(tmp_path, MODEL_FILE)
    out, dump = tmp_path / "sparse.pt", tmp_path / "graph.txt"
    result = _run("apply", path, "--budget", "0.6", "--dump", "--dump-file", str(dump), "--out", str(out), "--no-latency")
    assert result.exit_code == 0, result.output
    assert "tokens kept" in result.output and "ratio 0.5" in result.output
    lines = dump.read_text().splitlines()
    inserted = [line for line in lines if line.startswith("+")]
    assert any("prune_tokens" in line for line in inserted) and any("spot_scorer" in line for line in inserted)
    assert "+ prune_tokens" in result.output
    # the artifact restores the same graph onto the same model
    from spot_compile.userfile import load_model_file

    model = load_model_file(path)
    restored = sc.load(out, model)
    fresh = sc.sparsify(model, sc.SparsifyConfig(budget=0.6))
    assert [s.tokens_out for s in restored.plan.stages] == [s.tokens_out for s in fresh.plan.stages]
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), fresh(x))


def test_inspect_lists_blocks(tmp_path):
    result = _run("inspect", _write(tmp_path, MODEL_FILE))
    assert result.exit_code == 0
    assert "4 attention blocks found, 1 special token" in result.output


BAD_INPUTS = {
    "missing file": (None, [], "model file not found"),
    "syntax error": ("def broken(:\n", [], "syntax error in"),
    "no model": ("x = 1\n", [], "defines no model"),
    "several models": ("from spot_compile.models.vit import ViT\na = ViT(depth=1)\nb = ViT(depth=2)\n", [], "defines several models (a, b)"),
    "factory raises": ("def make():\n    raise ValueError('boom')\n", ["--factory", "make"], "make() in"),
    "factory needs args": ("def make(size):\n    pass\n", ["--factory", "make"], "needs arguments"),
    "unknown --model": (MODEL_FILE, ["--model", "nope"], "defines nothing named 'nope'"),
    "no attention": ("import torch.nn as nn\nmodel = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())\n", ["--input-size", "8"], "no attention found"),
    "input size mismatch": (MODEL_FILE, ["--input-size", "20"], "rejects a"),
    "no input size": ("import torch.nn as nn\nclass M(nn.Module):\n    def forward(self, x):\n        return x\n", [], "cannot tell the model's input size"),
    "budget zero": (MODEL_FILE, ["--budget", "0"], "budget must be in (0, 1]"),
    "budget above one": (MODEL_FILE, ["--budget", "1.5"], "budget must be in (0, 1]"),
    "budget unreachable": (MODEL_FILE, ["--budget", "0.1", "--stages", "3"], "unreachable"),
    "stage out of range": (MODEL_FILE, ["--stages", "1,9"], "stage 9 is out of range"),
    "untraceable": ("import torch, torch.nn as nn\nclass M(nn.Module):\n    img_size = 8\n    def forward(self, x):\n        if x.sum() > 0:\n            return x\n        return -x\nmodel = M()\n", [], "torch.export cannot capture"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_line_and_exit_2(tmp_path, case):
    body, extra, message = BAD_INPUTS[case]
    path = str(tmp_path / "absent.py") if body is None else _write(tmp_path, body)
    result = CliRunner().invoke(main, ["apply", path, "--no-latency", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) <= 3


def test_debug_flag_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(main, ["--debug", "apply", str(tmp_path / "absent.py")])
    assert result.exit_code != 0 and isinstance(result.exception, sc.SpotError)


def test_bench_writes_a_table_and_json(tmp_path):
    import json

    path = _write(tmp_path, MODEL_FILE)
    result = _run("bench", path, "--budgets", "0.6", "--batches", "2", "--modes", "eager", "--repeats", "2",
                  "--warmup", "1", "--out-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "latency_mymodel.json").read_text())
    (row,) = data["rows"]
    assert row["mode"] == "eager" and row["batch"] == 2 and 0.5 < row["flops_ratio"] <= 0.6
    assert row["dense_ms"] > 0 and row["sparse_ms"] > 0
    assert "speedup" in result.output
