"""Every supported model family (random init, built small): budget 1.0 equals dense; budget 0.6 meets the FLOPs
budget within 2 % and compiles as one full graph that matches eager."""

import pytest
import torch

import spot_compile as sc

from .model_families import FAMILIES, INPUT_SIZE, build, logits


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family(name):
    model = build(name)
    x = torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE)
    dense = sc.sparsify(model, sc.SparsifyConfig(budget=1.0, input_size=INPUT_SIZE))
    with torch.no_grad():
        torch.testing.assert_close(logits(dense(x)), logits(model(x)), atol=1e-5, rtol=1e-5)
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, input_size=INPUT_SIZE, stages=(1, 2, 3)))
    assert abs(sparse.plan.flops_ratio - 0.6) <= 0.012
    assert [s.tokens_out for s in sparse.plan.stages] == sorted((s.tokens_out for s in sparse.plan.stages), reverse=True)
    torch._dynamo.reset()
    compiled = sparse.compiled(verify=False, batch=len(x))
    with torch.no_grad():
        eager = logits(sparse(x))
        torch.testing.assert_close(logits(compiled(x)), eager, atol=1e-4, rtol=1e-4)
    assert eager.shape == (2, 10)
