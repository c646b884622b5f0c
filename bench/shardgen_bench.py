"""Benchmark: ``shardgen build`` against the research code's tiling script, on the same synthetic scans.

    python bench/shardgen_bench.py                      # 24 scans of 1150-1450 px, shardgen with 1 and 2 workers
    python bench/shardgen_bench.py --images 40 --workers 1 2 4 8 --repeats 2
    python bench/shardgen_bench.py --dask-workers 0     # without the Dask distributor

Both paths do the same job from the same files: parse the CVAT XML, rasterize the masks, cut the crust,
resize the crop to 1200 px (image Lanczos, mask nearest) and cut 25 tiles of 400 px at stride 200, with
tiles of the same colour mode (``--channels``). The baseline works the way the research code did: one
process, PIL ImageDraw on the parsed XML, and 50 PNG files per scan (``{id}_{i}_{j}.png`` and
``{id}_{i}_{j}-mask.png``) with PIL's default PNG settings. shardgen writes WebDataset tar shards (PNG
members at zlib level 1, plus per-tile json metadata and a manifest). Synthesis is not timed.

The Dask distributor (``--distributor dask``, one task per shard) runs on a ``LocalCluster`` of
``--dask-workers`` single-threaded worker processes on this machine and is compared with the local process
pool of as many workers, on the same shards (``--shard-size``, default one scan per shard: the most tasks, so
the per-task cost shows most). The cluster is started and warmed up by one untimed build before the timed
runs, as a long-running cluster would be; its start-up time is printed apart. The task overhead per shard is
reported twice: the round trip of empty tasks on the cluster, and the extra worker time per shard of the Dask
build over the local one ((dask - local) seconds x workers / shards).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import common
import numpy as np
from PIL import Image, ImageDraw

from shardgen.build import BuildOptions, build
from shardgen.classes import ClassMap
from shardgen.synth import DEFAULT_SIZE_RANGE, write_synthetic
from shardgen.tiling import TileGrid

STROKE = 2  # px: the research code's polygon outline and polyline width
POINT_RADIUS = 2  # px


def research_baseline(annotations: Path, images: Path, out: Path, channels: int) -> int:
    """The research code's pipeline, single process; returns the number of scans written."""
    opts = BuildOptions()
    cmap = ClassMap.load(opts.classes)
    grid = TileGrid(opts.image_size, opts.tile, opts.stride)
    out.mkdir(parents=True)
    n = 0
    for xml in sorted(annotations.glob("*.xml")):
        for el in ET.parse(xml).getroot().iter("image"):
            _baseline_image(el, images / el.get("name"), out, cmap, grid, opts.image_size, channels)
            n += 1
    return n


def _baseline_image(el, path: Path, out: Path, cmap: ClassMap, grid: TileGrid, size: int, channels: int) -> None:
    image = Image.open(path).convert("RGB")
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    for shape in el:
        info = cmap.lookup(shape.get("label", ""))
        if info is None:
            continue
        value = cmap.paint_value(info, "multiclass", "merge")
        pts = [tuple(float(c) for c in p.split(",")) for p in shape.get("points", "").split(";") if p]
        if shape.tag == "polygon":
            draw.polygon(pts, fill=value)
            draw.line(pts + pts[:1], fill=value, width=STROKE)
        elif shape.tag == "polyline":
            draw.line(pts, fill=value, width=STROKE)
        elif shape.tag == "points":
            for x, y in pts:
                draw.ellipse((x - POINT_RADIUS, y - POINT_RADIUS, x + POINT_RADIUS, y + POINT_RADIUS), fill=value)
    # Crust: pixels whose R+G+B is 0; border rows and columns made only of crust are cut.
    content = np.asarray(image).sum(axis=2) != 0
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    if channels == 1:  # converted before the resize, as shardgen does, so both resize the same pixels
        image = image.convert("L")
    image = image.crop(box).resize((size, size), Image.Resampling.LANCZOS)
    mask = mask.crop(box).resize((size, size), Image.Resampling.NEAREST)
    stem = Path(el.get("name")).stem
    t = grid.tile
    for i, j, y, x in grid.positions():
        tile_box = (x, y, x + t, y + t)
        image.crop(tile_box).save(out / f"{stem}_{i}_{j}.png")
        mask.crop(tile_box).save(out / f"{stem}_{i}_{j}-mask.png")


