"""bench and apply report latency with its spread and a noise check, bench always leaves its rows behind, and its
presets are what the help says."""

import json

import pytest
from click.testing import CliRunner
from rich.console import Console

from spot_compile.cli import bench
from spot_compile.cli.bench import QuickLatency, Timing, noise_lines
from spot_compile.cli.main import BENCH_QUICK, main
from spot_compile.cli.report import latency_lines
from spot_compile.measure.timing import Ratio

from .conftest import small_vit
from .test_cli import MODEL_FILE, _write


def test_a_ratio_carries_its_spread_and_knows_noise_from_a_quiet_machine():
    quiet = Ratio.of([10.0, 10.2, 9.9, 10.1, 10.0], [10.0, 10.0, 10.0, 10.0, 10.0])
    assert quiet.low <= 1.0 <= quiet.high and not quiet.too_noisy
    noisy = Ratio.of([16.0, 15.0, 17.0, 16.5, 15.5], [10.0] * 5)  # identical work reading 1.6x
    assert noisy.median == 1.6 and noisy.too_noisy and noisy.text() == "1.60 (1.55-1.65)"
    # a small steady offset is within the floor
    assert not Ratio.of([10.2] * 5, [10.0] * 5).too_noisy


def _timing(budget, dense, sparse, low, high, mode="compiled"):
    return Timing(budget, mode, 8, dense, sparse, 1.0 if budget >= 1 else 0.6, None, None, low, high)


def test_the_budget_one_rows_are_the_noise_check_and_a_noisy_one_is_named(tmp_path):
    quiet = [_timing(1.0, 10.0, 10.1, 0.97, 1.02), _timing(0.6, 10.0, 6.0, 1.6, 1.7)]
    assert noise_lines(quiet)[0].startswith("noise check passed")
    noisy = [_timing(1.0, 17.1, 10.0, 1.6, 1.8), _timing(0.6, 10.0, 6.0, 1.6, 1.7)]
    (line,) = noise_lines(noisy)
    assert line.startswith("warning: the machine is too noisy to trust these ratios") and "1.71x (1.60-1.80)" in line
    assert noise_lines(noisy[1:])[0].startswith("no noise check: add 1.0 to --budgets")
    console = Console(width=200, record=True)
    bench.report(noisy, "m", tmp_path, console, 5, 2)
    text = console.export_text()
    assert "1.71x (1.60-1.80) noisy!" in text and "too noisy" in text
    data = json.loads((tmp_path / "latency_m.json").read_text())
    assert data["rows"][0]["too_noisy"] and not data["rows"][1]["too_noisy"] and data["noise"] == [line]


def test_apply_s_latency_line_carries_its_spread_and_flags_noise():
    quiet = QuickLatency(8, 7, 10.0, 6.0, Ratio(0.6, 0.58, 0.62), Ratio(1.0, 0.98, 1.01))
    assert len(latency_lines(quiet)) == 1 and "ratio 0.600 (0.580-0.620)" in latency_lines(quiet)[0].plain
    noisy = QuickLatency(8, 7, 10.0, 6.0, Ratio(0.6, 0.4, 0.9), Ratio(1.25, 1.1, 1.4))
    assert "too noisy to trust this latency ratio" in latency_lines(noisy)[1].plain


def test_bench_at_budget_one_compiles_the_dense_graph_once_and_times_it_against_itself(monkeypatch):
    compiled = []

    def compiled_fn(graph, mode, example):
        compiled.append(graph)
        return graph.graph_module

    monkeypatch.setattr(bench, "compiled_fn", compiled_fn)
    rows = bench.run_bench(small_vit(), [1.0], [2], ("eager", "compiled"), warmup=1, repeats=3)
    assert len(compiled) == 1 and [r.mode for r in rows] == ["eager", "compiled"]
    assert all(r.flops_ratio == 1.0 and r.speedup_low <= r.speedup_high for r in rows)


def test_an_interrupted_bench_reports_and_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    real, calls = bench._time_budget_batch, []

    def stopped_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "_time_budget_batch", stopped_at_the_second)
    result = CliRunner().invoke(main, ["bench", _write(tmp_path, MODEL_FILE), "--budgets", "1.0,0.6", "--batches", "2",
                                       "--modes", "eager", "--repeats", "2", "--warmup", "0", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "interrupted: reporting the 1 rows measured so far" in result.output
    data = json.loads((tmp_path / "latency_mymodel.json").read_text())
    assert [r["budget"] for r in data["rows"]] == [1.0] and (tmp_path / "speedup_mymodel.png").is_file()


@pytest.mark.parametrize("quick", [True, False])
def test_bench_presets_and_its_default_output_folder(tmp_path, monkeypatch, quick):
    seen = {}

    def run_bench(model, budgets, batches, modes, input_size, warmup, repeats, console, config, on_rows=None):
        seen.update(budgets=budgets, batches=batches, modes=modes, warmup=warmup, repeats=repeats)
        rows = [_timing(1.0, 10.0, 10.0, 0.99, 1.01, mode="eager")]
        on_rows(rows)
        return rows

    monkeypatch.setattr(bench, "run_bench", run_bench)
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, MODEL_FILE)
    result = CliRunner().invoke(main, ["bench", path, *(["--quick", "--repeats", "3"] if quick else [])])
    assert result.exit_code == 0, result.output
    if quick:
        assert seen == dict(budgets=[1.0, 0.6], batches=[1, 8], modes=("eager", "compiled"), warmup=BENCH_QUICK["warmup"], repeats=3)
    else:
        assert seen == dict(budgets=[1.0, 0.8, 0.6, 0.5], batches=[1, 8, 64], modes=("eager", "compiled"), warmup=3, repeats=10)
    assert {p.name for p in (tmp_path / "bench_mymodel").iterdir()} == {"latency_mymodel.json", "latency_mymodel.md", "speedup_mymodel.png"}
