"""Capture a model as an ATen-level torch.fx graph with `torch.export` (batch dimension dynamic)."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import logging
import re

import torch
from torch.export import Dim, export
from torch.fx import Graph, GraphModule

from .errors import CaptureError, InputSizeError, first_line
from .passes.pipeline import run_passes
from .passes.trivial_masks import RemoveTrivialMasks

_USER_LINE = re.compile(r"File: (\S+:\d+) in \w+, code: (.*)")


def device_of(module: torch.nn.Module) -> torch.device:
    """Where the module's weights live (CPU for a module without any): inputs are made there."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def dtype_of(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype of the module's weights (float32 for a module without any): inputs are made in it."""
    # Lazily: SparseViT.forward asks on every call, and the first parameter answers.
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def example_input(model: torch.nn.Module, input_size: int | tuple[int, int] | None, batch: int = 2) -> torch.Tensor:
    """A random image batch of the model's input size, on the model's device: `input_size` if given, else what the
    model declares.

    Reading `img_size` / `image_size` (timm, torchvision, HF configs, spot-compile's own ViT) is only a default;
    any model works when the user passes the size.
    """
    channels = _declared(model, ("in_chans", "num_channels", "in_channels")) or 3
    size = input_size or _declared(model, ("img_size", "image_size"))
    if size is None:
        raise InputSizeError("cannot tell the model's input size; pass it with --input-size N (SparsifyConfig.input_size)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return noise_images((batch, int(channels), int(h), int(w)), device_of(model), dtype_of(model))


def noise_images(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian images of `shape`, the same on every call, drawn from a private generator.

    An example input only fixes shapes, dtype and device. Drawing it from the global generator made sparsifying move
    the caller's random stream: a calibration that sparsified twice trained differently from one that sparsified once.
    """
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)


def _declared(model: torch.nn.Module, names: tuple[str, ...]):
    holders = [model, getattr(model, "config", None), getattr(model, "patch_embed", None)]
    holders += [getattr(m, "config", None) for m in model.children()]
    for holder in holders:
        for name in names:
            value = getattr(holder, name, None) if holder is not None else None
            if isinstance(value, int) or (isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value)):
                return value
    return None


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
