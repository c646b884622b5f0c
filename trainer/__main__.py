"""python -m trainer --config CONFIG [section.key=value ...]  (also under torchrun; see trainer/train.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from shardgen.reader import CorruptSample, StorageUnavailable
from shardgen.schema import ManifestError

from . import dist
from .checkpoint import CheckpointError
from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    p.add_argument("--config", required=True, help="YAML file, or a name in the project's configs/ (demo, u2net)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=3e-4 data.batch_size=16")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if dist.local_rank() == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from .train import TrainError, train  # the loop pulls in models, data and DDP

    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg)
        main_rank = dist.is_main()  # asked before cleanup, after which every process looks like rank 0
    # CorruptSample: a validation tile read in this process (data.workers: 0); training skips corrupt tiles.
    except (ConfigError, ManifestError, CheckpointError, TrainError, StorageUnavailable, CorruptSample) as e:
        print(f"trainer: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()
    if main_rank:
        last = summary["last_val"] or {}
        keys = ("steps", "best_miou", "skipped_samples", "bad_steps", "rank_steps", "params_in_sync", "io_retries",
                "out_dir")
        print(json.dumps({"val_miou": last.get("miou"), "val_samples": last.get("samples"),
                          "val_pixels": last.get("pixels"), **{k: summary[k] for k in keys}}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
