"""Benchmark: streaming tar shards from S3 against one S3 object per PNG, and the shard loader on local disk.

    python bench/loader_s3_bench.py                          # 8 synthetic scans -> 200 tiles of 400 px
    python bench/loader_s3_bench.py --images 16 --repeats 3

The S3 server is SeaweedFS on loopback (``tests/s3server.py``, the test suite's server), so the figures
measure per-request cost on a fast link, not a WAN; real object storage adds latency to every GET, which
only widens the gap. Synthetic scans are built into shards (all in split "train") on local disk, then
uploaded twice: the shard folder as is, and every tile as two objects, ``{key}.png`` and ``{key}-mask.png``,
the way a folder-of-PNGs dataset sits on object storage.

1. S3, shards vs one object per PNG: every tile read once and decoded to arrays, both paths sequential in
   this one process and thread, no DataLoader workers (equal resources; the comparison is per request):
   - shards: ``shardgen.reader.iter_shard`` over the manifest's s3:// shard URLs + ``trainer.batch.decode``;
   - PNG objects: two ``s3fs`` ``cat_file`` GETs per tile + the same PNG decode.
   Goal: shards >= 10x the samples/s of PNG objects. Both are also timed without the decode (bytes only):
   decoding is the same work on both paths and bounds the read + decode ratio at (decode + 2 GETs) /
   decode, whatever the shards' own speed.
2. The training loader (``trainer.data.train_loader``) with 1 and 2 workers, from local disk and from S3,
   against PNG decoding alone (the bytes of the very tiles the loader delivers, already in memory, decoded in
   this process: ``train_bench.streamed_tiles``): what reading
   and batching add to decoding. Goals: 1 worker >= 0.85x decode alone; 2 workers >= 1.8x 1 worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common
import train_bench

from shardgen import schema, storage
from shardgen.reader import iter_shard
from trainer.batch import decode
from trainer.config import Config

sys.path.insert(0, str(common.ROOT / "tests"))
from s3server import S3Server  # noqa: E402  (the test suite's server, not a package)

SPLIT = train_bench.SPLIT
S3_GOAL = 10.0  # shards / one object per PNG
LOADER_GOAL = 0.85  # train_loader with 1 worker / PNG decode alone: reading and batching cost <= ~15 %
SCALING_GOAL = 0.9  # per added worker, as a fraction of perfect scaling
# Variables that would override the server's endpoint or credentials if inherited from the caller.
SHADOWING_AWS_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def upload_shards(local: Path, url: str) -> None:
    fs, root = storage.fs_for(url)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{root}/{path.relative_to(local).as_posix()}")


def upload_pngs(manifest: dict, url: str) -> list[tuple[str, str]]:
    """Every tile of the split as ``{key}.png`` and ``{key}-mask.png`` under ``url``; their object paths."""
    fs, root = storage.fs_for(url)
    objects, paths = {}, []
    for shard in schema.shard_urls(manifest, SPLIT):
        for key, parts in iter_shard(shard):
            image, mask = f"{root}/{key}.png", f"{root}/{key}-mask.png"
            objects[image], objects[mask] = parts[schema.IMAGE_KEY], parts[schema.MASK_KEY]
            paths.append((image, mask))
    fs.pipe(objects)
    return paths


def shard_rate(manifest: dict, decoded: bool) -> tuple[float, int]:
    """(samples/s, samples): every shard of the split streamed once (and its samples decoded), in this process."""
    n, t0 = 0, time.perf_counter()
    for url in schema.shard_urls(manifest, SPLIT):
        for key, parts in iter_shard(url):
            if decoded:
                decode(url, key, parts)
            n += 1
    return n / (time.perf_counter() - t0), n


def png_object_rate(url: str, paths: list[tuple[str, str]], decoded: bool) -> tuple[float, int]:
    """(samples/s, samples): one GET per PNG, image then mask (and both decoded), in this process."""
    fs, _ = storage.fs_for(url)
    t0 = time.perf_counter()
    for image, mask in paths:
        image_bytes, mask_bytes = fs.cat_file(image), fs.cat_file(mask)
        if decoded:
            schema.decode_png(image_bytes)
            schema.decode_png(mask_bytes)
    return len(paths) / (time.perf_counter() - t0), len(paths)


def start_server(base: Path) -> S3Server:
    """SeaweedFS on loopback, with this process's AWS_* environment pointing at it (as the tests do)."""
    server = S3Server(base)
    server.start()
    for name in SHADOWING_AWS_VARS:
        os.environ.pop(name, None)
    os.environ.update(server.env())
    storage.clear_cache()
    return server


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="synthetic scans, 25 tiles each (default 8)")
    p.add_argument("--image-size", type=int, default=1200, help="crop side the scans are resized to (default 1200)")
    p.add_argument("--tile", type=int, default=400, help="tile side, stride tile/2 (default 400)")
    p.add_argument("--batch-size", type=int, default=8, help="train_loader batch size (default 8)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="train_loader workers (default 1 2)")
    p.add_argument("--loader-batches", type=int, default=100, help="timed batches per loader run (default 100)")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed loader batches first: worker start, shuffle buffer (default 10)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="runs of each path; the fastest counts (default 3)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key in ("images", "tile", "image_size", "batch_size", "loader_batches", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if min(args.workers) < 1 or args.warmup < 0:
        p.error("--workers must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.print_machine()
    tmp = Path(tempfile.mkdtemp(prefix="loader_s3_bench_"))
    server = None
    try:
        t0 = time.perf_counter()
        local = Path(train_bench.build_shards(tmp, args.images, args.image_size, args.tile, args.seed))
        server = start_server(tmp / "s3")
        bucket = "s3://bench"
        fs, _ = storage.fs_for(bucket)
        fs.mkdir("bench")
        upload_shards(local, f"{bucket}/shards")
        local_manifest = schema.read_manifest(str(local))
        s3_manifest = schema.read_manifest(f"{bucket}/shards")
        paths = upload_pngs(s3_manifest, f"{bucket}/png")
        _, shard_bytes = common.tree_bytes(local, "*.tar")
        print(f"data: {len(paths)} tiles of {args.tile} px from {args.images} synthetic scans of {args.image_size} px: "
              f"{len(schema.shard_urls(s3_manifest, SPLIT))} shards ({shard_bytes / 1e6:.1f} MB) and "
              f"{2 * len(paths)} PNG objects on SeaweedFS {server.endpoint}; built and uploaded in "
              f"{time.perf_counter() - t0:.1f} s (not timed)")  # fmt: skip
        s3_comparison(s3_manifest, f"{bucket}/png", paths, args.repeats)
        loaders(local_manifest, s3_manifest, args, server.proc.pid)
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def s3_comparison(manifest: dict, png_url: str, paths: list[tuple[str, str]], repeats: int) -> None:
    best: dict[tuple[str, bool], tuple[float, int]] = {}  # (path, decoded) -> fastest (samples/s, samples)
    for _ in range(repeats):  # alternating, so both paths see the same machine load
        for decoded in (True, False):
            for path, rate in (("shards", shard_rate(manifest, decoded)),
                               ("png", png_object_rate(png_url, paths, decoded))):  # fmt: skip
                best[path, decoded] = max(best.get((path, decoded), (0.0, 0)), rate)
    names = {"shards": "S3 shards: iter_shard", "png": "S3 PNG objects: 2 GETs (cat_file)"}
    rows = [[f"{names[path]}{' + decode' if decoded else ', bytes only'}", rate, 1000 / rate, n]
            for (path, decoded), (rate, n) in best.items()]  # fmt: skip
    print(f"\nS3, every tile read once, sequential in 1 process and 1 thread, best of {repeats}")
    common.print_table(["path", "samples/s", "ms/sample", "samples"], rows)
    for decoded, what in ((True, "read + decode"), (False, "bytes only")):
        ratio = best["shards", decoded][0] / best["png", decoded][0]
        print(common.ratio_line(f"S3 {what}: shards / one object per PNG", ratio, S3_GOAL))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, all its threads; 0 where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loaders(local_manifest: dict, s3_manifest: dict, args: argparse.Namespace, server_pid: int) -> None:
    cfg = Config()
    cfg.train.seed = args.seed
    cfg.data = dataclasses.replace(cfg.data, batch_size=args.batch_size)
    tiles = train_bench.streamed_tiles(local_manifest, cfg, args.loader_batches, args.warmup)
    decode_alone = 0.0
    rates: dict[tuple[str, int], float] = {}  # (where, workers) -> fastest samples/s
    server: dict[int, list[float]] = {}  # workers -> [server CPU seconds, wall seconds] over the S3 runs
    for _ in range(args.repeats):  # round-robin over the paths, so each sees the same spread of machine load
        decode_alone = max(decode_alone, train_bench.decode_rate(tiles))
        for where, manifest in (("local", local_manifest), ("S3", s3_manifest)):
            for k in args.workers:
                cpu, wall = cpu_seconds(server_pid), time.perf_counter()
                rate = train_bench.loader_rate(manifest, cfg, k, args.loader_batches, args.warmup)
                rates[where, k] = max(rates.get((where, k), 0.0), rate)
                if where == "S3":
                    used = server.setdefault(k, [0.0, 0.0])
                    used[0] += cpu_seconds(server_pid) - cpu
                    used[1] += time.perf_counter() - wall
    rows = [["PNG decode alone (1 process, bytes in memory)", decode_alone, 1.0]]
    for (where, k), rate in rates.items():
        rows.append([f"{where} shards: train_loader, {k} worker{'s' * (k != 1)}", rate, rate / decode_alone])
    print(f"\ntrain_loader: {args.loader_batches} batches of {args.batch_size} after {args.warmup} warmup, "
          f"unpinned, best of {args.repeats}")  # fmt: skip
    common.print_table(["path", "samples/s", "vs decode"], rows)
    shares = ", ".join(f"{100 * c / w:.0f}% of a core with {k} worker{'s' * (k != 1)}" for k, (c, w) in server.items())
    print(f"the S3 server runs on the same cores: it used {shares} (its share comes out of the workers' time)")
    first = min(args.workers)
    for where in ("local", "S3"):
        print(common.ratio_line(f"{where}: train_loader {first} worker{'s' * (first != 1)} / PNG decode alone",
                                rates[where, first] / decode_alone, LOADER_GOAL * first))  # fmt: skip
        for k in args.workers:
            if k != first:
                print(common.ratio_line(f"{where}: train_loader {k} / {first} workers",
                                        rates[where, k] / rates[where, first], SCALING_GOAL * k / first))  # fmt: skip


if __name__ == "__main__":
    main()
