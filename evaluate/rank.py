"""``python -m evaluate rank``: which unlabelled scans are most worth labelling next, as a CVAT task folder.

    python -m evaluate rank --checkpoint CKPT --images DIR_OR_URL --top K --out TASK_DIR
                            [--score disagreement|entropy] [--device auto|cuda|cpu] [--batch-size 25]

Every scan goes through predict's own code (crust crop, tiles, blending, the checkpoint's tuned decision) four
times, once per flip of its tiles (identity, horizontal, vertical, both: ``TTA["flips"]``), and is scored by
how unsure the model is about it:

- ``disagreement`` (the default score): the share of the pixels some flip calls a defect on which the four
  decided class maps do not all agree. A defect the model sees only from some sides, or names differently
  from each, is one it has not learnt; a scan whose defects it finds the same way from every side teaches it
  little.
- ``entropy``: the mean entropy of the flip-averaged class probabilities (normalized to 0..1) in and around
  the defects (pixels some flip calls a defect, or whose defect probability reaches 0.2, grown by 3 px).

Both are written for every scan, with two more reasons a reviewer can check on the overlay: predicted defects
whose highest deciding probability is within ``NEAR`` of their class's threshold, and possible misses (regions
whose defect probability reaches half the lowest threshold without a decided defect pixel).

Outputs in ``--out``: ``ranking.csv`` (every scan, best first: rank, image, score, the signals, the reasons,
and whether it is in the task), ``images/`` (the top K scans, their files as they are) and ``annotations.xml``
(CVAT for images 1.1, predict's writer: the identity view's shapes, which are predict's, with ``score``), ready
to create a CVAT task from the images and upload the XML as pre-annotations. Ties are broken by the file
name, so the order is deterministic.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from shardgen import storage
from shardgen.cvat import ImageAnnotation, write_cvat
from shardgen.scanfile import DEFAULT_MAX_PIXELS, SCAN_SUFFIXES
from trainer.decision import deciding, defect_probability

from . import TTA, EvaluateError
from .contours import SCORE, ShapeOptions
from .inference import Predictor, load_model
from .predict import check_scans, list_scans, load_scan, resolve_grid, scan_shapes, tiles_of
from .run import decide, select_device

SCORES = ("disagreement", "entropy")
NEAR = 0.1  # a defect whose peak probability is within this of its threshold is "near the threshold"
AROUND_PROBABILITY = 0.2  # entropy region: pixels whose defect probability reaches this, and decided defects
AROUND_PX = 3  # ... grown by this many pixels
TASK_XML = "annotations.xml"
COLUMNS = ("rank", "image", "score", "disagreement", "entropy", "defects", "near_threshold", "possible_misses",
           "in_task", "reasons")  # fmt: skip


@dataclass
class RankOptions:
    checkpoint: str
    images: str  # folder or URL prefix of the scans
    out: str  # the task folder
    top: int = 20
    score: str = "disagreement"  # one of SCORES
    device: str = "auto"
    batch_size: int = 25
    max_pixels: int = DEFAULT_MAX_PIXELS


def thresholds_of(decision, n_defect: int) -> np.ndarray:
    """(n_defect,) the defect probability each class must reach (``objects``: one for all; argmax: 0.5)."""
    if decision.kind == "argmax":
        return np.full(n_defect, 0.5)
    if decision.kind == "objects":
        return np.full(n_defect, decision.thresholds[0])
    return np.asarray(decision.thresholds, dtype=np.float64)


def deciding_probability(probs: torch.Tensor, decision) -> np.ndarray:
    """(S, S) the probability the decision compares with a class's threshold: the defect probability for an
    ``objects`` or ``defect`` decision, else the likeliest defect class's (binary: the defect probability)."""
    if decision.by_defect:
        return defect_probability(probs[None])[0].cpu().numpy()
    return deciding(probs[None])[1][0].cpu().numpy()


def signals(views: list[torch.Tensor], maps: list[np.ndarray], thresholds: np.ndarray, decided: np.ndarray) -> dict:
    """A scan's uncertainty from its per-view blended probabilities (K, S, S), decided class maps, and the
    identity view's deciding probability (``deciding_probability``)."""
    defect_any = np.logical_or.reduce([m > 0 for m in maps])
    differ = np.logical_or.reduce([m != maps[0] for m in maps[1:]])
    mean = torch.stack(views).mean(0)
    p = mean.clamp_min(1e-7)
    if mean.shape[0] == 1:  # binary: the defect probability and its complement
        q = mean[0]
        p = torch.stack([1 - q, q]).clamp_min(1e-7)
    entropy = (-(p * p.log()).sum(0) / np.log(p.shape[0])).numpy()
    defect = (1 - p[0]).numpy()
    around = ndimage.binary_dilation(defect_any | (defect >= AROUND_PROBABILITY), iterations=AROUND_PX)
    identity = views[0][0].numpy() if views[0].shape[0] == 1 else 1 - views[0][0].numpy()
    defects = near = 0
    for c in np.unique(maps[0][maps[0] > 0]).tolist():  # components per class, as predict draws them
        labels, n = ndimage.label(maps[0] == c, np.ones((3, 3), bool))
        peaks = np.asarray(ndimage.maximum(decided, labels, np.arange(1, n + 1)), np.float64)
        defects, near = defects + n, near + int((peaks < thresholds[c - 1] + NEAR).sum())
    candidates, m = ndimage.label(identity >= thresholds.min() / 2, np.ones((3, 3), bool))
    misses = 0
    if m:
        hit = np.bincount(candidates[maps[0] > 0], minlength=m + 1)[1:]
        misses = int((hit == 0).sum())
    return {"disagreement": float(differ.sum()) / max(int(defect_any.sum()), 1),
            "entropy": float(entropy[around].mean()) if around.any() else 0.0,
            "defects": defects, "near_threshold": near, "possible_misses": misses}  # fmt: skip


