"""``shardgen build``: CVAT XML + scans (PNG, JPEG, TIFF, BMP) -> WebDataset tile shards per split, plus a manifest.

The build is planned in full before anything is written (parse every XML, resolve every label, find every
image and check its size), so bad input fails fast with ``FILE:LINE: reason`` and no manifest. Each shard is
then a unit of work with a fingerprint of its inputs: images are processed in a process pool in a fixed
order and written by the main process, so the bytes do not depend on ``--workers``. A finished shard is
written under a temporary name, renamed into place, and recorded in ``_build/{shard}.json``; a rerun after a
crash reuses every shard whose record, fingerprint and sha256 still match. ``manifest.json`` is written
last, atomically, and lists only finished shards.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from . import schema, storage
from .classes import ClassMap
from .plan import NON_OUTPUT_OPTIONS, BuildOptions, ImageJob, ShardgenError, plan
from .scan import process_image
from .splits import SPLITS, share_warnings
from .tiling import TileGrid

__all__ = ["BuildOptions", "ShardgenError", "build"]

BUILD_DIR = "_build"  # per-shard completion records used to resume
TAR_MTIME = 0  # fixed tar member mtime: shards are byte-identical across runs


def _process(args):
    return process_image(*args)


def _die_with_parent() -> None:
    """Pool initializer: a worker gets SIGKILL when the build process dies (Linux), so killing a build
    never leaves orphans that keep burning CPU."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------- shards


