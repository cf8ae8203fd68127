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
