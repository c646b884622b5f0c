"""Typed training config: dataclasses loaded from YAML, overridable from the command line.

    cfg = load_config("u2net.yaml", ["optim.lr=3e-4", "data.batch_size=16"])

A bare name that is not a file resolves to the project's ``configs/``. Unknown keys and wrong types are
errors that name the key and list the valid ones: a typo must never silently do nothing.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shardgen.classes import CONFIG_DIR

from .augment import AugmentConfig, NormalizeConfig
from .losses import LossConfig


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    train: str = ""  # dataset root or manifest URL (local or s3://) of the training shards
    val: str = ""  # dataset root or manifest URL for validation; "" = same as train
    train_split: str = "train"  # split of `train` to train on
    val_split: str = "val"  # split of `val` to validate on
    batch_size: int = 8  # samples per rank per step (global batch = batch_size * world_size * accum)
    workers: int = 2  # DataLoader worker processes per rank
    shuffle_buffer: int = 200  # samples held for shuffling in each worker
    pin_memory: bool = True  # pinned host batches, copied with non_blocking (ignored on CPU)
    prefetch_factor: int = 2  # batches prefetched per worker
    io_retries: int = 6  # attempts to open/read a shard before giving up (exponential backoff)
    io_backoff: float = 0.5  # seconds before the first retry; doubles each time, capped at 30 s


@dataclass
class ModelConfig:
    name: str = "unet"  # unet | u2net | u2netp | resnet_unet
    kwargs: dict = field(default_factory=dict)  # passed to the model class, e.g. {channels: [16, 24, 32, 40, 48]}


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    schedule: str = "cosine"  # cosine (warmup, cosine decay) | plateau (ReduceLROnPlateau on val mIoU) | constant
    warmup_steps: int = 100  # linear warmup steps (cosine)
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    plateau_patience: int = 3  # validations without improvement before the LR drops (plateau)
    plateau_factor: float = 0.5  # LR multiplier on a plateau
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    accum_steps: int = 1  # micro-batches accumulated per optimizer step


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"  # checkpoints, config.yaml, metrics.csv, TensorBoard events (local or s3://)
    steps: int = 0  # optimizer steps; 0 = epochs * steps_per_epoch
    epochs: float = 20.0  # used when steps = 0; an epoch = train samples / global batch
    seed: int = 0  # same seed, same samples and same initial weights
    device: str = "auto"  # auto (cuda if available) | cuda | cpu
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | off
    channels_last: bool = False  # NHWC memory format (faster convs on tensor cores)
    compile: bool = False  # torch.compile the model
    log_every: int = 20  # steps between log lines
    val_every: int = 500  # steps between validations (also at the end)
    ckpt_every: int = 500  # steps between checkpoints (also at the end)
    resume: str = "auto"  # auto: continue from out_dir's latest checkpoint if any | none | a checkpoint path
    max_bad_steps: int = 5  # abort after this many NaN/inf losses in a row


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ------------------------------------------------------------------------------------------- loading


def _check(value, tp, where: str):
    """``value`` converted to type ``tp`` or a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (typing.Any,)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is typing.Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    raise ConfigError(f"{where}: unsupported config type {tp}")


def from_dict(cls, data, where: str = "config"):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(names)}")
    values = {k: _check(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except ValueError as e:  # a section's own validation (e.g. augment ranges)
        raise ConfigError(f"{where}: {e}") from None


def resolve_config_path(name: str) -> Path:
    """A path as given, else the same name (with .yaml added if missing) in the project's configs/."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{name}: no such config file (nor in {CONFIG_DIR})")


def _set(tree: dict, dotted: str, value) -> None:
    node, parts = tree, dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def load_config(name: str, overrides: list[str] = ()) -> Config:
    path = resolve_config_path(name)
    with open(path, encoding="utf-8") as f:
        try:
            tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        _set(tree, key.strip(), yaml.safe_load(text))
    return from_dict(Config, tree, str(path))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
