"""python -m trainer --config CONFIG [section.key=value ...]  (also under torchrun; see trainer/train.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from shardgen.reader import StorageUnavailable
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
    from .train import TrainError, train  # torch and kornia load after argument errors are reported

    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg)
    except (ConfigError, ManifestError, CheckpointError, TrainError, StorageUnavailable) as e:
        print(f"trainer: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()
    if dist.is_main():
        miou = (summary["last_val"] or {}).get("miou")
        print(json.dumps({"steps": summary["steps"], "val_miou": miou, "best_miou": summary["best_miou"],
                          "skipped_samples": summary["skipped_samples"], "out_dir": summary["out_dir"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