def reasons(s: dict) -> str:
    return (f"flips disagree on {s['disagreement']:.0%} of defect pixels; entropy {s['entropy']:.2f} in and around "
            f"defects; {s['near_threshold']} of {s['defects']} defects near the threshold; {s['possible_misses']} "
            f"possible misses")  # fmt: skip


def rank_scans(opts: RankOptions) -> dict:
    """Score every scan, write ranking.csv and the task folder; returns a summary."""
    if opts.score not in SCORES:
        raise EvaluateError(f"--score must be one of {', '.join(SCORES)}, got {opts.score!r}")
    if opts.top < 1:
        raise EvaluateError(f"--top must be >= 1, got {opts.top}")
    model = load_model(opts.checkpoint, select_device(opts.device))
    names = model.class_names
    grid = resolve_grid(model.meta, None, None, None)
    decision = decide(model, "tuned")
    predictors = [Predictor(model, grid, "gaussian", opts.batch_size, decision, views=(view,))
                  for view in TTA["flips"]]  # fmt: skip
    thresholds = thresholds_of(decision, max(1, len(names) - 1))
    scans = list_scans(opts.images)
    check_scans(opts.images, scans, opts.max_pixels)
    images, owned = task_folder(opts)
    rows, best = [], []  # best: the top K so far, with what their pre-annotations are made of
    for name, path in tqdm(scans, desc="rank", unit="scan"):
        _, resized, geom = load_scan(opts.images, path, model.in_channels, grid.image_size, opts.max_pixels)
        tiles = tiles_of(resized, grid)
        views = [next(iter(p.probabilities([(tiles, None)])))[0].cpu() for p in predictors]
        maps = [predictors[0].classes(v) for v in views]
        s = signals(views, maps, thresholds, deciding_probability(views[0], decision))
        row = {"image": name, "path": path, "score": s[opts.score], **s}
        rows.append(row)
        best.append((_order(row), maps[0], predictors[0].confidence(views[0], maps[0]), geom))
        if len(best) > 2 * opts.top:  # memory for K scans' maps, not every scan's
            best = sorted(best, key=lambda b: b[0])[: opts.top]
    rows.sort(key=_order)
    best = sorted(best, key=lambda b: b[0])[: opts.top]
    annotations = []
    for (_, name), pred, confidence, geom in best:
        _, shapes = scan_shapes(pred, confidence, geom, [None, *names[1:]], ShapeOptions())
        annotations.append(ImageAnnotation(name, geom.width, geom.height, tuple(shapes), TASK_XML, 0))
    return _write_task(opts, rows, annotations, names, images, owned)


def _order(row: dict) -> tuple[float, str]:
    return -row["score"], row["image"]


def task_folder(opts: RankOptions) -> tuple[Path, list[Path]]:
    """(``--out``/images, the scans an earlier rank put there), checked before any scan is predicted: the
    folder must not be ``--images`` itself, and may hold no other scans, since they would join the task."""
    images = Path(opts.out) / "images"
    if storage.is_local(opts.images) and Path(storage.to_local_path(opts.images)).resolve() == images.resolve():
        raise EvaluateError(f"--out {opts.out}: its images/ is the --images folder, whose scans rank would replace; "
                            f"choose another --out")  # fmt: skip
    listed = set()
    ranking = Path(opts.out) / "ranking.csv"
    if ranking.is_file():
        with open(ranking, newline="") as f:
            listed = {r["image"] for r in csv.DictReader(f) if r.get("in_task") == "1"}
    present = []
    if images.is_dir():
        present = [p for p in images.iterdir() if p.is_file() and p.suffix.lower() in SCAN_SUFFIXES]
    foreign = sorted(p.name for p in present if p.name not in listed)
    if foreign:
        raise EvaluateError(f"{images}: holds {len(foreign)} scans an earlier rank did not put there ({foreign[0]}"
                            f"{', ...' if len(foreign) > 1 else ''}): empty it or choose another --out")  # fmt: skip
    return images, present


def _write_task(opts: RankOptions, rows: list[dict], annotations: list, names: list[str], images: Path,
                owned: list[Path]) -> dict:  # fmt: skip
    # Old scans out, then the new ranking, then its scans: a run stopped part-way leaves images/ holding only
    # scans its ranking.csv lists, which the next run may replace.
    images.mkdir(parents=True, exist_ok=True)
    for old in owned:  # the earlier task's scans would join this one's
        old.unlink(missing_ok=True)
    out = Path(opts.out)
    top = rows[: opts.top]
    with open(out / "ranking.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for k, r in enumerate(rows, start=1):
            numbers = [f"{r[key]:.6f}" for key in ("score", "disagreement", "entropy")]
            w.writerow([k, r["image"], *numbers, r["defects"], r["near_threshold"], r["possible_misses"],
                        int(k <= opts.top), reasons(r)])  # fmt: skip
    fs, _ = storage.fs_for(opts.images)
    for r in top:
        (images / PurePosixPath(r["path"]).name).write_bytes(fs.cat_file(r["path"]))
    write_cvat(out / TASK_XML, annotations, names[1:], source="auto", attributes=[SCORE])
    return {"scans": len(rows), "task": [r["image"] for r in top], "score": opts.score,
            "ranking": str(out / "ranking.csv"), "annotations": str(out / TASK_XML), "images": str(images)}  # fmt: skip
