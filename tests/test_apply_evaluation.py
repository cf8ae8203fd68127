"""`spot-compile apply --data`: what a budget costs on the user's own labelled images, normalised as the model says;
`--token-maps`; and where the normalisation comes from (`preprocessing`)."""

import textwrap

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import spot_compile as sc
from spot_compile.cli.main import main
from spot_compile.data.datasets import evaluation_images
from spot_compile.data.preprocessing import Normalization, Preprocessing, model_normalization, model_preprocessing
from spot_compile.errors import DataError
from spot_compile.measure.accuracy import compare
from spot_compile.models.vit import ViT

from .conftest import small_vit

MODEL_FILE = """
import torch
torch.manual_seed(0)
from spot_compile.models.vit import ViT
model = ViT(img_size=16, patch_size=2, dim=32, depth=4, heads=2).eval()
"""

NO_STATS_FILE = """
import torch
from spot_compile.models.vit import ViT

class Plain(torch.nn.Module):  # a model that declares no input statistics, as a Hugging Face model
    def __init__(self):
        super().__init__()
        self.inner = ViT(img_size=16, patch_size=2, dim=32, depth=4, heads=2)
        self.img_size, self.in_chans = 16, 1

    def forward(self, x):
        return self.inner(x)

model = Plain().eval()
"""


def _folder(root, per_class=10, classes=("a", "b", "c")):
    torch.manual_seed(0)
    for label in classes:
        (root / "val" / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((torch.rand(16, 16) * 255).to(torch.uint8).numpy(), mode="L").save(root / "val" / label / f"{i}.png")
    return root


def _evaluation_row(output: str) -> list[str]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if "of your images" in line)
    row = next(line for line in lines[start:] if line.count("│") >= 5)
    return [c.strip() for c in row.strip("│").split("│")]


def _run(tmp_path, body, *args):
    path = tmp_path / "mymodel.py"
    path.write_text(textwrap.dedent(body))
    return CliRunner().invoke(main, ["apply", str(path), "--no-latency", *args], catch_exceptions=False)


def test_apply_reports_dense_and_sparse_top1_and_agreement_on_the_users_images(tmp_path):
    data = _folder(tmp_path / "data")
    result = _run(tmp_path, MODEL_FILE, "--budget", "0.6", "--data", str(data), "--policy", "class-attention")
    assert result.exit_code == 0, result.output
    assert "evaluating on 30 images" in result.output and "declared by the model's pretrained_cfg" in result.output
    # the same figures, computed here from the API on the same images
    torch.manual_seed(0)

    model = ViT(img_size=16, patch_size=2, dim=32, depth=4, heads=2).eval()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy="class-attention"))
    images = evaluation_images(data, model_preprocessing(model, 1, (16, 16)))
    want = compare(model, sparse, images, model_normalization(model))
    assert _evaluation_row(result.output) == [f"{want.dense_top1:.2f}", f"{want.sparse_top1:.2f}", f"{want.sparse_top1 - want.dense_top1:+.2f}",
                     f"{want.agreement:.2f}"]


def test_at_budget_one_sparse_agrees_with_dense_everywhere(tmp_path):
    data = _folder(tmp_path / "data")
    result = _run(tmp_path, MODEL_FILE, "--budget", "1.0", "--data", str(data), "--eval-images", "12")
    assert result.exit_code == 0, result.output
    assert "evaluating on 12 images" in result.output
    assert _evaluation_row(result.output)[2:] == ["+0.00", "100.00"]


def test_token_maps_are_drawn_for_dropping_and_for_merging_one_image_per_class(tmp_path):
    data = _folder(tmp_path / "data")
    for policy in ("class-attention", "merge"):
        png = tmp_path / f"maps_{policy}.png"
        result = _run(tmp_path, MODEL_FILE, "--data", str(data), "--policy", policy, "--token-maps", str(png))
        assert result.exit_code == 0, result.output
        assert png.stat().st_size > 1000 and "one per class" in result.output
    result = _run(tmp_path, MODEL_FILE, "--token-maps", str(tmp_path / "maps.png"))
    assert result.exit_code == 2 and "give --data DIR too" in result.output


