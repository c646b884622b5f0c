"""Tiny synthetic datasets for tests: 180-230 px scans, cropped to 192 px and cut into 25 tiles of 64 px."""

from __future__ import annotations

from pathlib import Path

from shardgen.__main__ import main as shardgen_main
from shardgen.synth import write_synthetic

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
