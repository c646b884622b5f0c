"""trainer.config: typos and wrong types are errors naming the key, bare names find configs/, overrides are
typed, and the resolved config written next to the checkpoints loads back to the same config."""

from __future__ import annotations

import dataclasses

import pytest

from shardgen.classes import CONFIG_DIR
from trainer import __main__ as cli
from trainer.config import Config, ConfigError, OptimConfig, load_config, resolve_config_path
from trainer.runlog import RunLog

SHIPPED = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if p.name != "classes.yaml")


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "run.yaml") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


# ---------------------------------------------------------------------------------------------- typos


@pytest.mark.parametrize(
    "text, overrides, key, valid",
    [
        ("optim:\n  lrr: 0.1\n", [], "'lrr'", "lr, weight_decay, betas"),
        ("optimizer:\n  lr: 0.1\n", [], "'optimizer'", "data, model, optim, loss, augment, normalize, train"),
        ("", ["optim.lrr=0.1"], "'lrr'", "lr, weight_decay, betas"),
        ("", ["optimm.lr=0.1"], "'optimm'", "data, model, optim"),
        ("", ["augment.hflip=0.1"], "'hflip'", "enabled, hflip_p, vflip_p"),
    ],
)
def test_unknown_key_names_it_and_lists_the_valid_ones(write, text, overrides, key, valid):
    with pytest.raises(ConfigError, match="unknown key") as e:
        load_config(write(text), overrides)
    assert key in str(e.value) and valid in str(e.value)


def test_typo_on_the_command_line_is_a_one_line_error(write, capsys):
    assert cli.main(["--config", write("train:\n  steps: 1\n"), "optim.lrr=3e-4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'lrr'" in err[0] and "valid keys: lr," in err[0]


@pytest.mark.parametrize(
    "text, where, expected",
    [
        ('data:\n  batch_size: "8"\n', "data.batch_size", "expected an integer, got '8'"),
        ("data:\n  batch_size: true\n", "data.batch_size", "expected an integer, got True"),
        ("data:\n  batch_size: 8.5\n", "data.batch_size", "expected an integer"),
        ("data:\n  pin_memory: 1\n", "data.pin_memory", "expected true/false"),
        ('optim:\n  lr: "3e-4"\n', "optim.lr", "expected a number, got '3e-4'"),
        ("optim:\n  lr: false\n", "optim.lr", "expected a number"),
        ("optim:\n  betas: 0.9\n", "optim.betas", "expected a list"),
        ("optim:\n  betas: [0.9, fast]\n", "optim.betas[1]", "expected a number"),
        ("data:\n  train: 5\n", "data.train", "expected a string"),
        ("model:\n  kwargs: [1, 2]\n", "model.kwargs", "expected a mapping"),
        ("optim: 3\n", "optim", "expected a mapping"),
    ],
)
def test_wrong_types_are_rejected(write, text, where, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(text))
    assert f"config.{where}: {expected}" in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.schedule=cosin", "schedule must be one of cosine, plateau, constant; got 'cosin'"),
        ("model.name=unet3", "name must be one of unet, u2net, u2netp, resnet_unet; got 'unet3'"),
        ("train.device=gpu", "device must be one of auto, cuda, cpu; got 'gpu'"),
        ("train.val_every=0", "val_every must be >= 1, got 0"),
        ("data.batch_size=0", "batch_size must be >= 1, got 0"),
        ("augment.hflip_p=1.5", "hflip_p must be a probability"),
        ("train.decision_beta=0", "decision_beta must be > 0, got 0"),
        ("train.decision_grow=-1", "decision_grow must be >= 0, got -1"),
        ("train.class_decision=object train.decision_grow=8", "class_decision: object does not grow"),
        ("loss.object_window=16", "object_window must be 0 or odd, got 16"),
        ("loss.form=both", "form must be one of ('joint', 'where_what'), got 'both'"),
        ("train.class_decision=component", "class_decision must be one of defect, object, pixel; got 'component'"),
    ],
)
def test_values_out_of_range_are_rejected(write, override, message):
    with pytest.raises(ConfigError, match="run.yaml") as e:
        load_config(write(""), override.split())
    assert message in str(e.value)


@pytest.mark.parametrize("override", ["optim.lr", "=3", "optim.lr=[1"])
def test_malformed_override_is_an_error(write, override):
    with pytest.raises(ConfigError, match="override"):
        load_config(write(""), [override])


def test_invalid_yaml_file_is_one_line_error(write):
    with pytest.raises(ConfigError, match="run.yaml: invalid YAML") as e:
        load_config(write("optim: [1\n"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write("- 1\n"))


# ------------------------------------------------------------------------------------- names and files


def test_bare_names_resolve_to_the_project_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the names must not depend on the working directory
    assert resolve_config_path("u2net.yaml") == CONFIG_DIR / "u2net.yaml"
    assert resolve_config_path("demo") == CONFIG_DIR / "demo.yaml"
    assert load_config("u2netp").model.name == "u2netp"
    (tmp_path / "demo.yaml").write_text("model:\n  name: u2net\n")
    assert load_config("demo.yaml").model.name == "u2net"  # a file that exists wins
    with pytest.raises(ConfigError, match="nosuch: no such config file"):
        resolve_config_path("nosuch")


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert cfg.data.train and cfg.train.out_dir
    assert cfg != Config()  # it says something


def test_shipped_configs_are_all_tested():
    assert {"demo.yaml", "u2net.yaml", "u2netp.yaml", "unet.yaml", "resnet_unet.yaml"} <= set(SHIPPED)


# ------------------------------------------------------------------------------------------- overrides


def test_overrides_apply_with_their_types():
    cfg = load_config("u2net.yaml", ["optim.lr=3e-4", "data.batch_size=16", "optim.betas=[0.8, 0.99]",
                                     "data.train=s3://bucket/ds", "model.kwargs={channels: [4, 6, 8, 10, 12]}",
                                     "train.channels_last=false", "optim.weight_decay=0"])  # fmt: skip
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 16 and isinstance(cfg.data.batch_size, int)
    assert cfg.optim.betas == [0.8, 0.99]
    assert cfg.data.train == "s3://bucket/ds"
    assert cfg.model.kwargs == {"channels": [4, 6, 8, 10, 12]}
    assert cfg.train.channels_last is False
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.model.name == "u2net" and cfg.train.out_dir == "runs/u2net"  # the rest from the file
    base = load_config("u2net.yaml")
    assert dataclasses.replace(cfg, data=base.data, optim=base.optim, model=base.model,
                               train=base.train) == base  # fmt: skip


def test_exponent_floats_without_a_dot_are_numbers_in_files_too(write):
    assert load_config(write("optim:\n  lr: 3e-4\n  min_lr_ratio: 1E-2\n")).optim == OptimConfig(
        lr=3e-4, min_lr_ratio=0.01
    )


def test_override_fills_an_empty_section(write):
    cfg = load_config(write("optim:\n  # lr: 0.1\ntrain:\n  steps: 5\n"), ["optim.lr=0.5"])
    assert cfg.optim.lr == 0.5 and cfg.train.steps == 5


def test_resolved_config_is_saved_next_to_checkpoints_and_reloads(tmp_path):
    out = tmp_path / "run"
    cfg = load_config("u2netp", ["optim.lr=3e-4", f"train.out_dir={out}", "model.kwargs={channels: [4, 6]}"])
    log = RunLog(cfg, total_steps=10, enabled=True)
    log.close(0)
    assert load_config(str(out / "config.yaml")) == cfg
