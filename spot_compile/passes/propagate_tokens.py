"""Pass: after a node's token count changed, re-derive every downstream shape and rewrite baked-in sizes.

`torch.export` bakes the token count into shape arguments (`reshape(x, [s0, 197, 3, 3, 64])`, and, for
`nn.MultiheadAttention`, into symbolic products such as `[17*s0, 32]`). This pass walks the nodes after the change
in graph order, re-runs each op on fake tensors to get its new shape, and, for ops that take a target shape
(view/reshape/expand), maps the old input dims onto the old output dims group by group and rewrites only the
groups whose input sizes changed. A group that would split a changed token axis (tokens folded back into an image
grid) cannot be rewritten and is refused with the node named.
"""

from __future__ import annotations

import math

import torch
from torch._dispatch.python import enable_python_dispatcher  # noqa: PLC2701 (fake execution of one node, no public API)
from torch._guards import detect_fake_mode  # noqa: PLC2701
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from spot_compile.errors import StructureError

aten = torch.ops.aten
VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
EXPAND_OPS = {aten.expand.default}


def fake_mode_of(gm: GraphModule):
    mode = detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if "val" in n.meta])
    if mode is None:
        raise StructureError("the captured graph carries no shape metadata; capture it with spot_compile.graph.capture")
    return mode


def fake_execute(gm: GraphModule, node: Node, mode=None):
    """Runs one node on the fake values of its inputs and returns its fake output (shape metadata).

    Under the Python dispatcher, as torch.export runs: composite ops (matmul, linear, einsum) then use their
    symbolic-shape-aware decompositions. Without it, torch 2.11's C++ matmul reads concrete sizes, which pins the
    dynamic batch to the example's 2 for the whole graph (measured: every reshape after the first prune read
    `[2, ...]` and batch 1 failed).
    """
    mode = mode or fake_mode_of(gm)
    args, kwargs = map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    with mode, enable_python_dispatcher():
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
            fake_state = {k: mode.from_tensor(v, static_shapes=True) for k, v in state.items()}
            return torch.func.functional_call(module, fake_state, args, kwargs)
        return node.target(*args, **kwargs)


def _hint(v) -> int:
    if isinstance(v, int):
        return v
    hint = v.node.hint
    return int(hint) if hint is not None else int(v.node.shape_env.size_hint(v.node.expr))


def _same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, int) or isinstance(b, int):
        return False
    return str(a.node.expr) == str(b.node.expr)


