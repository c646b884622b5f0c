"""One scan in a build worker: rasterize its annotation, remove the crust, resize, cut the 25 tiles and
encode each as a shard sample (the schema of ``shardgen.schema``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from . import schema
from .classes import IGNORE_INDEX, ClassMap
from .crust import UPSCALE_WARNING, ScanError, crop_resize, crop_resize_mask, open_scan
from .plan import BuildOptions, ImageJob, ShardgenError
from .raster import RasterStats, rasterize
from .tarstream import sample_bytes
from .tiling import TileGrid

TAR_MTIME = 0  # fixed tar member mtime: shards are byte-identical across runs


def process_image(job: ImageJob, opts: BuildOptions) -> dict:
    """Rasterize, crop the crust, resize and tile one scan; returns its samples as tar members, and counts."""
    ann, grid = job.ann, TileGrid(opts.image_size, opts.tile, opts.stride)
    data = Path(job.path).read_bytes()
    try:
        source, geom = open_scan(data, job.path, opts.channels, opts.image_size, opts.max_pixels)
    except ScanError as e:
        raise ShardgenError(str(e)) from None
    stats = RasterStats()
    upscaled = []
    if geom.upscale > UPSCALE_WARNING:  # a tiny scan: warned and counted, still built
        left, top, right, bottom = geom.box
        upscaled.append([ann.name, round(geom.upscale, 2)])
        stats.warnings.append(
            f"{job.path}: crust crop {right - left}x{bottom - top} is upscaled {geom.upscale:.1f}x to "
            f"{opts.image_size}x{opts.image_size} (more than {UPSCALE_WARNING:g}x): its detail is interpolated"
        )
    values = job.values
    mask = rasterize(
        ann,
        lambda s: values[s.order],
        polyline_width=opts.polyline_width,
        point_radius=opts.point_radius,
        stats=stats,
    )
    image = np.asarray(crop_resize(source, geom))
    mask = crop_resize_mask(mask, geom)
    n_classes = ClassMap.load(opts.classes).num_classes(opts.mode)
    samples, hist = [], np.zeros(n_classes, dtype=np.int64)  # samples: their tar members, serialized here
    t = opts.tile
    tiles = zip(grid.positions(), grid.cut(image, channels_last=True), grid.cut(mask), strict=True)
    for (i, j, y, x), tile_image, tile_mask in tiles:
        counts = np.bincount(tile_mask.ravel(), minlength=256)
        hist += counts[:n_classes]
        meta = {
            "image_id": job.image_id,
            "stone_id": job.stone_id,
            "row": i,
            "col": j,
            "y": y,
            "x": x,
            "tile": t,
            "stride": opts.stride,
            "image_size": opts.image_size,
            "source_image": ann.name,
            "xml_file": Path(ann.xml_file).name,
            "crop_box": list(geom.box),
            "scale": list(geom.scale),
            "source_size": [geom.width, geom.height],
            "split": job.split,
            "class_pixels": counts[:n_classes].tolist(),
            "ignored_pixels": int(counts[IGNORE_INDEX]),
        }
        parts = {
            schema.IMAGE_KEY: schema.encode_png(tile_image, opts.png_level),
            schema.MASK_KEY: schema.encode_png(np.ascontiguousarray(tile_mask), opts.png_level),
            schema.META_KEY: json.dumps(meta, sort_keys=True).encode(),
        }
        samples.append(sample_bytes(schema.sample_key(job.image_id, i, j), parts, TAR_MTIME))
    return {
        "samples": len(samples),
        "tar": b"".join(samples),
        "hist": hist,
        "sha256": hashlib.sha256(data).hexdigest(),
        "warnings": stats.warnings,
        "upscaled": upscaled,
        "skipped": dict(stats.skipped),
    }
