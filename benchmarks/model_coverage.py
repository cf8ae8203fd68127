"""Model coverage: every supported family (small, random init) at budget 1.0 and 0.6.

    python -m benchmarks.model_coverage

Writes docs/results/model_coverage/model_coverage.{json,md}: blocks and special tokens found, max |output - dense| at budget 1.0,
the FLOPs ratio at budget 0.6 (FlopCounterMode), tokens per stage, and max |compiled - eager| of the sparse model.
The models are the ones tests/test_model_libraries.py checks (tests/model_families.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

import spot_compile as sc
from tests.model_families import FAMILIES, INPUT_SIZE, build, logits

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def measure(name: str) -> dict:
    model = build(name)
    x = torch.randn(4, 3, INPUT_SIZE, INPUT_SIZE)
    dense = sc.sparsify(model, sc.SparsifyConfig(budget=1.0, input_size=INPUT_SIZE))
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, input_size=INPUT_SIZE, stages=(1, 2, 3)))
    torch._dynamo.reset()
    compiled = sparse.compiled(verify=False, batch=len(x))
    with torch.no_grad():
        diff_dense = (logits(dense(x)) - logits(model(x))).abs().max().item()
        diff_compiled = (logits(compiled(x)) - logits(sparse(x))).abs().max().item()
    return {
        "family": name, "blocks": len(dense.structure.blocks), "special_tokens": dense.structure.num_special,
        "class_token": dense.structure.has_class_token, "attention": dense.structure.blocks[0].kind,
        "max_diff_budget_1": diff_dense, "flops_ratio_budget_0.6": sparse.plan.flops_ratio,
        "tokens": [dense.structure.tokens] + [s.tokens_out for s in sparse.plan.stages],
        "max_diff_compiled_vs_eager": diff_compiled,
    }


def main() -> None:
    console = Console()
    rows = [measure(name) for name in track(list(FAMILIES), description="sparsifying", console=console)]
    table = Table(title=f"model coverage ({INPUT_SIZE}x{INPUT_SIZE} input, depth 4, stages 1/2/3, torch {torch.__version__})")
    for col in ("family", "attention", "special", "max diff @1.0", "FLOPs ratio @0.6", "tokens", "compiled vs eager"):
        table.add_column(col)
    lines = ["| family | attention | special tokens | max abs diff @ budget 1.0 | FLOPs ratio @ 0.6 | tokens per stage "
             "| max abs diff compiled vs eager |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["family"], r["attention"], str(r["special_tokens"]), f"{r['max_diff_budget_1']:.1e}",
                 f"{r['flops_ratio_budget_0.6']:.4f}", " -> ".join(map(str, r["tokens"])), f"{r['max_diff_compiled_vs_eager']:.1e}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "model_coverage.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    (OUT / "model_coverage.md").write_text("\n".join(lines) + "\n")
    console.print(f"wrote {OUT / 'model_coverage.md'}")


if __name__ == "__main__":
    main()
