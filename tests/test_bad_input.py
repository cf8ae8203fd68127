"""Bad input, as a careful new user and a security reviewer would try it: every case ends in one clear `SpotError`
line (or a usage error from click), a correct result, or a refusal; never a traceback, a silently wrong result or
code execution. The messages are listed in docs/errors.md."""

import os
import pickle
import re
import textwrap

import pytest
import torch
from click.testing import CliRunner

import spot_compile as sc
from spot_compile.cli.main import main
from spot_compile.errors import BudgetError, CheckpointError, DataError, InputSizeError, StructureError, UsageError
from spot_compile.models.vit import ViT

from .conftest import small_vit

MODEL_FILE = """
from spot_compile.models.vit import ViT
model = ViT(img_size=16, patch_size=2, dim=32, depth=4, heads=2)
"""


class _RunsCode:
    """Unpickling this runs `os.system`: the shape of a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_file(tmp_path, name="evil.pt", fmt="spot-compile/sparse/1"):
    """A checkpoint as torch.save writes it, with a payload that runs a command when unpickled."""
    marker = tmp_path / "code_ran"
    path = tmp_path / name
    torch.save({"format": fmt, "payload": _RunsCode(marker)}, path)
    return path, marker


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_raw_malicious_pickle_is_refused_and_runs_no_code(tmp_path, protocol):
    marker, path = tmp_path / "code_ran", tmp_path / "raw.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "spot-compile/sparse/1", "payload": _RunsCode(marker)}, f, protocol=protocol)
    with pytest.raises(CheckpointError):
        sc.load(path, small_vit())
    assert not marker.exists()


def _write(tmp_path, body, name="mymodel.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def _loud_model_file(tmp_path):
    """A model file that leaves a marker when it is run: a check that must come before the slow work leaves none."""
    marker = tmp_path / "model_loaded"
    return _write(tmp_path, f"open({str(marker)!r}, 'w').close()\n" + MODEL_FILE), marker


def _one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("error:"), result.output
    assert message in result.output, result.output


def _idx_data(root, count=12, size=16):
    """An IDX directory of `count` random training images in two classes: calibration data that needs torch alone
    (an ImageFolder tree needs torchvision, which the oldest-torch run does not install)."""
    import gzip
    import struct

    import numpy as np

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for kind, array in (("images-idx3", rng.integers(0, 256, (count, size, size))), ("labels-idx1", np.arange(count) % 2)):
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        with gzip.open(root / f"train-{kind}-ubyte.gz", "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())
    return root


def _image_folder(root, count=12, size=16, corrupt=None):
    from PIL import Image

    for label in ("a", "b"):
        (root / "train" / label).mkdir(parents=True)
        for i in range(count // 2):
            Image.fromarray((torch.rand(size, size) * 255).to(torch.uint8).numpy(), mode="L").save(root / "train" / label / f"{i}.png")
    if corrupt:
        (root / "train" / "a" / corrupt).write_bytes(b"\x89PNG\r\n not really an image")
    return root


# --- checkpoints: a pickle never runs, and every unreadable file is one line --------------------------------------


@pytest.fixture(scope="module")
def model():
    return small_vit()


def test_a_malicious_pickle_is_refused_by_load_and_runs_no_code(tmp_path, model):
    path, marker = _malicious_file(tmp_path)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        sc.load(path, model)
    assert not marker.exists()


def test_a_malicious_pickle_as_predictors_runs_no_code(tmp_path, model):
    path, marker = _malicious_file(tmp_path)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        sc.sparsify(model, sc.SparsifyConfig(policy="spot", predictors=str(path)))
    result = CliRunner().invoke(main, ["apply", _write(tmp_path, MODEL_FILE), "--predictors", str(path), "--no-latency"])
    _one_line_error(result, "refuses to unpickle")
    assert not marker.exists()


def test_a_malicious_shipped_model_path_runs_no_code(tmp_path):
    from spot_compile.models.zoo import load_shipped_model

    path, marker = _malicious_file(tmp_path)
    with pytest.raises(CheckpointError):
        load_shipped_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"hello, I am text\n", b"", b"\x00" * 64, b"PK\x03\x04 truncated zip"],
                         ids=["text", "empty", "zeros", "truncated-zip"])
def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, model, content):
    path = tmp_path / "not.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        sc.load(path, model)


def test_a_tensor_file_is_not_a_sparse_model(tmp_path, model):
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="is not a spot-compile/sparse/1 file"):
        sc.load(tmp_path / "t.pt", model)


def test_loading_onto_another_model_says_so_not_which_setting(tmp_path, model):
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, stages=(1, 3)))
    sc.save(sparse, model, tmp_path / "s.pt")
    shallower = small_vit(depth=2)  # stage 3 would be out of range: the message must name the model, not the stage
    with pytest.raises(CheckpointError, match="made for a different model"):
        sc.load(tmp_path / "s.pt", shallower)
    larger = small_vit(img_size=24)  # another input size: same again
    with pytest.raises(CheckpointError, match="made for a different model"):
        sc.load(tmp_path / "s.pt", larger)


# --- budget 1.0 is a real model --------------------------------------------------------------------------------------


def test_budget_one_result_takes_eval_train_save_and_load(tmp_path, model):
    dense = sc.sparsify(model, sc.SparsifyConfig(budget=1.0))
    assert dense.eval() is dense and dense.train() is dense
    dense.eval()
    sc.save(dense, model, tmp_path / "dense.pt")
    restored = sc.load(tmp_path / "dense.pt", model)
    assert restored.plan.stages == [] and restored.plan.flops_ratio == 1.0
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


def test_apply_budget_one_out_loads_again(tmp_path):
    path = _write(tmp_path, "import torch\ntorch.manual_seed(0)\n" + MODEL_FILE)
    result = CliRunner().invoke(main, ["apply", path, "--budget", "1.0", "--out", str(tmp_path / "d.pt"), "--no-latency"])
    assert result.exit_code == 0, result.output
    from spot_compile.cli.userfile import load_model_file

    model = load_model_file(path)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(sc.load(tmp_path / "d.pt", model)(x), model(x))


# --- inputs to a SparseViT, and models in other dtypes -------------------------------------------------------------


@pytest.fixture(scope="module")
def sparse(model):
    return sc.sparsify(model, sc.SparsifyConfig(budget=0.6))


def test_an_unbatched_input_is_told_to_add_the_batch_dimension(sparse):
    with pytest.raises(InputSizeError, match=r"x.unsqueeze\(0\)"):
        sparse(torch.randn(1, 16, 16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.uint8])
def test_an_input_of_another_dtype_is_one_line(sparse, dtype):
    with pytest.raises(InputSizeError, match="does not match the model's weights"):
        sparse(torch.zeros(2, 1, 16, 16, dtype=dtype))


def test_a_non_tensor_input_is_one_line(sparse):
    with pytest.raises(InputSizeError, match="expects an image batch tensor"):
        sparse([[0.0]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_model_in_another_dtype_is_sparsified_in_that_dtype(dtype):
    model = small_vit().to(dtype)
    x = torch.randn(3, 1, 16, 16, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(sc.sparsify(model, sc.SparsifyConfig(budget=1.0))(x), model(x))
        sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6))
        y = sparse(x)
    assert y.dtype == dtype and y.shape == (3, 10) and abs(sparse.plan.flops_ratio - 0.6) <= 0.02


# --- models with several outputs -----------------------------------------------------------------------------------


class _TwoOutputs(ViT):
    """A ViT whose forward also returns token features, as a tuple or a dict, from the last or the first block."""

    def __init__(self, kind: str):
        super().__init__(img_size=16, patch_size=2, dim=32, depth=4, heads=2)
        self.kind = kind

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        first = self.blocks[0](x)
        tokens = self.norm(self.blocks[1:](first))
        logits = self.head(tokens[:, 0])
        return {
            "tuple": lambda: (logits, tokens),
            "dict": lambda: {"logits": logits, "tokens": tokens},
            "pooled": lambda: (logits, tokens[:, 1:].mean(1)),
            "first-block": lambda: (logits, first),
        }[self.kind]()


@pytest.mark.parametrize("kind,name", [("tuple", "[1]"), ("dict", "['tokens']")])
def test_token_outputs_of_pruned_blocks_are_refused_with_the_output_named(kind, name):
    torch.manual_seed(0)
    with pytest.raises(StructureError, match=re.escape(f"output {name} has shape (B, 65, 32)")) as info:
        sc.sparsify(_TwoOutputs(kind).eval(), sc.SparsifyConfig(budget=0.6))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["pooled", "first-block"])
def test_outputs_defined_on_what_survives_are_kept(kind):
    torch.manual_seed(0)
    model = _TwoOutputs(kind).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        logits, extra = sc.sparsify(model, sc.SparsifyConfig(budget=0.6))(x)
        dense_logits, dense_extra = model(x)
    assert logits.shape == dense_logits.shape and extra.shape == dense_extra.shape
    if kind == "first-block":  # computed before the first stage: exactly the dense value, not a pruned one
        torch.testing.assert_close(extra, dense_extra)


# --- model files -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body,option", [
    ("import torch.nn as nn\nclass M(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.l = nn.Linear('a', 3)\n", []),
    ("def make():\n    return len(3)\n", ["--factory", "make"]),
], ids=["class-init", "factory-body"])
def test_a_type_error_inside_the_model_code_is_not_called_missing_arguments(tmp_path, body, option):
    result = CliRunner().invoke(main, ["apply", _write(tmp_path, body), *option, "--no-latency"])
    _one_line_error(result, "raised TypeError")
    assert "needs arguments" not in result.output


def test_timm_swin_is_called_windowed_attention():
    timm = pytest.importorskip("timm")
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
                             depths=(1, 1, 2, 1), embed_dim=24, num_heads=(1, 2, 3, 4), num_classes=10).eval()
    with pytest.raises(StructureError, match="windowed \\(Swin-style\\)") as info:
        sc.sparsify(swin, sc.SparsifyConfig(budget=0.6))
    assert "encoder-decoder" not in str(info.value)


# --- output paths are checked before the slow work -----------------------------------------------------------------


@pytest.mark.parametrize("command,option,target", [
    ("apply", "--out", "missing/s.pt"),
    ("apply", "--out", "."),
    ("apply", "--dump-file", "missing/g.txt"),
    ("apply", "--export", "afile/p.pt2"),
    ("calibrate", "--out", "missing/p.pt"),
    ("bench", "--out-dir", "afile"),
])
def test_an_unwritable_output_is_refused_before_the_model_is_loaded(tmp_path, command, option, target):
    path, marker = _loud_model_file(tmp_path)
    (tmp_path / "afile").write_text("a file, not a directory")
    extra = ["--data", str(tmp_path)] if command == "calibrate" else ["--no-latency"] if command == "apply" else []
    result = CliRunner().invoke(main, [command, path, *extra, option, str(tmp_path / target)])
    _one_line_error(result, option)
    assert not marker.exists(), "the model file ran before the output path was checked"


# --- numbers out of range ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["calibrate", "MODEL", "--data", "DATA", "--out", "OUT", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["calibrate", "MODEL", "--data", "DATA", "--out", "OUT", "--epochs", "0"], "Invalid value for '--epochs'"),
    (["calibrate", "MODEL", "--data", "DATA", "--out", "OUT", "--max-steps", "0"], "Invalid value for '--max-steps'"),
    (["calibrate", "MODEL", "--data", "DATA", "--out", "OUT", "--val-size", "0"], "Invalid value for '--val-size'"),
    (["calibrate", "MODEL", "--data", "DATA", "--out", "OUT", "--mask-gradient", "keys"], "Invalid value for '--mask-gradient'"),
    (["calibrate", "MODEL", "--data", "DATA", "--out", "OUT", "--keep-ratio-weight", "-1"], "Invalid value for '--keep-ratio-weight'"),
    (["calibrate", "MODEL", "--data", "DATA", "--out", "OUT", "--rank-budget", "0"], "Invalid value for '--rank-budget'"),
    (["calibrate", "MODEL", "--data", "DATA", "--out", "OUT", "--rank-budget", "1.5"], "Invalid value for '--rank-budget'"),
    (["calibrate", "MODEL", "--data", "DATA", "--out", "OUT", "--finetune", "--finetune-graph", "both"],
     "Invalid value for '--finetune-graph'"),
    (["calibrate", "MODEL", "--data", "DATA", "--out", "OUT", "--finetune-graph", "deployed"],
     "Invalid value for --finetune-graph: only used with --finetune"),
    (["bench", "MODEL", "--batches", "0"], "batch sizes must be at least 1"),
    (["bench", "MODEL", "--batches", "-1"], "batch sizes must be at least 1"),
    (["bench", "MODEL", "--repeats", "0"], "Invalid value for '--repeats'"),
    (["bench", "MODEL", "--warmup", "-1"], "Invalid value for '--warmup'"),
])
def test_counts_out_of_range_are_usage_errors(tmp_path, args, message):
    path, marker = _loud_model_file(tmp_path)
    names = {"MODEL": path, "DATA": str(tmp_path), "OUT": str(tmp_path / "p.pt")}
    result = CliRunner().invoke(main, [names.get(a, a) for a in args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not marker.exists()


@pytest.mark.parametrize("kw,error", [
    (dict(batch_size=0), UsageError), (dict(epochs=0), UsageError), (dict(max_steps=0), UsageError),
    (dict(batch_size=64), DataError),  # more than the 12 training images
    (dict(mask_gradient="keys"), UsageError), (dict(val_every=0), UsageError),
    (dict(finetune_graph="deployed"), UsageError),  # without finetune=True it would do nothing
    (dict(finetune=True, backbone_from_scores=False), UsageError),  # the deployed graph's top-k passes no gradient
    (dict(keep_ratio_weight=-1.0), UsageError),
    (dict(rank_budget=0.0), BudgetError), (dict(rank_budget=1.5), BudgetError), (dict(rank_budget=True), BudgetError),
    (dict(budget=1.5), BudgetError), (dict(budget="half"), BudgetError),
], ids=["batch-0", "epochs-0", "max-steps-0", "batch-above-data", "unknown-mask-gradient", "val-every-0",
        "finetune-graph-without-finetune", "detached-inputs-without-a-joint-tune", "negative-keep-ratio-weight", "rank-budget-0",
        "rank-budget-above-1", "rank-budget-a-flag", "budget-above-1", "budget-not-a-number"])
def test_calibrate_api_refuses_a_run_that_cannot_train(tmp_path, model, monkeypatch, kw, error):
    from spot_compile.calibration import trainer as calibration
    from spot_compile.data.imageset import ImageSet

    def no_capture(*args, **kwargs):
        raise AssertionError("captured before refusing the run")

    monkeypatch.setattr(calibration, "capture", no_capture)  # every refusal comes before the slow work
    data = ImageSet(torch.rand(12, 1, 16, 16), torch.randint(0, 10, (12,)), tuple("0123456789"))
    kw = {"batch_size": 4, **kw}
    with pytest.raises(error) as refused:
        calibration.calibrate(model, data, data, kw.pop("budget", 0.6), **kw)
    if error is BudgetError:
        assert ("rank_budget" in str(refused.value)) == ("rank_budget" in kw), refused.value


# --- calibration data and its partial checkpoint -------------------------------------------------------------------


def test_more_validation_images_than_training_images_is_one_line(tmp_path):
    root = _idx_data(tmp_path / "data")
    result = CliRunner().invoke(main, ["calibrate", _write(tmp_path, MODEL_FILE), "--data", str(root), "--out",
                                       str(tmp_path / "p.pt")])  # default --val-size 5000 > 12 images
    _one_line_error(result, "--val-size 5000 does not fit the 12 training images")
    assert not (tmp_path / "p.pt").exists()


def test_fewer_training_images_than_a_batch_is_one_line(tmp_path):
    root = _idx_data(tmp_path / "data")
    result = CliRunner().invoke(main, ["calibrate", _write(tmp_path, MODEL_FILE), "--data", str(root), "--out",
                                       str(tmp_path / "p.pt"), "--val-size", "2"])  # 10 images, batch 128
    _one_line_error(result, "10 training images are fewer than one batch of 128")


def test_a_corrupt_image_is_named(tmp_path):
    pytest.importorskip("torchvision")  # calibration reads image folders through torchvision's ImageFolder
    # images are read as training reads them, in a loader worker: the error comes back from it as one line
    root = _image_folder(tmp_path / "data", corrupt="broken.png")
    model_file = _write(tmp_path, MODEL_FILE.replace("heads=2)", "heads=2, num_classes=2)"))
    result = CliRunner().invoke(main, ["calibrate", model_file, "--data", str(root), "--out",
                                       str(tmp_path / "p.pt"), "--val-size", "2", "--batch-size", "3", "--no-compile",
                                       "--workers", "1", "--epochs", "2"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]  # after the progress made before the file came up
    assert last.startswith("error: cannot read image") and "broken.png" in last, result.output


def _calibrate_into(tmp_path, out):
    root = _idx_data(tmp_path / "data", count=20)  # two classes: a model with a two-class head
    model_file = _write(tmp_path, MODEL_FILE.replace("heads=2)", "heads=2, num_classes=2)"))
    return CliRunner().invoke(main, ["calibrate", model_file, "--data", str(root), "--out", str(out),
                                     "--val-size", "4", "--batch-size", "8", "--max-steps", "1", "--no-compile"])


def test_a_malicious_partial_calibration_runs_no_code(tmp_path):
    out = tmp_path / "p.pt"
    partial, marker = _malicious_file(tmp_path, "p.partial", "spot-compile/calibration-partial/1")
    assert partial == out.with_suffix(".partial")
    result = _calibrate_into(tmp_path, out)
    _one_line_error(result, "refuses to unpickle")
    assert not marker.exists() and not out.exists()


def test_a_partial_calibration_of_another_run_is_not_resumed(tmp_path):
    import json

    from spot_compile.calibration.resume import PARTIAL_FORMAT

    out = tmp_path / "p.pt"
    torch.save({"format": PARTIAL_FORMAT, "identity": json.dumps({"budget": 0.3, "stages": [1, 2, 3]})},
               out.with_suffix(".partial"))
    result = _calibrate_into(tmp_path, out)
    _one_line_error(result, "is a partial calibration of another run")
    assert "budget" in result.output and not out.exists()


# --- calibrate takes the models apply takes ------------------------------------------------------------------------


def test_calibrate_reads_the_logits_of_a_hugging_face_model_output():
    pytest.importorskip("transformers")
    from spot_compile.calibration.trainer import calibrate
    from spot_compile.data.imageset import ImageSet

    from .model_families import INPUT_SIZE, build

    model = build("hf ViTForImageClassification (sdpa)")  # returns an ImageClassifierOutput, not a tensor
    data = ImageSet(torch.rand(16, 3, INPUT_SIZE, INPUT_SIZE), torch.randint(0, 10, (16,)), tuple("0123456789"))
    from spot_compile.data.preprocessing import Normalization, Preprocessing

    # a Hugging Face model keeps its statistics in its image processor: the caller states them
    pre = Preprocessing(Normalization((0.5,) * 3, (0.5,) * 3, "the image processor's"), (INPUT_SIZE, INPUT_SIZE), 3)
    result = calibrate(model, data, data.subset(torch.arange(8)), 0.6, batch_size=8, max_steps=2, compile=False,
                       input_size=INPUT_SIZE, preprocessing=pre)
    assert len(result.history) == 1 and 0.0 <= result.history[0]["val_top1"] <= 100.0


def test_calibrate_refuses_a_model_without_logits_before_the_slow_work(tmp_path):
    from spot_compile.calibration.trainer import calibrate
    from spot_compile.data.imageset import ImageSet

    class NoLogits(ViT):
        def forward(self, x):
            return {"logits": "not a tensor"} if x.shape[0] else super().forward(x)

    data = ImageSet(torch.rand(16, 1, 16, 16), torch.randint(0, 10, (16,)), tuple("0123456789"))
    with pytest.raises(StructureError, match="cannot find class logits"):
        calibrate(NoLogits(img_size=16, patch_size=2, dim=32, depth=4, heads=2), data, data, 0.6, batch_size=8)


def test_a_class_count_unlike_the_heads_is_one_line(model):
    from spot_compile.calibration.trainer import calibrate
    from spot_compile.data.imageset import ImageSet

    data = ImageSet(torch.rand(16, 1, 16, 16), torch.randint(0, 3, (16,)), ("a", "b", "c"))
    with pytest.raises(DataError, match="the data has 3 classes but the model's head gives 10 logits"):
        calibrate(model, data, data, 0.6, batch_size=8)


def test_the_training_recipe_runs_no_code_from_its_init_checkpoint(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "train_dense.py"
    path, marker = _malicious_file(tmp_path)
    result = subprocess.run([sys.executable, str(recipe), "--init", str(path), "--out", str(tmp_path / "m.pt")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "refuses to unpickle" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_an_image_folder_without_torchvision_is_one_line(tmp_path):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision is installed (the oldest-torch run has none)")
    root = _image_folder(tmp_path / "data")
    result = CliRunner().invoke(main, ["calibrate", _write(tmp_path, MODEL_FILE), "--data", str(root), "--out",
                                       str(tmp_path / "p.pt"), "--val-size", "2"])
    _one_line_error(result, "reading an image folder needs torchvision")