def _shard_plans(jobs: list[ImageJob], opts: BuildOptions) -> list[tuple[str, int, list[ImageJob]]]:
    per_shard = max(1, opts.shard_size // TileGrid(opts.image_size, opts.tile, opts.stride).count)
    plans = []
    for split in SPLITS:
        js = [j for j in jobs if j.split == split]
        for k in range(0, len(js), per_shard):
            plans.append((split, k // per_shard, js[k : k + per_shard]))
    return plans


def _fingerprint(name: str, jobs: list[ImageJob], image_hashes: list[str], opts: BuildOptions) -> str:
    options = _manifest_options(opts)
    # The split method only decides which images a shard holds, and those are hashed below: leaving it out
    # keeps the shards of builds made before the option existed reusable.
    del options["split_method"]
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    h.update(name.encode())
    for job, digest in zip(jobs, image_hashes, strict=True):
        h.update(repr((job.image_id, job.stone_id, job.ann.width, job.ann.height, job.ann.shapes)).encode())
        h.update(repr(job.values).encode())
        h.update(digest.encode())
    return h.hexdigest()


def _manifest_options(opts: BuildOptions) -> dict:
    out = {k: v for k, v in asdict(opts).items() if k not in NON_OUTPUT_OPTIONS}
    out["classes"] = Path(opts.classes).name
    return out


def _reusable(out: str, name: str, jobs: list[ImageJob], opts: BuildOptions) -> dict | None:
    """The completion record of an already written shard whose inputs and bytes are unchanged."""
    rec_url = storage.join(storage.join(out, BUILD_DIR), name + ".json")
    if not storage.exists(rec_url):
        return None
    try:
        rec = json.loads(storage.read_text(rec_url))
    except (OSError, json.JSONDecodeError):
        return None
    hashes = [hashlib.sha256(Path(j.path).read_bytes()).hexdigest() for j in jobs]
    if rec.get("fingerprint") != _fingerprint(name, jobs, hashes, opts):
        return None
    url = storage.join(out, name)
    if not storage.exists(url) or storage.sha256_of(url) != (rec["sha256"], rec["bytes"]):
        return None
    return rec


def _write_shard(out: str, split: str, index: int, results: list[dict]) -> tuple[str, int]:
    """Write one shard under a temporary name and move it into place; returns (sha256, bytes)."""
    final = storage.join(out, schema.shard_name(split, index))
    # One tar on a stream opened here (local or any fsspec URL); closing the stream is what commits an S3 upload.
    with storage.open_url(final + ".partial", "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME)  # samples are encoded bytes already
        for result in results:
            for sample in result["samples"]:
                writer.write(sample)
        writer.close()  # ends the tar; the stream is ours, closed by the with
    storage.rename(final + ".partial", final)
    return storage.sha256_of(final)


# --------------------------------------------------------------------------------------------- build


def build(annotations, images, out: str, opts: BuildOptions, workers: int = 1, progress: bool = True) -> dict:
    """Build the dataset at ``out``; returns the summary (also printed by the CLI)."""
    start = time.perf_counter()
    # Bad options fail before any input is read or any output (an earlier build's manifest) is touched.
    TileGrid(opts.image_size, opts.tile, opts.stride)
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

    plans = _shard_plans(jobs, opts)
    records, pending = {}, []
    for split, index, shard_jobs in plans:
        name = schema.shard_name(split, index)
        rec = _reusable(out, name, shard_jobs, opts)
        if rec is not None:
            records[name] = rec
        else:
            pending.append((split, index, shard_jobs))

    todo = [(job, opts) for _, _, shard_jobs in pending for job in shard_jobs]
    ctx = mp.get_context("fork")
    pool = ctx.Pool(workers, initializer=_die_with_parent) if workers > 1 and todo else None
    bar = tqdm(total=len(jobs), desc="shardgen", unit="img", disable=not progress)
    try:
        results = pool.imap(_process, todo) if pool else map(_process, todo)
        bar.update(sum(r["images"] for r in records.values()))
        for split, index, shard_jobs in pending:
            name = schema.shard_name(split, index)
            shard_results = []
            for _ in shard_jobs:
                shard_results.append(next(results))
                bar.update(1)
            raster_skipped = Counter()
            for r in shard_results:
                raster_skipped.update(r["skipped"])
            sha, size = _write_shard(out, split, index, shard_results)
            hist = np.sum([r["hist"] for r in shard_results], axis=0)
            fp = _fingerprint(name, shard_jobs, [r["sha256"] for r in shard_results], opts)
            records[name] = {
                "url": name,
                "samples": sum(len(r["samples"]) for r in shard_results),
                "images": len(shard_jobs),
                "bytes": size,
                "sha256": sha,
                "class_pixels": hist.tolist(),
                "warnings": [w for r in shard_results for w in r["warnings"]],
                "skipped": dict(raster_skipped),
                "upscaled": [u for r in shard_results for u in r["upscaled"]],
                "fingerprint": fp,
            }
            rec_url = storage.join(storage.join(out, BUILD_DIR), name + ".json")
            storage.write_bytes_atomic(rec_url, json.dumps(records[name], sort_keys=True).encode())
    finally:
        bar.close()  # also on error, so the error message starts on a line of its own
        if pool:
            pool.terminate()
    # Reused shards report their warnings again, so a resumed build prints what a fresh one would.
    warnings = plan_warnings + [w for s, i, _ in plans for w in records[schema.shard_name(s, i)]["warnings"]]
    for rec in records.values():
        skipped.update(rec["skipped"])
    upscaled = [u for s, i, _ in plans for u in records[schema.shard_name(s, i)].get("upscaled", [])]

    manifest = _manifest(plans, records, opts, cmap, skipped)
    storage.write_bytes_atomic(murl, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    elapsed = time.perf_counter() - start
    stones = {s: len({j.stone_id for j in jobs if j.split == s}) for s in SPLITS}
    return {
        "manifest": murl,
        "images": len(jobs),
        "tiles": {s: manifest["splits"][s]["samples"] for s in SPLITS},
        "stones": stones,
        "split_warnings": share_warnings(stones, opts.split_ratios, opts.split_method),
        "shards": len(plans),
        "reused_shards": len(plans) - len(pending),
        "skipped": dict(sorted(skipped.items())),
        "warnings": warnings,
        "upscaled": upscaled,  # [source image, factor] of each crop enlarged more than UPSCALE_WARNING
        "aborted_uploads": aborted,
        "seconds": elapsed,
        "images_per_s": len(jobs) / elapsed if elapsed else 0.0,
    }


def _manifest(plans, records, opts: BuildOptions, cmap: ClassMap, skipped: Counter) -> dict:
    n_classes = cmap.num_classes(opts.mode)
    splits = {}
    for split in SPLITS:
        shards = [records[schema.shard_name(s, i)] for s, i, _ in plans if s == split]
        hist = np.zeros(n_classes, dtype=np.int64)
        for rec in shards:
            hist += np.asarray(rec["class_pixels"], dtype=np.int64)
        splits[split] = {
            "shards": [{k: rec[k] for k in ("url", "samples", "images", "bytes", "sha256")} for rec in shards],
            "samples": sum(r["samples"] for r in shards),
            "images": sum(r["images"] for r in shards),
            "bytes": sum(r["bytes"] for r in shards),
            "class_pixels": hist.tolist(),
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
        "options": _manifest_options(opts),
        "skipped": dict(sorted(skipped.items())),
        "splits": splits,
    }
