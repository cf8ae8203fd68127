"""Capture a model as an ATen-level torch.fx graph with `torch.export` (batch dimension dynamic), and copy graphs
without copying weights.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re

import torch
from torch.export import Dim, export
from torch.fx import Graph, GraphModule

from spot_compile.errors import CaptureError, InputSizeError, first_line
from spot_compile.passes.pipeline import run_passes
from spot_compile.passes.trivial_masks import RemoveTrivialMasks

_USER_LINE = re.compile(r"File: (\S+:\d+) in \w+, code: (.*)")


def capture(model: torch.nn.Module, example: torch.Tensor) -> GraphModule:
    """Exports `model` in eval mode; the returned GraphModule shares the model's parameters (no copies).

    Attention masks that mask nothing are removed (passes/trivial_masks.py): they would pin the token count.
    """
    was_training = model.training
    model.eval()
    try:
        try:
            with torch.no_grad():
                model(example)
        except Exception as e:  # the model's own forward rejected the input: a size/channel mistake, not tracing
            raise InputSizeError(
                f"the model rejects a {tuple(example.shape)} input ({first_line(e)}); pass the right size with --input-size "
                "(for other than 3 input channels, give the model an `in_chans` attribute)"
            ) from e
        chatter = io.StringIO()
        try:
            with _quiet_torch_logs(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                program = export(model, (example,), dynamic_shapes=({0: Dim.AUTO},), strict=False)
        except Exception as e:
            where = _USER_LINE.findall(chatter.getvalue() + str(e))
            at = f" at {where[-1][0]} (`{where[-1][1].strip()}`)" if where else ""
            raise CaptureError(
                f"torch.export cannot capture the model{at}: {first_line(e)}; make the forward traceable "
                "(no data-dependent Python control flow, no untraceable ops) - see docs/errors.md"
            ) from e
    finally:
        model.train(was_training)
    # A plain GraphModule over the exported graph: the ExportedProgram's module refuses .train() and .eval(), which
    # users call on what sparsify returns (also at budget 1.0, where the captured graph is returned as it is).
    return clone_graph_module(run_passes(program.module(), [RemoveTrivialMasks(example)]).graph_module)


def clone_graph_module(gm: GraphModule) -> GraphModule:
    """A new GraphModule over a copy of the graph (node meta kept), sharing gm's parameters and submodules."""
    graph = Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new = GraphModule(gm, graph)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    return new


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs warnings of its own when tracing fails; the user gets our one-line error instead."""
    loggers = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
