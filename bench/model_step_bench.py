"""Benchmark: the training step of each model under channels_last, bf16, torch.compile and CUDA graphs.

    python bench/model_step_bench.py --device cuda     # GPU: batch 16 of 400 px tiles, unet u2net u2netp
    python bench/model_step_bench.py                    # CPU smoke run: batch 2 of 64 px, eager settings only

Every setting times the same step as trainer/train.py takes it (forward and loss under the setting's
autocast, backward, gradient clipping, the finite check that syncs with the host, AdamW) on normalized
float batches already on the device, for a fresh copy of the model with the same initial weights:

- ``eager fp32``: the baseline (TF32 convolutions, PyTorch's default on Ampere and later);
- ``eager bf16``: ``torch.autocast(bfloat16)``, what ``train.amp: auto`` does on CUDA;
- ``bf16 channels_last``: model and input in NHWC (``train.channels_last``), tensor-core friendly;
- ``bf16 channels_last compile``: ``torch.compile(model)`` (``train.compile``), Inductor's default mode;
- ``bf16 channels_last compile cudagraphs``: ``torch.compile(mode="reduce-overhead")``: the compiled
  forward and backward replayed as CUDA graphs, which removes the launch overhead of small kernels.

The table gives samples/s and the speed-up over eager fp32 per model; goal: >= 3x for the U-Net with the
best setting. Compilation happens in the warmup steps and is not timed (its time is printed).
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import dataclass

import common
import numpy as np
import torch

from trainer.config import Config
from trainer.losses import build_loss
from trainer.models import MODELS, build_model
from trainer.train import apply_gradients

N_CLASSES = 11
GOAL = {"unet": 3.0}  # best setting / eager fp32
SETTINGS = {  # name -> (bf16 autocast, channels_last, torch.compile mode or None)
    "eager fp32": (False, False, None),
    "eager bf16": (True, False, None),
    "bf16 channels_last": (True, True, None),
    "bf16 channels_last compile": (True, True, "default"),
    "bf16 channels_last compile cudagraphs": (True, True, "reduce-overhead"),
}
DEFAULTS = {
    "cuda": dict(tile=400, batch_size=16, steps=50, warmup=10, models=["unet", "u2net", "u2netp"],
                 settings=list(SETTINGS)),
    "cpu": dict(tile=64, batch_size=2, steps=3, warmup=1, models=["unet"],
                settings=["eager fp32", "bf16 channels_last"]),
}  # fmt: skip


@dataclass
class Result:
    rate: float  # samples/s
    ms: float  # per step
    warmup_s: float  # warmup steps, compilation included


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, setting: str, args: argparse.Namespace) -> Result:
    bf16, channels_last, mode = SETTINGS[setting]
    device = args.device
    torch.manual_seed(args.seed)
    model = build_model(name, 1, N_CLASSES).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = Config()
    loss_fn = build_loss(cfg.loss, N_CLASSES, np.ones(N_CLASSES, dtype=np.int64)).to(device)
    x = torch.randn(args.batch_size, 1, args.tile, args.tile, device=device)
    y = torch.randint(0, N_CLASSES, (args.batch_size, args.tile, args.tile), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    raw = model
    if mode is not None:
        model = torch.compile(model, mode=mode)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done with
        with amp:
            loss = loss_fn(model(x), y)
        loss.backward()
        apply_gradients(raw, optimizer, loss.detach(), cfg.optim.grad_clip)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    return Result(args.steps * args.batch_size / seconds, 1000 * seconds / args.steps, warm)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), help="(GPU: unet u2net u2netp; CPU: unet)")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), metavar="SETTING",
                   help=f"of {', '.join(SETTINGS)} (GPU: all; CPU: eager fp32, bf16 channels_last)")  # fmt: skip
    p.add_argument("--tile", type=int, help="tile side (GPU 400, CPU 64)")
    p.add_argument("--batch-size", type=int, help="samples per step (GPU 16, CPU 2)")
    p.add_argument("--steps", type=int, help="timed steps per setting (GPU 50, CPU 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first, compilation included (GPU 10, CPU 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    for key, value in DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if "eager fp32" not in args.settings:
        args.settings = ["eager fp32", *args.settings]  # the baseline every ratio divides by
    if "reduce-overhead" in [SETTINGS[s][2] for s in args.settings] and args.device.type != "cuda":
        p.error("the cudagraphs setting needs a CUDA device")
    if min(args.tile, args.batch_size, args.steps) < 1 or args.warmup < 0:
        p.error("--tile, --batch-size and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.print_machine()
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    print(f"step: batch {args.batch_size} of {args.tile} px, 1 channel, {N_CLASSES} classes, AdamW, device "
          f"{args.device}; {args.steps} timed steps after {args.warmup} warmup")  # fmt: skip
    for name in args.models:
        params = sum(p.numel() for p in build_model(name, 1, N_CLASSES).parameters())
        results = {setting: measure(name, setting, args) for setting in args.settings}
        base = results["eager fp32"].rate
        print(f"\n{name}: {params / 1e6:.2f} M params")
        common.print_table(["setting", "samples/s", "ms/step", "vs eager fp32", "warmup s"],
                           [[f"{name} {s}", r.rate, r.ms, f"{r.rate / base:.2f}x", r.warmup_s]
                            for s, r in results.items()])  # fmt: skip
        best = max(results, key=lambda s: results[s].rate)
        ratio = results[best].rate / base
        line = f"model step ({name}): best setting / eager fp32"
        if name in GOAL:
            note = "" if args.device.type == "cuda" else "  [the goal is for GPU]"
            print(common.ratio_line(line, ratio, GOAL[name]) + note)
        else:
            print(f"{line}: {ratio:.2f}x")
        print(f"best setting for {name}: {best}")


if __name__ == "__main__":
    main()
