import pytest
import torch

import spot_compile as sc
from spot_compile import ops
from spot_compile.cli.visualize import kept_patches
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import capture
from spot_compile.graph.inputs import example_input
from spot_compile.scorers.coverage_prior import coverage_prior, farthest_point_rank
from spot_compile.scorers.spot import PredictorConfig, make_predictors
from spot_compile.serialization.predictors import PredictorCheckpoint, load_predictor_checkpoint, save_predictors

from .conftest import calibration_and_pruned_graphs, small_vit
from .reference import eager_pruned


def covering_radius(chosen: torch.Tensor, side: int) -> float:
    """The largest distance from any grid position to the nearest chosen one."""
    pts = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2).float()
    return float(torch.cdist(pts, pts[chosen]).amin(1).amax())


def test_the_prior_ranks_the_grid_farthest_point_first():
    rank = farthest_point_rank(64)
    assert sorted(rank.tolist()) == list(range(64))
    prior = coverage_prior(64)
    assert prior[8 * 4 + 4] == 1 and prior.min() == 0  # the centre first
    # Every prefix of the order covers the grid about as evenly as that many points can; the raster order does not.
    radii = [covering_radius(prior.topk(k).indices, 8) for k in (4, 16, 32)]
    assert radii == sorted(radii, reverse=True) and radii[1] <= 2.0
    assert covering_radius(torch.arange(16), 8) > 5  # the first two rows
    # A token count that is not a square is read as a line: its ends come right after its middle.
    assert set(farthest_point_rank(10)[[0, 9]].tolist()) == {1, 2} and farthest_point_rank(10)[5] == 0


@pytest.mark.parametrize("overrides", [dict(), dict(pool="avg", num_registers=2)], ids=["cls", "avgpool-registers"])
def test_a_dominant_prior_keeps_the_farthest_point_prefix_at_every_stage(overrides):
    # The prior outweighs the (untrained) logits by far, so each stage must keep the order's first k positions; that
    # holds only if every stage reads the true grid positions of its surviving tokens, carried through earlier prunes.
    model = small_vit(**overrides)
    structure = find_blocks(capture(model, example_input(model, None)))
    stages, keep = (1, 2, 3), (40, 25, 12)
    predictors = make_predictors(structure, stages, PredictorConfig(hidden=16, coverage=1e4))
    sparse = sc.sparsify(model, sc.SparsifyConfig(keep=keep, stages=stages, policy=sc.GivenScorersConfig(predictors)))
    graph = sparse.graph_module.graph
    # Positions are emitted once and each stage's carry continues the previous one: one gather per prune in between.
    assert sum(n.target is ops.token_positions for n in graph.nodes) == 1
    carried = [n for n in graph.nodes if n.target is ops.prune_tokens and n.meta["val"].shape[-1] == 1]
    assert len(carried) == len(stages) - 1
    scorer_calls = [n for n in graph.nodes if n.op == "call_module" and n.target.startswith("given_scorer_")]
    assert len(scorer_calls) == 3 and all(n.kwargs["positions"].meta["val"].shape[1] == n.args[0].meta["val"].shape[1]
                                          for n in scorer_calls)
    x = torch.randn(3, 1, 16, 16)
    prior = coverage_prior(64)
    for k, alive in zip(keep, kept_patches(sparse, x)):
        expected = torch.zeros(64, dtype=torch.bool)
        expected[prior.topk(k).indices] = True
        assert torch.equal(alive, expected.expand(3, -1))
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), eager_pruned(model, x, stages, keep, position_scores=prior), atol=1e-5, rtol=1e-4)


def test_calibration_graph_with_a_prior_equals_hard_pruning_and_the_checkpoint_keeps_it(tmp_path):
    model = small_vit()
    structure = find_blocks(capture(model, example_input(model, None)))
    stages, keep = (1, 3), (30, 12)
    predictors = make_predictors(structure, stages, PredictorConfig(hidden=16, coverage=1.0))
    for p in predictors.values():  # logits on the prior's scale, so both decide
        torch.nn.init.normal_(p.mix[3].weight, std=1.0)
    student, keepers, sparse = calibration_and_pruned_graphs(model, stages, keep, predictors)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(student(x), sparse(x), atol=1e-5, rtol=1e-4)
        without = sc.sparsify(model, sc.SparsifyConfig(keep=keep, stages=stages,
                                                  policy=sc.GivenScorersConfig(make_predictors(structure, stages, PredictorConfig(hidden=16)))))
        assert not torch.allclose(without(x), sparse(x))  # the prior changed the selection
    assert sum(n.target is ops.token_positions for n in student.graph.nodes) == 1
    out = tmp_path / "pred.pt"
    save_predictors(out, PredictorCheckpoint(predictors, stages, 0.6, PredictorConfig(hidden=16, coverage=1.0)), model, structure)
    loaded = load_predictor_checkpoint(out, model, structure)
    assert loaded.config.coverage == 1.0
    reloaded = sc.sparsify(model, sc.SparsifyConfig(keep=keep, stages=stages, policy=sc.GivenScorersConfig(loaded.predictors)))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), sparse(x))


def test_a_negative_coverage_weight_is_refused():
    with pytest.raises(ValueError, match="coverage must be a weight >= 0"):
        PredictorConfig(coverage=-1.0)
