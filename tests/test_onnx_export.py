"""`SparseViT.to_onnx` / `apply --onnx`: every policy's graph as ONNX with a dynamic batch, run in ONNX Runtime against
the PyTorch sparse model; a mismatch or a missing extra is one line and writes nothing."""

import importlib.util

import numpy as np
import pytest
import torch

import spot_compile as sc
from spot_compile.errors import ExportError, UsageError
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import capture
from spot_compile.graph.inputs import example_input
from spot_compile.scorers.spot import PredictorConfig, make_predictors

from .conftest import small_vit
from .model_families import build, logits

ort = pytest.importorskip("onnxruntime")


def _run_file(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _policies(model):
    structure = find_blocks(capture(model, example_input(model, None)))
    predictors = make_predictors(structure, (1, 2, 3), PredictorConfig(hidden=16))
    return {
        "merge": dict(policy="merge"),
        "merge, ToMe's placement": dict(policy=sc.MergeConfig(merge_at="attention")),
        "class-attention": dict(policy="class-attention"),
        "class-attention, fused": dict(policy="class-attention", fuse_pruned=True),
        "spot predictors": dict(policy=sc.GivenScorersConfig(predictors)),
    }


@pytest.mark.parametrize("name", ["merge", "merge, ToMe's placement", "class-attention", "class-attention, fused", "spot predictors"])
def test_every_policy_exports_and_onnx_runtime_computes_what_pytorch_does(tmp_path, name):
    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, **_policies(model)[name]))
    written = sparse.to_onnx(tmp_path / "s.onnx")
    assert written.relative_diff < 1e-4 and "max |diff|" in written.describe()
    x = sparse.example(5)  # a batch the export never saw
    with torch.no_grad():
        np.testing.assert_allclose(_run_file(tmp_path / "s.onnx", x), sparse(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["hf ViTForImageClassification (sdpa)", "timm deit_tiny_distilled_patch16_224", "torchvision VisionTransformer"])
def test_the_families_export_with_the_default_policy(tmp_path, family):
    model = build(family)
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6))
    assert sparse.to_onnx(tmp_path / "s.onnx").relative_diff < 1e-4
    x = sparse.example(3)
    with torch.no_grad():
        np.testing.assert_allclose(_run_file(tmp_path / "s.onnx", x), logits(sparse(x)).numpy(), atol=1e-4, rtol=1e-4)


def test_a_random_policy_runs_without_a_comparison_and_a_mismatch_writes_nothing(tmp_path):
    model = small_vit()
    written = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy="random")).to_onnx(tmp_path / "r.onnx")
    assert written.max_abs_diff is None and "not compared" in written.describe() and (tmp_path / "r.onnx").is_file()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy="class-attention"))
    with pytest.raises(ExportError, match="outputs differ from PyTorch's by .* nothing was written"):
        sparse.to_onnx(tmp_path / "strict.onnx", tolerance=1e-15)
    assert not (tmp_path / "strict.onnx").exists()


def test_without_the_extra_the_export_is_one_line_naming_the_install(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from spot_compile.cli.main import main

    from .test_cli import MODEL_FILE, _write

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(UsageError, match=r"ONNX export needs onnxruntime: pip install 'spot-compile\[onnx\]'"):
        sc.sparsify(small_vit(), sc.SparsifyConfig(budget=0.6)).to_onnx(tmp_path / "s.onnx")
    marker = tmp_path / "ran"
    path = _write(tmp_path, f"open({str(marker)!r}, 'w').close()\n" + MODEL_FILE)
    result = CliRunner().invoke(main, ["apply", path, "--onnx", str(tmp_path / "s.onnx")])
    assert result.exit_code == 2 and "pip install 'spot-compile[onnx]'" in result.output and not marker.exists()


def test_apply_writes_the_onnx_file_and_says_how_close_it_is(tmp_path):
    from click.testing import CliRunner

    from spot_compile.cli.main import main

    from .test_cli import MODEL_FILE, _write

    result = CliRunner().invoke(main, ["apply", _write(tmp_path, MODEL_FILE), "--no-latency", "--onnx", str(tmp_path / "m.onnx")],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "ONNX Runtime against PyTorch on batches 2 and 3: max |diff|" in result.output and (tmp_path / "m.onnx").is_file()
