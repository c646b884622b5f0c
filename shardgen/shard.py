"""One output shard as a unit of work: the plan fixes which images go into which shard, so building a shard is a
plain function of (plan entry, options) -> record, run the same way by every distributor (``distribute.py``).

A shard is written under a temporary name unique to its attempt and renamed into place, then recorded in
``_build/{shard}.json`` with a fingerprint of its inputs. Attempts never share a temporary file, so a task that
a cluster retried while a lost worker was still writing (or a build rerun while the previous one's tasks were
still running) cannot interleave bytes: every attempt writes the same bytes and the rename is atomic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import schema, storage
from .plan import NON_OUTPUT_OPTIONS, BuildOptions, ImageJob, ShardgenError
from .scan import process_image
from .splits import SPLITS
from .tarstream import end_of_archive
from .tiling import TileGrid

BUILD_DIR = "_build"  # per-shard completion records used to resume
PARTIAL_SUFFIX = ".partial"  # temporary shards of unfinished attempts: {shard}.{attempt}.partial


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its split, its index in the split and its images in order."""

    split: str
    index: int
    jobs: tuple[ImageJob, ...]

    @property
    def name(self) -> str:
        return schema.shard_name(self.split, self.index)


def shard_plans(jobs: list[ImageJob], opts: BuildOptions) -> list[ShardPlan]:
    """Cut the planned images (in build order) into shards of whole images, per split."""
    per_shard = max(1, opts.shard_size // TileGrid(opts.image_size, opts.tile, opts.stride).count)
    plans = []
    for split in SPLITS:
        js = [j for j in jobs if j.split == split]
        for k in range(0, len(js), per_shard):
            plans.append(ShardPlan(split, k // per_shard, tuple(js[k : k + per_shard])))
    return plans


def manifest_options(opts: BuildOptions) -> dict:
    out = {k: v for k, v in asdict(opts).items() if k not in NON_OUTPUT_OPTIONS}
    out["classes"] = Path(opts.classes).name
    return out


def fingerprint(shard: ShardPlan, image_hashes: list[str], opts: BuildOptions) -> str:
    options = manifest_options(opts)
    # The split method only decides which images a shard holds, and those are hashed below: leaving it out
    # keeps the shards of builds made before the option existed reusable.
    del options["split_method"]
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    h.update(shard.name.encode())
    for job, digest in zip(shard.jobs, image_hashes, strict=True):
        h.update(repr((job.image_id, job.stone_id, job.ann.width, job.ann.height, job.ann.shapes)).encode())
        h.update(repr(job.values).encode())
        h.update(digest.encode())
    return h.hexdigest()


def record_url(out: str, name: str) -> str:
    return storage.join(storage.join(out, BUILD_DIR), name + ".json")


def reusable(out: str, shard: ShardPlan, opts: BuildOptions) -> dict | None:
    """The completion record of an already written shard whose inputs and bytes are unchanged."""
    rec_url = record_url(out, shard.name)
    if not storage.exists(rec_url):
        return None
    try:
        rec = json.loads(storage.read_text(rec_url))
    except (OSError, json.JSONDecodeError):
        return None
    hashes = [hashlib.sha256(Path(j.path).read_bytes()).hexdigest() for j in shard.jobs]
    if rec.get("fingerprint") != fingerprint(shard, hashes, opts) or "scans" not in rec:
        return None
    url = storage.join(out, shard.name)
    if not storage.exists(url) or storage.sha256_of(url) != (rec["sha256"], rec["bytes"]):
        return None
    return rec


def build_shard(out: str, shard: ShardPlan, opts: BuildOptions, results: Iterable[dict] | None = None) -> dict:
    """Build one shard: process its scans, write the tar and its completion record; returns the record.

    ``results`` are the scans' ``process_image`` results in order, when a process pool computed them already
    (the local distributor); by default the scans are processed here, one after the other (a cluster task).
    """
    if results is None:
        results = (process_image(job, opts) for job in shard.jobs)
    results = list(results)
    sha, size = _write_tar(out, shard, results)
    raster_skipped: Counter = Counter()
    for r in results:
        raster_skipped.update(r["skipped"])
    record = {
        "url": shard.name,
        "samples": sum(r["samples"] for r in results),
        "images": len(shard.jobs),
        "bytes": size,
        "sha256": sha,
        "class_pixels": np.sum([r["hist"] for r in results], axis=0).tolist(),
        "warnings": [w for r in results for w in r["warnings"]],
        "skipped": dict(raster_skipped),
        # [source image, factor] of each crop enlarged more than UPSCALE_WARNING, kept so that a resumed or
        # distributed build reports them like a fresh local one
        "upscaled": [u for r in results for u in r["upscaled"]],
        "fingerprint": fingerprint(shard, [r["sha256"] for r in results], opts),
        "scans": [r["sha256"] for r in results],  # the scans' own bytes: what a checkpoint trained on
    }
    storage.write_bytes_atomic(record_url(out, shard.name), json.dumps(record, sort_keys=True).encode())
    return record


def run_shard(out: str, shard: ShardPlan, opts: BuildOptions) -> tuple[dict, bool]:
    """A whole shard job: reuse the finished shard if its inputs and bytes are unchanged, else build it.
    Returns (record, reused)."""
    rec = reusable(out, shard, opts)
    if rec is not None:
        return rec, True
    return build_shard(out, shard, opts), False


def _write_tar(out: str, shard: ShardPlan, results: list[dict]) -> tuple[str, int]:
    """Write the tar under this attempt's temporary name and move it into place; returns (sha256, bytes),
    hashed on the way out (reading the shard back would download it again from object storage)."""
    final = storage.join(out, shard.name)
    attempt = uuid.uuid4().hex[:12]
    partial = f"{final}.{attempt}{PARTIAL_SUFFIX}"
    sha, size = hashlib.sha256(), 0
    # One tar on a stream opened here (local or any fsspec URL); closing the stream is what commits an S3 upload.
    with storage.open_url(partial, "wb") as stream:
        for chunk in [r["tar"] for r in results] + [end_of_archive(sum(len(r["tar"]) for r in results))]:
            stream.write(chunk)  # each scan's samples, serialized by the worker that made them
            sha.update(chunk)
            size += len(chunk)
        if storage.is_local(partial):  # on disk before the rename makes it final: a crash leaves no torn shard
            stream.flush()
            os.fsync(stream.fileno())
    storage.rename(partial, final)
    return sha.hexdigest(), size


def check_records(out: str, records: dict[str, dict]) -> None:
    """Every shard's bytes still match its record (``records``: name -> record), read back before the
    manifest lists them: an attempt of a killed Dask client may still be running on a cluster and replace a
    shard after its record was written. A mismatch loses its record (a rerun rebuilds the shard) and fails
    the build, naming the shards."""
    changed = []
    for name, rec in sorted(records.items()):
        url = storage.join(out, name)
        try:
            found = storage.sha256_of(url)
        except FileNotFoundError:
            found = None
        if found != (rec["sha256"], rec["bytes"]):
            with contextlib.suppress(FileNotFoundError):
                storage.remove(record_url(out, name))
            changed.append(name)
    if changed:
        raise ShardgenError(f"{out}: {', '.join(changed)} changed after {'its' if len(changed) == 1 else 'their'} "
                            f"record was written (another build writing into the same folder?); rerun the build "
                            f"to rebuild {'it' if len(changed) == 1 else 'them'}")  # fmt: skip


def remove_stale(out: str, names: set[str]) -> list[str]:
    """Delete the shards and build records of an earlier build into ``out`` that this build's plan does not
    have (``names``: its shard names), e.g. after a rebuild with another --shard-size or fewer scans, so the
    folder holds this build only; returns the names removed. Call it once every shard is written."""
    fs, root = storage.fs_for(out)
    root = root.rstrip("/")
    stale = []
    for pattern in ("/*.tar", f"/{BUILD_DIR}/*.json"):
        for path in fs.glob(root + pattern):
            name = path.rsplit("/", 1)[1]
            shard = name.removesuffix(".json") if pattern.endswith(".json") else name
            if re.fullmatch(r"(train|val|test)-\d{6}\.tar", shard) and shard not in names:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(path)
                stale.append(name)
    return sorted(stale)


def remove_partials(out: str) -> None:
    """Delete temporary shards left by killed attempts; call it once every task of the build has finished."""
    fs, root = storage.fs_for(out)
    for path in fs.glob(root.rstrip("/") + "/*" + PARTIAL_SUFFIX):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
