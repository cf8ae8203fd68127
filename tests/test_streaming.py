"""Streaming training data: datasets over IDX files and ImageFolder trees, the model's transforms, the seeded
sampler that makes augmentation and sharding reproducible, and the one-line refusals of bad data."""

import numpy as np
import pytest
import torch
from PIL import Image

from spot_compile.data.datasets import training_datasets
from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR
from spot_compile.data.idx import IdxImages
from spot_compile.data.loading import Prepared, SeededSampler, loader, reraised
from spot_compile.data.preprocessing import Normalization, Preprocessing, model_preprocessing
from spot_compile.data.transforms import EvalTransform, TrainTransform, draws
from spot_compile.errors import DataError

from .conftest import small_vit

GREY = Normalization((0.5,), (0.25,), "test")


def _folder(root, classes=("a", "b"), n=6, size=20, mode="L"):
    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            arr = (torch.rand(shape, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr, mode=mode).save(root / c / f"{i}.png")
    return root


def test_idx_images_stream_the_raw_bytes_and_split_as_the_in_memory_loader():
    from spot_compile.data.datasets import load_dataset
    from spot_compile.data.imageset import split

    train, val = training_datasets(FASHION_MNIST_DIR, 5000)
    base = train.dataset
    assert isinstance(base, IdxImages) and base.images.dtype == np.uint8, "held as bytes, not as decoded floats"
    assert len(train) == 55000 and len(val) == 5000 and base.classes[0] == "T-shirt/top"
    old_train, old_val = split(load_dataset(FASHION_MNIST_DIR, "train"), 5000)
    for i in (0, 1234, 4999):  # the same split as the in-memory path: results stay comparable
        image, label = val[i]
        assert torch.equal(image.float() / 255, old_val.images[i, 0]) and label == int(old_val.labels[i])
    image, label = train[54999]
    assert torch.equal(image.float() / 255, old_train.images[54999, 0])


def test_an_uncompressed_idx_file_is_memory_mapped(tmp_path):
    import gzip
    import shutil

    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        with gzip.open(FASHION_MNIST_DIR / f"{name}.gz") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    data = IdxImages(tmp_path, "train")
    assert isinstance(data.images, np.memmap) and len(data) == 60000
    assert torch.equal(data[7][0], IdxImages(FASHION_MNIST_DIR, "train")[7][0])


def test_image_folder_with_train_and_val_reads_both_and_refuses_mismatched_classes(tmp_path):
    _folder(tmp_path / "d" / "train")
    _folder(tmp_path / "d" / "val", n=2)
    train, val = training_datasets(tmp_path / "d", val_size=5000)  # val/ exists: --val-size is not used
    assert (len(train), len(val)) == (12, 4) and train.classes == ["a", "b"]
    _folder(tmp_path / "d" / "val", classes=("c",), n=1)
    with pytest.raises(DataError, match="different class folders"):
        training_datasets(tmp_path / "d", val_size=1)


def test_one_image_folder_is_split_by_val_size_and_too_large_a_split_is_refused(tmp_path):
    _folder(tmp_path / "one")
    train, val = training_datasets(tmp_path / "one", val_size=3)
    assert (len(train), len(val)) == (9, 3)
    with pytest.raises(DataError, match="does not fit the 12 training images"):
        training_datasets(tmp_path / "one", val_size=12)


def test_folders_without_classes_or_images_are_refused(tmp_path):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="expected ImageFolder layout"):
        training_datasets(tmp_path / "empty", val_size=1)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="neither an IDX directory nor|neither an IDX directory"):
        training_datasets(tmp_path / "flat", val_size=1)


def test_a_corrupt_image_stops_the_run_naming_the_file_also_from_a_worker(tmp_path):
    root = _folder(tmp_path / "d")
    (root / "a" / "3.png").write_bytes(b"not a png")
    train, _ = training_datasets(root, val_size=2)
    pre = Preprocessing(GREY, (20, 20), 1, augment="none")
    batches = loader(Prepared(train, EvalTransform(pre)), 4, workers=1)
    with pytest.raises(DataError) as caught:
        list(reraised(batches))
    assert str(caught.value).startswith("cannot read image") and "3.png" in str(caught.value)
    assert "\n" not in str(caught.value), "one line, not the worker's traceback"


def test_colour_images_for_a_one_channel_model_are_refused(tmp_path):
    root = _folder(tmp_path / "d", mode="RGB")
    train, _ = training_datasets(root, val_size=2)
    with pytest.raises(DataError, match=r"d/[ab]/\d+\.png is a colour image but the model takes 1 channel"):
        Prepared(train, EvalTransform(Preprocessing(GREY, (20, 20), 1)))[0]


