"""shardgen command line.

    python -m shardgen synth --out DIR --images N --seed S
    python -m shardgen build --annotations XML_DIR --images IMG_DIR --out URL [options]
    python -m shardgen verify URL
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .build import BuildOptions, ShardgenError, build
from .classes import MODES, REFLECTION_POLICIES
from .crust import UPSCALE_WARNING
from .distribute import DISTRIBUTORS, SCHEDULER_ENV, quiet_dask_logs
from .scanfile import max_pixels_arg
from .splits import SPLIT_METHODS, parse_ratios

MAX_NAMED = 10  # upscaled scans named in the summary line; the warnings above name every one


def _ratios(text: str) -> dict[str, float]:
    # argparse replaces a type's ValueError with a generic "invalid value"; this keeps parse_ratios' reason.
    try:
        return parse_ratios(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardgen", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic Sarine-like dataset (PNG scans + CVAT XML)")
    s.add_argument("--out", required=True, help="output folder: DIR/images/*.png, DIR/annotations/*.xml")
    s.add_argument("--images", type=int, default=40, help="number of scans (default 40)")
    s.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    s.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")

    d = BuildOptions()
    b = sub.add_parser("build", help="CVAT XML + scans (PNG, JPEG, TIFF, BMP) -> WebDataset tile shards + manifest")
    b.add_argument("--annotations", required=True, help="folder of CVAT for images 1.1 XML files (or one file)")
    b.add_argument("--images", required=True, help="folder of the scans named in the XML")
    b.add_argument("--out", required=True, help="output URL: a local path, s3://bucket/prefix, memory://...")
    b.add_argument("--mode", choices=MODES, default=d.mode, help="multiclass ids 0..10, or binary (any defect is 1)")
    b.add_argument("--reflections", choices=REFLECTION_POLICIES, default=d.reflections,
                   help="reflections paint their parent class (merge), 255 (ignore) or 0 (background)")
    b.add_argument("--unknown-labels", choices=("error", "ignore"), default=d.unknown_labels,
                   help="an unknown label fails the build (error) or is skipped and counted (ignore)")
    b.add_argument("--skip-missing", action="store_true", help="count images missing on disk instead of failing")
    b.add_argument("--channels", type=int, choices=(1, 3), default=d.channels, help="1: grayscale, 3: RGB tiles")
    b.add_argument("--image-size", type=int, default=d.image_size, help="crop resize side (default %(default)s)")
    b.add_argument("--tile", type=int, default=d.tile, help="tile side (default %(default)s)")
    b.add_argument("--stride", type=int, default=d.stride, help="tile stride (default %(default)s)")
    b.add_argument("--shard-size", type=int, default=d.shard_size, help="samples per shard (default %(default)s)")
    b.add_argument("--split-ratios", type=_ratios, default=d.split_ratios,
                   help="e.g. train=0.6,val=0.1,test=0.3 (the default)")
    b.add_argument("--split-method", choices=SPLIT_METHODS, default=d.split_method,
                   help="hash: each stone by a stable hash, adding stones never moves existing ones (default);\n"
                        "exact: stones in hash order cut at the exact ratios, for small datasets\n"
                        "(adding stones can move a few existing ones)")
    b.add_argument("--stone-id-regex", default=None,
                   help="regex on the image id whose first group is the stone id (default: image id)")
    b.add_argument("--polyline-width", type=int, default=d.polyline_width, help="px (default %(default)s)")
    b.add_argument("--point-radius", type=int, default=d.point_radius, help="px (default %(default)s)")
    b.add_argument("--png-level", type=int, choices=range(10), default=d.png_level, metavar="0-9",
                   help="zlib level of tile PNGs (default %(default)s)")
    b.add_argument("--classes", default=d.classes, help="class map YAML (default configs/classes.yaml)")
    b.add_argument("--max-pixels", type=max_pixels_arg, default=d.max_pixels,
                   help="refuse scans with more pixels, from the header (default %(default)s, Pillow's limit)")
    b.add_argument("--workers", type=int, default=None,
                   help="processes (local), or LocalCluster workers (dask without a scheduler); default 1. "
                        "The output bytes do not depend on it")
    b.add_argument("--distributor", choices=DISTRIBUTORS, default="local",
                   help="local: a process pool on this machine; dask: one task per shard on a Dask cluster")
    b.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help=f"Dask scheduler, e.g. tcp://HOST:8786 (default ${SCHEDULER_ENV}; if neither is set, "
                        "--distributor dask starts a LocalCluster of --workers processes)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    v = sub.add_parser("verify", help="check every shard against the manifest's sha256 and counts")
    v.add_argument("url", help="dataset root or manifest URL")
    return p


def _build(args) -> int:
    if args.scheduler and args.distributor != "dask":
        raise ValueError("--scheduler needs --distributor dask")
    if args.distributor == "dask" and args.workers is not None and (args.scheduler or os.environ.get(SCHEDULER_ENV)):
        raise ValueError("--workers sizes the local pool or a LocalCluster; a Dask scheduler's cluster brings its "
                         "own workers (start more with `dask worker ADDRESS`)")
    opts = BuildOptions(
        mode=args.mode, reflections=args.reflections, unknown_labels=args.unknown_labels,
        skip_missing=args.skip_missing, channels=args.channels, image_size=args.image_size, tile=args.tile,
        stride=args.stride, shard_size=args.shard_size, split_ratios=args.split_ratios,
        split_method=args.split_method,
        stone_id_regex=args.stone_id_regex, polyline_width=args.polyline_width,
        point_radius=args.point_radius, png_level=args.png_level, classes=args.classes,
        max_pixels=args.max_pixels,
    )  # fmt: skip
    if args.distributor == "dask":
        quiet_dask_logs()  # shardgen reports lost workers and failed tasks itself, in one line
    summary = build(args.annotations, args.images, args.out, opts, workers=args.workers or 1,
                    progress=not args.quiet, distributor=args.distributor, scheduler=args.scheduler)
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    tiles = ", ".join(f"{k} {v}" for k, v in summary["tiles"].items())
    xml = summary["xml_files"]
    print(f"annotations: {len(xml)} XML file{'s' * (len(xml) != 1)}: {', '.join(xml[:5])}"
          f"{f' ... ({len(xml) - 5} more)' if len(xml) > 5 else ''}")
    print(f"images: {summary['images']}  tiles: {tiles}  shards: {summary['shards']} "
          f"({summary['reused_shards']} reused)")  # fmt: skip
    if "dask" in summary:
        d = summary["dask"]
        print(f"dask: {d['tasks']} tasks on {d['workers']} worker{'s' * (d['workers'] != 1)}, {d['retried']} "
              f"retried ({d['scheduler']})")
    n_stones = sum(summary["stones"].values()) or 1
    shares = ", ".join(f"{s} {n} = {n / n_stones:.1%} (asked {opts.split_ratios[s]:.1%})"
                       for s, n in summary["stones"].items())  # fmt: skip
    print(f"stones per split ({opts.split_method}): {shares}", flush=True)
    for w in summary["split_warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if summary["aborted_uploads"]:
        print(f"aborted {summary['aborted_uploads']} unfinished uploads left in {args.out} by an earlier build")
    for reason, n in summary["skipped"].items():
        print(f"skipped: {n} x {reason}")
    if summary["upscaled"]:
        names = ", ".join(f"{name} ({factor:g}x)" for name, factor in summary["upscaled"][:MAX_NAMED])
        more = len(summary["upscaled"]) - MAX_NAMED
        print(f"upscaled: {len(summary['upscaled'])} scans whose crust crop is enlarged more than "
              f"{UPSCALE_WARNING:g}x: {names}{f' and {more} more' if more > 0 else ''}")  # fmt: skip
    print(f"throughput: {summary['images_per_s']:.2f} images/s in {summary['seconds']:.1f} s")
    stale = [name for name in summary["stale_removed"] if name.endswith(".tar")]  # records: name.tar.json
    if stale:
        print(f"removed {len(stale)} shards and records of an earlier build into {args.out}: {', '.join(stale[:4])}"
              f"{' ...' if len(stale) > 4 else ''}")
    print(f"manifest: {summary['manifest']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            return _build(args)
        if args.command == "synth":
            from .synth import write_synthetic

            summary = write_synthetic(args.out, args.images, args.seed, workers=args.workers)
            print(json.dumps(summary, indent=1, default=str))
            return 0
        from .verify import verify

        return verify(args.url)
    except (ShardgenError, ValueError, OSError) as e:
        print(f"shardgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "; rerun the same command to resume (finished shards are reused)" if args.command == "build" else ""
        print(f"shardgen: interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
