"""Quality of the training recipe, arm by arm, at a fixed budget: test defect IoU (binary) or mIoU (multiclass),
object recall and object precision of full-image predictions, side by side in one run.

    python bench/quality_bench.py                          # CPU: binary, 40 scans, ~5 min of training per arm
    python bench/quality_bench.py --device cuda --mode multiclass --images 200 --budget-mpx 20000

Arms, each adding one change to the one before:
  previous   the research recipe: whole tiles drawn uniformly, BCE pos_weight 50 (median-frequency CE weights in
             multiclass) + Dice, argmax / 0.5 decision (configs/research.yaml's loss and data settings)
  +sampling  half of each batch drawn from defect tiles, class-balanced, on 192 px crops (forced ones centred
             near a defect)
  +loss      pos_weight 1 (inv-sqrt CE weights), thin and small defects weighted up (loss.object_window), Dice
             over the classes present in the batch
  +decision  the same model, with the thresholds, minimum component areas and peaks tuned on validation
  +augment   retrained with the demo's light augmentation (configs/demo.yaml's ``augment``: flips, 90-degree
             turns, mild intensity; no affine, blur or noise) instead of the default one: the demo recipe
  +tta       the same model and decision, probabilities averaged over the four flips of every tile

The budget is in training pixels (``--budget-mpx`` million pixels fed to the network), so an arm on 128 px crops
runs ~4x the steps of one on whole 400 px tiles: on a CPU the cost of a step follows its pixels. Every arm
uses the same model, seed, optimizer and LR schedule. Held-out scans from the same generator are the test split.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, print_machine, print_table

PY = sys.executable
ARMS = ("previous", "+sampling", "+loss", "+decision", "+augment", "+tta")
TRAINED_AS = {"+decision": "+loss", "+tta": "+augment"}  # arms that reuse another arm's model
CALIBRATED = ("+loss", "+augment")  # arms trained with the default losses and a tuned decision


def run(*args: str) -> str:
    proc = subprocess.run([PY, "-m", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"quality_bench: {' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def build_data(tmp: Path, images: int, mode: str, seed: int) -> Path:
    run("shardgen", "synth", "--out", str(tmp / "raw"), "--images", str(images), "--seed", str(seed),
        "--workers", "2")  # fmt: skip
    run("shardgen", "build", "--annotations", str(tmp / "raw" / "annotations"), "--images",
        str(tmp / "raw" / "images"), "--out", str(tmp / "shards"), "--mode", mode, "--workers", "2",
        "--split-method", "exact", "--split-ratios", "train=0.6,val=0.2,test=0.2", "--quiet")  # fmt: skip
    return tmp / "shards"


def train_arm(name: str, shards: Path, out: Path, args) -> float:
    """Train one arm; returns its training seconds."""
    sampling = name != "previous"
    batch, side = (args.crop_batch, args.crop) if sampling else (args.tile_batch, 400)
    steps = max(1, round(args.budget_mpx * 1e6 / (batch * side * side)))
    cfg = {
        "data": {"train": str(shards), "batch_size": batch, "workers": 1, "pin_memory": args.device == "cuda",
                 "defect_share": 0.5 if sampling else 0.0, "crop": args.crop if sampling else 0},
        "model": {"name": args.model, "kwargs": json.loads(args.model_kwargs)},
        "optim": {"lr": args.lr, "warmup_steps": min(100, steps // 10)},
        "loss": {} if name in CALIBRATED else {"pos_weight": 50.0, "class_weighting": "median_freq",
                                            "class_weight_max": 10.0, "object_window": 0},
        "train": {"out_dir": str(out), "steps": steps, "device": args.device, "val_every": steps,
                  "ckpt_every": steps, "seed": args.seed, "tune_decision": name in CALIBRATED},
    }  # fmt: skip
    if name == "+augment":
        cfg["augment"] = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["augment"]
    path = out.with_suffix(".yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    run("trainer", "--config", str(path))
    return time.perf_counter() - start


def evaluate_arm(ckpt: Path, shards: Path, out: Path, decision: str, tta: str, device: str) -> dict:
    run("evaluate", "--checkpoint", str(ckpt), "--data", str(shards), "--split", "test", "--out", str(out),
        "--device", device, "--decision", decision, "--tta", tta, "--workers", "1")  # fmt: skip
    return json.loads((out / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--mode", default="binary", choices=("binary", "multiclass"))
    p.add_argument("--images", type=int, default=40, help="synthetic scans (split 60/20/20 exactly, as the demo)")
    p.add_argument("--budget-mpx", type=float, default=200.0, help="training pixels per arm, millions (the demo: 354)")
    p.add_argument("--model", default="unet")
    p.add_argument("--model-kwargs", default='{"channels": [8, 16, 32, 64, 128]}', help="JSON")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--crop", type=int, default=192)
    p.add_argument("--crop-batch", type=int, default=4)
    p.add_argument("--tile-batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", help="keep the data and runs in this folder")
    args = p.parse_args(argv)
    print_machine()
    print(f"quality: {args.mode}, {args.images} scans, {args.model} {args.model_kwargs}, "
          f"{args.budget_mpx:g} Mpx of training per arm on {args.device}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(args.keep or tmpdir)
        shards = build_data(tmp, args.images, args.mode, args.seed)
        rows, seconds = [], {}
        for arm in ARMS:
            trained = TRAINED_AS.get(arm, arm)
            if trained not in seconds:
                seconds[trained] = train_arm(trained, shards, tmp / "runs" / trained.strip("+"), args)
            ckpt = tmp / "runs" / trained.strip("+") / "last.pt"
            decision = "tuned" if arm in ("+decision", "+augment", "+tta") else "argmax"
            m = evaluate_arm(ckpt, shards, tmp / "eval" / arm.strip("+"), decision,
                             "flips" if arm == "+tta" else "none", args.device)  # fmt: skip
            rows.append([arm, m["miou"], m["object_recall"], m["object_precision"], seconds[trained]])
            print(f"{arm}: {'defect IoU' if args.mode == 'binary' else 'mIoU'} {m['miou']:.3f}", flush=True)
    print()
    headline = "test defect IoU" if args.mode == "binary" else "test mIoU"
    print_table(["arm", headline, "object recall", "object precision", "train s"], rows)


if __name__ == "__main__":
    main()