def test_a_model_without_declared_statistics_needs_mean_and_std(tmp_path):
    data = _folder(tmp_path / "data")
    result = _run(tmp_path, NO_STATS_FILE, "--data", str(data))
    assert result.exit_code == 2
    assert "the model declares no input normalisation" in result.output and "--mean 0.485,0.456,0.406" in result.output
    assert "Traceback" not in result.output
    result = _run(tmp_path, NO_STATS_FILE, "--data", str(data), "--mean", "0.5", "--std", "0.25", "--budget", "1.0")
    assert result.exit_code == 0, result.output
    assert "mean/std 0.5/0.25 (--mean/--std)" in result.output
    for args, message in ((("--mean", "0.5"), "give --mean and --std together"),
                          (("--mean", "x", "--std", "1"), "--mean must be comma-separated numbers"),
                          (("--mean", "0.1,0.2", "--std", "1,1"), "mean/std give 2 channels but the images have 1"),
                          (("--mean", "0.1", "--std", "0"), "std values must be positive")):
        result = _run(tmp_path, NO_STATS_FILE, "--data", str(data), *args)
        assert result.exit_code == 2 and message in result.output, result.output


def test_normalisation_is_read_from_timm_and_from_spot_compiles_own_models():
    timm = pytest.importorskip("timm")
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    norm = model_normalization(model)
    assert norm.mean == pytest.approx((0.485, 0.456, 0.406)) and norm.std == pytest.approx((0.229, 0.224, 0.225))
    vit = small_vit()
    assert model_normalization(vit).mean == (0.2860,)
    sparse = sc.sparsify(vit, sc.SparsifyConfig(budget=1.0))
    assert model_normalization(sparse) == model_normalization(vit)  # a sparse model is fed as its source model
    x = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(model_normalization(vit)(x), (x - 0.2860) / 0.3530)
    with pytest.raises(DataError, match="declares no input normalisation"):
        model_normalization(torch.nn.Linear(2, 2))


def test_colour_images_for_a_one_channel_model_are_refused_not_greyed(tmp_path):
    import numpy as np

    (tmp_path / "val" / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "val" / "a" / "colour.png")
    def read(channels):
        return evaluation_images(tmp_path, Preprocessing(Normalization((0.5,) * channels, (0.5,) * channels, "test"),
                                                         (16, 16), channels))

    with pytest.raises(DataError, match="colour.png is a colour image but the model takes 1 channel"):
        read(1)
    assert read(3).images.shape == (1, 3, 16, 16)
    grey = rng.integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "val" / "a" / "colour.png")  # grey, stored as RGB
    assert read(1).images.shape == (1, 1, 16, 16)


def test_box_precision_counts_kept_patch_centres_inside_the_box():
    from research.boxes import box_precision

    side, patch = 4, 4  # a 16x16 image in 4x4 patches; patch centres at 2, 6, 10, 14
    boxes = torch.tensor([[0, 0, 8, 8], [8, 4, 8, 12]])  # the top-left 2x2 patches; the bottom two rows minus column 0
    inside = torch.zeros(2, side, side, dtype=torch.bool)
    inside[0, :2, :2] = True
    inside[1, 2:, 1:] = True
    kept = inside.flatten(1).clone()
    result = box_precision(kept, boxes, patch)
    assert result.precision == 100.0 and result.box_share == pytest.approx(100 * (4 + 6) / 32)
    kept[0, 15] = True  # one more token, outside the first box
    assert box_precision(kept, boxes, patch).precision == pytest.approx(100 * 10 / 11)
    everything = torch.ones(2, 16, dtype=torch.bool)
    every = box_precision(everything, boxes, patch)
    assert every.precision == pytest.approx(every.box_share) and every.lift == pytest.approx(1.0), "keeping all = the share"
