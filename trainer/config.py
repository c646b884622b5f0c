"""Typed training config: dataclasses loaded from YAML, overridable from the command line.

    cfg = load_config("u2net.yaml", ["optim.lr=3e-4", "data.batch_size=16"])

A bare name that is not a file resolves to the project's ``configs/``. Unknown keys and wrong types are
errors that name the key and list the valid ones: a typo must never silently do nothing.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shardgen.classes import CONFIG_DIR

from .augment import AugmentConfig, NormalizeConfig
from .losses import LossConfig
from .models import MODELS

SCHEDULES = ("cosine", "plateau", "constant")
# train.class_decision -> the trainer.decision.Decision kind it tunes
CLASS_DECISIONS = {"pixel": "tuned", "defect": "defect", "object": "objects"}
DEVICES = ("auto", "cuda", "cpu")
AMP_MODES = ("auto", "bf16", "off")


class ConfigError(ValueError):
    pass


def _at_least(section, low, *names) -> None:
    for name in names:
        if getattr(section, name) < low:
            raise ValueError(f"{name} must be >= {low}, got {getattr(section, name)}")


def _one_of(section, name: str, choices: tuple[str, ...]) -> None:
    if getattr(section, name) not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(section, name)!r}")


@dataclass
class DataConfig:
    train: str = ""  # dataset root or manifest URL (local or s3://) of the training shards
    val: str = ""  # dataset root or manifest URL for validation; "" = same as train
    train_split: str = "train"  # split of `train` to train on
    val_split: str = "val"  # split of `val` to validate on
    batch_size: int = 8  # samples per rank per step (global batch = batch_size * world_size * accum)
    workers: int = 2  # DataLoader worker processes per rank
    shuffle_buffer: int = 200  # samples held for shuffling in each worker (and per class in the defect pool)
    defect_share: float = 0.5  # share of each batch (in expectation) drawn from recent defect tiles, class-balanced
    crop: int = 0  # train on random crops of this side (0 = whole tiles); forced samples centre a defect
    pin_memory: bool = True  # pinned host batches, copied with non_blocking (ignored on CPU)
    prefetch_factor: int = 2  # batches prefetched per worker
    io_retries: int = 6  # attempts to open/read a shard before giving up (exponential backoff)
    io_backoff: float = 0.5  # seconds before the first retry; doubles each time, capped at 30 s

    def __post_init__(self) -> None:
        _at_least(self, 1, "batch_size", "shuffle_buffer", "prefetch_factor", "io_retries")
        _at_least(self, 0, "workers", "io_backoff", "crop")
        if not 0.0 <= self.defect_share <= 1.0:
            raise ValueError(f"defect_share must lie in [0, 1], got {self.defect_share}")


@dataclass
class ModelConfig:
    name: str = "unet"  # unet | u2net | u2netp | resnet_unet
    kwargs: dict = field(default_factory=dict)  # passed to the model class, e.g. {channels: [16, 24, 32, 40, 48]}

    def __post_init__(self) -> None:
        _one_of(self, "name", tuple(MODELS))


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

    def __post_init__(self) -> None:
        _one_of(self, "schedule", SCHEDULES)  # a typo here would otherwise train at a constant LR
        _at_least(self, 0, "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip")
        _at_least(self, 1, "accum_steps", "plateau_patience")
        if self.lr <= 0 or len(self.betas) != 2 or not 0 < self.plateau_factor < 1 or self.min_lr_ratio > 1:
            raise ValueError(f"need lr > 0, two betas, 0 < plateau_factor < 1 and min_lr_ratio <= 1; got lr "
                             f"{self.lr}, betas {self.betas}, plateau_factor {self.plateau_factor}, "
                             f"min_lr_ratio {self.min_lr_ratio}")
        if not all(0 <= b < 1 for b in self.betas):  # AdamW's own check would come later, as a traceback
            raise ValueError(f"betas must each lie in [0, 1), got {self.betas}")


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"  # checkpoints, config.yaml, metrics.csv, TensorBoard events (local or s3://)
    tb_dir: str = ""  # TensorBoard event folder (local or s3://); "" = {out_dir}/tb
    steps: int = 0  # optimizer steps; 0 = epochs * steps_per_epoch
    epochs: float = 20.0  # used when steps = 0; an epoch = train samples / global batch
    seed: int = 0  # same seed, same samples and same initial weights
    device: str = "auto"  # auto (cuda if available) | cuda | cpu
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 (also on a CPU with native bf16) | off
    channels_last: bool = False  # NHWC memory format (faster convs on tensor cores)
    compile: bool = False  # torch.compile the model
    log_every: int = 20  # steps between log lines
    val_every: int = 500  # steps between validations (also at the end)
    ckpt_every: int = 500  # steps between checkpoints (also at the end)
    resume: str = "auto"  # auto: continue from out_dir's latest checkpoint if any | none | a checkpoint path
    max_bad_steps: int = 5  # abort after this many NaN/inf losses in a row
    # At the end of a run, tune each checkpoint's per-class thresholds, minimum areas and peaks on the whole
    # scans of the validation split (evaluate.tune), and store them with it.
    tune_decision: bool = True
    # The F-beta of object recall and precision that picks them: 2 counts a missed defect as much as four
    # false alarms, the inspector's trade (a false alarm costs a glance, a miss ships).
    decision_beta: float = 2.0
    # Multiclass: "pixel" tunes a rule per class, per pixel, on the likeliest class's probability; "defect"
    # the same rules on the defect probability (1 - background's), the likeliest class naming the pixel;
    # "object" one threshold on the defect probability, each component taking the class of largest summed
    # probability, then per-class area and peak rules.
    class_decision: str = "pixel"
    # Per-pixel decisions: each kept defect grows up to this many pixels into its neighbours of its own
    # likeliest class whose deciding probability (the defect probability under class_decision: defect, the
    # class's own under pixel) reaches 0.5, never joining another (trainer.decision.grow); 0: the tuned rules'
    # pixels only. Not tuned: the rules are tuned without it; it changes outlines, not which components are
    # kept (an object's IoU, so whether it counts as found at IoU >= 0.1, may still move).
    decision_grow: int = 0

    def __post_init__(self) -> None:
        _one_of(self, "device", DEVICES)
        _one_of(self, "class_decision", tuple(sorted(CLASS_DECISIONS)))
        _one_of(self, "amp", AMP_MODES)
        _at_least(self, 0, "steps", "decision_grow")
        if self.decision_grow and self.class_decision == "object":
            raise ValueError(f"decision_grow grows the per-pixel decisions (class_decision: pixel or defect); "
                             f"class_decision: object does not grow, so set decision_grow to 0 "
                             f"(got {self.decision_grow})")
        if self.decision_beta <= 0:
            raise ValueError(f"train config: decision_beta must be > 0, got {self.decision_beta}")
        _at_least(self, 1, "log_every", "val_every", "ckpt_every", "max_bad_steps")
        if self.steps == 0 and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0 when steps is 0, got {self.epochs}")


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


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader with YAML 1.2 scalars: ``3e-4`` is a number (PyYAML follows YAML 1.1, where
    a float needs a dot, so ``optim.lr=3e-4`` would arrive as the string "3e-4"), and only true/false are
    booleans (YAML 1.1 also reads on/off/yes/no, so ``train.amp=off`` would arrive as False)."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _yaml(text):
    return yaml.load(text, Loader=_Loader)  # safe: a SafeLoader subclass


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
        if not math.isfinite(value):  # .inf, .nan: a learning rate or weight that trains a NaN model
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
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
        if node.get(part) is None:  # absent, or an empty section (``optim:`` with every key commented out)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def load_config(name: str, overrides: list[str] = ()) -> Config:
    path = resolve_config_path(name)
    with open(path, encoding="utf-8") as f:
        try:
            tree = _yaml(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {tree!r}")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            value = _yaml(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: invalid YAML value: {' '.join(str(e).split())}") from None
        _set(tree, key.strip(), value)
    return from_dict(Config, tree, f"{path}: config")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
