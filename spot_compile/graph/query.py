"""Graph queries on an exported fx graph, in networkx: tensor data flow and ancestry."""

from __future__ import annotations

import networkx as nx
import torch
from torch.fx import Graph, Node

aten = torch.ops.aten

SDPA_OPS = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.einsum.default}
ADD_OPS = {aten.add.Tensor, aten.add_.Tensor}
CAT_OPS = {aten.cat.default, aten.concat.default}


def is_tensor_node(node: Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return any(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor)


def shape(node: Node) -> tuple:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


class DataFlow:
    """The graph's tensor data flow as a networkx DiGraph.

    Shape-only values (sym_size and the integer arithmetic on it) carry no token data, so they are left out: they
    would otherwise make the input image look like it bypasses every block.
    """

    SOURCE = "__input__"

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        g = nx.DiGraph()
        for node in graph.nodes:
            if node.op == "output":
                g.add_node(node)
            elif not is_tensor_node(node):
                continue
            g.add_node(node)
            for src in node.all_input_nodes:
                if src in g:
                    g.add_edge(src, node)
        self.inputs = [n for n in graph.nodes if n.op == "placeholder" and is_tensor_node(n)]
        for p in self.inputs:
            g.add_edge(self.SOURCE, p)
        self.g = g

    def ancestors(self, node: Node) -> set[Node]:
        return nx.ancestors(self.g, node) - {self.SOURCE}

    def descendants(self, node: Node) -> set[Node]:
        return nx.descendants(self.g, node)

    def depends_on_input(self, node: Node) -> bool:
        return any(p in self.ancestors(node) or p is node for p in self.inputs)
