"""Everything a training run checks and builds before its first step: the datasets (checked against each
other and the config), the network, the optimizer and its schedule, and the run context (``RunState``)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from shardgen import schema, storage

from . import dist, runlog
from .augment import GpuAugment
from .config import Config, to_dict
from .data import rank_share
from .models import build_model
from .precision import autocast
from .state import RunState, TrainError, rank_seed


def lr_factor(step: int, total: int, cfg) -> float:
    """LR multiplier at ``step``: linear warmup, then cosine down to ``min_lr_ratio`` (or constant)."""
    if cfg.schedule != "cosine":
        return 1.0
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# What a separate validation set must share with the training set: anything else is scored against other
# labels (a binary set under a multiclass model reads every defect as Pinpoint) or other pixels.
SAME_DATASET_KEYS = ("classes", "mode", "channels", "tile", "image_size")


def check_val_dataset(train: dict, val: dict) -> None:
    """A separate ``data.val`` must be built like ``data.train``; the first difference is a one-line error."""
    for key in SAME_DATASET_KEYS:
        if val.get(key) != train.get(key):
            raise TrainError(
                f"data.val {val['_url']} has {key}={val.get(key)!r} but data.train {train['_url']} has "
                f"{key}={train.get(key)!r}; build both with the same options"
            )


def check_before_start(cfg: Config) -> None:
    """What would otherwise fail later as a traceback: a missing GPU, an out_dir that is a file."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device is cuda but no CUDA device is available (train.device: auto uses one where "
                         "there is one)")  # fmt: skip
    for key in ("out_dir", "tb_dir"):
        url = getattr(cfg.train, key)
        if url and storage.is_local(url) and Path(url).exists() and not Path(url).is_dir():
            raise TrainError(f"train.{key} {url} is a file, not a folder")


def load_datasets(cfg: Config, world: int) -> tuple[dict, dict, int, int]:
    """(train manifest, val manifest, train samples, val samples), checked before anything is built."""
    manifest = schema.read_manifest(cfg.data.train)
    val_manifest = manifest
    if cfg.data.val:
        val_manifest = schema.read_manifest(cfg.data.val)
        check_val_dataset(manifest, val_manifest)
    if cfg.data.crop > int(manifest["tile"]):
        raise TrainError(f"data.crop={cfg.data.crop} is larger than the {manifest['tile']} px tiles of "
                         f"{manifest['_url']}; set data.crop to at most {manifest['tile']} (0 = whole tiles)")
    n_train = schema.split_info(manifest, cfg.data.train_split)["samples"]
    if n_train == 0:
        raise TrainError(f"{manifest['_url']}: split {cfg.data.train_split!r} has no samples")
    n_val = schema.split_info(val_manifest, cfg.data.val_split)["samples"]
    if n_val == 0:
        raise TrainError(f"{val_manifest['_url']}: split {cfg.data.val_split!r} has no samples")
    # The last rank gets the fewest images; checking it on every rank makes all ranks fail alike.
    share = rank_share(val_manifest, cfg.data.val_split, world - 1, world)
    if share < cfg.data.batch_size:
        raise TrainError(
            f"{val_manifest['_url']}: rank {world - 1} of {world} validates {share} samples of split "
            f"{cfg.data.val_split!r}, fewer than data.batch_size={cfg.data.batch_size}; lower the batch size"
        )
    return manifest, val_manifest, n_train, n_val


def build_network(cfg: Config, channels: int, n_classes: int, device: torch.device) -> torch.nn.Module:
    try:
        model = build_model(cfg.model.name, channels, n_classes, **cfg.model.kwargs).to(device)
    except (TypeError, ValueError) as e:  # model.kwargs the model does not take, or values it rejects
        raise TrainError(f"model {cfg.model.name!r} with model.kwargs {cfg.model.kwargs}: {e}") from None
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def build_optimizer(cfg: Config, model: torch.nn.Module, total: int):
    """AdamW and its LR schedule: warmup + cosine over ``total`` steps, plateau on val mIoU, or constant."""
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    if o.schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=o.plateau_factor, patience=o.plateau_patience
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, o))
    return optimizer, scheduler


def build_run(cfg: Config, device: torch.device, manifest: dict, n_train: int) -> RunState:
    """The run's model (initial weights equal on every rank), augmentation, optimizer, schedule and autocast."""
    torch.manual_seed(cfg.train.seed)
    classes, binary = manifest["classes"], manifest["mode"] == "binary"
    n_classes = 1 if binary else len(classes)
    model = build_network(cfg, manifest["channels"], n_classes, device)
    torch.manual_seed(rank_seed(cfg.train.seed, dist.rank(), 0))
    global_batch = cfg.data.batch_size * dist.world_size() * cfg.optim.accum_steps
    total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * n_train / global_batch))
    optimizer, scheduler = build_optimizer(cfg, model, total)
    meta = {"model": cfg.model.name, "in_channels": manifest["channels"], "n_classes": n_classes,
            "classes": classes, "mode": manifest["mode"], "config": to_dict(cfg),
            "grid": {k: manifest[k] for k in ("image_size", "tile", "stride")},
            # the sha256 of each training scan: evaluate warns when it scores any of them
            "train_scans": schema.split_info(manifest, cfg.data.train_split).get("scans", [])}  # fmt: skip
    amp = autocast(device, cfg.train.amp)
    # What the steps really run in: a ``train.amp: bf16`` run on a CPU without native bf16 trains in fp32
    # (evaluate predicts a model in the precision it was trained in, evaluate.inference.Model.amp).
    meta["precision"] = "bf16" if isinstance(amp, torch.autocast) else "fp32"
    augment = GpuAugment(cfg.augment, cfg.normalize).to(device)
    names = runlog.RunLog.class_names(classes, binary)
    return RunState(cfg, device, model, optimizer, scheduler, meta, augment, amp, names, total)
