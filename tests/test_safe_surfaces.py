"""The newer surfaces, tried as a careful user and a security reviewer would: writes that cannot be redirected by a
planted link nor left half done, a full disk named as such, resume that checks every setting, one run per `--out`,
and inputs that are what they seem. Each ends in one clear line, a correct result or a refusal."""

import errno
import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import spot_compile as sc
from spot_compile.calibration.config import CalibrationConfig
from spot_compile.cli.main import main
from spot_compile.data.imageset import ImageSet
from spot_compile.errors import BudgetError, CheckpointError, DataError, InputSizeError, ModelFileError, OutputPathError, UsageError
from spot_compile.serialization import files

from .conftest import small_vit


def _data(n=16, seed=3):
    torch.manual_seed(seed)
    train = ImageSet(torch.rand(n, 1, 16, 16), torch.randint(0, 10, (n,)), tuple("0123456789"))
    return train, train.subset(torch.arange(4))


def _config(**settings):
    return CalibrationConfig.from_flat(**{"budget": 0.6, "batch_size": 4, "compile": False, **settings})


# --- writes ----------------------------------------------------------------------------------------------------------

def test_a_link_planted_where_the_temporary_file_would_be_is_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "shared.pt"
    # the name the atomic write used to take: .NAME.<pid>.tmp
    os.symlink(victim, tmp_path / f".shared.pt.{os.getpid()}.tmp")
    model = small_vit()
    sc.save(sc.sparsify(model, sc.SparsifyConfig(budget=0.6)), model, out)
    assert victim.read_text() == "precious" and out.is_file() and not out.is_symlink()
    assert sc.load(out, model).plan.flops_ratio <= 0.6


def test_an_output_given_as_a_link_is_refused_in_one_line(tmp_path):
    target = tmp_path / "elsewhere.pt"
    link = tmp_path / "out.pt"
    os.symlink(target, link)  # dangling: the check must not create its target
    with pytest.raises(OutputPathError, match="is a symbolic link"):
        files.check_writable_file(link, "--out")
    assert not target.exists()
    with pytest.raises(OutputPathError, match="is a symbolic link"):
        files.save_atomically({"a": 1}, link, "--out")
    assert not target.exists()


def test_the_calibration_log_is_not_opened_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "p.pt"
    os.symlink(victim, out.with_suffix(".jsonl"))
    train, val = _data()
    with pytest.raises(OutputPathError, match="symbolic link"):
        sc.calibrate(small_vit(), train, val, _config(max_steps=1, out=out))
    assert victim.read_text() == "precious"
    assert not out.with_suffix(".lock").exists(), "a refused run left its lock behind"


def test_temporary_files_of_a_killed_run_are_removed_and_a_living_ones_kept(tmp_path):
    out = tmp_path / "out.pt"
    dead = tmp_path / ".out.pt.999999999.abcd.tmp"  # no such process
    alive = tmp_path / f".out.pt.{os.getppid()}.efgh.tmp"  # the test runner's parent: running
    dead.write_bytes(b"")
    alive.write_bytes(b"")
    files.save_atomically({"a": 1}, out, "--out")
    assert not dead.exists() and alive.exists() and torch.load(out, weights_only=True) == {"a": 1}


def test_a_full_disk_is_named_and_the_old_file_kept(tmp_path, monkeypatch):
    out = tmp_path / "out.pt"
    files.save_atomically({"old": 1}, out, "--out")

    def no_space(obj, f, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OutputPathError, match="no space left on device"):
        files.save_atomically({"new": 2}, out, "--out")
    monkeypatch.undo()
    assert torch.load(out, weights_only=True) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"], "a temporary file was left"
    monkeypatch.setattr(files, "_free_bytes", lambda directory: 0)  # the up-front check on a full disk
    with pytest.raises(OutputPathError, match="no space left on device"):
        files.check_writable_file(tmp_path / "new.pt", "--out")