def test_eval_transform_is_timms_resize_and_centre_crop():
    from torchvision.transforms import v2

    pre = Preprocessing(Normalization((0.0,) * 3, (1.0,) * 3, "none"), (24, 24), 3, crop_pct=0.875, interpolation="bicubic")
    image = torch.rand(3, 40, 56)
    reference = v2.Compose([v2.Resize(int(24 / 0.875), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(24)])(image)
    ours = EvalTransform(pre)(image)
    assert ours.shape == (3, 24, 24)
    torch.testing.assert_close(ours, reference.clamp(0, 1))
    same = Preprocessing(GREY, (28, 28), 1)
    x = torch.rand(1, 28, 28)
    torch.testing.assert_close(EvalTransform(same)(x), (x - 0.5) / 0.25), "the right size, no crop: normalised only"


@pytest.mark.parametrize("augment", ["shift-flip", "random-resized-crop"])
def test_augmentation_depends_on_seed_epoch_and_index_alone(augment):
    data = [(torch.rand(1, 28, 28), i % 2) for i in range(16)]
    pre = Preprocessing(GREY, (28, 28), 1, augment=augment)
    prepared = Prepared(data, TrainTransform(pre))
    sampler = SeededSampler(data, 1, 0, seed=5)
    sampler.start(epoch=3)
    items = list(sampler)
    torch.manual_seed(123)  # the global generator's state does not matter
    first = [prepared[item][0] for item in items]
    torch.manual_seed(999)
    again = [prepared[item][0] for item in reversed(items)][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, (x - 0.5) / 0.25) for a, (x, _) in zip(first, [data[i] for i, _ in items])), "it augments"
    with_workers = [x for xs, _ in loader(prepared, 4, sampler=sampler, workers=2) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(first, with_workers)), "the same images whatever the number of workers"
    torch.manual_seed(7)
    unseeded = TrainTransform(pre)(data[0][0])
    torch.manual_seed(7)
    assert torch.equal(unseeded, TrainTransform(pre)(data[0][0])), "without a seed it draws one from torch's generator"


@pytest.mark.parametrize("augment", ["shift-flip", "none"])
@pytest.mark.parametrize("channels", [1, 3])
def test_a_batch_is_transformed_as_its_images_are_one_by_one(augment, channels):
    images = [(torch.rand(28, 28) * 255).to(torch.uint8) for _ in range(32)]
    data = [(img, i % 3) for i, img in enumerate(images)]
    norm = Normalization((0.5,) * channels, (0.25,) * channels, "test")
    pre = Preprocessing(norm, (28, 28), channels, augment=augment)
    sampler = SeededSampler(data, 1, 0, seed=3)
    sampler.start(epoch=1)
    items = list(sampler)
    for transform in (TrainTransform(pre), EvalTransform(pre)):
        assert transform.batch([img for img, _ in data], [s for _, s in items]) is not None, "IDX images go batch-wise"
        batched = Prepared(data, transform).__getitems__(items)
        alone = [Prepared(data, transform, batched=False)[item] for item in items]
        assert [y for _, y in batched] == [y for _, y in alone]
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batched, alone))
    shifts = {draws(seed)[:2] for _, seed in items}
    assert len(shifts) > 10 and {f for _, s in items for f in [draws(s)[2]]} == {True, False}, "the draws vary"
    resized = Preprocessing(norm, (20, 20), channels, augment=augment)
    assert TrainTransform(resized).batch(images, [0] * 32) is None, "a resize goes image by image"


def test_two_processes_batches_together_are_one_processs_batch_and_resume_skips_exactly():
    data = list(range(37))
    one = SeededSampler(data, 1, 0, seed=0)
    two = [SeededSampler(data, 2, r, seed=0) for r in (0, 1)]
    one.start(2)
    for s in two:
        s.start(2)
    single = [i for i, _ in one]
    mine = [[i for i, _ in s] for s in two]
    assert len(mine[0]) == len(mine[1]) == 18 and not set(mine[0]) & set(mine[1])
    for b in range(18 // 3):  # a global batch of 6 = 3 per process
        assert sorted(mine[0][3 * b : 3 * b + 3] + mine[1][3 * b : 3 * b + 3]) == sorted(single[6 * b : 6 * b + 6])
    seeds = dict(iter(one))
    one.start(2, skip=10)
    assert list(one) == [(i, seeds[i]) for i in single[10:]] and len(one) == len(single) - 10


def test_model_preprocessing_reads_timms_pretrained_cfg_and_the_overrides():
    timm = pytest.importorskip("timm")
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    pre = model_preprocessing(model, 3, (224, 224))
    assert pre.crop_pct == model.pretrained_cfg["crop_pct"] and pre.interpolation == "bicubic"
    assert pre.augment == "random-resized-crop" and pre.normalization.mean == tuple(model.pretrained_cfg["mean"])
    assert "crop_pct 0.875" in pre.describe() or f"crop_pct {pre.crop_pct:g}" in pre.describe()
    ours = model_preprocessing(small_vit(), 1, (16, 16), mean=(0.1,), std=(0.2,), augment="none")
    assert ours.augment == "none" and ours.normalization.mean == (0.1,) and ours.crop_pct == 1.0
    assert model_preprocessing(small_vit(), 1, (16, 16)).augment == "shift-flip", "spot-compile's ViT declares its recipe's"


def test_crop_box_draws_as_torchvisions_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    from spot_compile.data.transforms import crop_box

    for seed, (h, w) in enumerate([(40, 56), (224, 224), (10, 1000)]):  # no crop of the last fits: the centre fallback
        torch.manual_seed(seed)  # torchvision draws from the global generator, crop_box from its own: the same stream
        expected = RandomResizedCrop.get_params(torch.zeros(3, h, w), (0.08, 1.0), (3 / 4, 4 / 3))
        assert crop_box(h, w, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed)) == tuple(expected)
