import pytest
import torch

import spot_compile as sc
from spot_compile import ops
from spot_compile.calibration.losses import token_loss
from spot_compile.calibration.trainer import calibrate
from spot_compile.data.imageset import ImageSet
from spot_compile.errors import CheckpointError
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import capture
from spot_compile.graph.inputs import example_input
from spot_compile.measure.flops import count_flops
from spot_compile.passes.emit import SPOT_TAG
from spot_compile.passes.soft_pruning import MASK_GRADIENTS, SoftKeep, build_calibration_graph, kept_positions, tap_final_tokens
from spot_compile.scorers.spot import PredictorConfig, SpotPredictor, make_predictors

from .conftest import calibration_and_pruned_graphs, small_vit


@pytest.mark.parametrize("mask_gradient", MASK_GRADIENTS)
@pytest.mark.parametrize("stages,keep", [((1, 2, 3), (40, 25, 12)), ((1, 3), (30, 12))], ids=["consecutive", "gap"])
@pytest.mark.parametrize("overrides", [dict(), dict(attention="explicit", qkv="separate"), dict(pool="avg", num_registers=2)],
                         ids=["sdpa", "explicit", "avgpool-registers"])
def test_binary_mask_calibration_graph_equals_hard_pruning(overrides, stages, keep, mask_gradient):
    model = small_vit(**overrides)
    structure = find_blocks(capture(model, example_input(model, None)))
    predictors = make_predictors(structure, stages, PredictorConfig(hidden=16))
    student, keepers, sparse = calibration_and_pruned_graphs(model, stages, keep, predictors, mask_gradient)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(student(x), sparse(x), atol=1e-5, rtol=1e-4)
    dim, special = structure.blocks[0].dim, structure.num_special
    masked = [n for n in student.graph.nodes if n.target in (ops.masked_attention, ops.masked_softmax)]
    gathers = [n for n in student.graph.nodes if n.target is ops.prune_tokens and n.meta["val"].shape[-1] == dim]
    decisions = [n for n in student.graph.nodes if n.op == "call_module" and n.target.startswith("spot_keep_")]
    assert len(decisions) == len(stages)
    # One top-k per stage (SoftKeep's), whose indices every gather by that stage's selection shares.
    assert not [n for n in student.graph.nodes if n.target is ops.kept_patch_indices]
    indices = [u for d in decisions for u in d.users if u.args[1] == 1]
    prunes = [n for n in student.graph.nodes if n.target is ops.prune_tokens]
    assert all(n.args[5] in indices for n in prunes)
    if mask_gradient == "full":
        # Every block from the first stage on attends under the live mask; the stream keeps all its tokens until
        # one gather after the last block, by the last stage's indices.
        assert len(masked) == len(structure.blocks) - stages[0]
        assert [g.meta["val"].shape[1] for g in gathers] == [special + keep[-1]] and len(indices) == 1
        assert [d.meta["val"][0].shape[1] for d in decisions] == [special + 64] * len(stages)
    else:
        # Each stage's block attends under the mask; then the kept tokens are gathered and later blocks run on them
        # alone (token gathers, not the descriptors that follow them).
        assert len(masked) == len(stages)
        assert [g.meta["val"].shape[1] for g in gathers] == [special + k for k in keep]
        assert len(indices) == len(stages) and len(prunes) > len(stages)
        assert [d.meta["val"][0].shape[1] for d in decisions] == [special + 64, *(special + k for k in keep[:-1])]
    assert student.spot_final_tokens.value.shape == (4, special + keep[-1], dim)  # the tap for token distillation
    # The mask gets gradient through the masked attention.
    student.train()
    scores = {}
    for s, p in predictors.items():
        p.register_forward_hook(lambda m, i, o, s=s: scores.__setitem__(s, o) or o.retain_grad())
    student(x).sum().backward()
    assert all(scores[s].grad is not None and scores[s].grad.abs().sum() > 0 for s in stages)


