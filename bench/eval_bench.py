"""Benchmark: full-image prediction by ``evaluate`` against MONAI's ``sliding_window_inference``.

    python bench/eval_bench.py                  # CPU: 3 images of 1200 px, tiles 400/200, narrow U-Net
    python bench/eval_bench.py --image-size 384 --tile 128 --stride 64 --images 8   # a quicker CPU run
    python bench/eval_bench.py --device cuda    # GPU: the research U-Net, 16 images

Both paths turn the same uint8 images into (S, S) class maps with the same model on the same device:
tiles -> normalize -> network (bf16 autocast on CUDA) -> softmax -> Gaussian-weighted blend of the tile
probabilities into the full image -> argmax -> numpy on the host.

- evaluate: ``evaluate.inference.Predictor.predict``, the product's path, fed each image's tiles in grid
  order as ``evaluate`` gets them from the shards (batches of ``--batch-size`` tiles may span images);
- MONAI: per image, the normalized full image through ``sliding_window_inference(roi_size=tile,
  sw_batch_size=B, overlap=1 - stride/tile, mode="gaussian", sigma_scale=0.125)``, the same network with
  the same autocast and softmax as its predictor, then the same argmax.

Input images are random (speed does not depend on content) and the model has random weights. Both paths'
probabilities for the first image and their class maps for every image are compared, so the timing
compares equal work. Both paths are timed twice: with the chosen model, and with a 1x1 convolution in its
place, which leaves only their own batching, softmax and blending to time. Goal: evaluate / MONAI >= 1,
i.e. batching and blending cost nothing beyond MONAI's.
"""

from __future__ import annotations

import argparse
import time

import common
import numpy as np
import torch
from monai.inferers import sliding_window_inference

from evaluate.blend import blend_tiles
from evaluate.inference import Model, Predictor
from shardgen.tiling import TileGrid
from trainer.augment import AugmentConfig, GpuAugment, NormalizeConfig
from trainer.models import MODELS, build_model

