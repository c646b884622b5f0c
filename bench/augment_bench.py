"""Benchmark: ``GpuAugment`` (folded single warp) against the chain of kornia augmentation modules it replaced.

    python bench/augment_bench.py                  # CPU: 8 tiles of 128 px
    python bench/augment_bench.py --device cuda    # GPU: 16 tiles of 400 px (the training batch)

Both paths take the same uint8 image batch and uint8 mask batch on the device and return the normalized
float image and the long mask, with the default ``AugmentConfig`` (every op on, at its default
probability):

- kornia chain: ``kornia.augmentation.AugmentationSequential`` of RandomHorizontalFlip, RandomVerticalFlip,
  RandomRotation90, RandomAffine, RandomBrightness, RandomContrast, RandomGamma, RandomGaussianBlur and
  RandomGaussianNoise (the previous ``GpuAugment``: one resampling per geometric op, masks shifted by +1 so
  that padding can become 255);
- folded: ``trainer.augment.GpuAugment`` (one warp per tensor, parameters drawn on the device).

Each path is timed over ``--iters`` batches after a warmup, with a device sync only at the end (what a
training step sees). Goal on an H100/H200: folded <= 3 ms per batch of 16 400 px tiles.
"""

from __future__ import annotations

import argparse
import time

import common
import kornia.augmentation as K
import torch

from shardgen.classes import IGNORE_INDEX
from trainer.augment import AugmentConfig, GpuAugment, NormalizeConfig, to_unit_float

GPU_GOAL_MS = 3.0
DEFAULTS = {"cuda": dict(tile=400, batch_size=16, iters=100, warmup=10),
            "cpu": dict(tile=128, batch_size=8, iters=10, warmup=2)}  # fmt: skip


def kornia_chain(cfg: AugmentConfig) -> K.AugmentationSequential:
    """The AugmentationSequential the previous GpuAugment built from ``cfg`` (every op's p > 0)."""
    t, s, k = cfg.affine_translate, cfg.affine_shear, cfg.blur_kernel
    return K.AugmentationSequential(
        K.RandomHorizontalFlip(p=cfg.hflip_p),
        K.RandomVerticalFlip(p=cfg.vflip_p),
        K.RandomRotation90(times=(-1.5, 2.5), resample="nearest", p=cfg.rot90_p),
        K.RandomAffine(degrees=cfg.affine_degrees, translate=(t, t), scale=tuple(cfg.affine_scale),
                       shear=(-s, s, -s, s), p=cfg.affine_p),  # fmt: skip
        K.RandomBrightness(brightness=tuple(cfg.brightness), p=cfg.brightness_p),
        K.RandomContrast(contrast=tuple(cfg.contrast), p=cfg.contrast_p),
        K.RandomGamma(gamma=tuple(cfg.gamma), p=cfg.gamma_p),
        K.RandomGaussianBlur(kernel_size=(k, k), sigma=tuple(cfg.blur_sigma), p=cfg.blur_p),
        K.RandomGaussianNoise(mean=0.0, std=cfg.noise_std, p=cfg.noise_p),
        data_keys=["input", "mask"],
    )


class KorniaAugment(torch.nn.Module):
    """The previous GpuAugment's train-mode forward, for comparison."""

    def __init__(self, cfg: AugmentConfig, norm: GpuAugment):
        super().__init__()
        self.aug, self.norm = kornia_chain(cfg), norm

    def forward(self, image: torch.Tensor, mask: torch.Tensor):
        shifted = mask[:, None].to(torch.float32) + 1.0  # 0 = padding, mapped to ignore below
        x, shifted = self.aug(to_unit_float(image), shifted)
        labels = shifted.round().long()[:, 0]
        return self.norm._normalize_unit(x), torch.where(labels == 0, IGNORE_INDEX, labels - 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms_per_batch(fn, image, mask, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn(image, mask)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(image, mask)
    sync(device)
    return 1000 * (time.perf_counter() - t0) / iters


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--tile", type=int, help="tile side (GPU 400, CPU 128)")
    p.add_argument("--batch-size", type=int, help="tiles per batch (GPU 16, CPU 8)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="image channels (default 1)")
    p.add_argument("--iters", type=int, help="timed batches per path (GPU 100, CPU 10)")
    p.add_argument("--warmup", type=int, help="untimed batches first (GPU 10, CPU 2)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each path, alternating; the fastest counts")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    for key, value in DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.tile, args.batch_size, args.iters, args.repeats) < 1 or args.warmup < 0:
        p.error("--tile, --batch-size, --iters and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = args.device
    torch.manual_seed(args.seed)
    common.print_machine()
    cfg = AugmentConfig()
    folded = GpuAugment(cfg, NormalizeConfig()).to(device).train()
    chain = KorniaAugment(cfg, folded).to(device).train()
    shape = (args.batch_size, args.channels, args.tile, args.tile)
    image = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    mask = torch.randint(0, 11, (args.batch_size, args.tile, args.tile), dtype=torch.uint8, device=device)
    print(f"input: {args.batch_size} tiles of {args.tile} px, {args.channels} channel(s), uint8 on {device}; "
          f"default AugmentConfig (every op on); {torch.get_num_threads()} torch threads")  # fmt: skip
    names = {"kornia chain (AugmentationSequential)": chain, "folded GpuAugment (one warp per tensor)": folded}
    best = dict.fromkeys(names, float("inf"))
    with torch.no_grad():
        for _ in range(args.repeats):  # alternating, so both paths see the same machine load
            for name, fn in names.items():
                best[name] = min(best[name], ms_per_batch(fn, image, mask, args.iters, args.warmup, device))
    print(f"\n{args.iters} timed batches after {args.warmup} warmup, best of {args.repeats}")
    common.print_table(["path", "ms/batch", "tiles/s"],
                       [[name, ms, 1000 * args.batch_size / ms] for name, ms in best.items()])  # fmt: skip
    kornia_ms, folded_ms = best.values()
    print(common.ratio_line("augmentation speed: folded / kornia chain", kornia_ms / folded_ms, 1.0))
    at_goal_size = device.type == "cuda" and (args.tile, args.batch_size) == (400, 16)
    note = "" if at_goal_size else "  [the goal is for 16 tiles of 400 px on an H100/H200]"
    print(common.limit_line("folded augmentation per batch", folded_ms, "ms", GPU_GOAL_MS) + note)


if __name__ == "__main__":
    main()
