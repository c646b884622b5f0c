"""Helpers shared by several test modules: tiny synthetic datasets and training configs, byte-exact writers of
scans Pillow cannot write, hand-made scans and CVAT XML for ``shardgen build``, hand-made class maps and their
CVAT shapes, and evaluate's tiny dataset with a trained checkpoint."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import webdataset as wds
import yaml
from PIL import Image

from evaluate.contours import ShapeOptions
from shardgen import schema
from shardgen.__main__ import main as shardgen_main
from shardgen.build import BuildOptions, build
from shardgen.classes import ClassMap
from shardgen.cvat import parse_cvat
from shardgen.raster import rasterize
from shardgen.synth import write_synthetic
from shardgen.tiling import TileGrid

# ------------------------------------------------------------------ tiny synthetic datasets for training
# 180-230 px scans, cropped to 192 px and cut into 25 tiles of 64 px.

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


# ---------------------------------------------------------------------------- 16-bit and huge scan files
# Scans Pillow cannot write: 16-bit-per-channel PNG and TIFF (48-bit RGB, 64-bit RGBA, 32-bit grey+alpha), byte
# for byte as the specifications lay them out, so tests can feed them to the reader.

PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of (H, W) or (H, W, C) uint16 values. Rows use the Sub filter, which depends on the bytes
    per pixel, so a reader that unfilters with the wrong pixel size gets other values."""
    a = pixels if pixels.ndim == 3 else pixels[..., None]
    h, w, c = a.shape
    bpp = 2 * c
    rows = []
    for row in a:
        raw = np.frombuffer(row.astype(">u2").tobytes(), np.uint8).astype(np.int16)
        sub = raw.copy()
        sub[bpp:] = (raw[bpp:] - raw[:-bpp]) % 256
        rows.append(b"\x01" + sub.astype(np.uint8).tobytes())
    header = struct.pack(">IIBBBBB", w, h, 16, PNG_COLOUR_TYPES[c], 0, 0, 0)
    body = _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def tiff16(pixels: np.ndarray, big_endian: bool = False, deflate: bool = False) -> bytes:
    """A one-strip 16-bit RGB TIFF of (H, W, 3) uint16 values, uncompressed or Adobe deflate."""
    h, w, c = pixels.shape
    e = ">" if big_endian else "<"
    data = pixels.astype(e + "u2").tobytes()
    data = zlib.compress(data) if deflate else data
    n_tags = 10
    bits_at = 8 + 2 + 12 * n_tags + 4  # BitsPerSample values follow the IFD, then the strip
    strip_at = bits_at + 2 * c
    tags = [  # (tag, type: 3 SHORT / 4 LONG, count, value or offset)
        (256, 3, 1, w), (257, 3, 1, h), (258, 3, c, bits_at), (259, 3, 1, 8 if deflate else 1), (262, 3, 1, 2),
        (273, 4, 1, strip_at), (277, 3, 1, c), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1),
    ]  # fmt: skip
    out = bytearray((b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", n_tags))
    for tag, kind, count, value in tags:
        if kind == 3 and count == 1:
            out += struct.pack(e + "HHIHH", tag, kind, count, value, 0)
        else:
            out += struct.pack(e + "HHII", tag, kind, count, value)
    out += struct.pack(e + "I", 0) + struct.pack(e + "H" * c, *([16] * c)) + data
    return bytes(out)


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit all-white PNG of any size, compressed row by row: a 20000 x 20000 scan is ~60 KB on disk
    (and 400 MB once decoded by Pillow, which stores 1-bit images a byte a pixel)."""
    row = b"\x00" + b"\xff" * ((width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


# ---------------------------------------------------------------- hand-made scans for ``shardgen build``
# 64x64 content in an uneven black crust, cropped at scale 1 into 2x2 tiles of 32.

LEFT, TOP, RIGHT, BOTTOM = 3, 7, 11, 5
SIDE = 64
SCAN_W, SCAN_H = LEFT + SIDE + RIGHT, TOP + SIDE + BOTTOM
HAND = ["--image-size", "64", "--tile", "32", "--stride", "32", "--split-ratios", "train=1,val=0,test=0", "--quiet"]
UPSCALED_LINE = "upscaled: 1 scans whose crust crop is enlarged more than 2x: tiny.png (3.2x)"  # tiny_scan_case's


def cli(capsys, *args) -> tuple[int, str, str]:
    """``shardgen`` in-process: (exit code, stdout, stderr)."""
    rc = shardgen_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def build_args(data: Path, out: Path, *extra) -> list[str]:
    """``build`` arguments for ``data/annotations`` and ``data/images`` into ``out``."""
    return ["build", "--annotations", data / "annotations", "--images", data / "images", "--out", out, *extra]


def read_split(out: Path, split: str) -> list[dict]:
    """Raw samples (bytes, no decoding) of one split, in shard order."""
    urls = schema.shard_urls(schema.read_manifest(str(out)), split)
    return list(wds.WebDataset(urls, shardshuffle=False)) if urls else []


def png(data: bytes) -> np.ndarray:
    """The pixels of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def files(out: Path) -> dict[str, bytes]:
    """Every shard and the manifest, by name."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def content(seed: int = 0) -> np.ndarray:
    """Random RGB content of a hand-made scan, never black."""
    return np.random.default_rng(seed).integers(1, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def write_scan(path: Path, pixels: np.ndarray | None = None) -> None:
    """A scan: ``pixels`` (default: random content) inside a crust of different widths on each side."""
    pixels = content() if pixels is None else pixels
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.pad(pixels, ((TOP, BOTTOM), (LEFT, RIGHT), (0, 0)))).save(path)


def write_xml(path: Path, images: list[tuple[str, list[str]]], size=(SCAN_W, SCAN_H)) -> Path:
    """A CVAT for images 1.1 file with one ``<image>`` per (name, shape elements)."""
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<annotations>", "  <version>1.1</version>"]
    for k, (name, shapes) in enumerate(images):
        lines.append(f'  <image id="{k}" name="{name}" width="{size[0]}" height="{size[1]}">')
        lines += [f"    {s}" for s in shapes]
        lines.append("  </image>")
    lines.append("</annotations>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def line_of(path: Path, needle: str) -> int:
    """The 1-based number of the first line of ``path`` holding ``needle``."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def rect(label: str, x0: int, y0: int, x1: int, y1: int) -> str:
    """A polygon over source columns x0..x1 and rows y0..y1 inclusive (the rasterizer's convention)."""
    return f'<polygon label="{label}" points="{x0},{y0};{x1},{y0};{x1},{y1};{x0},{y1}" z_order="0"/>'


def assemble(samples: list[dict], member: str) -> np.ndarray:
    """Reassemble the scale-1 crop of one hand-made image from its 2x2 tiles."""
    full = None
    for s in samples:
        meta, tile = json.loads(s["json"]), png(s[member])
        if full is None:
            full = np.zeros((SIDE, SIDE, *tile.shape[2:]), np.uint8)
        full[meta["y"] : meta["y"] + 32, meta["x"] : meta["x"] + 32] = tile
    return full


def tiny_scan_case(tmp_path: Path) -> tuple[Path, Path]:
    """A normal scan and a 20x20 one whose crust crop is upscaled 3.2x to 64x64: (data dir, tiny scan)."""
    data = tmp_path / "data"
    write_scan(data / "images" / "big.png")
    small = np.random.default_rng(5).integers(1, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(np.pad(small, ((4, 4), (2, 2), (0, 0)))).save(data / "images" / "tiny.png")
    write_xml(data / "annotations" / "a.xml", [("big.png", [])])
    write_xml(data / "annotations" / "b.xml", [("tiny.png", [rect("Pit", 5, 6, 8, 9)])], size=(24, 28))
    return data, data / "images" / "tiny.png"


# ------------------------------------------------------------------- class maps and their CVAT shapes

NAMES = ClassMap.load().names
CLASS_OF = {name: c for c, name in enumerate(NAMES)}
EXACT = ShapeOptions(simplify=0)


def handmade_mask(h: int = 170, w: int = 150, top: int = 11, left: int = 7) -> np.ndarray:
    """Blobs, holes (one holding another class, one holding a ring holding a dot, one enclosed by diagonal
    contacts only), touching classes, 1-px lines, a Y, a staircase, 1- and 2-pixel specks."""
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), np.uint8)
    r2 = (yy - 60) ** 2 + (xx - 60) ** 2
    m[r2 <= 25**2] = 2  # Crystal disc ...
    m[r2 <= 5**2] = 0  # ... with a small hole ...
    m[r2 <= 2**2] = 1  # ... holding a Pinpoint
    m[50:70, 86:96] = 8  # Nick touching the crystal
    for k in range(30):
        m[100 + k, 10 + k] = 3  # Needle: a 1-px diagonal line
    m[140, 20:70] = 3  # and a horizontal one
    m[110:130, 80] = 4  # Feather: a Y of 1-px strokes
    for k in range(10):
        m[110 - k, 80 - k] = m[110 - k, 80 + k] = 4
    m[top : top + 12, left : left + 15] = 6  # Cloud in the content's top-left corner
    for k in range(12):
        m[150 - k, 100 + k] = m[150 - k, 101 + k] = 10  # Burn_mark: a 2-px staircase
    m[150:160, 120:130] = 9  # Pit block, plus a 1-px and a 2-px speck
    m[145, 135] = 9
    m[155, 140:142] = 9
    ring = np.abs(np.hypot(yy - 30, xx - 120) - 14) <= 1.5  # Internal_graining: a ring along an outline ...
    m[ring] = 5
    m[np.abs(np.hypot(yy - 30, xx - 120) - 7) <= 0.8] = 7  # ... holding a thin Twinning_wisp ring ...
    m[29:32, 119:122] = 1  # ... holding a Pinpoint
    m[np.abs(yy - 95) + np.abs(xx - 140) == 2] = 9  # a diamond of diagonal contacts, enclosing 5 pixels
    return m


def shardgen_render(path) -> dict[str, np.ndarray]:
    """Every image of a CVAT XML file as a class map, painted by shardgen's rasterizer."""
    return {a.name: rasterize(a, lambda s: CLASS_OF[s.label]) for a in parse_cvat(path)}


def image_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Class-aware IoU of two class maps over their defect pixels."""
    return ((a == b) & (a > 0)).sum() / ((a > 0) | (b > 0)).sum()


# ------------------------------------------------------------- evaluate's tiny dataset and checkpoint

GRID = TileGrid(192, 64, 32)
# Stones 1, 2 and 5 hash into test (2 shards of <= 2 images), 6 into val, the rest into train.
RATIOS = {"train": 0.2, "val": 0.2, "test": 0.6}


def build_shards(raw: Path, out: Path, mode: str = "multiclass") -> None:
    """Build the scans under ``raw`` into ``out`` on GRID, split by RATIOS, 50 tiles a shard."""
    opts = BuildOptions(mode=mode, image_size=GRID.image_size, tile=GRID.tile, stride=GRID.stride,
                        shard_size=50, split_ratios=RATIOS)  # fmt: skip
    build(raw / "annotations", raw / "images", str(out), opts, progress=False)


def tiny_dataset(tmp_path_factory) -> SimpleNamespace:
    """8 synthetic scans, their 64-px-tile shards and a 4-step narrow U-Net checkpoint, built once per session
    and shared by every module that calls this (each wraps it in its own module-scoped ``tiny`` fixture)."""
    root = tmp_path_factory.getbasetemp() / "evaluate_tiny"
    ns = SimpleNamespace(root=root, raw=root / "raw", shards=root / "shards", ckpt=root / "run" / "last.pt")
    if ns.ckpt.is_file():
        return ns
    from trainer.config import load_config
    from trainer.train import train

    write_synthetic(ns.raw, 8, seed=0, size_range=(180, 230))
    build_shards(ns.raw, ns.shards)
    config = root / "train.yaml"
    config.write_text(json.dumps({
        "data": {"train": str(ns.shards), "batch_size": 4, "workers": 0, "shuffle_buffer": 10,
                 "pin_memory": False},
        "model": {"name": "unet", "kwargs": {"channels": [4, 6, 8, 10, 12]}},
        "optim": {"lr": 0.01, "warmup_steps": 1},
        # Plain per-pixel BCE: the 4-step model's ragged masks, on which the predict tests' outline fidelity
        # (IoU >= 0.99 at --simplify 1) was sized; object weighting makes them noisier still (0.9875).
        "loss": {"object_window": 0},
        "train": {"out_dir": str(root / "run"), "steps": 4, "device": "cpu", "val_every": 4, "ckpt_every": 4},
    }))  # fmt: skip
    train(load_config(str(config)))
    return ns


# The tiny model is 4 steps old: a decision low enough to leave it defects of several classes on every scan.
LOW_DECISION = {"kind": "tuned", "thresholds": [0.14] * 10, "min_area": [12] * 10, "min_peak": [0.0] * 10}


def decided_checkpoint(tiny: SimpleNamespace, tmp_path_factory) -> Path:
    """The tiny checkpoint with ``LOW_DECISION`` stored: predictions with shapes to compare."""
    return with_decision(tiny.ckpt, tmp_path_factory.mktemp("ckpt") / "decided.pt", LOW_DECISION)


def with_decision(ckpt: Path, out: Path, decision: dict | None, binary: bool = False) -> Path:
    """A copy of checkpoint ``ckpt`` at ``out`` whose stored decision is ``decision`` (``binary``: a seeded
    binary U-Net of the same shape instead of its network)."""
    import torch

    from trainer import checkpoint
    from trainer.models import build_model

    state = checkpoint.load(str(ckpt))
    meta = state["meta"]
    if binary:
        torch.manual_seed(0)
        state["model"] = build_model("unet", meta["in_channels"], 1, **meta["config"]["model"]["kwargs"]).state_dict()
        meta.update(mode="binary", n_classes=1, classes=["background", "defect"])
    meta["decision"] = decision
    torch.save(state, out)
    return out


def cvat_cli_parser():
    """cvat-cli's own command-line parser (the one ``cvat-cli`` runs)."""
    import argparse

    from cvat_cli._internal.commands_all import COMMANDS
    from cvat_cli._internal.common import configure_common_arguments

    parser = argparse.ArgumentParser(prog="cvat-cli")
    configure_common_arguments(parser)
    COMMANDS.configure_parser(parser)
    return parser