# --- resume ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,named", [
    (dict(seed=1), "optim.seed: 0 there, 1 here"), (dict(max_steps=1), "optim.max_steps: 4 there, 1 here"),
    (dict(lr=1e-2), "optim.lr: 0.003 there, 0.01 here"), (dict(logit_distill=0.0), "loss.logit_distill: 0.5 there, 0.0 here"),
    (dict(data_seed=4), "training images: "),
], ids=["seed", "max-steps-below-the-partial", "lr", "distillation", "other-data"])
def test_a_partial_is_resumed_only_with_every_setting_it_was_made_with(tmp_path, monkeypatch, change, named):
    from spot_compile.calibration import trainer

    out = tmp_path / "p.pt"
    train, val = _data()
    real_lr = trainer.cosine_lr

    def dies_at_step(step, *a, **kw):
        if step == 2:
            raise KeyboardInterrupt
        return real_lr(step, *a, **kw)

    monkeypatch.setattr(trainer, "cosine_lr", dies_at_step)
    with pytest.raises(KeyboardInterrupt):
        sc.calibrate(small_vit(), train, val, _config(max_steps=4, out=out, save_every=1))
    monkeypatch.setattr(trainer, "cosine_lr", real_lr)
    assert out.with_suffix(".partial").exists() and not out.with_suffix(".lock").exists()
    data_seed = change.pop("data_seed", None)
    if data_seed is not None:
        train, val = _data(seed=data_seed)
    with pytest.raises(CheckpointError) as refused:
        sc.calibrate(small_vit(), train, val, _config(max_steps=4, out=out, save_every=1).with_flat(**change))
    message = str(refused.value)
    assert named in message and "\n" not in message, message


def test_a_second_run_on_the_same_out_is_refused_while_the_first_lives(tmp_path):
    out = tmp_path / "p.pt"
    out.with_suffix(".lock").write_text(str(os.getppid()))  # a living process holds it
    train, val = _data()
    with pytest.raises(UsageError, match=f"another calibration \\(pid {os.getppid()}\\) is writing"):
        sc.calibrate(small_vit(), train, val, _config(max_steps=1, out=out))
    out.with_suffix(".lock").write_text("999999999")  # a killed run's: taken over
    sc.calibrate(small_vit(), train, val, _config(max_steps=1, out=out))
    assert out.exists() and not out.with_suffix(".lock").exists()


def test_a_damaged_partial_says_to_delete_it(tmp_path):
    out = tmp_path / "p.pt"
    out.with_suffix(".partial").write_bytes(b"not a checkpoint")
    train, val = _data()
    with pytest.raises(CheckpointError, match="delete it to start afresh"):
        sc.calibrate(small_vit(), train, val, _config(max_steps=1, out=out))


def test_an_unreachable_rank_budget_is_named_as_such():
    train, val = _data()
    with pytest.raises(BudgetError, match=r"^--rank-budget 0\.01: "):
        sc.calibrate(small_vit(), train, val, _config(max_steps=1, rank_budget=0.01))


# --- inputs ----------------------------------------------------------------------------------------------------------

def test_images_of_16_bit_and_float_modes_are_read_by_their_real_range(tmp_path):
    from spot_compile.data.images import to_tensor

    deep = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # a 16-bit PNG, as a scanner writes it
    with Image.open(tmp_path / "deep.png") as image:
        t = to_tensor(image, 1)
    np.testing.assert_allclose(t[0].numpy(), deep / 65535.0, rtol=1e-6)
    floats = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(to_tensor(Image.fromarray(floats), 1)[0].numpy(), floats)
    with pytest.raises(DataError, match="floating-point image with values outside"):
        to_tensor(Image.fromarray(floats * 255), 1)
    palette = Image.new("P", (2, 2))
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.putdata([0, 1, 1, 0])
    np.testing.assert_allclose(to_tensor(palette, 1)[0].numpy(), [[0, 1], [1, 0]])


def test_a_directory_loop_in_a_data_tree_is_refused(tmp_path):
    from spot_compile.data.images import image_folder

    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a" / "0.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    with pytest.raises(DataError, match="a link to a directory the tree already holds"):
        image_folder(tmp_path, 1)


def _idx(path, array, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_idx_labels_that_index_no_class_and_pixels_that_are_not_bytes_are_refused(tmp_path):
    from spot_compile.data.idx import IdxImages

    _idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 4, 4), np.uint8))
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, -1, 2], np.int8), 0x09)
    with pytest.raises(DataError, match="labels must be class indices"):
        IdxImages(tmp_path, "train")
    _idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 4, 4), ">i2"), 0x0B)
    with pytest.raises(DataError, match="spot-compile reads 8-bit"):
        IdxImages(tmp_path, "train")


def test_logits_are_found_by_name_before_position():
    from spot_compile.measure.accuracy import logits_of

    pooled, logits = torch.zeros(2, 8), torch.ones(2, 10)
    assert logits_of({"pooled": pooled, "logits": logits}) is logits


@pytest.mark.parametrize("source,message", [
    ("import sys\nsys.exit(0)\n", r"called sys\.exit\(0\)"),
    ("model = 3\n", "`model` in .* is a int, not an nn.Module"),
], ids=["exits", "model-is-a-number"])
def test_a_model_file_that_is_not_what_it_seems_is_one_line(tmp_path, source, message):
    from spot_compile.cli.userfile import load_model_file

    path = tmp_path / "m.py"
    path.write_text(source)
    with pytest.raises(ModelFileError, match=message):
        load_model_file(path)


