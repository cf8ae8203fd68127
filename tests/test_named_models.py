"""Models named instead of written: `timm:NAME` (random init, or `--checkpoint FILE`'s weights) and `hf:DIR` (a local
save_pretrained folder), wherever a command takes a model file, with one-line errors as for model files."""

import pytest
import torch
from click.testing import CliRunner

from spot_compile.cli.main import main
from spot_compile.cli.userfile import load_model_file
from spot_compile.errors import CheckpointError, ModelFileError


def test_a_timm_name_builds_its_architecture_and_takes_a_checkpoints_weights(tmp_path):
    timm = pytest.importorskip("timm")
    model = load_model_file("timm:test_vit")
    assert isinstance(model, timm.models.VisionTransformer) and not model.training
    torch.manual_seed(5)
    trained = timm.create_model("test_vit", pretrained=False)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "w.pt")
    loaded = load_model_file("timm:test_vit", checkpoint=tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="does not hold timm test_vit's weights"):
        load_model_file("timm:test_vit", checkpoint=tmp_path / "other.pt")


def test_the_cli_inspects_a_named_timm_model_and_a_local_hf_folder(tmp_path):
    pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    result = CliRunner().invoke(main, ["inspect", "timm:test_vit"])
    assert result.exit_code == 0 and "blocks" in result.output.lower(), result.output
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, num_labels=3)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "hf")
    result = CliRunner().invoke(main, ["inspect", f"hf:{tmp_path / 'hf'}"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("source,kwargs,error,message", [
    ("timm:not_a_model", {}, ModelFileError, "timm has no model 'not_a_model'"),
    ("hf:/nowhere", {}, ModelFileError, "is not a folder written by save_pretrained"),
    ("deit_tiny_patch16_224", {}, ModelFileError, "to name a model, write timm:deit_tiny_patch16_224"),
    ("timm:test_vit", {"checkpoint": "/nowhere.pt"}, CheckpointError, "checkpoint not found"),
], ids=["unknown-timm-name", "no-hf-folder", "a-bare-name", "missing-checkpoint"])
def test_a_name_that_names_nothing_is_one_line(source, kwargs, error, message):
    if source.startswith("timm:"):
        pytest.importorskip("timm")
    with pytest.raises(error, match=message):
        load_model_file(source, **kwargs)
