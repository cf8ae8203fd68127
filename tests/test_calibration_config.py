"""`CalibrationConfig`: one description of a calibration, built alike by the API, the old flat keywords and the CLI;
and the seed that it carries reaching the predictors' initialisation and the exploration noise."""

import pytest
import torch
from click.testing import CliRunner

import spot_compile as sc
from spot_compile.calibration import trainer
from spot_compile.calibration.config import FLAT_FIELDS, CalibrationConfig, FineTune, Optimization
from spot_compile.data.imageset import ImageSet
from spot_compile.errors import UsageError

from .conftest import small_vit


def _data():
    torch.manual_seed(3)
    train = ImageSet(torch.rand(16, 1, 16, 16), torch.randint(0, 10, (16,)), tuple("0123456789"))
    return train, train.subset(torch.arange(4))


def test_flat_settings_and_the_nested_config_are_one_config():
    flat = CalibrationConfig.from_flat(budget=0.5, epochs=3, finetune=True, finetune_graph="calibration", keep_ratio_weight=1.0,
                                       out="p.pt", mask_gradient="full")
    nested = CalibrationConfig(budget=0.5, optim=Optimization(epochs=3), finetune=FineTune(enabled=True, graph="calibration"),
                               loss=sc.CalibrationConfig().loss.__class__(keep_ratio=1.0),
                               run=CalibrationConfig().run.__class__(out="p.pt"),
                               experimental=CalibrationConfig().experimental.__class__(mask_gradient="full"))
    assert flat == nested and flat.to_dict() == nested.to_dict()
    assert flat.finetune.joint and not flat.finetune.after and flat.phases == ("calibrate",)
    # every flat name lands in a field of its group
    for name, (group, attr) in FLAT_FIELDS.items():
        assert hasattr(getattr(CalibrationConfig(), group) if group else CalibrationConfig(), attr), name


def test_a_config_is_frozen_and_changed_only_by_making_another():
    config = CalibrationConfig()
    with pytest.raises(AttributeError):
        config.budget = 0.3
    changed = config.with_flat(finetune=True, backbone_lr=1e-3)
    assert changed.finetune == FineTune(enabled=True, backbone_lr=1e-3) and config.finetune == FineTune()
    # settings checked together change together: a frozen backbone without its fine-tune graph
    assert not changed.with_flat(finetune=False, finetune_graph=None).finetune.enabled


@pytest.mark.parametrize("settings,message", [
    (dict(epoch=2), "unknown calibration setting(s) epoch"),
    (dict(lr=float("nan")), "lr must be a finite number > 0"),
    (dict(keep_ratio_weight=float("inf")), "keep_ratio_weight must be a finite number >= 0"),
    (dict(logit_distill=-1), "logit_distill must be a finite number >= 0"),
    (dict(precision="fp16"), "unknown precision 'fp16'"),
    (dict(seed=1.5), "seed must be a whole number"),
], ids=["unknown-name", "nan-lr", "inf-weight", "negative-weight", "unknown-precision", "fractional-seed"])
def test_a_setting_out_of_its_range_is_one_line_when_the_config_is_made(settings, message):
    with pytest.raises(UsageError) as refused:
        CalibrationConfig.from_flat(**settings)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_old_flat_call_still_calibrates_and_equals_the_config_call():
    train, val = _data()
    args = dict(budget=0.6, epochs=1, batch_size=4, compile=False, max_steps=2)
    with pytest.warns(DeprecationWarning, match="CalibrationConfig"):
        old = trainer.calibrate(small_vit(), train, val, **args)
    new = sc.calibrate(small_vit(), train, val, CalibrationConfig.from_flat(**args))
    assert old.history == new.history
    for s in old.checkpoint.predictors:
        a, b = old.checkpoint.predictors[s].state_dict(), new.checkpoint.predictors[s].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UsageError, match="not beside it"):
        sc.calibrate(small_vit(), train, val, CalibrationConfig(), epochs=2)


