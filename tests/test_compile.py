import torch
from torch._dynamo.testing import CompileCounterWithBackend

import spot_compile as sc

from .conftest import small_vit


def test_fullgraph_compile_no_recompiles_and_same_outputs():
    torch._dynamo.reset()
    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(sparse.graph_module, fullgraph=True, backend=counter)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        first = compiled(x)
        for _ in range(3):
            again = compiled(torch.randn(4, 1, 16, 16))
        torch.testing.assert_close(first, sparse(x), atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 1  # fullgraph=True would have raised on a graph break
    assert again.shape == (4, 10)
