"""``python -m evaluate``: score a checkpoint on the full images of a split and write the report.

Every image is predicted tile by tile, its tile probabilities blended into the full image (``blend``), and
compared with its ground truth reassembled from the same tiles. All pixel metrics come from one confusion
matrix summed over the split (``trainer.metrics.summarize``), object counts are summed the same way, and
per-image Dice is kept per (image, class) (``evaluate.metrics``). Under torchrun each rank scores every
world-th image; matrices and counts are all-reduced, per-image rows gathered, and rank 0 writes
``metrics.json``, ``per_image.csv`` and ``report.html``. Each rank writes its own images' ``predictions/``
and ``overlays/`` PNGs, so with several nodes ``--out`` must be a shared filesystem.

A rank that fails tells the others before the first collective, so every rank stops with the same one-line
error instead of waiting for a rank that is gone.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from shardgen import schema
from shardgen.classes import IGNORE_INDEX
from shardgen.tiling import TileGrid
from trainer import dist
from trainer.metrics import summarize

from . import EvaluateError, fresh_folders
from .blend import reassemble_mask
from .inference import Predictor, check_dataset, decision_for, load_model
from .metrics import (
    OBJECT_COLUMNS,
    dice_summary,
    image_confusion,
    mean_of,
    object_summary,
    object_tally,
    per_image_dice,
)
from .overlay import overlay, side_by_side
from .report import write_report
from .tiles import grid_of, image_loader

PNG_WRITERS = 4  # threads encoding overlay/prediction PNGs while the next images are predicted
MAX_QUEUED_WRITES = 2 * PNG_WRITERS  # bounds the images held in memory waiting for their PNGs


@dataclass
class EvalOptions:
    checkpoint: str
    data: str  # dataset root or manifest URL
    out: str  # local output folder
    split: str = "test"
    blend: str = "gaussian"
    batch_size: int = 25  # tiles per forward pass; batches span images
    device: str = "auto"  # auto | cuda | cpu
    worst: int = 12  # images shown in the report, lowest mean Dice first
    workers: int = 2  # processes decoding shards
    decision: str = "tuned"  # tuned: the checkpoint's validation-tuned thresholds and areas | argmax
    tta: str = "none"  # test-time augmentation: none | flips | d4


def select_device(name: str) -> torch.device:
    """Join the process group under torchrun and pick this rank's device."""
    if name not in ("auto", "cuda", "cpu"):
        raise EvaluateError(f"--device must be auto, cuda or cpu, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvaluateError("--device cuda, but no CUDA device is available")
    return dist.setup(name)


def decide(model, requested: str, blend: str = "gaussian", tta: str = "none"):
    """The checkpoint's decision (see inference.decision_for); rank 0 prints the fallback warning, and a
    warning when the blending differs from the one the decision was tuned with (evaluate.tune)."""
    decision, warning = decision_for(model, requested)
    # TTA is not warned of: make demo applies the decision tuned on single views to the average of a tile's
    # flips on purpose (the averaged views prune false alarms those rules let through; bench/README.md).
    if decision.kind != "argmax" and blend != "gaussian":
        warning = (f"the decision was tuned on Gaussian-blended probabilities; --blend {blend} moves the "
                   f"probabilities it applies to")
    if warning and dist.is_main():
        print(f"evaluate: warning: {warning}", file=sys.stderr)
    return decision


def scan_of(images: torch.Tensor, grid: TileGrid) -> np.ndarray:
    """The full input image from its tiles, for the overlay: (S, S) for one channel, (S, S, 3) for RGB."""
    scan = grid.paste(images.numpy(), np.empty((images.shape[1], grid.image_size, grid.image_size), np.uint8))
    return scan[0] if len(scan) == 1 else scan.transpose(1, 2, 0)


def score_image(image_id: str, pred: np.ndarray, truth: np.ndarray, n_classes: int) -> dict:
    """The per-image row: Dice per defect class, pixel counts, and the matrices to sum over the split."""
    conf = image_confusion(pred, truth, n_classes)
    dice = per_image_dice(pred, truth, n_classes)
    objects, object_confusion = object_tally(pred, truth, n_classes)
    return {
        "image_id": image_id,
        "dice": dice,
        "mean_dice": mean_of(dice),  # None when the image has no defect in truth or prediction
        "truth_pixels": conf.sum(1).tolist(),
        "pred_pixels": conf.sum(0).tolist(),
        "ignored_pixels": int((truth == IGNORE_INDEX).sum()),
        "confusion": conf,
        "objects": objects,
        "object_confusion": object_confusion,
    }


def defect_iou(conf) -> float | None:
    """Pixel IoU of "any defect" against background: the defect classes merged (binary: the defect IoU)."""
    m = np.asarray(conf, np.int64)
    tp, truth, pred = m[1:, 1:].sum(), m[1:].sum(), m[:, 1:].sum()
    return float(tp / (truth + pred - tp)) if truth + pred else None


def split_metrics(conf, objects, object_confusion, rows: list[dict], class_names: list[str]) -> dict:
    """metrics.json's scores from the summed pixel confusion matrix, summed object tallies and confusion, and
    the per-image rows."""
    pixel = summarize(conf, class_names)
    obj = object_summary(objects, object_confusion, class_names)
    per_image = {r["image_id"]: r["dice"] for r in rows}
    dice = dice_summary(per_image, class_names)
    per_class = {}
    blank = dict.fromkeys(obj["any_defect"])  # background has no objects
    for name in class_names:
        o = obj["per_class"].get(name, blank)
        per_class[name] = {**pixel["per_class"][name], **o, "image_dice": dice["per_class"].get(name)}
    return {
        "miou": pixel["miou"],
        # All defect classes together, merged before labelling: of the defects there were, how many were
        # found, and of the ones painted, how many were real.
        "any_defect": {"iou": defect_iou(conf), **obj["any_defect"]},
        "object_f1_mean": obj["object_f1_mean"],
        "right_class": obj["right_class"],
        "object_confusion": obj["object_confusion"],
        "mdice": pixel["mdice"],
        "mean_dice": dice["mean_dice"],
        "pixel_accuracy": pixel["pixel_accuracy"],
        "absent": pixel["absent"],
        "per_class": per_class,
        "per_image_dice": per_image,
        "n_images": len(rows),
        "confusion_matrix": np.asarray(conf).tolist(),
    }


def _cell(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"  # an empty cell: no defect in truth or prediction


def write_csv(path: Path, rows: list[dict], class_names: list[str]) -> None:
    defects = class_names[1:]
    header = ["image_id", "source_image", "mean_dice"]
    header += [f"dice_{n}" for n in defects] + [f"truth_px_{n}" for n in class_names]
    header += [f"pred_px_{n}" for n in class_names] + ["ignored_px"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([r["image_id"], r["source_image"], _cell(r["mean_dice"]), *map(_cell, r["dice"]),
                        *r["truth_pixels"], *r["pred_pixels"],
                        r["ignored_pixels"]])  # fmt: skip


def _save_pngs(out: Path, image_id: str, scan: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> None:
    """predictions/<id>.png (class ids), overlays/<id>.png (errors marked: the report's thumbnail) and
    side_by_side/<id>.png (truth left, prediction right, full resolution: what the thumbnail opens)."""
    Image.fromarray(pred).save(out / "predictions" / f"{image_id}.png")
    # zlib level 3: RGB overlays come out about as small as at Pillow's default 6 and encode a few times
    # faster; every image's are written while the next ones are predicted.
    Image.fromarray(overlay(scan, pred, truth)).save(out / "overlays" / f"{image_id}.png", compress_level=3)
    Image.fromarray(side_by_side(scan, pred, truth)).save(out / "side_by_side" / f"{image_id}.png", compress_level=3)


def _score_rank(opts: EvalOptions, predictor: Predictor, manifest: dict, out: Path) -> tuple:
    """This rank's confusion matrix, object counts and per-image rows; writes its images' PNGs."""
    rank, world = dist.rank(), dist.world_size()
    grid, class_names = predictor.grid, list(manifest["classes"])
    n = len(class_names)
    conf, confusion, rows = np.zeros((n, n), np.int64), np.zeros((n, n), np.int64), []
    objects = np.zeros((n, len(OBJECT_COLUMNS)), np.float64)
    expected = schema.rank_images(manifest, opts.split, rank, world)
    images = image_loader(manifest, opts.split, rank, world, opts.workers)
    writes: deque[Future] = deque()
    bar = tqdm(total=expected, desc=f"evaluate {opts.split}", unit="img", disable=not dist.is_main())
    with bar, ThreadPoolExecutor(PNG_WRITERS) as pool:
        for pred, item in predictor.predict((item.images, item) for item in images):
            try:
                truth = reassemble_mask(item.masks.numpy(), grid, item.image_id)
                scan = scan_of(item.images, grid)
                row = score_image(item.image_id, pred, truth, n)
            except ValueError as e:  # overlapping tiles disagree, or class ids beyond the class list
                raise EvaluateError(f"{item.shard}: {e}") from None
            row["source_image"] = item.meta.get("source_image", "")
            conf += row.pop("confusion")
            objects += row.pop("objects")
            confusion += row.pop("object_confusion")
            rows.append(row)
            writes.append(pool.submit(_save_pngs, out, item.image_id, scan, pred, truth))
            while len(writes) > MAX_QUEUED_WRITES or (writes and writes[0].done()):
                writes.popleft().result()
            bar.update(1)
        for f in writes:
            f.result()
    if len(rows) != expected:  # unreachable while the shard checks hold; never report a partial split
        raise EvaluateError(f"{manifest['_url']}: rank {rank} scored {len(rows)} of its {expected} images")
    return conf, objects, confusion, rows


def evaluate(opts: EvalOptions) -> dict:
    """Score ``opts.checkpoint`` on ``opts.split`` of ``opts.data``; returns metrics.json's content."""
    if opts.worst < 0 or opts.workers < 0:
        raise EvaluateError(f"--worst and --workers must be >= 0, got {opts.worst} and {opts.workers}")
    device = select_device(opts.device)
    model = load_model(opts.checkpoint, device)
    manifest = schema.read_manifest(opts.data)
    check_dataset(model, manifest)
    if not schema.split_info(manifest, opts.split)["images"]:
        raise EvaluateError(f"{manifest['_url']}: split {opts.split!r} has no images")
    grid = grid_of(manifest)
    decision = decide(model, opts.decision, opts.blend, opts.tta)
    predictor = Predictor(model, grid, opts.blend, opts.batch_size, decision, opts.tta)
    class_names = list(manifest["classes"])
    out = Path(opts.out)
    if dist.is_main():
        fresh_folders(out, ("predictions", "overlays", "side_by_side"))
    dist.barrier()  # no rank writes before the folders are fresh

    error, result = None, None
    try:
        result = _score_rank(opts, predictor, manifest, out)
    except (EvaluateError, OSError) as e:  # bad data, or an output file that cannot be written
        error = f"rank {dist.rank()}: {e}" if dist.world_size() > 1 else str(e)
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        raise EvaluateError(errors[0])
    conf, objects, confusion, rows = result
    conf, objects, confusion = (dist.all_reduce(torch.from_numpy(a).to(device)).cpu().numpy()
                                for a in (conf, objects, confusion))  # fmt: skip
    rows = sorted((r for part in dist.all_gather_object(rows) for r in part), key=lambda r: r["image_id"])
    ids = [r["image_id"] for r in rows]
    twice = sorted({i for i, j in zip(ids, ids[1:], strict=False) if i == j})
    if twice:  # in two shards: its files would overwrite each other and it would count double
        raise EvaluateError(f"{manifest['_url']}: image {twice[0]!r} appears twice in split {opts.split!r}")

    metrics = split_metrics(conf, objects, confusion, rows, class_names)
    metrics["checkpoint"] = opts.checkpoint
    scored = set(schema.split_info(manifest, opts.split).get("scans", []))
    if seen := len(scored & set(model.meta.get("train_scans") or [])):  # the same scan files, by their bytes
        metrics["trained_on"] = {"scans": seen, "of": len(scored)}
        if dist.is_main():
            print(f"warning: {seen} of the {len(scored)} scans of split {opts.split!r} are among the checkpoint's "
                  f"training scans: these figures do not measure held-out quality", file=sys.stderr)
    metrics["decision"] = {"requested": opts.decision, **decision.to_json()}
    metrics["tta"] = opts.tta
    metrics["precision"] = model.precision  # bf16 or fp32: what the tiles were predicted in
    metrics["config"] = {
        "evaluate": {**asdict(opts), "data": manifest["_url"], "world_size": dist.world_size()},
        "grid": {"image_size": grid.image_size, "tile": grid.tile, "stride": grid.stride},
        "model": model.meta["model"],
        "mode": model.meta["mode"],
        "training": model.meta["config"],
    }
    if dist.is_main():
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
        write_csv(out / "per_image.csv", rows, class_names)
        # Worst first; an image with no defect in truth or prediction (no Dice) is right and comes last.
        ranked = sorted(rows, key=lambda r: (r["mean_dice"] is None, r["mean_dice"] or 0.0, r["image_id"]))
        ranked = ranked[: opts.worst]
        worst = [{"image_id": r["image_id"], "dice": r["mean_dice"],
                  "overlay_path_relative": f"overlays/{r['image_id']}.png",
                  "side_by_side_path_relative": f"side_by_side/{r['image_id']}.png"} for r in ranked]  # fmt: skip
        metrics["report"] = str(write_report(out, metrics, worst, class_names))
    return metrics
