"""Human-readable views: the blocks found, the plan, and the rewritten graph (`--dump`)."""

from __future__ import annotations

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text
from torch.fx import GraphModule, Node

from spot_compile.graph.blocks import ModelStructure
from spot_compile.passes.emit import SPOT_TAG
from spot_compile.planning.plan import SparsityPlan


def blocks_table(structure: ModelStructure) -> Table:
    table = Table(title=f"{len(structure.blocks)} attention blocks found, {structure.num_special} special token(s)")
    for col in ("block", "attention", "input stream", "attn residual", "mlp residual", "tokens", "dim", "heads"):
        table.add_column(col)
    for b in structure.blocks:
        d = b.describe()
        table.add_row(*(str(d[k]) for k in ("block", "attention", "input", "attn_residual", "mlp_residual", "tokens", "dim", "heads")))
    return table


def plan_table(plan: SparsityPlan, latency=None, inside_blocks: bool = False) -> Group:
    """The plan as a table with its FLOPs; `latency` (a `bench.QuickLatency`) adds the eager timing, its spread and
    the noise check. `inside_blocks`: the stages reduce inside their block, after its attention (ToMe's placement)."""
    table = Table(title=f"spot-compile plan: policy {plan.policy}, budget {plan.budget}")
    where = "in block (after attention)" if inside_blocks else "before block"
    # Patch tokens are what a budget reduces; the totals add the special tokens (class, registers) and a fused token.
    for column in ("stage", where, "patch tokens kept", "tokens in (all)", "tokens kept (all)"):
        table.add_column(column)
    for i, s in enumerate(plan.stages):
        table.add_row(str(i + 1), str(s.block), str(s.keep), str(s.tokens_in), str(s.tokens_out))
    lines = [
        f"FLOPs/image: dense {plan.dense_flops / 1e9:.4f} G, sparse {plan.sparse_flops / 1e9:.4f} G, "
        f"ratio {plan.flops_ratio:.3f} (torch FlopCounterMode)"
    ]
    texts = [Text(line) for line in lines]
    if latency:
        texts += latency_lines(latency)
    return Group(table, *texts)


def latency_lines(t) -> list[Text]:
    """A `bench.QuickLatency` as lines: the ratio with its interquartile range, the noise check, and a warning
    when the dense model timed against itself says the machine is too noisy for the ratio to mean anything."""
    lines = [Text(f"eager latency, batch {t.batch}: dense {t.dense_ms:.1f} ms, sparse {t.sparse_ms:.1f} ms, ratio "
                  f"{t.ratio.text(3)} (median and interquartile range of {t.repeats} interleaved rounds); noise check, "
                  f"dense against itself: {t.noise.text(3)}")]
    if t.noise.too_noisy:
        lines.append(Text(f"warning: the machine is too noisy to trust this latency ratio: the dense model timed against "
                          f"itself reads {t.noise.median:.3f}, not 1.000; rerun on a quiet machine, or use "
                          "spot-compile bench for more repeats", style="yellow"))
    return lines


def _fmt(arg) -> str:
    if isinstance(arg, Node):
        return arg.name
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_fmt(a) for a in arg) + "]"
    return repr(arg) if not isinstance(arg, float) else f"{arg:g}"


def _target(node: Node) -> str:
    if node.op == "call_module":
        return f"self.{node.target}"
    t = node.target
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__qualname__", str(t)).replace("<", "").replace(">", "")


def dump_graph(gm: GraphModule) -> Text:
    """One line per compute node: `name = op(args, key=value)  # shape`; nodes spot-compile inserted are marked `+`,
    the model's own nodes that now read an inserted one (rewired: the reduced stream, a size bias) `~`."""
    text = Text()
    for node in gm.graph.nodes:
        if node.op in ("get_attr",):
            continue
        val = node.meta.get("val")
        shape = f"  # {tuple(val.shape)}" if isinstance(val, torch.Tensor) else ""
        inserted = SPOT_TAG in node.meta
        rewired = not inserted and any(SPOT_TAG in n.meta for n in node.all_input_nodes)
        if node.op == "placeholder":
            line = f"  input {node.name}{shape}"
        elif node.op == "output":
            line = f"  return {_fmt(node.args[0])}"
        else:
            args = [_fmt(a) for a in node.args] + [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()]
            mark = "+" if inserted else "~" if rewired else " "
            line = f"{mark} {node.name} = {_target(node)}({', '.join(args)}){shape}"
            if inserted:
                line += f"   [{node.meta[SPOT_TAG]}]"
        text.append(line + "\n", style="bold green" if inserted else "yellow" if rewired else None)
    return text
