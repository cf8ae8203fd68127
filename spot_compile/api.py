"""The public verb: `sparsify(model, SparsifyConfig(...)) -> SparseViT`."""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule

from spot_compile.config import SparsifyConfig
from spot_compile.errors import BudgetError, InputSizeError, StructureError, UsageError, first_line
from spot_compile.graph.blocks import ModelStructure, find_blocks
from spot_compile.graph.capture import capture, clone_graph_module
from spot_compile.graph.inputs import device_of, dtype_of, example_input, noise_images
from spot_compile.measure.flops import count_flops
from spot_compile.measure.timing import median_pair
from spot_compile.planning.budget import schedule_cost, solve_keep
from spot_compile.planning.build import build_sparse
from spot_compile.planning.plan import SparsityPlan, Stage
from spot_compile.policies import TokenPolicy, policy_class
from spot_compile.policy_configs import GivenScorersConfig

logger = logging.getLogger("spot_compile")
SCORER_NAME = re.compile(r"\w+_scorer_(\d+)")  # a scorer submodule: `<policy>_scorer_<block>`


class SparseViT(nn.Module):
    """The rewritten model: a GraphModule that prunes tokens, plus the plan that produced it.

    It shares its weights with the model it was made from. `compiled()` returns it under `torch.compile` (or the eager
    graph where that is faster); `nn.Module.compile()` keeps its own meaning (compiles `forward` in place).
    """

    def __init__(self, graph_module: GraphModule, plan: SparsityPlan, structure: ModelStructure, config: SparsifyConfig) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.plan = plan
        self.config = config
        self.structure = structure
        self.compile_choice: dict | None = None  # set by compiled(verify=True)
        self.pretrained_cfg: dict | None = None  # the source model's declared preprocessing (timm's convention)
        self.predictor_record: dict | None = None  # the predictor file's contents, when loaded from a saved model

    def forward(self, x: torch.Tensor):
        shape = self.plan.input_shape
        if not isinstance(x, torch.Tensor):
            raise InputSizeError(f"expects an image batch tensor of shape (N, {', '.join(map(str, shape[1:]))}), got a {type(x).__name__}")
        if x.dim() == len(shape) and x.shape[0] == 0:
            raise InputSizeError("the batch is empty (0 images); pass at least one image")
        if x.dim() != len(shape) or tuple(x.shape[1:]) != shape[1:]:
            unbatched = x.dim() == len(shape) - 1 and tuple(x.shape) == shape[1:]
            raise InputSizeError(
                f"input of shape {tuple(x.shape)} does not match the (N, {', '.join(map(str, shape[1:]))}) batch this "
                "model was sparsified for; " + ("add the batch dimension: x.unsqueeze(0)" if unbatched else
                                                 "resize the input or sparsify again with that input size")
            )
        dtype = dtype_of(self.graph_module)
        if x.dtype != dtype:
            raise InputSizeError(f"input of dtype {x.dtype} does not match the model's weights ({dtype}); cast the input "
                                 f"with x.to({dtype}), or the model and sparsify again")
        return self.graph_module(x)

    def compiled(self, *, freezing: bool = False, verify: bool = True, batch: int = 8, **options) -> Callable:
        """`torch.compile(fullgraph=True)` of the graph, with the options chosen by measurement (docs/performance.md),
        returned as a new callable (this module is left as it is).

        The graph is compiled before this returns, on a random batch of `batch` images. `freezing` turns on Inductor's
        weight freezing for that compile (inference only: later changes to the weights are not seen; a recompile for
        another batch size is not frozen). It is off by default, by measurement (docs/performance.md: no speed gain on
        DeiT-S at batch 1/8/64). With `verify`, the compiled graph is then timed against the eager one on
        that batch (median of 5 after 2 warm-up, interleaved) and the faster is returned, so the result is never slower
        than eager; the timings and the choice are kept in `self.compile_choice`, and a warning is logged when eager
        wins. Also with `verify`, a compile that fails inside torch returns the eager graph with a warning (the error
        is kept in `self.compile_choice`); without it, the failure is raised. Batch size may vary (dynamic after the
        first change).
        """
        # A clone: Inductor may rewrite the GraphModule it is given in place (pytorch#138980), and this one is reused.
        compiled = torch.compile(clone_graph_module(self.graph_module), fullgraph=True, **options)
        x = self.example(batch)
        # Compiled now, on a batch of `batch`: Inductor reads `freezing` when it compiles, not when torch.compile is
        # called (passing it in torch.compile's `options` was measured not to freeze), and freezing needs no_grad.
        try:
            with torch._inductor.config.patch(freezing=freezing), torch.no_grad():
                compiled(x)
        except Exception as e:
            if not verify:  # the caller asked for the compiled graph itself (benchmarks): no silent substitute
                raise
            # An Inductor failure is torch's, not the user's: the eager graph still computes the same thing.
            # (Seen on torch 2.11 + CUDA with the shipped SPOT graph, "InductorError: ... is not comparable", since
            # avoided in ops.token_positions.)
            self.compile_choice = {"chosen": "eager", "error": first_line(e), "batch": batch}
            logger.warning("torch.compile failed for this graph (%s); returning the eager graph",
                           self.compile_choice["error"])
            return self.graph_module
        if not verify:
            return compiled
        with torch.no_grad():
            eager_ms, compiled_ms = median_pair((self.graph_module, compiled), x, warmup=2, repeats=5)
        chosen = "compiled" if compiled_ms <= eager_ms else "eager"
        self.compile_choice = {"eager_ms": eager_ms, "compiled_ms": compiled_ms, "batch": batch, "chosen": chosen}
        if chosen == "eager":
            logger.warning("torch.compile is slower than eager for this model (%.1f ms vs %.1f ms at batch %d); "
                           "returning the eager graph", compiled_ms, eager_ms, batch)
            return self.graph_module
        logger.info("compiled graph chosen: %.1f ms against eager's %.1f ms at batch %d", compiled_ms, eager_ms, batch)
        return compiled

    def aot_compile(self, batch: int = 8, *, dynamic_batch: bool = False, package_path: str | None = None) -> Callable:
        """The graph compiled ahead of time by AOTInductor: a runner that calls one shared library, with no Python
        between kernels and no dynamo guards, the fastest path measured for small batches (docs/performance.md).

        Exported on a batch of `batch` images (the only batch size it accepts unless `dynamic_batch`). The weights
        are copied into the library: later changes to the model are not seen (compile again). Needs a C++ compiler
        (about 20-45 s for the shipped model on 2 cores). `package_path` keeps the `.pt2` package (load it again with
        `torch._inductor.aoti_load_package`, no spot-compile needed); by default it is written to a temporary file.
        """
        import os
        import tempfile

        example = self.example(batch)
        dynamic = ({0: torch.export.Dim.AUTO},) if dynamic_batch else None
        with torch.no_grad():
            program = torch.export.export(clone_graph_module(self.graph_module), (example,), dynamic_shapes=dynamic)
        temporary = package_path is None
        if temporary:
            fd, package_path = tempfile.mkstemp(suffix=".pt2", prefix="spot_compile_aot_")
            os.close(fd)
        try:
            return torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(program, package_path=package_path))
        finally:
            if temporary:  # loading unpacked the shared library elsewhere, so the package itself can go
                os.unlink(package_path)

    def export(self, batch: int = 2) -> torch.export.ExportedProgram:
        """`torch.export` of the sparse graph with a dynamic batch size: save it with `torch.export.save`, or
        compile it ahead of time with AOTInductor (docs/serving.md)."""
        example = self.example(batch)
        return torch.export.export(self.graph_module, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))

    def to_onnx(self, path: str | Path, *, batch: int = 2, tolerance: float = 1e-4):
        """Writes the sparse model as ONNX (dynamic batch axis, the plan's static token counts) after running it in
        ONNX Runtime on batches `batch` and `batch + 1` against this model: a difference above `tolerance`
        (relative to the outputs' scale) is an ExportError and nothing is written. Returns an `export.onnx.OnnxExport`
        with the differences. Needs `pip install 'spot-compile[onnx]'` (docs/serving.md)."""
        from spot_compile.export.onnx import to_onnx

        return to_onnx(self, path, batch=batch, tolerance=tolerance, compare=policy_class(self.config.policy).deterministic)

    def example(self, batch: int) -> torch.Tensor:
        """A random input batch of the shape, dtype and device this model takes."""
        return noise_images((batch, *self.plan.input_shape[1:]), device_of(self.graph_module), dtype_of(self.graph_module))

    @property
    def scorers(self) -> dict[str, nn.Module]:
        """The scorer submodules by name, `<policy>_scorer_<block>` (e.g. `class_attention_scorer_3`)."""
        return {n: m for n, m in self.graph_module.named_children() if SCORER_NAME.fullmatch(n)}


