"""Does ``evaluate rank`` put the scans the model gets wrong first? Top 10 against bottom 10 and random 10.

    python bench/rank_bench.py                                   # trains the demo recipe for 3 seeds (~30 min)
    python bench/rank_bench.py --checkpoints runs/a/best.pt runs/b/best.pt runs/c/best.pt
    python bench/rank_bench.py --seed 11 --checkpoints runs/a/best.pt    # choosing a score: another seed

Scans: ``--scans`` synthetic scans of seed ``--seed`` (31 by default: used for nothing else, never for a choice),
with their truth. Models: the demo recipe (``configs/demo.yaml``) trained on the demo's data (72 scans of seed 0,
36/24/12, as ``make demo`` and ``bench/quality_bench.py`` build it) with training seeds 0, 1, 2, or the
``--checkpoints`` given. Each model ranks every scan (``evaluate rank``; every score of ``SCORES`` from the
same pass) and predicts it (``evaluate predict``, the masks the pre-annotations are made of); a scan's quality
is its **Dice**: the mean over the classes in its truth or its prediction of the per-class Dice at the scan's
size (1 when both are empty); a **missed** defect is a true one (8-connected, any class) less than 10% of whose
pixels are predicted as any defect. For each score and model: the mean Dice and missed defects per scan of
the top 10, the bottom 10 and 10 random scans (the mean of 20 draws). Goal (issue 26): over the models, the
median of the top 10's mean Dice at least 0.05 below the random 10's.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import quality_bench  # noqa: E402

from evaluate import predict, rank  # noqa: E402
from evaluate.predict import PredictOptions, predict_scans  # noqa: E402
from evaluate.rank import SCORES, RankOptions, rank_scans  # noqa: E402
from shardgen.classes import ClassMap  # noqa: E402
from shardgen.cvat import parse_cvat  # noqa: E402
from shardgen.raster import rasterize  # noqa: E402
from shardgen.synth import write_synthetic  # noqa: E402

GAP = 0.05  # the top 10's median mean Dice must be this far below the random 10's
GROUP = 10
DRAWS = 20
EIGHT = np.ones((3, 3), bool)


def truth_masks(raw: Path) -> dict[str, np.ndarray]:
    """{scan name: uint8 class map at the scan's size} from the synthetic CVAT XML, multiclass as built."""
    classes = ClassMap.load()
    out = {}
    for xml in sorted((raw / "annotations").glob("*.xml")):
        for ann in parse_cvat(xml):
            out[ann.name] = rasterize(ann, lambda s: classes.paint_value(classes.lookup(s.label), "multiclass"))
    return out


def dice(truth: np.ndarray, pred: np.ndarray) -> float:
    present = sorted((set(np.unique(truth).tolist()) | set(np.unique(pred).tolist())) - {0})
    if not present:
        return 1.0
    return float(np.mean([2 * ((truth == c) & (pred == c)).sum() / ((truth == c).sum() + (pred == c).sum())
                          for c in present]))  # fmt: skip


def missed(truth: np.ndarray, pred: np.ndarray) -> int:
    labels, n = ndimage.label(truth > 0, EIGHT)
    if not n:
        return 0
    size = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    hit = np.bincount(labels[pred > 0], minlength=n + 1)[1:]
    return int((hit < 0.1 * size).sum())


def groups(order: list[str], quality: dict[str, tuple[float, int]], seed: int) -> dict[str, tuple[float, float]]:
    """(mean Dice, mean missed defects per scan) of the top, the bottom and random draws of ``GROUP`` scans."""

    def mean(names):
        return (float(np.mean([quality[n][0] for n in names])), float(np.mean([quality[n][1] for n in names])))

    rng = random.Random(seed)
    draws = [mean(rng.sample(order, GROUP)) for _ in range(DRAWS)]
    return {"top": mean(order[:GROUP]), "bottom": mean(order[-GROUP:]),
            "random": (float(np.mean([d[0] for d in draws])), float(np.mean([d[1] for d in draws])))}  # fmt: skip


def ranked(ranking: Path, score: str) -> list[str]:
    with open(ranking, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["image"] for r in sorted(rows, key=lambda r: (-float(r[score]), r["image"]))]


def train_demo(root: Path, seeds: int) -> list[Path]:
    """The demo recipe on the demo's data, one run per training seed (quality_bench's own code)."""
    qb = quality_bench
    shards = qb.build_data(root / "data", qb.DEMO_IMAGES, "multiclass", 0, qb.DEMO_SPLIT)
    args = argparse.Namespace(device="cpu", steps=0, set=[])
    out = []
    for seed in range(seeds):
        run = root / "runs" / f"demo-seed{seed}"
        if not (run / "best.pt").is_file():
            quality_bench.train("demo", shards, run, seed, args)
        out.append(run / "best.pt")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", help="trained models (default: train the demo recipe)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds when training (default 3)")
    p.add_argument("--scans", type=int, default=40, help="synthetic scans to rank (default 40)")
    p.add_argument("--seed", type=int, default=31, help="their synthetic seed (default 31)")
    p.add_argument("--keep", help="keep data, runs and outputs in this folder")
    args = p.parse_args()
    common.print_machine()
    predict.tqdm = rank.tqdm = lambda items, **_: items  # progress bars, once per model
    with tempfile.TemporaryDirectory() as tmpdir:
        root = Path(args.keep or tmpdir)
        checkpoints = [Path(c) for c in args.checkpoints] if args.checkpoints else train_demo(root, args.seeds)
        raw = root / f"scans-seed{args.seed}"
        if not (raw / "images").is_dir():
            write_synthetic(raw, args.scans, args.seed)
        truth = truth_masks(raw)
        print(f"rank: {len(truth)} synthetic scans of seed {args.seed}; {len(checkpoints)} models; groups of "
              f"{GROUP} (random: mean of {DRAWS} draws)\n", flush=True)  # fmt: skip
        rows, tops, randoms = [], {s: [] for s in SCORES}, {s: [] for s in SCORES}
        for k, ckpt in enumerate(checkpoints):
            out = root / f"model{k}"
            rank_scans(RankOptions(str(ckpt), str(raw / "images"), str(out / "task"), GROUP, device="cpu"))
            predict_scans(PredictOptions(str(ckpt), str(raw / "images"), str(out / "predict"), device="cpu"))
            quality = {}
            for name, t in truth.items():
                pred = np.asarray(Image.open(out / "predict" / "masks" / f"{Path(name).stem}.png"))
                quality[name] = (dice(t, pred), missed(t, pred))
            for score in SCORES:
                g = groups(ranked(out / "task" / "ranking.csv", score), quality, seed=k)
                tops[score].append(g["top"][0])
                randoms[score].append(g["random"][0])
                rows.append([f"{ckpt.parent.name}: {score}", *(f"{g[x][0]:.3f}" for x in ("top", "random", "bottom")),
                             *(f"{g[x][1]:.2f}" for x in ("top", "random", "bottom"))])  # fmt: skip
            mean_dice = np.mean([q[0] for q in quality.values()])
            print(f"{ckpt.parent.name}: mean Dice of all {len(quality)} scans {mean_dice:.3f}", flush=True)
        print()
        common.print_table(["model: score", "Dice top", "Dice random", "Dice bottom", "missed top",
                            "missed random", "missed bottom"], rows)  # fmt: skip
        print()
        for score in SCORES:
            top, rnd = statistics.median(tops[score]), statistics.median(randoms[score])
            verdict = "meets" if rnd - top >= GAP else "misses"
            print(f"{score}: median mean Dice top {GROUP} {top:.3f}, random {GROUP} {rnd:.3f}: gap {rnd - top:.3f} "
                  f"(goal >= {GAP}: {verdict})")  # fmt: skip


if __name__ == "__main__":
    main()
