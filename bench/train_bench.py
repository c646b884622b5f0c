"""Benchmark: what the shard input pipeline costs a training run, and what the loader alone delivers.

    python bench/train_bench.py                        # CPU: 128 px tiles from 384 px crops, narrow U-Net
    python bench/train_bench.py --device cuda          # GPU: 400 px tiles from 1200 px crops, research U-Net
    python bench/train_bench.py --data s3://bucket/ds  # existing shards (split "train") instead of synthetic ones

1. Training samples/s, every path timed over the same step (forward and loss under autocast, backward,
   gradient clipping, the finite check that syncs with the host, AdamW) on the same model:
   - model step alone: normalized float batches pre-allocated on the device;
   - in-memory + GpuAugment: uint8 batches on the device, augmented each step;
   - shard loader: trainer.data.train_loader -> .to(device, non_blocking) -> GpuAugment, as trainer/train.py.
   loader / model-alone is what the whole input pipeline costs (goal >= 0.95 on GPU).
2. Loader alone: samples/s of train_loader with 1 and 2 workers against PNG decoding alone: the raw PNG
   bytes of the very tiles the loader delivers (``streamed_tiles``) read into memory first, then image and
   mask decoded with PIL in this one process.
Without --data, synthetic scans are built into shards (all in split "train") in a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import common
import torch

from shardgen import schema
from shardgen.build import BuildOptions, build
from shardgen.reader import iter_shard
from shardgen.synth import write_synthetic
from trainer.augment import GpuAugment
from trainer.config import Config
from trainer.data import class_histogram, train_loader
from trainer.losses import build_loss
from trainer.models import MODELS, build_model
from trainer.train import apply_gradients

SPLIT = "train"
NARROW_UNET = [8, 12, 16, 24, 32]  # the demo config's U-Net: CPU-sized
# Defaults per device type: a GPU run at the real tile size, a CPU run small enough for a 2-core machine.
DEFAULTS = {
    "cuda": dict(tile=400, image_size=1200, images=16, batch_size=16, steps=100, warmup=10, loader_batches=100,
                 unet_channels=None),
    "cpu": dict(tile=128, image_size=384, images=8, batch_size=8, steps=20, warmup=3, loader_batches=40,
                unet_channels=NARROW_UNET),
}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_shards(tmp: Path, images: int, image_size: int, tile: int, seed: int) -> str:
    raw, out = tmp / "raw", tmp / "shards"
    workers = common.usable_cores()
    write_synthetic(raw, images, seed, size_range=common.synth_size_range(image_size), workers=workers)
    opts = BuildOptions(image_size=image_size, tile=tile, stride=tile // 2,
                        split_ratios={"train": 1.0, "val": 0.0, "test": 0.0})  # fmt: skip
    build(raw / "annotations", raw / "images", str(out), opts, workers=workers, progress=False)
    return str(out)


class Step:
    """One optimizer step as trainer/train.py takes it (accum_steps 1, single process)."""

    def __init__(self, model, loss_fn, optimizer, amp, grad_clip: float):
        self.model, self.loss_fn, self.optimizer, self.amp, self.grad_clip = model, loss_fn, optimizer, amp, grad_clip

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.amp:
            loss = self.loss_fn(self.model(x), y)
        loss.backward()
        apply_gradients(self.model, self.optimizer, loss.detach(), self.grad_clip)  # clip, finite check, step


def time_training(fetch: Callable, prepare: Callable, step: Step, steps: int, warmup: int, batch: int,
                  device: torch.device) -> tuple[float, float, float]:  # fmt: skip
    """(samples/s, ms per step, fraction of the time spent waiting in ``fetch``, as train.py's data-wait)."""
    for _ in range(warmup):
        step(*prepare(*fetch()))
    sync(device)
    wait, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        tw = time.perf_counter()
        batch_data = fetch()
        wait += time.perf_counter() - tw
        step(*prepare(*batch_data))
    sync(device)
    seconds = time.perf_counter() - t0
    return steps * batch / seconds, 1000 * seconds / steps, wait / seconds


def loader_rate(manifest: dict, cfg: Config, workers: int, batches: int, warmup: int) -> float:
    """Samples/s of train_loader alone (unpinned), after ``warmup`` batches (worker start, shuffle buffer)."""
    data = dataclasses.replace(cfg.data, workers=workers)
    it = iter(train_loader(manifest, SPLIT, data, cfg.train.seed, 0, 0, False))
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t0
    del it  # stops the workers before the next measurement
    return batches * data.batch_size / seconds


def streamed_tiles(manifest: dict, cfg: Config, batches: int, warmup: int) -> list[tuple[bytes, bytes]]:
    """The (image, mask) PNG bytes of the tiles train_loader delivers in its timed batches: the in-process
    stream, which one worker repeats exactly, with each tile found among the split's by its pixels. The
    stream's mix is not the split's: half of each batch comes from the defect pool, and those tiles decode
    ~2 % slower than the average tile (measured on 2 cores), so this is the decoding the loader really does."""
    by_pixels = {}
    for url in schema.shard_urls(manifest, SPLIT):
        for _, parts in iter_shard(url):
            image, mask = parts[schema.IMAGE_KEY], parts[schema.MASK_KEY]
            by_pixels[schema.decode_png(image).tobytes() + schema.decode_png(mask).tobytes()] = image, mask
    data = dataclasses.replace(cfg.data, workers=0)
    stream = iter(train_loader(manifest, SPLIT, data, cfg.train.seed, 0, 0, False))
    for _ in range(warmup):
        next(stream)
    return [by_pixels[image.numpy().tobytes() + mask.numpy().tobytes()]
            for images, masks in (next(stream) for _ in range(batches))
            for image, mask in zip(images, masks, strict=True)]  # fmt: skip


def decode_rate(tiles: list[tuple[bytes, bytes]]) -> float:
    t0 = time.perf_counter()
    for image, mask in tiles:
        schema.decode_png(image)
        schema.decode_png(mask)
    return len(tiles) / (time.perf_counter() - t0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--data", help="existing dataset root or manifest URL (its train split); default: build one")
    p.add_argument("--images", type=int, help="synthetic scans to build shards from (GPU 16, CPU 8)")
    p.add_argument("--image-size", type=int, help="crop side the scans are resized to (GPU 1200, CPU 384)")
    p.add_argument("--tile", type=int, help="tile side, stride tile/2 (GPU 400, CPU 128)")
    p.add_argument("--model", default="unet", choices=sorted(MODELS))
    p.add_argument("--unet-channels", type=int, nargs="+",
                   help=f"U-Net widths (GPU: the research U-Net's; CPU: {NARROW_UNET})")  # fmt: skip
    p.add_argument("--batch-size", type=int, help="samples per step (GPU 16, CPU 8)")
    p.add_argument("--steps", type=int, help="timed steps per training path (GPU 100, CPU 20)")
    p.add_argument("--warmup", type=int, help="untimed steps (and loader batches) first (GPU 10, CPU 3)")
    p.add_argument("--workers", type=int, help="DataLoader workers of the training run (GPU min(6, cores), CPU 1)")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[1, 2], help="loader-only runs (default 1 2)")
    p.add_argument("--loader-batches", type=int, help="timed batches per loader-only run (GPU 100, CPU 40)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"),
                   help="as train.amp: auto = bf16 on CUDA, off on CPU")  # fmt: skip
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads of the main process (default: torch's own choice)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1, help="runs of each path; the fastest counts (default 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    gpu = args.device.type == "cuda"
    if args.unet_channels and args.model != "unet":
        p.error("--unet-channels applies to --model unet only")
    for key, value in DEFAULTS["cuda" if gpu else "cpu"].items():
        if getattr(args, key) is None and (key != "unet_channels" or args.model == "unet"):
            setattr(args, key, value)
    if args.workers is None:
        args.workers = min(6, common.usable_cores()) if gpu else 1
    for key in ("images", "tile", "image_size", "batch_size", "steps", "loader_batches", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if min(args.warmup, args.workers, *args.loader_workers) < 0:
        p.error("--warmup, --workers and --loader-workers must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = args.device
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.print_machine()
    tmp = Path(tempfile.mkdtemp(prefix="train_bench_"))
    try:
        if args.data:
            url = args.data
        else:
            t0 = time.perf_counter()
            url = build_shards(tmp, args.images, args.image_size, args.tile, args.seed)
            print(f"built shards from {args.images} synthetic scans in {time.perf_counter() - t0:.1f} s (not timed)")
        run(url, args, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(url: str, args: argparse.Namespace, device: torch.device) -> None:
    manifest = schema.read_manifest(url)
    n_tiles, tile, channels = schema.split_info(manifest, SPLIT)["samples"], manifest["tile"], manifest["channels"]
    if n_tiles < args.batch_size:
        raise SystemExit(f"{manifest['_url']}: split {SPLIT!r} has {n_tiles} samples, fewer than one batch")
    cfg = Config()
    cfg.train.seed = args.seed
    cfg.data = dataclasses.replace(cfg.data, batch_size=args.batch_size, workers=args.workers,
                                   pin_memory=device.type == "cuda")  # fmt: skip
    n_classes = 1 if manifest["mode"] == "binary" else len(manifest["classes"])
    kwargs = {"channels": args.unet_channels} if args.unet_channels else {}
    model = build_model(args.model, channels, n_classes, **kwargs).to(device).train()
    augment = GpuAugment(cfg.augment, cfg.normalize).to(device).train()
    loss_fn = build_loss(cfg.loss, n_classes, class_histogram(manifest, SPLIT)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)  # fmt: skip
    use_bf16 = device.type == "cuda" and args.amp in ("auto", "bf16")  # train.py's rule
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    step = Step(model, loss_fn, optimizer, amp, cfg.optim.grad_clip)
    params = sum(p.numel() for p in model.parameters())
    print(f"data: {manifest['_url']}: {n_tiles} {SPLIT} tiles of {tile} px, {channels} channel(s), "
          f"{len(manifest['classes'])} classes ({manifest['mode']})")  # fmt: skip
    print(f"model: {args.model} {kwargs or ''} {params / 1e6:.2f} M params; batch {args.batch_size}, device "
          f"{device}, amp {'bf16' if use_bf16 else 'off'}, {torch.get_num_threads()} torch threads")
    training(manifest, cfg, args, step, augment, max(n_classes, 2), device)
    loader_alone(manifest, cfg, args)


def training(manifest: dict, cfg: Config, args: argparse.Namespace, step: Step, augment: GpuAugment,
             n_labels: int, device: torch.device) -> None:  # fmt: skip
    b, tile, channels = args.batch_size, manifest["tile"], manifest["channels"]
    images = torch.randint(0, 256, (b, channels, tile, tile), dtype=torch.uint8, device=device)
    masks = torch.randint(0, n_labels, (b, tile, tile), dtype=torch.uint8, device=device)
    x, y = augment.normalize(images), masks.long()

    def unchanged(x, y):
        return x, y

    def to_device_and_augment(images, masks):
        return augment(images.to(device, non_blocking=True), masks.to(device, non_blocking=True))

    names = ["model step alone (in-memory, normalized)", "in-memory uint8 + GpuAugment",
             f"shard loader ({args.workers} worker{'s' * (args.workers != 1)}) + GpuAugment"]  # fmt: skip
    best: dict[str, tuple[float, float, float]] = {}  # path -> its fastest run

    def measure(name, fetch, prepare):
        result = time_training(fetch, prepare, step, args.steps, args.warmup, b, device)
        if name not in best or result[0] > best[name][0]:
            best[name] = result

    for _ in range(args.repeats):
        measure(names[0], lambda: (x, y), unchanged)
        measure(names[1], lambda: (images, masks), augment)
        # A fresh loader each time: its workers neither prefetch during nor compete with the runs above.
        fetch = _images_and_masks(train_loader(manifest, SPLIT, cfg.data, args.seed, 0, 0, cfg.data.pin_memory))
        measure(names[2], fetch, to_device_and_augment)
        del fetch  # drops the loader's iterator, which stops its workers
    print(f"\ntraining: {args.steps} timed steps after {args.warmup} warmup, best of {args.repeats}")
    rows = [[name, rate, ms, f"{100 * wait:.0f}%"] for name, (rate, ms, wait) in best.items()]
    common.print_table(["path", "samples/s", "ms/step", "data wait"], rows)
    rates = [best[name][0] for name in names]
    print(common.ratio_line("input pipeline: shard loader / model step alone", rates[2] / rates[0], 0.95)
          + ("" if device.type == "cuda" else "  [the goal is for GPU; on CPU the workers share the cores]"))
    print(f"loader's share: shard loader / in-memory + augment = {rates[2] / rates[1]:.2f}x; "
          f"augmentation: in-memory + augment / model alone = {rates[1] / rates[0]:.2f}x")


def _images_and_masks(loader) -> Callable:
    """Its workers start here, and stop when the returned function is dropped."""
    batches = iter(loader)
    return lambda: next(batches)[:2]


def loader_alone(manifest: dict, cfg: Config, args: argparse.Namespace) -> None:
    count = args.loader_batches * args.batch_size
    tiles = streamed_tiles(manifest, cfg, args.loader_batches, args.warmup)
    decode = max(decode_rate(tiles) for _ in range(args.repeats))
    rows = [["PNG decode alone (1 process, bytes in memory)", decode, 1.0]]
    for k in args.loader_workers:
        rate = max(loader_rate(manifest, cfg, k, args.loader_batches, args.warmup) for _ in range(args.repeats))
        rows.append([f"train_loader, {k} worker{'s' * (k != 1)}", rate, rate / decode])
    print(f"\nloader alone: {count} samples (image + mask) in batches of {args.batch_size}, unpinned, after "
          f"{args.warmup} warmup batches, best of {args.repeats}")  # fmt: skip
    common.print_table(["path", "samples/s", "vs decode"], rows)


if __name__ == "__main__":
    main()
