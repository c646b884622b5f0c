"""Evaluate a checkpoint on a split of a shard dataset, or predict raw scans.

    python -m evaluate --checkpoint CKPT --data URL [--split test] --out DIR [--blend gaussian|mean]
                       [--batch-size 25] [--device auto|cuda|cpu] [--worst 12] [--workers 2]
                       [--decision tuned|argmax] [--tta none|flips|d4]
    torchrun --standalone --nproc_per_node=8 -m evaluate --checkpoint CKPT --data URL --out DIR
    python -m evaluate predict --checkpoint CKPT --images DIR_OR_URL --out DIR [--device ...] [--blend ...]
                       [--batch-size 25] [--image-size 1200 --tile 400 --stride 200] [--max-pixels N]
                       [--decision tuned|argmax] [--tta none|flips|d4] [--simplify 1]
                       [--masks holes|all|none] [--min-score 0] [--labels-from TASK_XML] [--save-crops]
    python -m evaluate export --checkpoint CKPT --out model.onnx [--opset 17]
    python -m evaluate rank --checkpoint CKPT --images DIR_OR_URL --top K --out TASK_DIR
                       [--score disagreement|entropy] [--device ...] [--batch-size 25]

--model model.onnx (from evaluate export) replaces --checkpoint in evaluate and predict: ONNX Runtime runs it.

Bad input (a missing or corrupt checkpoint, a checkpoint for other classes, a broken manifest or shard, an
incomplete image) is reported in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from shardgen.scanfile import DEFAULT_MAX_PIXELS, max_pixels_arg

from . import DECISIONS, TTA
from .blend import BLEND_MODES
from .contours import DEFAULT_SIMPLIFY, MASK_POLICIES

TTA_MODES = tuple(TTA)

DEVICES = ("auto", "cuda", "cpu")


def _common(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a trainer checkpoint (.pt), local or s3://")
    which.add_argument("--model", dest="checkpoint", metavar="ONNX",
                       help="a model written by evaluate export (.onnx), run in ONNX Runtime")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--blend",
        choices=BLEND_MODES,
        default="gaussian",
        help="weighting of overlapping tiles (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=25, help="tiles per forward pass (default: %(default)s)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when available (default)")
    p.add_argument("--decision", choices=DECISIONS, default="tuned",
                   help="tuned: the thresholds and minimum areas tuned on validation and stored in the checkpoint "
                        "(argmax if it has none); argmax: plain argmax / 0.5 (default: %(default)s)")  # fmt: skip
    p.add_argument("--tta", choices=TTA_MODES, default="none",
                   help="test-time augmentation: average over flipped (flips) or all 8 rotated and flipped (d4) "
                        "views of each tile (default: %(default)s)")  # fmt: skip


def _evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _common(p)
    p.add_argument("--data", required=True, help="dataset root or manifest.json (local or s3://)")
    p.add_argument("--split", default="test", help="split to score (default: %(default)s)")
    p.add_argument("--worst", type=int, default=12, help="images shown in the report (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="processes decoding shards (default: %(default)s)")
    return p


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluate predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _common(p)
    p.add_argument("--images", required=True, help="folder or URL prefix of the scans (PNG, JPEG, TIFF, BMP)")
    p.add_argument("--image-size", type=int, help="side of the resized crust crop the model was trained on")
    p.add_argument("--tile", type=int, help="tile side the model was trained on")
    p.add_argument("--stride", type=int, help="tile stride")
    p.add_argument("--max-pixels", type=max_pixels_arg, default=DEFAULT_MAX_PIXELS,
                   help="refuse scans with more pixels, from the header (default %(default)s, Pillow's limit)")
    p.add_argument("--simplify", type=float, default=DEFAULT_SIMPLIFY, metavar="PX",
                   help="Douglas-Peucker tolerance of polygon outlines in px; 0 writes exact outlines "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--masks", choices=MASK_POLICIES, default="holes",
                   help="RLE masks for components with holes, or for all of them, or none (polygons only, holes "
                        "filled) (default: %(default)s)")  # fmt: skip
    p.add_argument("--min-score", type=float, default=0.0, metavar="P",
                   help="leave out shapes whose score (mean probability; under a defect or object decision, "
                        "mean defect probability) is below P (default: %(default)s)")  # fmt: skip
    p.add_argument("--labels-from", metavar="XML",
                   help="a CVAT export of the task to import into: its label names are used")  # fmt: skip
    p.add_argument("--save-crops", action="store_true",
                   help="also write crops/{stem}.png: each scan's crust crop at the grid's size, as the model saw it")
    return p


def headline(metrics: dict) -> str:
    """The one line a run ends with: pixel IoU, then objects matched one to one (see evaluate.metrics)."""
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    d = metrics["any_defect"]
    parts = [f"defect IoU {fmt(d['iou'])}"]
    if metrics["config"]["mode"] != "binary":
        parts.insert(0, f"mIoU {fmt(metrics['miou'])}")
    parts.append(f"objects found (IoU >= 0.1): recall {fmt(d['object_recall'])}, precision "
                 f"{fmt(d['object_precision'])}, F1 {fmt(d['object_f1'])}")  # fmt: skip
    parts.append(f"F1 at IoU > 0.5 {fmt(d['object_f1_050'])}, PQ {fmt(d['pq'])}")
    if metrics["config"]["mode"] != "binary":
        parts.append(f"class F1 {fmt(metrics['object_f1_mean'])}, right class {fmt(metrics['right_class'])}")
    line = (" | ".join(parts) + f" ({metrics['n_images']} images, {d['gt_objects']} defects, decision: "
            f"{metrics['decision']['kind']}, tta: {metrics['tta']})")
    if seen := metrics.get("trained_on"):
        line = f"WARNING: {seen['scans']} of {seen['of']} scans trained on | " + line
    return line


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluate export",
                                description="A checkpoint as ONNX: per-class probabilities of normalized tiles, "
                                            "with classes, normalization, grid and decision in its metadata.")
    p.add_argument("--checkpoint", required=True, help="a trainer checkpoint (.pt), local or s3://")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    return p


def _rank_parser() -> argparse.ArgumentParser:
    from .rank import SCORES  # numpy and scipy only; torch loads after argument errors are reported

    p = argparse.ArgumentParser(prog="python -m evaluate rank",
                                description="Rank unlabelled scans by how unsure the model is about them; the top K "
                                            "become a CVAT task folder (images/ and annotations.xml) with "
                                            "ranking.csv beside it.")  # fmt: skip
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a trainer checkpoint (.pt), local or s3://")
    which.add_argument("--model", dest="checkpoint", metavar="ONNX", help="a model written by evaluate export")
    p.add_argument("--images", required=True, help="folder or URL prefix of the scans (PNG, JPEG, TIFF, BMP)")
    p.add_argument("--top", type=int, required=True, help="scans in the task")
    p.add_argument("--out", required=True, help="the task folder")
    p.add_argument("--score", choices=SCORES, default="disagreement", help="ranking score (default: %(default)s)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when available (default)")
    p.add_argument("--batch-size", type=int, default=25, help="tiles per forward pass (default: %(default)s)")
    p.add_argument("--max-pixels", type=max_pixels_arg, default=DEFAULT_MAX_PIXELS,
                   help="refuse scans with more pixels, from the header (default %(default)s, Pillow's limit)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "export":
        return _export(_export_parser().parse_args(argv[1:]))
    if argv and argv[0] == "rank":
        return _rank(_rank_parser().parse_args(argv[1:]))
    predicting = bool(argv) and argv[0] == "predict"
    args = (_predict_parser() if predicting else _evaluate_parser()).parse_args(
        argv[1:] if predicting else argv
    )
    # torch loads after argument errors are reported.
    from shardgen.schema import ManifestError
    from trainer import dist
    from trainer.checkpoint import CheckpointError

    from . import EvaluateError
    from .predict import PredictOptions, predict_scans
    from .run import EvalOptions, evaluate

    try:
        if os.path.exists(args.out) and not os.path.isdir(args.out):  # found before the model runs, not after
            raise EvaluateError(f"--out {args.out} is a file, not a folder")
        if predicting:
            summary = predict_scans(PredictOptions(
                args.checkpoint, args.images, args.out, args.device, args.blend, args.batch_size,
                args.image_size, args.tile, args.stride, args.decision, args.tta, args.max_pixels,
                args.simplify, args.masks, args.min_score, args.labels_from, args.save_crops))  # fmt: skip
            print(json.dumps(summary, indent=1))
            return 0
        metrics = evaluate(EvalOptions(
            args.checkpoint, args.data, args.out, args.split, args.blend, args.batch_size, args.device,
            args.worst, args.workers, args.decision, args.tta))  # fmt: skip
    except (EvaluateError, CheckpointError, ManifestError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()
    if "report" in metrics:  # rank 0 wrote it
        print(f"report: {metrics['report']}")
        print(headline(metrics))
    return 0


def _export(args) -> int:
    from trainer.checkpoint import CheckpointError

    from . import EvaluateError
    from .export import export

    try:
        print(json.dumps(export(args.checkpoint, args.out, args.opset), indent=1))
    except (EvaluateError, CheckpointError, OSError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


def _rank(args) -> int:
    from trainer.checkpoint import CheckpointError

    from . import EvaluateError
    from .rank import RankOptions, rank_scans

    try:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise EvaluateError(f"--out {args.out} is a file, not a folder")
        summary = rank_scans(RankOptions(args.checkpoint, args.images, args.out, args.top, args.score, args.device,
                                         args.batch_size, args.max_pixels))  # fmt: skip
    except (EvaluateError, CheckpointError, OSError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
