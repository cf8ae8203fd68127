"""Pass: find the transformer blocks of an exported ViT by graph structure alone.

Matches, in the ATen graph:
  * attention cores: `scaled_dot_product_attention` (any fused variant), or `softmax` fed by a matmul and feeding
    a matmul (the explicit form);
  * the attention residual add: the first `add` after the core whose other operand feeds the core (that operand
    is the block's input stream, pre- or post-norm alike);
  * the MLP residual add: the next `add` that re-joins the stream;
  * special tokens (class, distillation, register tokens): the leading inputs of the `cat` along the token axis
    that builds the first block's input from tensors that do not depend on the image.
Emits nothing into the graph; returns a `ModelStructure`. No module names or library classes are consulted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from spot_compile.errors import StructureError
from spot_compile.graph.query import ADD_OPS, CAT_OPS, MATMUL_OPS, SDPA_OPS, SOFTMAX_OPS, DataFlow, shape

# Element-wise ops allowed between a softmax and the matmuls around it (scaling, masking, casts, dropout).
_PASSTHROUGH = {
    torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.dropout.default,
    torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.type_as.default,
    torch.ops.aten.contiguous.default, torch.ops.aten.clone.default, torch.ops.aten.alias.default,
}


@dataclass
class Block:
    """One transformer block as found in the graph."""

    index: int
    attention: Node  # the SDPA node, or the softmax node of an explicit attention
    kind: str  # "sdpa" | "explicit"
    input: Node  # residual stream entering the block, (B, N, D)
    attn_residual: Node
    mlp_residual: Node | None
    tokens: int
    dim: int
    heads: int
    probs: Node | None = None  # attention probabilities, once a pass has materialised them
    taps: dict[str, Node] = field(default_factory=dict)  # attention taps already emitted on this block, by kind

    @property
    def output(self) -> Node:
        """The residual stream leaving the block (after its MLP, or its attention where it has no MLP)."""
        return self.mlp_residual or self.attn_residual

    @property
    def query(self) -> Node | None:
        return self.attention.args[0] if self.kind == "sdpa" else None

    @property
    def key(self) -> Node | None:
        return self.attention.args[1] if self.kind == "sdpa" else None

    @property
    def scale(self) -> float | None:
        return self.attention.kwargs.get("scale") if self.kind == "sdpa" else None

    def describe(self) -> dict:
        return {
            "block": self.index, "attention": f"{self.kind} ({self.attention.name})", "input": self.input.name,
            "attn_residual": self.attn_residual.name,
            "mlp_residual": self.mlp_residual.name if self.mlp_residual is not None else "-",
            "tokens": self.tokens, "dim": self.dim, "heads": self.heads,
        }


@dataclass
class ModelStructure:
    blocks: list[Block]
    num_special: int  # class/distillation/register tokens, always a prefix of the token axis
    special_sources: list[str] = field(default_factory=list)
    class_token: int | None = None  # index of the special token the output is read from, if any

    @property
    def tokens(self) -> int:
        return self.blocks[0].tokens

    @property
    def has_class_token(self) -> bool:
        return self.class_token is not None

    def check_stage(self, block: int, error: type[Exception] = StructureError, first: int = 1) -> None:
        """Refuses a stage at `block` unless the model has that block and, with `first` 1 (a reduction in front of
        the block), one before it: the first block's input is the embedding, with nothing to score yet. A policy
        that reduces inside a block, after its attention, allows block 0 (`first` 0)."""
        depth = len(self.blocks)
        if not (isinstance(block, int) and first <= block < depth):
            raise error(f"stage {block} is out of range: the model has {depth} blocks, so stages must be in {first}..{depth - 1}")


def find_blocks(gm: GraphModule) -> ModelStructure:
    flow = DataFlow(gm.graph)
    cores = [n for n in gm.graph.nodes if n.op == "call_function" and (n.target in SDPA_OPS or _is_explicit_softmax(n))]
    if not cores:
        raise StructureError(
            "no attention found in the model graph (no scaled_dot_product_attention and no matmul->softmax->matmul); "
            "spot-compile prunes Vision Transformers, not CNNs or MLPs"
        )
    blocks = []
    for core in cores:
        blocks.append(_block_around(core, flow, len(blocks)))
    _check_blocks(blocks, flow)
    num_special, sources = _special_tokens(blocks[0], flow)
    return ModelStructure(blocks, num_special, sources, _class_token(blocks[-1], num_special, flow))


def _is_explicit_softmax(node: Node) -> bool:
    if node.target not in SOFTMAX_OPS:
        return False
    return _reaches(node, MATMUL_OPS, upstream=True) and _reaches(node, MATMUL_OPS, upstream=False)


def _reaches(node: Node, targets: set, upstream: bool, hops: int = 4) -> bool:
    return _nearest(node, targets, upstream, hops) is not None


def _block_around(core: Node, flow: DataFlow, index: int) -> Block:
    up = flow.ancestors(core)
    down = flow.descendants(core)
    after = sorted(down, key=flow.order.get)
    attn_res, stream = next(((add, x) for add, x in _residual_adds(after, up, down) if len(shape(x)) == 3), (None, None))
    if attn_res is None:
        grid = next((x for _, x in _residual_adds(after, up, down) if len(shape(x)) >= 4), None)  # (batch, H, W, dim), Swin
        if grid is not None:
            raise StructureError(
                f"attention `{core.name}` sits in a residual stream of shape {_dims(shape(grid))}, a grid of tokens, not "
                "(batch, tokens, dim): windowed (Swin-style) or hierarchical attention cannot drop tokens without "
                "re-partitioning windows and is not supported; spot-compile prunes plain ViTs"
            )
        raise StructureError(
            f"attention `{core.name}` has no residual connection around it; spot-compile needs ViT blocks of the form "
            "x + attention(x) on a (batch, tokens, dim) stream"
        )
    # MLP residual: the next add that joins a stream value with something computed from it.
    res_down = flow.descendants(attn_res) | {attn_res}
    mlp_res = None
    for node in sorted(flow.descendants(attn_res), key=flow.order.get):
        if node.op == "call_function" and node.target in ADD_OPS and len(node.args) >= 2:
            a, b = node.args[0], node.args[1]
            if all(isinstance(v, Node) and v in res_down for v in (a, b)) and shape(node) == shape(attn_res):
                if a in flow.ancestors(b) or b in flow.ancestors(a):
                    mlp_res = node
                    break
        if node.op == "call_function" and (node.target in SDPA_OPS or _is_explicit_softmax(node)):
            break
    s = shape(stream)
    heads = _heads(core)
    return Block(index, core, "sdpa" if core.target in SDPA_OPS else "explicit", stream, attn_res, mlp_res,
                 tokens=int(s[1]), dim=int(s[2]), heads=heads)


def _residual_adds(after: list[Node], up: set, down: set):
    """(add, stream) for each add, in graph order, that joins a value upstream of the attention (`stream`) with one
    downstream of it: the candidates for the attention's residual connection, whatever the stream's rank."""
    for node in after:
        if node.op == "call_function" and node.target in ADD_OPS and len(node.args) >= 2:
            a, b = node.args[0], node.args[1]
            for x, branch in ((a, b), (b, a)):
                if isinstance(x, Node) and isinstance(branch, Node) and x in up and branch in down:
                    yield node, x
                    break


def _dims(s) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "B" for d in s) + ")"


def _heads(core: Node) -> int:
    q = shape(core.args[0]) if core.target in SDPA_OPS else shape(core)
    return int(q[-3]) if len(q) >= 4 and isinstance(q[-3], int) else 1


def _check_blocks(blocks: list[Block], flow: DataFlow) -> None:
    for b in blocks:
        s = shape(b.input)
        if len(s) != 3 or not isinstance(s[1], int):
            raise StructureError(f"block {b.index}: the residual stream `{b.input.name}` has shape {s}, not (batch, tokens, dim)")
        operands = _attention_operands(b)
        strangers = [o for o in operands if o is not b.input and b.input not in flow.ancestors(o)]
        if strangers:
            raise StructureError(
                f"block {b.index}: attention `{b.attention.name}` reads keys/values (`{strangers[0].name}`) that do not "
                "come from its own token stream: cross-attention, as in an encoder-decoder; spot-compile prunes the "
                "self-attention blocks of encoder-only ViTs - sparsify the encoder on its own"
            )
        core_q = shape(b.attention.args[0]) if b.kind == "sdpa" else shape(b.attention)
        if len(core_q) >= 2 and isinstance(core_q[-2], int) and core_q[-2] != s[1]:
            raise StructureError(
                f"block {b.index}: attention runs over {core_q[-2]} tokens but the stream holds {s[1]}; windowed "
                "(Swin-style) attention cannot drop tokens without re-partitioning windows and is not supported"
            )


def _attention_operands(block: Block) -> list[Node]:
    """q, k, v of an SDPA; for an explicit softmax, the operands of the score matmul and the value matmul."""
    core = block.attention
    if block.kind == "sdpa":
        return [a for a in core.args[:3] if isinstance(a, Node)]
    operands = []
    for start, upstream in ((core, True), (core, False)):
        matmul = _nearest(start, MATMUL_OPS, upstream)
        if matmul is not None:
            operands += [a for a in matmul.all_input_nodes if a is not start and not _passes_to(a, core)]
    return operands


def query_key(block: Block) -> tuple[Node, Node, bool] | None:
    """The nodes the block's attention logits are made from: (q, k, k_is_transposed). For an SDPA its q and k; for an
    explicit softmax the operands of the score matmul (`q @ k.transpose(-2, -1)`: the key is then (..., d, N));
    None where the scores come from an einsum."""
    if block.kind == "sdpa":
        return block.attention.args[0], block.attention.args[1], False
    matmul = _nearest(block.attention, MATMUL_OPS, upstream=True)
    if matmul is None or matmul.target not in (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default):
        return None
    return matmul.args[0], matmul.args[1], True


def _nearest(node: Node, targets: set, upstream: bool, hops: int = 4) -> Node | None:
    """The first node with a target in `targets` within `hops` steps, walking only through element-wise ops."""
    frontier = [node]
    for _ in range(hops):
        nxt = []
        for n in frontier:
            for m in (n.all_input_nodes if upstream else n.users):
                if m.op == "call_function" and m.target in targets:
                    return m
                if m.op == "call_function" and m.target in _PASSTHROUGH:
                    nxt.append(m)
        frontier = nxt
    return None


def _passes_to(node: Node, core: Node, hops: int = 4) -> bool:
    """`node` is the softmax itself or an element-wise successor of it (the probabilities entering the value matmul)."""
    frontier = [core]
    for _ in range(hops):
        if node in frontier:
            return True
        frontier = [u for n in frontier for u in n.users if u.op == "call_function" and u.target in _PASSTHROUGH]
    return node in frontier


def _special_tokens(first: Block, flow: DataFlow) -> tuple[int, list[str]]:
    """Counts the leading tokens that do not come from the image (class, distillation, register tokens)."""
    up = flow.ancestors(first.input) | {first.input}
    cats = [n for n in up if n.op == "call_function" and n.target in CAT_OPS and _cat_dim(n) == 1
            and len(shape(n)) == 3 and shape(n)[1] == first.tokens]
    if not cats:
        return 0, []
    cat = max(cats, key=flow.order.get)
    count, sources = 0, []
    for part in cat.args[0]:
        if flow.depends_on_input(part):
            break
        count += int(shape(part)[1])
        sources.append(part.name)
    rest = cat.args[0][len(sources):]
    if any(not flow.depends_on_input(p) for p in rest):
        raise StructureError(
            f"special tokens are not all in front of the patch tokens (`{cat.name}`); spot-compile keeps special "
            "tokens as a prefix of the sequence and cannot prune this layout"
        )
    return count, sources


def _class_token(last: Block, num_special: int, flow: DataFlow) -> int | None:
    """The special token whose final state the output reads (`select(stream, 1, i)`): the class token.

    Register tokens are special too, but nothing reads them at the end; models that pool patch tokens have none.
    """
    anchor = last.output
    for node in sorted(flow.descendants(anchor), key=flow.order.get):
        if node.op == "call_function" and node.target == torch.ops.aten.select.int and len(shape(node.args[0])) == 3:
            dim, index = node.args[1], node.args[2]
            if dim in (1, -2) and 0 <= index < num_special:
                return int(index)
    return None


def _cat_dim(node: Node) -> int:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(shape(node))
    return dim + rank if dim < 0 else dim
