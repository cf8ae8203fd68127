import torch
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: PLC2701 (counts dynamo frames)

import spot_compile as sc
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import capture
from spot_compile.graph.inputs import example_input
from spot_compile.scorers.spot import PredictorConfig, make_predictors

from .conftest import small_vit


def test_fullgraph_compile_no_recompiles_and_same_outputs():
    torch._dynamo.reset()
    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(sparse.graph_module, fullgraph=True, backend=counter)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        first = compiled(x)
        for _ in range(3):
            again = compiled(torch.randn(4, 1, 16, 16))
        torch.testing.assert_close(first, sparse(x), atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 1  # fullgraph=True would have raised on a graph break
    assert again.shape == (4, 10)


def test_compile_never_hands_back_something_slower_than_eager(monkeypatch, caplog):
    from spot_compile import api as api

    sparse = sc.sparsify(small_vit(), sc.SparsifyConfig(budget=0.6))
    x = torch.randn(2, 1, 16, 16)
    torch._dynamo.reset()
    fast = sparse.compiled(batch=4)
    assert sparse.compile_choice["chosen"] in ("compiled", "eager") and sparse.compile_choice["eager_ms"] > 0
    with torch.no_grad():
        torch.testing.assert_close(fast(x), sparse(x), atol=1e-4, rtol=1e-4)
    # where Inductor loses, the eager graph comes back, and the user is told
    monkeypatch.setattr(api, "median_pair", lambda fns, x, warmup, repeats: (1.0, 2.0))
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="spot_compile"):
        slow_compile = sparse.compiled(batch=4)
    assert slow_compile is sparse.graph_module and sparse.compile_choice["chosen"] == "eager"
    assert "slower than eager" in caplog.text


def test_aot_compile_matches_eager_and_keeps_no_package(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sparse = sc.sparsify(small_vit(), sc.SparsifyConfig(budget=0.6))
    runner = sparse.aot_compile(batch=3, dynamic_batch=True)
    with torch.no_grad():
        for batch in (3, 5):
            x = torch.randn(batch, 1, 16, 16)
            torch.testing.assert_close(runner(x), sparse(x), atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob("spot_compile_aot_*"))  # the temporary package is removed once loaded


def test_compiled_fn_hands_each_benchmark_mode_its_compile_path(monkeypatch):
    from spot_compile.cli.bench import MODES, compiled_fn

    sparse = sc.sparsify(small_vit(), sc.SparsifyConfig(budget=0.6))
    calls = []
    monkeypatch.setattr(type(sparse), "compiled", lambda self, **kw: calls.append(("compile", kw)) or "compiled")
    monkeypatch.setattr(type(sparse), "aot_compile", lambda self, batch, **kw: calls.append(("aot", batch)) or "aot")
    x = torch.randn(3, 1, 16, 16)
    fns = {mode: compiled_fn(sparse, mode, x) for mode in MODES}
    assert fns == {"eager": sparse.graph_module, "compiled": "compiled", "frozen": "compiled", "aot": "aot",
                   "cudagraphs": "compiled"}
    same = {"verify": False, "dynamic": False, "batch": 3}
    assert calls == [("compile", {"freezing": False, **same}), ("compile", {"freezing": True, **same}), ("aot", 3),
                     ("compile", {"freezing": False, **same, "mode": "reduce-overhead"})]


def test_a_compile_that_fails_inside_torch_falls_back_to_eager(monkeypatch, caplog):
    import pytest

    sparse = sc.sparsify(small_vit(), sc.SparsifyConfig(budget=0.6))

    def broken(*args, **kwargs):
        def run(x):
            raise RuntimeError("InductorError: ValueError: The argument '-1 + ((0))' is not comparable.")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level("WARNING", logger="spot_compile"):
        fallback = sparse.compiled(batch=2)
    assert fallback is sparse.graph_module and sparse.compile_choice["chosen"] == "eager"
    assert "not comparable" in sparse.compile_choice["error"] and "returning the eager graph" in caplog.text
    with pytest.raises(RuntimeError, match="not comparable"):  # benchmarks ask for the compiled graph itself
        sparse.compiled(batch=2, verify=False)


def test_bench_leaves_out_a_mode_that_fails_to_compile(monkeypatch):
    from spot_compile.cli import bench as bench

    def compiled_pair(dense, sparse, mode, example):
        raise RuntimeError(f"{mode} is broken here")

    monkeypatch.setattr(bench, "compiled_pair", compiled_pair)
    rows = bench.run_bench(small_vit(), [0.6], [2], ("eager", "compiled"), warmup=1, repeats=2)
    assert [(r.mode, r.batch) for r in rows] == [("eager", 2)] and rows[0].sparse_ms > 0


def test_bench_hands_over_the_rows_after_each_budget_and_batch():
    from spot_compile.cli import bench as bench

    seen = []
    rows = bench.run_bench(small_vit(), [1.0, 0.6], [2], ("eager",), warmup=1, repeats=2, on_rows=seen.append)
    assert [len(r) for r in seen] == [1, 2] and seen[-1] == rows  # a run cut short keeps what it measured


def test_the_token_positions_compile_where_inductor_lowers_cat_pointwise():
    # On a GPU Inductor lowers `cat` pointwise, and the shipped SPOT graph failed to compile there ("InductorError:
    # The argument '-1 + ((0))' is not comparable", torch 2.11 and 2.14): a clamp of an arange-derived position folds
    # into a sympy Max over the cat's index, which sympy cannot order. force_pointwise_cat takes that path on the CPU.
    torch._dynamo.reset()
    model = small_vit()
    structure = find_blocks(capture(model, example_input(model, None)))
    stages = (1, 2)  # the second stage reads positions carried through the first prune: the failing pattern
    predictors = make_predictors(structure, stages, PredictorConfig(hidden=16, coverage=2.0))
    sparse = sc.sparsify(model, sc.SparsifyConfig(keep=(40, 25), stages=stages, policy=sc.GivenScorersConfig(predictors)))
    x = torch.randn(3, 1, 16, 16)
    with torch._inductor.config.patch(force_pointwise_cat=True), torch.no_grad():
        compiled = sparse.compiled(verify=False, dynamic=False, batch=3)
        torch.testing.assert_close(compiled(x), sparse(x), atol=1e-4, rtol=1e-4)
