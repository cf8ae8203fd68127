"""What the reports say: one meaning of "tokens" (patch tokens kept, and the totals with special tokens, labelled)."""

import io

from rich.console import Console

import spot_compile as sc
from spot_compile.cli.report import plan_table

from .conftest import small_vit


def test_the_plan_table_labels_patch_tokens_and_totals_apart():
    sparse = sc.sparsify(small_vit(), sc.SparsifyConfig(budget=0.6, policy="class-attention"))
    console = Console(file=io.StringIO(), width=200)
    console.print(plan_table(sparse.plan))
    lines = console.file.getvalue().splitlines()
    assert any("patch tokens kept" in line and "tokens kept (all)" in line for line in lines)
    for i, s in enumerate(sparse.plan.stages, 1):
        cells = next(line for line in lines if line.lstrip("│ ").startswith(f"{i} ")).replace("│", " ").split()
        assert cells[:5] == [str(i), str(s.block), str(s.keep), str(s.tokens_in), str(s.tokens_out)]
        assert s.tokens_out == s.keep + 1  # the class token


def test_dump_shows_keyword_arguments_and_marks_the_nodes_merging_rewired():
    from spot_compile.cli.report import dump_graph

    sparse = sc.sparsify(small_vit(), sc.SparsifyConfig(budget=0.7, policy="merge"))
    lines = dump_graph(sparse.graph_module).plain.splitlines()
    attention = [line for line in lines if "= aten.scaled_dot_product_attention" in line]
    assert attention and all(line.startswith("~") and "attn_mask=" in line for line in attention[1:]), attention
    assert any(line.startswith("+") and "merge_tokens" in line for line in lines)


def test_cli_tables_and_dumps_survive_a_pipe(tmp_path):
    from click.testing import CliRunner

    from spot_compile.cli.main import main

    model = tmp_path / "m.py"
    model.write_text("from spot_compile.models.vit import ViT\nmodel = ViT(img_size=16, patch_size=2, dim=32, depth=4, heads=2)\n")
    result = CliRunner().invoke(main, ["apply", str(model), "--budget", "0.6", "--no-latency", "--dump"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and "patch tokens kept" in result.output and "tokens kept (all)" in result.output
    assert max(len(line) for line in result.output.splitlines()) > 80  # nothing folded to the 80 columns of a pipe


def test_every_error_line_has_one_prefix(tmp_path):
    """click's own usage errors and spot-compile's one-line errors both say `error:`, not `Error:` for some."""
    from click.testing import CliRunner

    from spot_compile.cli.main import main

    runner = CliRunner()
    usage = runner.invoke(main, ["bench", str(tmp_path / "m.py"), "--repeats", "0"])
    ours = runner.invoke(main, ["apply", str(tmp_path / "absent.py")])
    unknown = runner.invoke(main, ["--bogus"])
    for result in (usage, ours, unknown):
        assert result.exit_code == 2
        lines = [line for line in result.output.splitlines() if "rror:" in line]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Usage: " in usage.output and "0 is not in the range x>=1" in usage.output


def test_scorer_nodes_are_named_after_their_policy_and_old_files_still_load(tmp_path):
    import torch

    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy="class-attention"))
    assert sorted(sparse.scorers) == [f"class_attention_scorer_{s.block}" for s in sparse.plan.stages]
    sc.save(sparse, model, tmp_path / "new.pt")
    record = torch.load(tmp_path / "new.pt", weights_only=True)
    record["scorers"] = {name.replace("class_attention_", "spot_"): state for name, state in record["scorers"].items()}
    torch.save(record, tmp_path / "old.pt")  # as files were written when every scorer was `spot_scorer_<block>`
    loaded = sc.load(tmp_path / "old.pt", model)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x))
