"""Reading a model as a graph, without changing it: `capture` exports it with `torch.export` to an ATen-level
GraphModule, `inputs` makes the example input it is captured on, `blocks` finds its attention blocks by graph
structure (`ModelStructure`), `query` holds the op sets and data-flow queries the finder and the passes share.
Analysis only: the one rewrite made here is capture's removal of masks that mask nothing (`passes.trivial_masks`).
May import `errors`, `passes.pipeline` and `passes.trivial_masks`; everything else may import it.
"""
