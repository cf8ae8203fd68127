"""Cluttered Fashion-MNIST (recipes/cluttered_fmnist.py) and the dense model shipped for it."""

import torch

from recipes.cluttered_fmnist import CANVAS, GARMENT, make_cluttered
from research.boxes import box_precision
from spot_compile.data.datasets import load_dataset
from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR
from spot_compile.data.imageset import ImageSet
from spot_compile.measure.accuracy import accuracy
from spot_compile.models.zoo import CLUTTERED_MODEL, load_shipped_model


def _garments(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset(FASHION_MNIST_DIR, "test")
    return (data.images[:n] * 255).round().to(torch.uint8), data.labels[:n]


def test_each_garment_lies_whole_in_its_box_over_distractors_and_the_build_is_deterministic():
    garments, _ = _garments(64)
    canvases, boxes = make_cluttered(garments, seed=2)
    again, same_boxes = make_cluttered(garments, seed=2)
    assert torch.equal(canvases, again) and torch.equal(boxes, same_boxes)
    assert canvases.shape == (64, 1, CANVAS, CANVAS)
    assert bool((boxes[:, 2:] == GARMENT).all()) and bool((boxes[:, :2] + GARMENT <= CANVAS).all())
    outside = 0
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        region = canvases[i, 0, top : top + h, left : left + w]
        assert bool((region >= garments[i, 0]).all()), "pixels combine by maximum: the garment is never covered"
        rest = canvases[i, 0].clone()
        rest[top : top + h, left : left + w] = 0
        outside += int(rest.gt(0).any())
    assert outside >= 60, "distractors lie outside the box on nearly every canvas"
    assert len(set(map(tuple, boxes[:, :2].tolist()))) > 50, "the garment's place varies per image"


def test_the_shipped_cluttered_model_classifies_fresh_canvases_and_its_grid_puts_a_quarter_on_the_garment():
    model, metrics = load_shipped_model(CLUTTERED_MODEL)
    assert (model.cfg.img_size, model.cfg.patch_size) == (CANVAS, 4) and metrics["test_top1"] > 60
    garments, labels = _garments(500)
    canvases, boxes = make_cluttered(garments, seed=12345)  # canvases the model never saw, from test garments
    top1 = accuracy(model, ImageSet(canvases.float() / 255, labels, ()))
    assert top1 > metrics["test_top1"] - 6, f"{top1:.1f} % on fresh canvases vs {metrics['test_top1']:.1f} % recorded"
    every = torch.ones(len(boxes), (CANVAS // 4) ** 2, dtype=torch.bool)
    assert box_precision(every, boxes, 4).box_share == 25.0