class _Scale(torch.nn.Module):
    """Multiplies each token by its own weight (1 at start): the weight's gradient is <token, dL/dtoken>."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(shape))

    def forward(self, tokens):
        return tokens * self.weight


def test_downstream_mask_gradient_adds_each_kept_tokens_scaling_gradient_and_leaves_the_output_alone():
    # One stage, no noise: "downstream" must equal "block" in the forward pass, and in the backward pass give each kept
    # token's score, on top of the block's gradient, sigmoid'(score) * <token, dL/dtoken> after the gather (every later
    # block's first-order cost of scaling it away); dropped tokens' scores keep exactly the block's gradient.
    model = small_vit()
    captured = capture(model, example_input(model, None))
    structure = find_blocks(captured)
    special, stages, keep = structure.num_special, (1,), (30,)
    predictors = make_predictors(structure, stages, PredictorConfig(hidden=16))
    torch.manual_seed(2)
    x, weights = torch.randn(4, 1, 16, 16), torch.randn(4, 10)
    out, score, grad = {}, {}, {}
    for mode in ("block", "downstream"):
        student, keepers = build_calibration_graph(captured, stages, keep, predictors, noise=0.0, mask_gradient=mode)
        gathers = [n for n in student.graph.nodes if n.meta.get(SPOT_TAG) == "calibration gather@1"]
        scaled = [n for n in student.graph.nodes if n.target is ops.scale_by_keep]
        assert len(gathers) == 1 and len(scaled) == (mode == "downstream")
        if mode == "block":  # the probe: dL/dtoken . token for every token right after the gather
            probe = _Scale((4, special + keep[0], 1))
            student.add_submodule("probe", probe)
            with student.graph.inserting_after(gathers[0]):
                node = student.graph.call_module("probe", (gathers[0],))
            gathers[0].replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
            student.recompile()
        student.train()
        hook = predictors[1].register_forward_hook(lambda m, i, o: score.__setitem__(mode, o) or o.retain_grad())
        out[mode] = student(x)
        hook.remove()
        (out[mode] * weights).sum().backward()
        grad[mode] = score[mode].grad
        kept = keepers[1].kept
    assert torch.equal(out["block"], out["downstream"])
    s = score["block"].detach()
    expected = grad["block"].clone()
    expected[:, special:].scatter_add_(1, kept, (torch.sigmoid(s) * (1 - torch.sigmoid(s)))[:, special:].gather(1, kept)
                                       * probe.weight.grad[:, special:, 0])
    torch.testing.assert_close(grad["downstream"], expected, atol=1e-6, rtol=1e-4)
    assert (grad["downstream"] - grad["block"]).abs().amax() > 1e-5  # well above the tolerance: the check can fail


def test_full_mask_gradient_weighs_each_token_as_a_key_in_every_later_block():
    # "full" keeps dropped tokens in the stream and weighs each token as a key by its mask entry in every block from
    # the stage on. So with the mask forced to all ones, the graph is the dense model (class-token head), which "block",
    # whose gather removes the dropped tokens, is not; and a dropped token's mask gradient, the first-order value of
    # giving it back to every later block, differs from "block"'s one-block estimate.
    model = small_vit().double()
    captured = capture(model, example_input(model, None).double())
    structure = find_blocks(captured)
    special, stages, keep = structure.num_special, (1,), (30,)
    predictors = make_predictors(structure, stages, PredictorConfig(hidden=16))
    torch.manual_seed(2)
    x, weights = torch.randn(4, 1, 16, 16, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    grads, outputs = {}, {}
    for mode in ("block", "full"):
        student, keepers = build_calibration_graph(captured, stages, keep, predictors.copy(), noise=0.0,
                                                   mask_gradient=mode)
        student.double().train()
        delta = torch.zeros(4, 65, dtype=torch.float64, requires_grad=True)
        ones = {"on": False}

        def shift(module, inputs, out):
            mask = torch.ones_like(out[0]) if ones["on"] else out[0]
            return mask + delta, out[1]

        keepers[1].register_forward_hook(shift)
        (student(x) * weights).sum().backward()
        dropped = torch.ones(4, 64, dtype=torch.bool).scatter(1, keepers[1].kept, False)
        grads[mode] = delta.grad[:, special:][dropped]
        with torch.no_grad():
            ones["on"] = True
            outputs[mode] = student(x)
        if mode == "full":  # the gradient is the loss's derivative: central differences on one dropped token
            b, i = dropped.nonzero()[0].tolist()
            with torch.no_grad():
                ones["on"] = False
                fd = []
                for eps in (1e-4, -1e-4):
                    delta[b, special + i] = eps
                    fd.append((student(x) * weights).sum())
            torch.testing.assert_close((fd[0] - fd[1]) / 2e-4, grads["full"][dropped[:b].sum() + dropped[b, :i].sum()],
                                       rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        dense = model(x)
    torch.testing.assert_close(outputs["full"], dense)
    assert (outputs["block"] - dense).abs().amax() > 1e-3
    assert (grads["full"] - grads["block"]).abs().amax() > 1e-3 * grads["block"].abs().amax()


def test_kept_positions_compose_the_stages_selections():
    first, second = SoftKeep(1, 4), SoftKeep(1, 2)
    first.eval(), second.eval()
    first(torch.tensor([[9.0, 0, 5, 1, 6, 7, 2, 8, 3]]))  # patch tokens 0..7 scored 0 5 1 6 7 2 8 3: keeps 1, 3, 4, 6
    second(torch.tensor([[9.0, 4, 1, 0, 3]]))  # of those four (class token first): keeps the 1st and the 4th
    assert first.kept.tolist() == [[1, 3, 4, 6]]
    assert kept_positions([first, second], 8).tolist() == [[1, 6]]


@pytest.mark.parametrize("overrides", [dict(), dict(pool="avg", num_registers=2)], ids=["cls", "avgpool-registers"])
def test_token_distillation_targets_the_teachers_tokens_at_the_surviving_positions(overrides):
    # Blocks whose residual branches output zero leave every token as it entered: the student's surviving tokens are
    # then exactly the teacher's tokens at the positions the stages kept, so the loss must read zero - and only if the
    # positions are composed right through all the stages.
    model = small_vit(**overrides)
    with torch.no_grad():
        for block in model.blocks:
            for layer in (block.attn.proj, block.mlp[2]):
                layer.weight.zero_(), layer.bias.zero_()
    captured = capture(model, example_input(model, None))
    structure = find_blocks(captured)
    stages, keep = (1, 2, 3), (40, 25, 12)
    predictors = make_predictors(structure, stages, PredictorConfig(hidden=16))
    student, keepers = build_calibration_graph(captured, stages, keep, predictors)
    teacher = capture(model, example_input(model, None))
    teacher_tap = tap_final_tokens(teacher)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        student(x), teacher(x)
    chain = [keepers[s] for s in stages]
    assert token_loss(student.spot_final_tokens.value, teacher_tap.value, chain, structure.num_special) < 1e-10
    # A wrong composition (the last stage's indices read as if into the input) does not.
    shuffled = [keepers[3]]
    assert token_loss(student.spot_final_tokens.value, teacher_tap.value, shuffled, structure.num_special) > 1e-3


def test_descriptor_from_queries_and_keys_equals_the_one_from_logits_and_respects_the_mask():
    torch.manual_seed(0)
    b, h, n, d, special = 2, 3, 10, 8, 1
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    logits = q @ k.transpose(-2, -1) * 0.3
    mask = torch.ones(b, n)
    mask[:, [2, 5, 6]] = 0
    for m in (None, mask):
        from_qk = ops.interaction_descriptor(q, k, 0.3, b, special, 0, m)
        torch.testing.assert_close(from_qk, ops.descriptor_from_logits(logits, b, special, 0, m))
    # Live rows under the mask are what the pruned graph computes on the surviving tokens alone.
    live = mask[0].bool()
    pruned = ops.interaction_descriptor(q[:, :, live], k[:, :, live], 0.3, b, special, 0)
    torch.testing.assert_close(ops.interaction_descriptor(q, k, 0.3, b, special, 0, mask)[:, live], pruned)
    assert from_qk.shape == (b, n, 4 * h) and torch.isfinite(from_qk).all()
    # Uniform attention (all logits equal) reads 1 for both softmax features.
    flat = ops.descriptor_from_logits(torch.zeros(b, h, n, n), b, special, 0).reshape(b, n, h, 4)
    torch.testing.assert_close(flat[..., :2], torch.ones(b, n, h, 2))


@pytest.mark.parametrize("signals", [("embedding", "interaction", "dynamics"), ("interaction", "dynamics"),
                                     ("embedding", "dynamics"), ("embedding", "interaction")])
def test_predictor_forward_equals_its_textbook_form(signals):
    # The forward reorders the arithmetic (one GEMM for all inputs, the context half of the mix once per image);
    # it must compute the function the module docstring states.
    torch.manual_seed(0)
    p = SpotPredictor(24, 3, PredictorConfig(hidden=16, signals=signals))
    for param in p.parameters():
        torch.nn.init.normal_(param, std=0.3)
    tokens, prev, last = torch.randn(2, 9, 24), torch.randn(2, 9, 12), torch.randn(2, 9, 12)
    h = 0
    if p.embedding is not None:
        h = h + p.embedding(tokens)
    if p.interaction is not None:
        h = h + p.interaction(last)
    if p.dynamics is not None:
        h = h + p.dynamics(last - prev)
    context = h.mean(1, keepdim=True)
    expected = p.mix(torch.cat([h, context.expand_as(h)], dim=-1)).squeeze(-1)
    torch.testing.assert_close(p(tokens, prev, last), expected, atol=1e-5, rtol=1e-5)
    if p.dynamics is not None:  # a single descriptor means no change yet
        torch.testing.assert_close(p(tokens, last), p(tokens, last, last))


def test_spot_taps_keep_fused_attention_fused_and_agree_with_explicit_attention():
    fused = small_vit()
    explicit = small_vit(attention="explicit")
    explicit.load_state_dict(fused.state_dict())
    structure = find_blocks(capture(fused, example_input(fused, None)))
    predictors = make_predictors(structure, (1, 2, 3), PredictorConfig(hidden=16))
    # Explicit keep counts: FLOPs of SDPA and of an explicit softmax are counted differently, so a budget could
    # give the two models different counts.
    config = sc.SparsifyConfig(keep=(40, 25, 12), stages=(1, 2, 3), policy=sc.GivenScorersConfig(predictors))
    outputs = []
    x = torch.randn(3, 1, 16, 16)
    for model, descriptor in ((fused, ops.interaction_descriptor), (explicit, ops.descriptor_from_logits)):
        sparse = sc.sparsify(model, config)
        targets = [n.target for n in sparse.graph_module.graph.nodes]
        assert targets.count(descriptor) == 3  # blocks 0, 1, 2, each emitted once though stages 2 and 3 reread 0 and 1
        assert ops.attention_probs not in targets
        with torch.no_grad():
            outputs.append(sparse(x))
    fused_sparse = sc.sparsify(fused, config)
    fused_graph = fused_sparse.graph_module.graph
    assert sum(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in fused_graph.nodes) == 4
    # One top-k per stage in the ATen graph Inductor gets, though the taps of blocks 0 and 1 are carried through
    # later stages' selections.
    carried = [n for n in fused_graph.nodes if n.target is ops.prune_tokens and "spot_block" not in n.meta]
    aten_graph = fused_sparse.export().graph
    assert carried and sum(n.target is torch.ops.aten.topk.default for n in aten_graph.nodes) == 3
    # Same weights, same predictors: the descriptor read from q/k selects what the one read from logits selects.
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


def test_predictor_shapes_and_cost_under_three_percent():
    model = small_vit(img_size=28, dim=64, depth=6, stem_channels=32)  # the shipped model's shape
    structure = find_blocks(capture(model, example_input(model, None)))
    p = SpotPredictor(64, 2)
    tokens, desc = torch.randn(2, 197, 64), torch.randn(2, 197, 8)  # 4 features x 2 heads
    assert p(tokens, desc, desc).shape == (2, 197)
    predictors = make_predictors(structure, (2, 3, 4), PredictorConfig())
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy=sc.GivenScorersConfig(predictors)))
    x = torch.randn(1, 1, 28, 28)
    predictor_flops = 0
    for stage in sparse.plan.stages:
        n = stage.tokens_in
        with torch.utils.flop_counter.FlopCounterMode(display=False) as c:
            predictors[stage.block](torch.randn(1, n, 64), torch.randn(1, n, 8), torch.randn(1, n, 8))
        predictor_flops += c.get_total_flops()
    assert predictor_flops / count_flops(model, x) <= 0.03


@pytest.mark.parametrize("overrides", [dict(), dict(pool="avg", num_registers=2)], ids=["cls", "avgpool-registers"])
def test_calibration_smoke_lowers_the_loss_and_round_trips(tmp_path, overrides):
    model = small_vit(**overrides)
    torch.manual_seed(0)
    data = ImageSet(torch.rand(256, 1, 16, 16), torch.randint(0, 10, (256,)), tuple("0123456789"))
    out = tmp_path / "pred.pt"
    result = calibrate(model, data, data.subset(torch.arange(64)), budget=0.6, epochs=3, batch_size=32, lr=5e-3, out=out,
                       predictor=PredictorConfig(hidden=16), compile=False, token_distill=0.5)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] and all(h["tok"] > 0 for h in result.history)
    loaded = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy="spot", predictors=str(out)))
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.sparse(x))
    with pytest.raises(CheckpointError, match="different model"):
        sc.sparsify(small_vit(dim=48, **overrides), sc.SparsifyConfig(budget=0.6, policy="spot", predictors=str(out)))
    with pytest.raises(CheckpointError, match="needs calibrated predictors"):
        sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy="spot"))
    old = torch.load(out, weights_only=True)
    old["format"] = "spot-compile/predictors/1"  # the N x N descriptor's checkpoints
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="another version of spot-compile"):
        sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy="spot", predictors=str(tmp_path / "old.pt")))


@pytest.mark.parametrize("logit_distill", [0.5, 0.0], ids=["distilled", "no-teacher"])
def test_finetune_tunes_the_backbone_and_the_checkpoint_carries_it(tmp_path, monkeypatch, logit_distill):
    from spot_compile.calibration import trainer as calibration

    captures = []
    monkeypatch.setattr(calibration, "capture", lambda *a: captures.append(a) or capture(*a))
    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    data = ImageSet(torch.rand(128, 1, 16, 16), torch.randint(0, 10, (128,)), tuple("0123456789"))
    out = tmp_path / "pred.pt"
    result = calibrate(model, data, data.subset(torch.arange(32)), budget=0.6, epochs=2, batch_size=32, lr=5e-3,
                       out=out, predictor=PredictorConfig(hidden=16), compile=False, finetune=True, backbone_lr=1e-3,
                       logit_distill=logit_distill)
    # The student's graph, plus the teacher's (a frozen copy of the dense model) only when something is distilled.
    assert len(captures) == (2 if logit_distill else 1)
    assert all((h["kl"] > 0) == bool(logit_distill) for h in result.history)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "blocks.0.attn.qkv.weight" in changed and not any(p.requires_grad for p in model.parameters())
    fresh = small_vit()  # the same initial weights as `model` had
    loaded = sc.sparsify(fresh, sc.SparsifyConfig(budget=0.6, policy="spot", predictors=str(out)))
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.sparse(x))
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # the user's model is untouched


@pytest.mark.parametrize("weight", [2.0, 0.0])
def test_keep_ratio_weight_scales_the_keep_ratio_term_of_the_loss(weight):
    torch.manual_seed(0)
    data = ImageSet(torch.rand(16, 1, 16, 16), torch.randint(0, 10, (16,)), tuple("0123456789"))
    result = calibrate(small_vit(), data, data.subset(torch.arange(4)), budget=0.6, epochs=1, batch_size=8, compile=False,
                       predictor=PredictorConfig(hidden=16), keep_ratio_weight=weight)
    (row,) = result.history
    assert row["ratio"] > 1e-4, "the keep ratio is off its target: the term is there to be weighed"
    assert row["loss"] == pytest.approx(row["ce"] + 0.5 * row["kl"] + weight * row["ratio"], rel=1e-5)
    assert result.checkpoint.metrics["keep_ratio_weight"] == weight