def sparsify(model: nn.Module, config: SparsifyConfig | None = None, *, scorers: dict[int, nn.Module] | None = None) -> SparseViT:
    """Captures `model` with torch.export, finds its attention blocks and prunes tokens to meet `config.budget`.

    The model's own parameters are used, not copied (except with predictors calibrated with a tuned backbone: then
    a copy of the model carries that backbone, and `model` is left as it was). Raises a `SpotError` subclass, with a message that says what
    to change, for any input it cannot handle. `scorers` (stage -> module) is the older spelling of
    `SparsifyConfig(policy=GivenScorersConfig(scorers))` (deprecated).
    """
    if not isinstance(model, nn.Module):
        hint = " (a model file is for the command line: spot-compile apply FILE)" if isinstance(model, (str, Path)) else ""
        raise UsageError(f"sparsify takes an nn.Module, got a {type(model).__name__}{hint}; build or load the model first")
    if config is not None and not isinstance(config, SparsifyConfig):
        hint = f": sparsify(model, SparsifyConfig(budget={config!r}))" if isinstance(config, (int, float)) else ""
        raise UsageError(f"sparsify's second argument is a SparsifyConfig, got a {type(config).__name__}{hint}")
    config = config or SparsifyConfig()
    if scorers is not None:
        warnings.warn("sparsify(model, config, scorers=S) is deprecated; pass SparsifyConfig(policy=GivenScorersConfig(S), ...)",
                      DeprecationWarning, stacklevel=2)
        config = dataclasses.replace(config, policy=GivenScorersConfig(scorers=scorers, fuse=config.fuse_pruned), predictors=None)
    model = policy_class(config.policy).prepare_model(config, model)
    example = example_input(model, config.input_size)
    captured = capture(model, example)
    structure = find_blocks(captured)
    depth = len(structure.blocks)
    policy: TokenPolicy = policy_class(config.policy)(config, model, structure)
    stages = config.stages or policy.fixed_stages or policy.default_stages(depth)
    for s in stages:
        structure.check_stage(s, BudgetError, policy.first_stage)
    one = example[:1]
    dense_flops = count_flops(captured, one)
    patch_tokens = structure.tokens - structure.num_special

    if config.keep is None and config.budget >= 1.0:
        plan = SparsityPlan(config.policy, config.budget, [], dense_flops, dense_flops, tuple(example.shape))
        return _declaring_preprocessing(SparseViT(captured, plan, structure, config), model)
    built: dict[tuple[int, ...], tuple[GraphModule, ModelStructure, int]] = {}

    def build(k) -> tuple[GraphModule, ModelStructure, int]:
        """The sparse graph for keep counts `k`, its structure and its FLOPs; built once per schedule, since a build
        costs seconds (shape propagation) and the budget search already builds the schedule it settles on."""
        if tuple(k) not in built:
            gm, sparse_structure = build_sparse(captured, stages, k, policy.stage_pass)
            check_outputs_survive(captured, gm)  # on the first build already, before the budget search goes on
            built[tuple(k)] = (gm, sparse_structure, count_flops(gm, one))
        return built[tuple(k)]

    if config.keep is not None:
        if len(config.keep) != len(stages):
            raise BudgetError(f"keep has {len(config.keep)} counts but there are {len(stages)} stages {stages}; give one per stage")
        keep = config.keep
    else:
        extra = policy.tokens_out(0) - structure.num_special  # a fused token
        estimate = schedule_cost(stages, depth, structure.blocks[0].dim, structure.num_special, bool(extra))
        keep = solve_keep(lambda k: build(k)[2], dense_flops, lambda rho: policy.schedule(patch_tokens, len(stages), rho),
                          config.budget, config.tolerance, estimate)
    gm, sparse_structure, sparse_flops = build(keep)
    plan_stages, tokens = [], structure.tokens
    for s, k in zip(stages, keep):
        out = policy.tokens_out(k)
        plan_stages.append(Stage(s, tokens, out, k))
        tokens = out
    plan = SparsityPlan(config.policy, config.budget, plan_stages, dense_flops, sparse_flops, tuple(example.shape))
    return _declaring_preprocessing(SparseViT(gm, plan, sparse_structure, config), model)