@pytest.mark.parametrize("call,message", [
    (lambda m: sc.sparsify(None), "sparsify takes an nn.Module, got a NoneType"),
    (lambda m: sc.sparsify("m/vit.py"), "spot-compile apply FILE"),
    (lambda m: sc.sparsify(m, 0.6), r"sparsify\(model, SparsifyConfig\(budget=0.6\)\)"),
], ids=["none", "a-path", "a-bare-budget"])
def test_sparsify_says_what_it_takes(call, message):
    with pytest.raises(UsageError, match=message):
        call(small_vit())


def test_an_empty_batch_is_one_line():
    sparse = sc.sparsify(small_vit(), sc.SparsifyConfig(budget=0.6))
    with pytest.raises(InputSizeError, match="the batch is empty"):
        sparse(torch.randn(0, 1, 16, 16))


def test_a_crafted_artifact_and_a_missing_plug_in_are_named(tmp_path):
    model = small_vit()
    out = tmp_path / "s.pt"
    sc.save(sc.sparsify(model, sc.SparsifyConfig(budget=0.6)), model, out)
    data = torch.load(out, weights_only=True)
    torch.save({**data, "scorers": [1]}, tmp_path / "crafted.pt")
    with pytest.raises(CheckpointError, match="scorer weights are no state dicts"):
        sc.load(tmp_path / "crafted.pt", model)
    config = json.loads(data["config"])
    torch.save({**data, "config": json.dumps({**config, "policy": "someone-elses"})}, tmp_path / "plugin.pt")
    with pytest.raises(CheckpointError, match="token policy 'someone-elses', which is not installed here"):
        sc.load(tmp_path / "plugin.pt", model)


def test_nan_predictors_are_refused(tmp_path):
    train, val = _data()
    out = tmp_path / "p.pt"
    sc.calibrate(small_vit(), train, val, _config(max_steps=1, out=out))
    data = torch.load(out, weights_only=True)
    stage = next(iter(data["state"]))
    key = next(iter(data["state"][stage]))
    data["state"][stage][key] = torch.full_like(data["state"][stage][key], float("nan"))
    torch.save(data, out)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        sc.sparsify(small_vit(), sc.SparsifyConfig(budget=0.6, policy="spot", predictors=str(out)))


def test_predictors_with_a_policy_that_reads_none_are_refused():
    with pytest.raises(BudgetError, match="read by policy 'spot', not by 'merge'"):
        sc.SparsifyConfig(policy="merge", predictors="p.pt")


