"""``shardgen build``: CVAT XML + scans (PNG, JPEG, TIFF, BMP) -> WebDataset tile shards per split, plus a manifest.

The build is planned in full before anything is written (parse every XML, resolve every label, find every
image and check its size), so bad input fails fast with ``FILE:LINE: reason`` and no manifest. The plan fixes
which images go into which shard, so each shard is an independent job (``shard.py``) with a fingerprint of its
inputs, run by a distributor (``distribute.py``: a local process pool, or one task per shard on a Dask cluster);
the bytes depend neither on the distributor nor on the number of workers. A finished shard is written under a
temporary name, renamed into place, and recorded in ``_build/{shard}.json``; a rerun after a crash reuses every
shard whose record, fingerprint and sha256 still match. ``manifest.json`` is written last, atomically, by this
process, and lists only finished shards.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import schema, storage
from .classes import ClassMap
from .distribute import DISTRIBUTORS, run_dask, run_local
from .plan import BuildOptions, ShardgenError, plan, xml_files
from .shard import BUILD_DIR, check_records, manifest_options, remove_partials, remove_stale, shard_plans
from .splits import SPLITS, share_warnings
from .tiling import TileGrid

__all__ = ["BuildOptions", "ShardgenError", "build"]


# --------------------------------------------------------------------------------------------- build


def build(annotations, images, out: str, opts: BuildOptions, workers: int = 1, progress: bool = True,
          distributor: str = "local", scheduler: str | None = None) -> dict:  # fmt: skip
    """Build the dataset at ``out``; returns the summary (also printed by the CLI).

    ``distributor`` "local" processes scans with ``workers`` processes; "dask" runs one task per shard on the
    Dask cluster at ``scheduler`` (default ``$DASK_SCHEDULER_ADDRESS``) or, without one, on a ``LocalCluster`` of
    ``workers`` processes.
    """
    start = time.perf_counter()
    if distributor not in DISTRIBUTORS:
        raise ValueError(f"unknown distributor {distributor!r} (choose from {', '.join(DISTRIBUTORS)})")
    # Bad options fail before any input is read or any output (an earlier build's manifest) is touched.
    TileGrid(opts.image_size, opts.tile, opts.stride)
    if distributor == "dask":
        # Tasks run in other processes, possibly on other machines, with another working directory.
        annotations, images = os.path.abspath(annotations), os.path.abspath(images)
        out = os.path.abspath(out) if storage.is_local(out) and "://" not in out else out
    skipped: Counter = Counter()
    plan_warnings: list[str] = []
    jobs = plan(Path(annotations), Path(images), opts, skipped, plan_warnings)
    cmap = ClassMap.load(opts.classes)
    storage.makedirs(out)
    storage.makedirs(storage.join(out, BUILD_DIR))
    aborted = storage.abort_uploads(out)  # a killed build's half-streamed shard uploads, still stored and billed
    murl = storage.join(out, schema.MANIFEST_NAME)
    if storage.exists(murl):  # the old manifest would describe shards that are about to change
        storage.remove(murl)

    plans = shard_plans(jobs, opts)
    bar = tqdm(total=len(jobs), desc="shardgen", unit="img", disable=not progress)
    try:
        if distributor == "dask":
            outcome = run_dask(out, plans, opts, workers, scheduler, bar)
        else:
            outcome = run_local(out, plans, opts, workers, bar)
    finally:
        bar.close()  # also on error, so the error message starts on a line of its own
    records = outcome.records
    remove_partials(out)
    stale = remove_stale(out, {p.name for p in plans})  # an earlier build's other shards: not this dataset
    check_records(out, records)
    # Reused shards report their warnings again, so a resumed build prints what a fresh one would.
    warnings = plan_warnings + [w for p in plans for w in records[p.name]["warnings"]]
    for rec in records.values():
        skipped.update(rec["skipped"])
    upscaled = [u for p in plans for u in records[p.name].get("upscaled", [])]

    manifest = _manifest(plans, records, opts, cmap, skipped)
    storage.write_bytes_atomic(murl, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    elapsed = time.perf_counter() - start
    stones = {s: len({j.stone_id for j in jobs if j.split == s}) for s in SPLITS}
    summary = {
        "manifest": murl,
        "xml_files": [str(p) for p in xml_files(Path(annotations))],
        "images": len(jobs),
        "tiles": {s: manifest["splits"][s]["samples"] for s in SPLITS},
        "stones": stones,
        "split_warnings": share_warnings(stones, opts.split_ratios, opts.split_method),
        "shards": len(plans),
        "reused_shards": outcome.reused,
        "skipped": dict(sorted(skipped.items())),
        "warnings": warnings,
        "upscaled": upscaled,  # [source image, factor] of each crop enlarged more than UPSCALE_WARNING
        "aborted_uploads": aborted,
        "stale_removed": stale,
        "seconds": elapsed,
        "images_per_s": len(jobs) / elapsed if elapsed else 0.0,
        "distributor": distributor,
    }
    if distributor == "dask":
        summary["dask"] = {"scheduler": outcome.scheduler, "tasks": outcome.tasks, "workers": outcome.workers,
                           "retried": outcome.retried}  # fmt: skip
    return summary


def _manifest(plans, records, opts: BuildOptions, cmap: ClassMap, skipped: Counter) -> dict:
    n_classes = cmap.num_classes(opts.mode)
    splits = {}
    for split in SPLITS:
        shards = [records[p.name] for p in plans if p.split == split]
        hist = np.zeros(n_classes, dtype=np.int64)
        for rec in shards:
            hist += np.asarray(rec["class_pixels"], dtype=np.int64)
        splits[split] = {
            "shards": [{k: rec[k] for k in ("url", "samples", "images", "bytes", "sha256")} for rec in shards],
            "samples": sum(r["samples"] for r in shards),
            "images": sum(r["images"] for r in shards),
            "bytes": sum(r["bytes"] for r in shards),
            "class_pixels": hist.tolist(),
            "scans": sorted({h for rec in shards for h in rec["scans"]}),  # sha256 of each scan file
        }
    return {
        "format": schema.FORMAT,
        "format_version": schema.FORMAT_VERSION,
        "classes": cmap.class_names(opts.mode),
        "mode": opts.mode,
        "ignore_index": cmap.ignore_index,
        "channels": opts.channels,
        "image_size": opts.image_size,
        "tile": opts.tile,
        "stride": opts.stride,
        "tiles_per_image": TileGrid(opts.image_size, opts.tile, opts.stride).count,
        "options": manifest_options(opts),
        "skipped": dict(sorted(skipped.items())),
        "splits": splits,
    }