def run_baseline(raw: Path, out: Path, channels: int) -> tuple[float, int, int, int]:
    """(seconds, scans, tiles, bytes of the PNG files)."""
    t0 = time.perf_counter()
    n = research_baseline(raw / "annotations", raw / "images", out, channels)
    seconds = time.perf_counter() - t0
    files, size = common.tree_bytes(out, "*.png")
    shutil.rmtree(out)
    return seconds, n, files // 2, size  # a tile is an image file and a mask file


def run_shardgen(raw: Path, out: Path, channels: int, workers: int, shard_size: int,
                 scheduler: str | None = None) -> tuple[float, int, int, int]:  # fmt: skip
    """(seconds, scans, tiles, bytes of the tar shards); with ``scheduler``, the Dask distributor on that cluster."""
    opts = BuildOptions(channels=channels, shard_size=shard_size)
    distributor = "dask" if scheduler else "local"
    t0 = time.perf_counter()
    summary = build(raw / "annotations", raw / "images", str(out), opts, workers=workers, progress=False,
                    distributor=distributor, scheduler=scheduler)  # fmt: skip
    seconds = time.perf_counter() - t0
    _, size = common.tree_bytes(out, "*.tar")
    shutil.rmtree(out)  # a second build into the same folder would reuse the shards
    return seconds, summary["images"], sum(summary["tiles"].values()), size