def _declaring_preprocessing(sparse: SparseViT, model: nn.Module) -> SparseViT:
    """`sparse` declaring the input statistics `model` declares, so that it is fed as the model is."""
    cfg = getattr(model, "pretrained_cfg", None)
    sparse.pretrained_cfg = dict(cfg) if isinstance(cfg, dict) else None
    return sparse


def check_outputs_survive(dense: GraphModule, sparse: GraphModule) -> None:
    """Raises StructureError when an output of the model would change shape under pruning (token features of a late
    block, say): an output is kept only when it is defined on what survives (class token, pooled features, logits),
    so no caller gets fewer tokens back than the model promised without a word."""
    dense_out, sparse_out = (_output_shapes(g) for g in (dense, sparse))
    names = _output_names(dense, len(dense_out))
    for name, before, after in zip(names, dense_out, sparse_out):
        if before is not None and before != after:
            raise StructureError(
                f"the model's output {name} has shape {_shape_text(before)} and would come out with fewer tokens after "
                "pruning (it holds per-token values of a pruned block); return only outputs computed from the "
                "class token or pooled features (e.g. logits), or place every stage after the block it comes from (--stages)"
            )


def _output_shapes(gm: GraphModule) -> list[tuple | None]:
    """Each flat output's shape with the (symbolic) batch size as None; None for an output that is no tensor."""
    shapes, outputs = [], next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    for arg in outputs if isinstance(outputs, (tuple, list)) else [outputs]:
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        shapes.append(tuple(d if isinstance(d, int) else None for d in val.shape) if isinstance(val, torch.Tensor) else None)
    return shapes


def _output_names(gm: GraphModule, count: int) -> list[str]:
    """How a user indexes each flat output: `['tokens']`, `[1]`, or "(the only output)" for a lone tensor."""
    from torch.utils import _pytree as pytree  # noqa: PLC2701 (torch.export's own output spec is a _pytree TreeSpec)

    spec = getattr(gm, "_out_spec", None)
    try:
        paths = [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(count)), spec))[0]]
    except Exception:  # no pytree spec (a hand-built graph): number the outputs
        paths = [f"[{i}]" for i in range(count)]
    return [p or "(the only output)" for p in paths]


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join("B" if d is None else str(d) for d in shape) + ")"