def test_the_seed_moves_the_predictors_initialisation_and_the_exploration_noise(monkeypatch):
    train, val = _data()
    runs = []  # per run: (the predictors as made, the first uniform draw: the first stage's Gumbel noise)
    real_make, real_rand = trainer.make_predictors, torch.rand_like

    def recording_make(*a, **kw):
        made = real_make(*a, **kw)
        runs.append([{f"{s}.{k}": v.clone() for s, p in made.items() for k, v in p.state_dict().items()}])
        return made

    def recording_rand(x, *a, **kw):
        u = real_rand(x, *a, **kw)
        if len(runs[-1]) == 1 and type(u) is torch.Tensor:  # a real draw, not shape propagation's fake one
            runs[-1].append(u.clone())
        return u

    monkeypatch.setattr(trainer, "make_predictors", recording_make)
    monkeypatch.setattr(torch, "rand_like", recording_rand)
    for seed in (0, 1, 0):
        sc.calibrate(small_vit(), train, val, CalibrationConfig.from_flat(budget=0.6, batch_size=4, max_steps=1, compile=False, seed=seed))
    (init_0, noise_0), (init_1, noise_1), (init_again, noise_again) = runs
    assert all(torch.equal(init_0[k], init_again[k]) for k in init_0) and torch.equal(noise_0, noise_again)
    assert any(not torch.equal(init_0[k], init_1[k]) for k in init_0), "seed 1 initialised the predictors as seed 0"
    assert not torch.equal(noise_0, noise_1), "seed 1 drew the exploration noise of seed 0"


def test_the_cli_calibrates_with_the_apis_defaults():
    from spot_compile.cli.main import main

    options = {p.name: p.default for p in main.commands["calibrate"].params}
    defaults = CalibrationConfig()
    assert options["epochs"] == defaults.optim.epochs and options["batch_size"] == defaults.optim.batch_size
    assert options["lr"] == defaults.optim.lr and options["keep_ratio_weight"] == defaults.loss.keep_ratio
    assert options["precision"] == defaults.run.precision and options["budget"] == defaults.budget


def test_stages_help_names_each_policys_default():
    from spot_compile.cli.main import main

    text = CliRunner().invoke(main, ["apply", "--help"], terminal_width=400).output
    assert "merge: every block after the first" in " ".join(text.split())
    assert "class-attention: the blocks at 1/4, 1/2 and 3/4 of the depth" in " ".join(text.split())


def test_a_calibration_says_how_few_steps_it_has_and_what_the_dense_model_scores():
    import io

    from rich.console import Console

    train, val = _data()
    printed = io.StringIO()
    result = sc.calibrate(small_vit(), train, val, CalibrationConfig.from_flat(budget=0.6, batch_size=4, max_steps=2, compile=False),
                          console=Console(file=printed, width=300))
    text = printed.getvalue()
    assert "warning: 2 optimizer steps per phase (16 training images, batch 4 x 1 process(es), 1 epoch(s))" in text
    dense = result.checkpoint.metrics["dense_val_top1"]
    assert f"validation top-1 of the dense model: {dense:.2f}%" in text and f"dense model {dense:.2f}%" in text


def test_the_log_the_jsonl_and_the_table_count_epochs_within_their_named_phase(tmp_path):
    import io
    import json

    from rich.console import Console

    train, val = _data()
    printed = io.StringIO()
    out = tmp_path / "p.pt"
    config = CalibrationConfig.from_flat(budget=0.6, batch_size=8, epochs=2, finetune=True, compile=False, out=str(out))
    result = sc.calibrate(small_vit(), train, val, config, console=Console(file=printed, width=300))
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    steps = [(r["phase"], r["epoch"]) for r in records if "step" in r and "validation" not in r]
    assert steps == [("calibrate", 1), ("calibrate", 1), ("calibrate", 2), ("calibrate", 2),
                     ("tune", 1), ("tune", 1), ("tune", 2), ("tune", 2)]
    ends = [(r["validation"]["phase"], r["validation"]["epoch"]) for r in records if "validation" in r]
    assert ends == [("calibrate", 1), ("calibrate", 2), ("tune", 1), ("tune", 2)]
    assert [(r["phase"], r["epoch"]) for r in result.history] == ends
    text = printed.getvalue()
    assert "epoch 2: loss" in text and "tune epoch 1: loss" in text and "tune 1" not in text
