"""Token maps: where merging sends each token (checked against the merge itself), merged groups composed across
stages, one image per class, and colour images drawn in colour."""

import torch

import spot_compile as sc
from spot_compile.cli.visualize import display_image, merged_groups, one_per_class, save_token_maps
from spot_compile.ops.merging import merge_destinations, merge_tokens

from .conftest import small_vit


def test_each_token_goes_where_the_merge_puts_its_value():
    torch.manual_seed(0)
    tokens, metric = torch.randn(3, 17, 8), torch.randn(3, 17, 5)
    sizes = torch.randint(1, 4, (3, 17, 1)).float()
    merged, merged_sizes = merge_tokens(tokens, sizes, metric, 1, 10)
    dest = merge_destinations(metric, 1, 10)
    assert dest.shape == (3, 17) and int(dest.max()) == 10 and (dest[:, 0] == 0).all()
    weights = torch.zeros(3, 11, 1).scatter_add(1, dest[..., None], sizes)
    expected = torch.zeros(3, 11, 8).scatter_add(1, dest[..., None].expand(-1, -1, 8), tokens * sizes) / weights
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(merged_sizes, weights)


def test_merged_groups_coarsen_stage_by_stage_to_the_planned_token_counts():
    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy="merge"))
    maps = merged_groups(sparse, torch.randn(2, 1, 16, 16))
    assert len(maps) == len(sparse.plan.stages)
    special = sparse.structure.num_special
    for stage, groups in zip(sparse.plan.stages, maps):
        for image in groups:
            assert image.unique().numel() == stage.keep and int(image.min()) >= special
    for before, after in zip(maps, maps[1:]):  # patches merged together stay together
        for b, a in zip(before, after):
            for g in b.unique():
                assert a[b == g].unique().numel() == 1


def test_one_image_per_class_first():
    labels = torch.tensor([2, 2, 0, 1, 0, 2, 1])
    assert one_per_class(labels, 3).tolist() == [2, 3, 0]
    assert one_per_class(labels, 5).tolist() == [2, 3, 0, 4, 6]
    assert one_per_class(labels, 9).tolist() == [2, 3, 0, 4, 6, 1, 5]


def test_colour_images_are_drawn_in_colour_and_both_kinds_of_map_are_saved(tmp_path):
    red = torch.zeros(3, 16, 16)
    red[0] = 1.0
    assert torch.equal(display_image(red)[0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(display_image(torch.full((1, 16, 16), 0.5))[0, 0], torch.full((3,), 0.5))
    images = torch.rand(2, 3, 16, 16)
    kept = [torch.rand(2, 64) > 0.5]
    groups = [torch.randint(0, 20, (2, 64))]
    save_token_maps(images, {"class-attention": kept, "merge": groups}, tmp_path / "maps.png", ["a", "b"])
    assert (tmp_path / "maps.png").stat().st_size > 1000


def test_merged_groups_follow_tomes_placement_too():
    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy=sc.MergeConfig(merge_at="attention")))
    maps = merged_groups(sparse, torch.randn(2, 1, 16, 16))
    assert len(maps) == len(sparse.plan.stages)
    for stage, groups in zip(sparse.plan.stages, maps):
        assert all(image.unique().numel() == stage.keep for image in groups)