@pytest.mark.parametrize("args,message", [
    (["bench", "MODEL", "--modes", "eager,cudagraphs"], "needs --device cuda"),
    (["apply", "MODEL", "--std", "nan", "--mean", "0.5", "--data", "DATA"], "must be finite numbers"),
    (["calibrate", "MODEL", "--data", "DATA", "--out", "OUT", "--keep-ratio-weight", "nan"], "keep_ratio_weight must be a finite number"),
    (["calibrate", "MODEL", "--data", "DATA", "--out", "OUT", "--lr", "-1"], "lr must be a finite number > 0"),
    (["demo", "--limit", "-1"], "Invalid value for '--limit'"),
], ids=["cudagraphs-on-cpu", "nan-std", "nan-weight", "negative-lr", "negative-limit"])
def test_the_cli_refuses_these_in_one_line_before_the_slow_work(tmp_path, args, message):
    model = tmp_path / "m.py"
    model.write_text("from spot_compile.models.vit import ViT\nmodel = ViT(img_size=16, patch_size=2, dim=32, depth=4, heads=2)\n")
    (tmp_path / "data" / "a").mkdir(parents=True)
    names = {"MODEL": str(model), "DATA": str(tmp_path / "data"), "OUT": str(tmp_path / "p.pt")}
    result = CliRunner().invoke(main, [names.get(a, a) for a in args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


# --- saved models, self-contained ------------------------------------------------------------------------------------

def test_a_saved_spot_model_carries_its_predictors_and_tuned_backbone(tmp_path, monkeypatch):
    train, val = _data(n=24)
    predictors = tmp_path / "p.pt"
    model = small_vit()
    sc.calibrate(model, train, val, _config(max_steps=2, out=predictors, finetune=True, backbone_lr=1e-2))
    user_model = small_vit()  # the user's model: the tuned backbone lives in the predictor file only
    sparse = sc.sparsify(user_model, sc.SparsifyConfig(budget=0.6, policy="spot", predictors=str(predictors)))
    sc.save(sparse, user_model, tmp_path / "s.pt")
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = sparse(x)
    # another calibration now lies at the path the artifact names, and the loader runs from another directory
    sc.calibrate(small_vit(), *_data(n=24, seed=9), _config(max_steps=2, out=predictors, finetune=True, backbone_lr=5e-2, seed=4))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = sc.load(tmp_path / "s.pt", small_vit())
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    predictors.unlink()  # and without the file at all, saved again and loaded again
    sc.save(loaded, small_vit(), tmp_path / "again.pt")
    with torch.no_grad():
        assert torch.equal(sc.load(tmp_path / "again.pt", small_vit())(x), expected)
    record = torch.load(tmp_path / "s.pt", weights_only=True)["predictors"]
    assert "backbone" not in record and 0 < len(record["backbone_diff"]) <= len(small_vit().state_dict())


def test_calibrating_a_model_that_is_not_float32_is_one_line_before_the_capture():
    train, val = _data()
    with pytest.raises(UsageError, match="calibrate trains a float32 model"):
        sc.calibrate(small_vit().to(torch.bfloat16), train, val, _config(max_steps=1))


def test_token_maps_with_fused_tokens_are_refused_up_front(tmp_path):
    model = tmp_path / "m.py"
    model.write_text("from spot_compile.models.vit import ViT\nmodel = ViT(img_size=16, patch_size=2, dim=32, depth=4, heads=2)\n")
    result = CliRunner().invoke(main, ["apply", str(model), "--policy", "class-attention", "--fuse", "--data", str(tmp_path),
                                       "--token-maps", str(tmp_path / "maps.png")])
    assert result.exit_code == 2 and "drop --fuse for the maps" in " ".join(result.output.split()), result.output


def test_a_raw_pickle_of_any_protocol_gets_spot_compiles_line_not_torchs_advice(tmp_path):
    import pickle

    for protocol in (2, 4, 5):
        path = tmp_path / f"raw{protocol}.pt"
        path.write_bytes(pickle.dumps({"weights": object()}, protocol=protocol))
        with pytest.raises(CheckpointError) as refused:
            sc.load(path, small_vit())
        assert "weights_only" not in str(refused.value) and "\n" not in str(refused.value)


def test_train_and_val_class_folders_that_differ_are_named(tmp_path):
    from spot_compile.data.datasets import training_datasets

    for split, classes in (("train", "abc"), ("val", "abd")):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / split / c / "0.png")
    with pytest.raises(DataError, match="only in train/: c; only in val/: d"):
        training_datasets(tmp_path, 1)


def test_an_infinite_coverage_weight_is_refused():
    result = CliRunner().invoke(main, ["calibrate", "m.py", "--data", ".", "--out", "p.pt", "--coverage", "inf"])
    assert result.exit_code == 2 and "and finite" in result.output, result.output


def test_save_called_as_users_guess_it_names_the_right_call(tmp_path):
    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6))
    with pytest.raises(UsageError, match=r"spot_compile\.save\(sparse, model, 'sparse\.pt'\) \(got a PosixPath as the model\)"):
        sc.save(sparse, tmp_path / "s.pt")


def test_reading_an_image_file_raises_no_warning(tmp_path, recwarn):
    from spot_compile.data.images import ImageLoader

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "0.png")
    ImageLoader(1)(str(tmp_path / "0.png"))
    assert not [w for w in recwarn.list if "writable" in str(w.message)]


def test_images_per_class_are_counted_from_the_labels_of_every_kind_of_data(tmp_path):
    from spot_compile.data.datasets import training_datasets
    from spot_compile.data.imageset import as_dataset, images_per_class

    for c, n in (("cat", 3), ("dog", 5)):
        (tmp_path / "tree" / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "tree" / c / f"{i}.png")
    train, val = training_datasets(tmp_path / "tree", 2)
    together = {k: images_per_class(train).get(k, 0) + images_per_class(val).get(k, 0) for k in ("cat", "dog")}
    assert together == {"cat": 3, "dog": 5} and sum(images_per_class(train).values()) == 6
    memory = ImageSet(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 1, 1]), ("a", "b"))
    assert images_per_class(as_dataset(memory)) == {"a": 1, "b": 3}


def test_the_dense_recipe_refuses_a_bad_partial_in_one_line(tmp_path):
    import subprocess
    import sys

    from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR

    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    out = tmp_path / "m.pt"
    out.with_suffix(".partial").write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "recipes.train_dense", "--out", str(out), "--epochs", "1", "--amp", "off"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().startswith("error:") and "delete" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
