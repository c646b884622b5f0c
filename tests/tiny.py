"""Tiny synthetic datasets for tests: 180-230 px scans, cropped to 192 px and cut into 25 tiles of 64 px."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from shardgen import schema
from shardgen.__main__ import main as shardgen_main
from shardgen.synth import write_synthetic

NARROW = {"channels": [4, 6, 8, 10, 12]}  # a U-Net narrow enough for CPU tests
TINY_GRID = ["--image-size", "192", "--tile", "64", "--stride", "32"]


def build_tiny(tmp: Path, images: int, *, seed: int = 0, shard_size: int = 75,
               ratios: str = "train=0.5,val=0.25,test=0.25", out: str | None = None) -> str:  # fmt: skip
    """Write ``images`` synthetic scans under ``tmp/raw`` and build them into ``out`` (default ``tmp/shards``)."""
    raw = tmp / "raw"
    write_synthetic(raw, images, seed=seed, size_range=(180, 230))
    out = out or str(tmp / "shards")
    rc = shardgen_main(["build", "--annotations", str(raw / "annotations"), "--images", str(raw / "images"),
                        "--out", out, *TINY_GRID, "--shard-size", str(shard_size), "--split-ratios", ratios,
                        "--quiet"])  # fmt: skip
    assert rc == 0
    return out


def write_config(path: Path, shards: str, out: Path, **sections) -> str:
    """A tiny CPU run: narrow U-Net, batch 4, no DataLoader workers; ``sections`` update the defaults."""
    cfg = {
        "data": {"train": shards, "batch_size": 4, "workers": 0, "shuffle_buffer": 20, "pin_memory": False},
        "model": {"name": "unet", "kwargs": NARROW},
        "optim": {"lr": 0.01, "warmup_steps": 2},
        "train": {"out_dir": str(out), "steps": 4, "device": "cpu", "log_every": 2, "val_every": 2,
                  "ckpt_every": 2},  # fmt: skip
    }
    for name, values in sections.items():
        cfg[name].update(values)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def scored_pixels(shards: str, split: str) -> int:
    """Pixels that are not 255 in every mask of ``split``, read straight from the tar files."""
    total = 0
    for url in schema.shard_urls(schema.read_manifest(shards), split):
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".mask.png"):
                    total += int((np.asarray(Image.open(tar.extractfile(m))) != 255).sum())
    return total


def tb_scalars(folder: Path) -> dict[str, list[int]]:
    """The steps of every scalar tag in the TensorBoard event files of ``folder``, read by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def fixed_batch_losses(model, loss_fn, x, y, lr: float, steps: int, ctx=None) -> list[float]:
    """The loss of each of ``steps`` AdamW steps on one fixed batch (under ``ctx``, an autocast, if given):
    the smallest check that a model and loss can learn at all."""
    import contextlib

    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        with ctx or contextlib.nullcontext():
            loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