def view_groups(src: list[int], dst: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pairs of (source dims, target dims) whose sizes multiply to the same number, finest first."""
    groups, i, j = [], 0, 0
    while i < len(src) and j < len(dst):
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= src[i]
                gi.append(i)
                i += 1
            else:
                pj *= dst[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    if groups:  # trailing size-1 dims join the last group
        groups[-1][0].extend(range(i, len(src)))
        groups[-1][1].extend(range(j, len(dst)))
    else:
        groups.append((list(range(len(src))), list(range(len(dst)))))
    return groups


class TokenPropagation:
    """Re-derives shapes of all nodes after `start` in graph order; `counts` maps old token counts to new ones."""

    def __init__(self, gm: GraphModule, start: Node, counts: dict[int, int], stage_name: str) -> None:
        self.gm, self.start, self.counts, self.stage = gm, start, dict(counts), stage_name
        self.mode = fake_mode_of(gm)
        self.old: dict[Node, object] = {}

    def run(self) -> None:
        started = False
        for node in list(self.gm.graph.nodes):
            if node is self.start:
                started = True
                continue
            if not started or node.op not in ("call_function", "call_module"):
                continue
            self.old[node] = node.meta.get("val")
            if node.op == "call_function" and node.target in VIEW_OPS:
                self._rewrite_view(node)
            elif node.op == "call_function" and node.target in EXPAND_OPS:
                self._rewrite_expand(node)
            node.meta["val"] = self._execute(node)
            self._learn_counts(node)
        self._check_batch_dynamic()

    def _check_batch_dynamic(self) -> None:
        """Refuses a propagation that pinned the dynamic batch to the example's size: the graph would then reject
        every other batch size (or, where a reshape only reorders, mix images) instead of failing here."""
        shape_env = self.mode.shape_env
        if shape_env is None:
            return
        for sym in shape_env.var_to_sources:  # the input sizes torch.export made dynamic: the batch
            pinned = shape_env.replacements.get(sym)
            if getattr(pinned, "is_number", False):
                raise StructureError(
                    f"pruning at {self.stage} pinned the dynamic batch size to {pinned} while re-deriving shapes "
                    f"(torch {torch.__version__}); this is a spot-compile bug: please report it"
                )

    # -- shape-argument rewrites ------------------------------------------------------------------------------
    def _rewrite_view(self, node: Node) -> None:
        src_node, target = node.args[0], node.args[1]
        old_in, new_in = self._old_val(src_node).shape, src_node.meta["val"].shape
        if all(_same(a, b) for a, b in zip(old_in, new_in)):
            return
        old_out = self.old[node].shape
        new_target, free_used = list(target), False
        for gi, gj in view_groups([_hint(d) for d in old_in], [_hint(d) for d in old_out]):
            if all(_same(old_in[d], new_in[d]) for d in gi):
                continue
            new_sizes = [new_in[d] for d in gi]
            if len(gj) == 1:
                if all(isinstance(s, int) for s in new_sizes):
                    new_target[gj[0]] = math.prod(new_sizes)
                elif not free_used:
                    new_target[gj[0]], free_used = -1, True
                else:
                    self._refuse(node, "two token-dependent symbolic sizes in one reshape")
                continue
            # The group splits: only a token count that reappears as-is may be replaced (e.g. [17*B] -> [17, B]).
            replaced = [self.counts.get(t, t) if isinstance(t, int) else t for t in (target[j] for j in gj)]
            want = math.prod(_hint(s) for s in new_sizes)
            got = math.prod(_hint(s) if not isinstance(s, Node) else _hint(s.meta["val"]) for s in replaced)
            if got != want or replaced == [target[j] for j in gj]:
                self._refuse(node, "it splits the token axis (tokens reshaped into a grid?)")
            for j, v in zip(gj, replaced):
                new_target[j] = v
        node.args = (src_node, new_target, *node.args[2:])

    def _rewrite_expand(self, node: Node) -> None:
        src_node, target = node.args[0], list(node.args[1])
        old_in, new_in = self._old_val(src_node).shape, src_node.meta["val"].shape
        offset = len(target) - len(new_in)
        for d, (a, b) in enumerate(zip(old_in, new_in)):
            if not _same(a, b) and isinstance(target[d + offset], int) and target[d + offset] != -1:
                target[d + offset] = b if isinstance(b, int) else -1
        node.args = (src_node, target, *node.args[2:])

    # -- execution on fake tensors ----------------------------------------------------------------------------
    def _execute(self, node: Node):
        try:
            return fake_execute(self.gm, node, self.mode)
        except StructureError:
            raise
        except Exception as e:
            self._refuse(node, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    def _learn_counts(self, node: Node) -> None:
        old, new = self.old.get(node), node.meta.get("val")
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and old.dim() == new.dim():
            for a, b in zip(old.shape, new.shape):
                if isinstance(a, int) and isinstance(b, int) and a != b:
                    self.counts.setdefault(a, b)

    def _old_val(self, node: Node):
        return self.old.get(node, node.meta.get("val"))

    def _refuse(self, node: Node, why: str):
        raise StructureError(
            f"cannot prune tokens at {self.stage}: downstream op `{node.format_node()}` does not accept fewer tokens "
            f"({why}); choose other stages with --stages, or the model is not a plain ViT"
        )
