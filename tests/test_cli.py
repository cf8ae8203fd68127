import textwrap

import pytest
import torch
from click.testing import CliRunner

import spot_compile as sc
from spot_compile.cli.main import main

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
    # the default policy merges: the matching, the merge and the size bias of proportional attention are marked
    assert any("merge_tokens" in line for line in inserted) and any("size_bias" in line for line in inserted)
    assert "+ merge_tokens" in result.output
    # the artifact restores the same graph onto the same model
    from spot_compile.cli.userfile import load_model_file

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


WINDOWED_FILE = """
import torch, torch.nn as nn
class Windowed(nn.Module):  # Swin-like: attention inside 2x2 windows of a 4x4 token grid
    in_chans = 1
    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.head = nn.Conv2d(1, 16, 4, 4), nn.Linear(16, 48), nn.Linear(16, 10)
    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        w = x.reshape(b, 2, 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, 4, c)
        q, k, v = self.qkv(w).chunk(3, dim=-1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + a.reshape(b, 2, 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, n, c)
        return self.head(x.mean(1))
model = Windowed()
"""
ENCODER_DECODER_FILE = """
import torch, torch.nn as nn
class EncoderDecoder(nn.Module):
    in_chans = 1
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 16, 4, 4)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True), 1, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, 0.0, batch_first=True), 1)
        self.queries, self.head = nn.Parameter(torch.randn(1, 5, 16)), nn.Linear(16, 10)
    def forward(self, x):
        memory = self.encoder(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(self.decoder(self.queries.expand(x.shape[0], -1, -1), memory).mean(1))
model = EncoderDecoder()
"""

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
    "no input size": ("import torch.nn as nn\nclass M(nn.Module):\n    def forward(self, x):\n        return x\n", [],
                      "cannot tell the model's input size"),
    "budget zero": (MODEL_FILE, ["--budget", "0"], "budget must be in (0, 1]"),
    "budget above one": (MODEL_FILE, ["--budget", "1.5"], "budget must be in (0, 1]"),
    "budget unreachable": (MODEL_FILE, ["--budget", "0.1", "--stages", "3"], "unreachable"),
    "stage out of range": (MODEL_FILE, ["--stages", "1,9"], "stage 9 is out of range"),
    "windowed attention": (WINDOWED_FILE, ["--input-size", "16"], "windowed (Swin-style) attention"),
    "encoder-decoder": (ENCODER_DECODER_FILE, ["--input-size", "16"], "cross-attention, as in an encoder-decoder"),
    "corrupt predictors": (MODEL_FILE, ["--predictors", "CORRUPT"], "not a readable checkpoint"),
    "calibrate, data dir missing": (MODEL_FILE, ["calibrate", "--data", "NOPE", "--out", "p.pt"], "data directory not found"),
    "untraceable": ("import torch, torch.nn as nn\nclass M(nn.Module):\n    img_size = 8\n    def forward(self, x):\n"
                    "        if x.sum() > 0:\n            return x\n        return -x\nmodel = M()\n", [], "torch.export cannot capture"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_line_and_exit_2(tmp_path, case):
    body, extra, message = BAD_INPUTS[case]
    path = str(tmp_path / "absent.py") if body is None else _write(tmp_path, body)
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    extra = [{"CORRUPT": str(tmp_path / "corrupt.pt"), "NOPE": str(tmp_path / "nope"), "p.pt": str(tmp_path / "p.pt")}.get(a, a) for a in extra]
    command = [extra[0], path, *extra[1:]] if extra and extra[0] == "calibrate" else ["apply", path, "--no-latency", *extra]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) <= 3


def test_budget_that_is_not_a_number_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["apply", _write(tmp_path, MODEL_FILE), "--budget", "lots"])
    assert result.exit_code == 2 and "Invalid value for '--budget': 'lots' is not a valid float" in result.output
    assert "Traceback" not in result.output


def test_a_negative_coverage_weight_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["calibrate", _write(tmp_path, MODEL_FILE), "--coverage", "-1", "--out", str(tmp_path / "p.pt")])
    assert result.exit_code == 2 and "Invalid value for '--coverage'" in result.output
    assert "Traceback" not in result.output


def test_apply_exports_a_program_with_the_same_outputs(tmp_path):
    path = _write(tmp_path, "import torch\ntorch.manual_seed(0)\n" + MODEL_FILE)  # same weights at every load
    pt2 = tmp_path / "sparse.pt2"
    result = _run("apply", path, "--budget", "0.6", "--export", str(pt2), "--no-latency")
    assert result.exit_code == 0, result.output
    from spot_compile.cli.userfile import load_model_file

    program = torch.export.load(pt2)
    fresh = sc.sparsify(load_model_file(path), sc.SparsifyConfig(budget=0.6))
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    assert any(n.target is torch.ops.aten.scatter_add.default for n in nodes)  # the merging survived export
    with torch.no_grad():
        for batch in (1, 5):  # the batch size stays dynamic
            x = torch.randn(batch, 1, 16, 16)
            torch.testing.assert_close(program.module()(x), fresh(x), atol=1e-6, rtol=1e-6)


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
    assert data["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_bench_on_cuda_without_a_gpu_says_so(tmp_path):
    result = _run("bench", _write(tmp_path, MODEL_FILE), "--device", "cuda")
    assert result.exit_code != 0 and "no CUDA device" in result.output
