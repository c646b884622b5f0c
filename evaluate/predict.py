"""``python -m evaluate predict``: raw scans of any size -> class masks at their own size, overlays, CVAT XML.

Each scan goes through exactly the preprocessing shardgen gives training images
(``shardgen.crust.open_scan``, as ``shardgen.scan.process_image`` uses it): crust detection on the
source values, 8-bit scaling, ``.convert("L")`` for a 1-channel model, crop to the crust box and Lanczos
resize to the grid's square. Its tiles are predicted and blended (``inference.Predictor``), and the class
map is mapped back onto the scan with ``uncrop`` (nearest; the crust is background). Scans are every PNG,
JPEG, TIFF and BMP file directly under ``--images`` (``shardgen.scanfile``: any mode, 16-bit scaled by its
full range); the summary lists the scans whose crust crop was enlarged more than ``UPSCALE_WARNING`` times.

Outputs in ``--out``: ``masks/{stem}.png`` (uint8 class ids, the scan's size), ``overlays/{stem}.png``,
with ``--save-crops`` ``crops/{stem}.png`` (the crust crop at the grid's size, as the model saw it), and
``predictions.xml``, a CVAT for images 1.1 file with one shape per predicted component in scan coordinates
(``contours``: a polygon, or a CVAT RLE mask for a component with holes; exact unless simplified), each
with ``source="auto"`` and its mean probability as the attribute ``score``. Labels are the checkpoint's
class names, or the matching labels of an existing CVAT task (``--labels-from``). It imports into CVAT as
pre-annotations and builds into shards with ``shardgen build`` like any hand-made export.

The grid (image size, tile, stride) must be the one the model was trained on: ``--image-size``, ``--tile``
and ``--stride``, else the checkpoint's ``meta["grid"]`` when it records one, else shardgen's defaults.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from shardgen import storage
from shardgen.crust import UPSCALE_WARNING, Geometry, ScanError, crop_resize, open_scan, uncrop
from shardgen.cvat import ImageAnnotation, write_cvat
from shardgen.scanfile import DEFAULT_MAX_PIXELS, SCAN_SUFFIXES, scan_size
from shardgen.tiling import TileGrid

from . import EvaluateError, fresh_folders
from .contours import DEFAULT_MIN_IOU, DEFAULT_SIMPLIFY, MASK_POLICIES, SCORE, ShapeOptions, mask_shapes
from .inference import Predictor, load_model
from .overlay import overlay
from .review import score_of, summarize, task_labels
from .run import decide, select_device

XML_NAME = "predictions.xml"


@dataclass
class PredictOptions:
    checkpoint: str
    images: str  # folder or URL prefix holding the scans (PNG, JPEG, TIFF, BMP: SCAN_SUFFIXES)
    out: str  # local output folder
    device: str = "auto"  # auto | cuda | cpu
    blend: str = "gaussian"
    batch_size: int = 25
    image_size: int | None = None  # grid; None: the checkpoint's meta["grid"], else TileGrid's default
    tile: int | None = None
    stride: int | None = None
    decision: str = "tuned"  # tuned (the checkpoint's validation-tuned thresholds and areas) | argmax
    tta: str = "none"  # test-time augmentation: none | flips | d4
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger scans are refused from their header
    simplify: float = DEFAULT_SIMPLIFY  # px of Douglas-Peucker on polygon outlines; 0: exact outlines
    masks: str = "holes"  # holes: RLE masks for components with holes; all: for every component
    min_score: float = 0.0  # shapes whose score (Predictor.confidence averaged) is lower are left out of the XML
    labels_from: str | None = None  # a CVAT export whose label names the XML uses
    save_crops: bool = False  # also write crops/{stem}.png: the resized crust crop the model saw


def resolve_grid(meta: dict, image_size: int | None, tile: int | None, stride: int | None) -> TileGrid:
    """The grid given on the command line, else recorded in the checkpoint, else the production default."""
    default = TileGrid()
    saved = meta.get("grid") or {}
    given = {"image_size": image_size, "tile": tile, "stride": stride}
    values = {k: v if v is not None else saved.get(k, getattr(default, k)) for k, v in given.items()}
    try:
        return TileGrid(**values)
    except ValueError as e:
        raise EvaluateError(str(e)) from None


def list_scans(url: str) -> list[tuple[str, str]]:
    """(file name, path for the url's filesystem) of every scan directly under ``url``, sorted: the files
    whose suffix is one of ``SCAN_SUFFIXES`` in any case. Two scans with one stem would write one mask."""
    fs, path = storage.fs_for(url)
    if storage.is_local(url) and not fs.isdir(path):
        raise EvaluateError(f"{url}: no such folder")
    found = sorted(p for p in fs.glob(path.rstrip("/") + "/*") if PurePosixPath(p).suffix.lower() in SCAN_SUFFIXES)
    if not found:
        raise EvaluateError(f"{url}: no scans found ({', '.join('*' + s for s in SCAN_SUFFIXES)})")
    stems: dict[str, str] = {}
    for p in found:
        name = PurePosixPath(p).name
        other = stems.setdefault(PurePosixPath(p).stem, name)
        if other != name:
            raise EvaluateError(f"{url}: {other} and {name} would both write masks/{PurePosixPath(p).stem}.png")
    return [(PurePosixPath(p).name, p) for p in found]


def check_scans(url: str, scans: list[tuple[str, str]], max_pixels: int) -> None:
    """Every scan's format, mode and size from its header, before any is predicted: an oversized or
    unsupported scan fails the run up front instead of after hours of predictions."""
    fs, _ = storage.fs_for(url)
    for _, path in scans:
        try:
            with fs.open(path, "rb") as f:
                scan_size(f, path, max_pixels)
        except ScanError as e:
            raise EvaluateError(str(e)) from None


def load_scan(
    url: str, path: str, channels: int, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """(scan at its own size, crust crop resized to ``size`` square, geometry); (H, W) or (H, W, 3) uint8."""
    fs, _ = storage.fs_for(url)
    return prepare_scan(fs.cat_file(path), path, channels, size, max_pixels)


def prepare_scan(
    data: bytes, name: str, channels: int, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """``load_scan`` of a scan file's bytes (``name`` for messages)."""
    try:
        source, geom = open_scan(data, name, channels, size, max_pixels)
    except ScanError as e:
        raise EvaluateError(str(e)) from None
    return np.asarray(source), np.array(crop_resize(source, geom)), geom


def scan_shapes(
    pred: np.ndarray, confidence: np.ndarray, geom: Geometry, label_of: list, options: ShapeOptions
) -> tuple[np.ndarray, list]:
    """A crust crop's class map and confidence -> (class map at the scan's size, its CVAT shapes)."""
    mask = uncrop(pred, geom)
    return mask, mask_shapes(mask, label_of, uncrop(confidence, geom), options)


def tiles_of(image: np.ndarray, grid: TileGrid) -> torch.Tensor:
    """(S, S) or (S, S, C) uint8 -> (count, C, tile, tile) uint8 in grid order."""
    chw = torch.from_numpy(np.ascontiguousarray(image[None] if image.ndim == 2 else image.transpose(2, 0, 1)))
    return torch.stack(grid.cut(chw))


def check_options(opts: PredictOptions) -> None:
    if opts.simplify < 0:
        raise EvaluateError(f"--simplify must be >= 0 px, got {opts.simplify}")
    if not 0 <= opts.min_score <= 1:
        raise EvaluateError(f"--min-score must be within 0..1, got {opts.min_score}")
    if opts.masks not in MASK_POLICIES:
        raise EvaluateError(f"--masks must be one of {', '.join(MASK_POLICIES)}, got {opts.masks!r}")


def predict_scans(opts: PredictOptions) -> dict:
    """Predict every scan under ``opts.images``; returns the summary (see ``summarize``)."""
    check_options(opts)
    device = select_device(opts.device)
    model = load_model(opts.checkpoint, device)
    names = model.class_names
    labels, label_of = names[1:], [None, *names[1:]]
    if opts.labels_from:
        labels, label_of = task_labels(names, opts.labels_from)
    shape_options = ShapeOptions(opts.simplify, opts.masks, DEFAULT_MIN_IOU)
    grid = resolve_grid(model.meta, opts.image_size, opts.tile, opts.stride)
    decision = decide(model, opts.decision, opts.blend, opts.tta)
    predictor = Predictor(model, grid, opts.blend, opts.batch_size, decision, opts.tta)
    scans = list_scans(opts.images)
    check_scans(opts.images, scans, opts.max_pixels)
    out = Path(opts.out)
    fresh_folders(out, ("masks", "overlays") + (("crops",) if opts.save_crops else ()))

    def inputs():
        for name, path in scans:
            original, resized, geom = load_scan(opts.images, path, model.in_channels, grid.image_size, opts.max_pixels)
            yield tiles_of(resized, grid), (name, original, geom, resized if opts.save_crops else None)

    annotations, below, upscaled = [], Counter(), []
    bar = tqdm(predictor.predict_scored(inputs()), total=len(scans), desc="predict", unit="scan")
    for pred, confidence, (name, original, geom, crop) in bar:
        mask, shapes = scan_shapes(pred, confidence, geom, label_of, shape_options)
        if geom.upscale > UPSCALE_WARNING:  # the model saw interpolated detail: say so
            upscaled.append([name, round(geom.upscale, 2)])
        stem = PurePosixPath(name).stem
        Image.fromarray(mask).save(out / "masks" / f"{stem}.png")
        Image.fromarray(overlay(original, mask)).save(out / "overlays" / f"{stem}.png")
        if crop is not None:
            Image.fromarray(crop).save(out / "crops" / f"{stem}.png")
        kept = [s for s in shapes if score_of(s) >= opts.min_score]
        below.update(s.label for s in shapes if score_of(s) < opts.min_score)
        annotations.append(ImageAnnotation(name, geom.width, geom.height, tuple(kept), XML_NAME, 0))
    xml = out / XML_NAME
    write_cvat(xml, annotations, labels, source="auto", attributes=[SCORE])
    summary = {"images": len(annotations), "grid": [grid.image_size, grid.tile, grid.stride]}
    return {**summary, **summarize(annotations, below, xml), "upscaled": upscaled}