NARROW_UNET = [8, 12, 16, 24, 32]  # the demo config's U-Net: CPU-sized
N_CLASSES = 11  # background + the 10 defect classes (multiclass)
SIGMA_SCALE = 0.125  # evaluate's and MONAI's default Gaussian width
GOAL = 1.0
DEFAULTS = {
    "cuda": dict(images=16, unet_channels=None, warmup=2, repeats=3),
    "cpu": dict(images=3, unet_channels=NARROW_UNET, warmup=0, repeats=2),  # the agreement check warms up
}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cut_tiles(image: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """(C, S, S) -> (count, C, t, t) in ``grid.positions()`` order, contiguous like decoded shard tiles."""
    return torch.stack(grid.cut(image)).contiguous()


class MonaiPath:
    """MONAI's sliding window over the full image, with the Predictor's network, autocast and softmax."""

    def __init__(self, predictor: Predictor, grid: TileGrid, batch_size: int):
        self.predictor, self.grid, self.batch_size = predictor, grid, batch_size
        self.overlap = 1 - grid.stride / grid.tile  # MONAI's scan interval is then exactly the stride

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        with self.predictor.amp:
            logits = self.predictor.model.net(x)
        return torch.softmax(logits.float(), dim=1)

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (C, S, S) -> float32 (K, S, S)."""
        model = self.predictor.model
        x = model.normalize.normalize(image[None].to(model.device, non_blocking=True))
        probs = sliding_window_inference(
            x, roi_size=self.grid.tile, sw_batch_size=self.batch_size, predictor=self._probabilities,
            overlap=self.overlap, mode="gaussian", sigma_scale=SIGMA_SCALE,
        )  # fmt: skip
        return probs[0]

    def predict(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        return [self.predictor.classes(self.probabilities(image)) for image in images]


def evaluate_path(predictor: Predictor, tiles: list[torch.Tensor]) -> list[np.ndarray]:
    return [classes for classes, _ in predictor.predict((t, k) for k, t in enumerate(tiles))]


def timed(fn, device: torch.device) -> tuple[float, list[np.ndarray]]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--images", type=int, help="timed images per path (GPU 16, CPU 3)")
    p.add_argument("--image-size", type=int, default=1200, help="full image side (default 1200)")
    p.add_argument("--tile", type=int, default=400, help="tile side (default 400)")
    p.add_argument("--stride", type=int, default=200, help="tile stride (default 200)")
    p.add_argument("--batch-size", type=int, default=25,
                   help="tiles per forward pass: Predictor batch_size = MONAI sw_batch_size (default 25)")  # fmt: skip
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="image channels (default 1)")
    p.add_argument("--model", default="unet", choices=sorted(MODELS))
    p.add_argument("--unet-channels", type=int, nargs="+",
                   help=f"U-Net widths (GPU: the research U-Net's; CPU: {NARROW_UNET})")  # fmt: skip
    p.add_argument("--warmup", type=int, help="untimed images per path, after the agreement check (GPU 2, CPU 0)")
    p.add_argument("--repeats", type=int, help="timed runs of each path; the fastest counts (GPU 3, CPU 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.unet_channels and args.model != "unet":
        p.error("--unet-channels applies to --model unet only")
    for key, value in DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None and (key != "unet_channels" or args.model == "unet"):
            setattr(args, key, value)
    for key in ("images", "batch_size", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if not 0 < args.stride <= args.tile <= args.image_size or (args.image_size - args.tile) % args.stride:
        p.error("need 0 < stride <= tile <= image size with (image size - tile) a multiple of the stride, "
                "so the tiles cover the image exactly as MONAI's windows do")  # fmt: skip
    return args


def compare(net: torch.nn.Module, grid: TileGrid, images: list[torch.Tensor], tiles: list[torch.Tensor],
            args: argparse.Namespace, title: str) -> float:  # fmt: skip
    """Time both paths on ``net``, print their table, agreement and ratio; returns evaluate / MONAI."""
    device = args.device
    normalize = GpuAugment(AugmentConfig(enabled=False), NormalizeConfig()).to(device).eval()
    meta = {"model": title, "classes": [f"class{k}" for k in range(N_CLASSES)]}  # what Predictor reads
    model = Model(net.to(device).eval(), normalize, meta, "random weights", device)
    predictor = Predictor(model, grid, blend="gaussian", batch_size=args.batch_size)
    monai = MonaiPath(predictor, grid, args.batch_size)

    # Same work: the blended probabilities of one image, and every class map of the timed runs below.
    with torch.no_grad():
        ours = blend_tiles(predictor.tile_probabilities(tiles[0]), grid, "gaussian", SIGMA_SCALE)
    prob_diff = (ours - monai.probabilities(images[0])).abs().max().item()
    warm = min(args.warmup, len(images))
    evaluate_path(predictor, tiles[:warm])
    monai.predict(images[:warm])
    best = {"evaluate (Predictor.predict)": float("inf"), "MONAI sliding_window_inference": float("inf")}
    names = list(best)
    for _ in range(args.repeats):  # alternating, so both paths see the same machine load
        seconds, ours_maps = timed(lambda: evaluate_path(predictor, tiles), device)
        best[names[0]] = min(best[names[0]], seconds)
        seconds, monai_maps = timed(lambda: monai.predict(images), device)
        best[names[1]] = min(best[names[1]], seconds)
    agree = np.mean([np.mean(a == b) for a, b in zip(ours_maps, monai_maps, strict=True)])

    print(f"\n{title}: {len(images)} images timed per path after {warm} warmup, best of {args.repeats}")
    rates = {name: len(images) / seconds for name, seconds in best.items()}
    common.print_table(["path", "images/s", "ms/image"],
                       [[f"{name}, {title}", rate, 1000 / rate] for name, rate in rates.items()])  # fmt: skip
    print(f"agreement: max |p_evaluate - p_MONAI| = {prob_diff:.2e} (first image); "
          f"class maps equal on {100 * agree:.4f}% of pixels")  # fmt: skip
    return rates[names[0]] / rates[names[1]]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = args.device
    torch.manual_seed(args.seed)
    common.print_machine()
    grid = TileGrid(args.image_size, args.tile, args.stride)
    kwargs = {"channels": args.unet_channels} if args.unet_channels else {}
    net = build_model(args.model, args.channels, N_CLASSES, **kwargs)
    params = sum(p.numel() for p in net.parameters())
    print(f"model: {args.model} {kwargs or ''} {params / 1e6:.2f} M params, {N_CLASSES} classes, device {device}, "
          f"amp {'bf16' if device.type == 'cuda' else 'off'}, {torch.get_num_threads()} torch threads")  # fmt: skip
    print(f"input: {args.images} random {args.channels}-channel images of {args.image_size} px, {grid.count} "
          f"tiles of {args.tile} px at stride {args.stride} (MONAI overlap {1 - args.stride / args.tile:g}), "
          f"{args.batch_size} tiles per batch")  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.channels, args.image_size, args.image_size)
    images = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen) for _ in range(args.images)]
    tiles = [cut_tiles(image, grid) for image in images]  # evaluate reads tiles, already cut, from shards

    full = compare(net, grid, images, tiles, args, args.model)
    # A 1x1 convolution costs next to nothing, so what remains is each path's own batching, softmax and
    # blending: the overhead the goal is about, free of the network's (and a shared CPU's) noise.
    light = compare(torch.nn.Conv2d(args.channels, N_CLASSES, 1), grid, images, tiles, args, "1x1 conv")
    print()
    print(common.ratio_line(f"evaluate / MONAI sliding_window_inference ({args.model})", full, GOAL))
    print(common.ratio_line("evaluate / MONAI, overhead only (1x1 conv model)", light, GOAL))


if __name__ == "__main__":
    main()