def start_cluster(workers: int):
    """(cluster, client, start-up seconds, empty-task round trip in seconds) of a warm LocalCluster."""
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0")  # fmt: skip
    client = Client(cluster)
    client.wait_for_workers(workers)
    client.run(importlib.import_module, "shardgen.distribute")  # what a worker imports for its first task
    startup = time.perf_counter() - t0
    n = 50 * workers
    client.gather(client.map(int, range(n), pure=False))  # warm the scheduler's code paths
    t0 = time.perf_counter()
    client.gather(client.map(int, range(n), pure=False))
    return cluster, client, startup, (time.perf_counter() - t0) * workers / n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 24: a build's fixed costs (starting the pool, the last shard written after the last scan, the manifest;
    # ~50 ms on 2 cores) are ~4 % of a 2-worker build of 12 scans, and hide the scaling a real build has.
    p.add_argument("--images", type=int, default=24, help="synthetic scans (default 24)")
    p.add_argument("--size-range", type=int, nargs=2, default=list(DEFAULT_SIZE_RANGE), metavar=("MIN", "MAX"),
                   help="scan side range in px (default %(default)s)")  # fmt: skip
    p.add_argument("--channels", type=int, choices=(1, 3), default=1,
                   help="tile colour mode for both paths: 1 = 8-bit L (shardgen's default), 3 = RGB")  # fmt: skip
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="shardgen worker counts; 1, the per-core reference, always runs (default 1 2)")  # fmt: skip
    p.add_argument("--dask-workers", type=int, default=2,
                   help="workers of the Dask LocalCluster, compared with as many local workers; 0: no Dask run "
                        "(default %(default)s)")  # fmt: skip
    p.add_argument("--shard-size", type=int, default=25,
                   help="samples per shard for every shardgen run (default %(default)s: one scan per shard)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each path, alternating; the fastest counts (default 2: one run of a few seconds is at "
                        "the mercy of a moment of load on a small machine)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.images < 1 or args.repeats < 1 or min(args.workers) < 1 or args.dask_workers < 0:
        p.error("--images, --repeats and --workers must be >= 1, --dask-workers >= 0")
    workers = sorted({1, *args.workers, *([args.dask_workers] if args.dask_workers else [])})

    common.print_machine()
    opts = BuildOptions(channels=args.channels)
    mode = "L (8-bit grey)" if args.channels == 1 else "RGB"
    print(f"input: {args.images} synthetic scans, {args.size_range[0]}-{args.size_range[1]} px, seed {args.seed}; "
          f"both paths write {mode} tiles of {opts.tile} px, stride {opts.stride}, from a {opts.image_size} px "
          "crop")  # fmt: skip
    print("baseline: 1 process, ElementTree + ImageDraw, 50 PNG files per scan, PIL default PNG (zlib 6)")
    print(f"shardgen: build() with BuildOptions(channels={args.channels}, shard_size={args.shard_size}), tar "
          f"shards, PNG zlib level {opts.png_level} + json per tile")  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="shardgen_bench_"))
    cluster = client = None
    try:
        raw = tmp / "raw"
        t0 = time.perf_counter()
        write_synthetic(raw, args.images, args.seed, size_range=tuple(args.size_range))
        print(f"synthesized in {time.perf_counter() - t0:.1f} s (not timed below)")
        dask_name = f"shardgen build, dask {args.dask_workers} workers"
        if args.dask_workers:
            cluster, client, startup, empty_task = start_cluster(args.dask_workers)
            warmup = build(raw / "annotations", raw / "images", str(tmp / "warmup"),
                           BuildOptions(channels=args.channels, shard_size=args.shard_size), progress=False,
                           distributor="dask", scheduler=client.scheduler.address)  # fmt: skip
            shutil.rmtree(tmp / "warmup")
            print(f"dask: LocalCluster of {args.dask_workers} single-threaded workers started in {startup:.1f} s, "
                  "warmed up by one build (not timed below)")  # fmt: skip
        print()
        best: dict[str, tuple] = {}  # path -> its fastest run
        for r in range(args.repeats):
            runs = {"baseline (research style)": run_baseline(raw, tmp / f"base{r}", args.channels)}
            for k in workers:
                name = f"shardgen build, {k} worker{'s' * (k > 1)}"
                runs[name] = run_shardgen(raw, tmp / f"sg{k}_{r}", args.channels, k, args.shard_size)
            if client is not None:
                address = client.scheduler.address
                runs[dask_name] = run_shardgen(raw, tmp / f"dask_{r}", args.channels, args.dask_workers,
                                               args.shard_size, address)
            for name, result in runs.items():
                if name not in best or result[0] < best[name][0]:
                    best[name] = result
        rows = []
        for name, (seconds, n, count, size) in best.items():
            rows.append([name, seconds, n / seconds, count, size, size // n])
        common.print_table(["path", "seconds", "images/s", "tiles", "bytes", "bytes/image"], rows)
        names = [name for name in best if name != dask_name]
        rate = {name: best[name][1] / best[name][0] for name in best}
        base, ref = names[0], names[1]
        print()
        print(common.ratio_line("per core: shardgen 1 worker / baseline", rate[ref] / rate[base], 1.5))
        for k, name in zip(workers[1:], names[2:], strict=True):
            print(common.ratio_line(f"scaling: {k} workers / 1 worker", rate[name] / rate[ref], 0.9 * k))
        if client is not None:
            k = args.dask_workers
            local = f"shardgen build, {k} worker{'s' * (k > 1)}"
            print(common.ratio_line(f"dask: {k} workers / local {k} workers", rate[dask_name] / rate[local], 0.9))
            shards = warmup["shards"]
            extra = (best[dask_name][0] - best[local][0]) * k / shards
            print(f"dask task overhead per shard: {1000 * empty_task:.1f} ms per empty task round trip; "
                  f"{1000 * extra:+.0f} ms of worker time per shard in the build ((dask - local) x {k} / "
                  f"{shards} shards)")  # fmt: skip
        print(f"output size: shardgen / baseline = {best[ref][3] / best[base][3]:.2f}")
    finally:
        if client is not None:
            client.close()
            cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
