"""Quality of the demo recipe and of one-change variants of it, over several training seeds, side by side.

    python bench/quality_bench.py --arms demo                      # bench/README.md's figure: 3 seeds, ~25 min
    python bench/quality_bench.py                                  # every arm, 3 seeds each (~2.5 h on 2 cores)
    python bench/quality_bench.py --mode multiclass --arms demo fp32
    python bench/quality_bench.py --device cuda --images 200 --steps 20000   # a GPU's budget
    python bench/quality_bench.py --mode multiclass --arms demo --set loss.form=where_what   # try a change

``--retune`` (with ``--keep``) measures a change of the decision alone: each kept run whose configuration differs
from the arm's only in ``train.decision_beta``, ``train.class_decision`` or ``train.decision_grow`` is not trained
again; its best.pt is re-tuned on its validation split as the trainer would tune it (training is deterministic on
one machine: the same seed gives bit-identical weights, bench/README.md). ``--held-out-only`` skips scoring the
validation split.

``--mode multiclass`` (what ``make demo`` trains) adds mIoU, the mean per-class object F1 and the share of found
defects with the right class, and a table of the multiclass goals (held-out median, and the worst seed at 0.8 of
each). ``--keep DIR`` keeps the data, runs and evaluations; a later run with the same ``--keep`` reuses its data.

Data, as ``make demo`` builds it: 72 synthetic scans of seed 0 split 36/24/12 exactly. Every arm trains on its
train split and tunes its decision on its validation split (as the trainer does, on whole scans); nothing is
scored on its test split. Two scores per model:

- **val**: the demo data's validation split, where the decision was tuned. Compare arms on these.
- **held-out**: a separate 40-scan synthetic set of another seed (``shardgen synth --seed 7``), all of it scored,
  used for no choice: what a new user's scans from the same generator would see. Report it, never optimize it.

Arms; each differs from ``demo`` (``configs/demo.yaml`` as it stands) in exactly one thing, at the same training
budget (the demo's steps, batch and crop, unless ``--steps`` sets another for all):

  demo          configs/demo.yaml, evaluated as ``make demo`` evaluates it (``--tta flips``: DEMO_TTA)
  fp32          train.amp: "off" (what a CPU without native bf16 runs)
  share-0.5     data.defect_share: 0.5
  no-objects    loss.object_window: 0 (no up-weighting of thin and small defects)
  default-aug   the trainer's default augmentation instead of the demo's light one
  no-tta        the demo model, evaluated without test-time augmentation

Each figure is the median and the [min, max] range over ``--seeds`` training seeds (``train.seed``); one run is
one draw, and on a CPU runs at this budget move with the seed and even the float order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, print_machine, print_table

PY = sys.executable
ARMS = ("demo", "fp32", "share-0.5", "no-objects", "default-aug", "no-tta")
TRAINED_AS = {"no-tta": "demo"}  # arms that reuse another arm's models
# make demo's evaluation: each tile's probabilities averaged over its 4 flips, the decision tuned without them
# (the Makefile's evaluate --tta; bench/README.md measures the choice).
DEMO_TTA = "flips"
DECISION_KEYS = ("decision_beta", "class_decision", "decision_grow")  # train.* settings that --retune may change
HELD_OUT_SEED = 7
DEMO_IMAGES, DEMO_SPLIT = 72, "train=0.5,val=0.33,test=0.17"  # as the Makefile's demo builds it: 36/24/12
# (column, metrics.json path); multiclass adds its class figures.
FIGURES = [("defect IoU", ("any_defect", "iou")), ("recall", ("any_defect", "object_recall")),
           ("precision", ("any_defect", "object_precision")), ("F1", ("any_defect", "object_f1")),
           ("F1 IoU>0.5", ("any_defect", "object_f1_050")), ("PQ", ("any_defect", "pq"))]  # fmt: skip
CLASS_FIGURES = [("mIoU", ("miou",)), ("class F1", ("object_f1_mean",)), ("right class", ("right_class",))]
# The multiclass demo's goals on the held-out set (median of the seeds; the worst seed >= WORST x the goal).
GOALS = {"defect IoU": 0.55, "F1": 0.70, "recall": 0.80, "mIoU": 0.40, "class F1": 0.55, "right class": 0.80}
WORST = 0.8


def run(*args: str) -> str:
    proc = subprocess.run([PY, "-m", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"quality_bench: {' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def build_data(root: Path, images: int, mode: str, seed: int, ratios: str) -> Path:
    """The scans and shards in ``root``; kept ones (``--keep`` of an earlier run with the same options) are reused."""
    manifest = root / "shards" / "manifest.json"
    if manifest.exists():
        built = json.loads(manifest.read_text())
        if built.get("mode") == mode and sum(s["images"] for s in built["splits"].values()) == images:
            return root / "shards"
    run("shardgen", "synth", "--out", str(root / "raw"), "--images", str(images), "--seed", str(seed),
        "--workers", "2")  # fmt: skip
    run("shardgen", "build", "--annotations", str(root / "raw" / "annotations"), "--images",
        str(root / "raw" / "images"), "--out", str(root / "shards"), "--mode", mode, "--workers", "2",
        "--split-method", "exact", "--split-ratios", ratios, "--quiet")  # fmt: skip
    return root / "shards"


def arm_config(arm: str, shards: Path, out: Path, seed: int, args) -> dict:
    """configs/demo.yaml with this run's data, output and seed, and the arm's one change."""
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["data"]["train"] = str(shards)
    cfg["train"].update(out_dir=str(out), seed=seed, device=args.device)
    if args.steps:
        cfg["train"].update(steps=args.steps, val_every=args.steps, ckpt_every=args.steps)
    if args.device == "cuda":
        cfg["data"]["pin_memory"] = True
    for item in args.set:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    if arm == "fp32":
        cfg["train"]["amp"] = "off"
    elif arm == "share-0.5":
        cfg["data"]["defect_share"] = 0.5
    elif arm == "no-objects":
        cfg.setdefault("loss", {})["object_window"] = 0
    elif arm == "default-aug":
        cfg.pop("augment", None)
    elif arm != "demo":
        raise ValueError(f"unknown arm {arm!r}; valid: {', '.join(ARMS)}")
    return cfg


def train(arm: str, shards: Path, out: Path, seed: int, args) -> float:
    """Train one arm with one seed; returns its training seconds (decision tuning included)."""
    path = out.with_suffix(".yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(arm_config(arm, shards, out, seed, args)))
    start = time.perf_counter()
    run("trainer", "--config", str(path))
    return time.perf_counter() - start


def training_changes(old: dict, new: dict) -> list[str]:
    """The settings (``section.key``) in which two arm configs train differently: the decision's settings
    (``DECISION_KEYS``) are not training, and the paths are not either (a --keep folder may have moved)."""
    def strip(c: dict) -> dict:
        c = {s: dict(v) if isinstance(v, dict) else v for s, v in c.items()}
        for section, keys in (("data", ("train",)), ("train", (*DECISION_KEYS, "out_dir"))):
            for k in keys:
                (c.get(section) or {}).pop(k, None)
        return c

    old, new = strip(old), strip(new)
    return sorted(f"{s}.{k}" for s in set(old) | set(new) for k in set(old.get(s) or {}) | set(new.get(s) or {})
                  if (old.get(s) or {}).get(k) != (new.get(s) or {}).get(k))  # fmt: skip


def retune(out: Path, cfg: dict) -> float:
    """Re-tune a kept run's best.pt for the decision settings of ``cfg`` (it must train as the kept run did, on
    the training scans of ``cfg``'s data); returns the seconds it took."""
    kept = yaml.safe_load(out.with_suffix(".yaml").read_text())  # what train() wrote
    if diff := training_changes(kept, yaml.safe_load(yaml.safe_dump(cfg))):
        sys.exit(f"quality_bench: --retune: {out} was trained with other settings ({', '.join(diff)}); train it again")
    import torch  # only --retune loads models in this process

    from evaluate import EvaluateError
    from evaluate.inference import check_dataset, load_model
    from evaluate.tune import tune_model
    from shardgen import schema
    from trainer import checkpoint
    from trainer.config import Config, ConfigError, from_dict

    start = time.perf_counter()
    try:
        train_cfg = from_dict(Config, cfg).train  # the trainer's defaults for what cfg leaves out
    except ConfigError as e:  # a --set the trainer would refuse too (its message names the setting)
        sys.exit(f"quality_bench: --retune: {e}")
    model = load_model(str(out / "best.pt"), torch.device(train_cfg.device))
    manifest = schema.read_manifest(cfg["data"]["train"])
    try:
        check_dataset(model, manifest)
    except EvaluateError as e:
        sys.exit(f"quality_bench: --retune: {e}")
    if model.meta.get("train_scans") != schema.split_info(manifest, "train").get("scans"):
        sys.exit(f"quality_bench: --retune: {out} was trained on other scans than {cfg['data']['train']}; "
                 f"train it again")
    decision, _ = tune_model(model, manifest, "val", train_cfg.decision_beta, 1, form=train_cfg.class_decision,
                             grow_px=train_cfg.decision_grow)  # fmt: skip
    state = checkpoint.load(str(out / "best.pt"), map_location="cpu")
    state["meta"]["decision"] = decision.to_json()
    for key in DECISION_KEYS:  # the checkpoint's config says what its decision was tuned with
        state["meta"]["config"]["train"][key] = getattr(train_cfg, key)
    checkpoint.save(str(out), "best", state, pointer=False)
    out.with_suffix(".yaml").write_text(yaml.safe_dump(cfg))
    return time.perf_counter() - start


def score(ckpt: Path, shards: Path, split: str, out: Path, tta: str, device: str) -> dict:
    run("evaluate", "--checkpoint", str(ckpt), "--data", str(shards), "--split", split, "--out", str(out),
        "--device", device, "--tta", tta, "--workers", "1", "--worst", "0")  # fmt: skip
    return json.loads((out / "metrics.json").read_text())


def pick(metrics: dict, path: tuple[str, ...]):
    for key in path:
        metrics = metrics[key]
    return metrics


def spread(values: list) -> str:
    """'median [min, max]' of the values that are defined; a dash when none is."""
    v = [x for x in values if x is not None]
    if not v:
        return "—"
    return f"{statistics.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]" + ("" if len(v) == len(values) else "*")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", type=int, default=3, help="training seeds per arm (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--mode", default="binary", choices=("binary", "multiclass"))
    p.add_argument("--images", type=int, default=DEMO_IMAGES,
                   help="synthetic scans of the training data (split 50/33/17; default: %(default)s)")
    p.add_argument("--held-out-images", type=int, default=40, help="scans of the held-out synthetic set")
    p.add_argument("--steps", type=int, default=0, help="training steps of every arm (0: the demo's)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every arm (dotted keys, YAML values), e.g. loss.form=joint")
    p.add_argument("--keep", help="keep the data, runs and evaluations in this folder")
    p.add_argument("--retune", action="store_true",
                   help="with --keep: re-tune the kept runs' decisions instead of training them again")
    p.add_argument("--held-out-only", action="store_true", help="score the held-out set only, not validation")
    args = p.parse_args(argv)
    if args.retune and not args.keep:
        p.error("--retune re-tunes the runs of a --keep folder")
    print_machine()
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    steps, batch, crop = args.steps or demo["train"]["steps"], demo["data"]["batch_size"], demo["data"]["crop"]
    print(f"quality: {args.mode}, {args.images} scans (seed 0, 50/33/17) to train and tune on, "
          f"{args.held_out_images} held-out scans (seed {HELD_OUT_SEED}); {steps} steps of {batch} x {crop} px "
          f"crops ({steps * batch * crop * crop / 1e6:.0f} Mpx) per run on {args.device}; {args.seeds} seeds per arm",
          flush=True)  # fmt: skip
    figures = FIGURES + (CLASS_FIGURES if args.mode == "multiclass" else [])
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(args.keep or tmpdir)
        shards = build_data(tmp / "data", args.images, args.mode, 0, DEMO_SPLIT)
        held_out = build_data(tmp / "held_out", args.held_out_images, args.mode, HELD_OUT_SEED,
                              "train=0,val=0,test=1")  # fmt: skip
        results: dict[str, dict[str, list]] = {}
        seconds: dict[tuple[str, int], float] = {}
        for arm in args.arms:
            trained = TRAINED_AS.get(arm, arm)
            tta = "none" if arm == "no-tta" else DEMO_TTA
            for seed in range(args.seeds):
                out = tmp / "runs" / f"{trained}-seed{seed}"
                if (trained, seed) not in seconds:
                    if args.retune and (out / "best.pt").exists():
                        seconds[(trained, seed)] = retune(out, arm_config(trained, shards, out, seed, args))
                    else:
                        seconds[(trained, seed)] = train(trained, shards, out, seed, args)
                ckpt = out / "best.pt"
                scored = (("held-out", held_out, "test"),) if args.held_out_only else (
                    ("val", shards, "val"), ("held-out", held_out, "test"))  # fmt: skip
                for name, data, split in scored:
                    m = score(ckpt, data, split, tmp / "eval" / f"{arm}-seed{seed}-{name}", tta, args.device)
                    row = results.setdefault(f"{arm} {name}", {label: [] for label, _ in figures})
                    for label, path in figures:
                        row[label].append(pick(m, path))
                    row.setdefault("train s", []).append(seconds[(trained, seed)])
                print(f"{arm} seed {seed}: held-out " + ", ".join(
                    f"{label} {results[f'{arm} held-out'][label][-1] or 0:.3f}" for label, _ in figures[:4]),
                    flush=True)  # fmt: skip
    print()
    print("median [min, max] over seeds (* some seeds undefined)"
          + ("" if args.held_out_only else "; compare arms on val, report held-out"))
    # With --retune a kept run's seconds are its re-tuning's, not its training's.
    headers = ["arm, scored on", *(label for label, _ in figures), "train or retune s" if args.retune else "train s"]
    print_table(headers, [[name, *(spread(row[label]) for label, _ in figures),
                           f"{statistics.median(row['train s']):.0f}"] for name, row in results.items()])  # fmt: skip
    if args.mode == "multiclass":
        print()
        print(f"goals on the held-out scans: median >= goal and worst seed >= {WORST} x goal")
        rows = []
        for name, row in results.items():
            if name.endswith("held-out"):
                for label, goal in GOALS.items():
                    v = [x if x is not None else 0.0 for x in row[label]]
                    met = statistics.median(v) >= goal and min(v) >= WORST * goal
                    rows.append([name, label, goal, statistics.median(v), min(v), "met" if met else "NOT met"])
        print_table(["arm, scored on", "figure", "goal", "median", "worst", ""], rows)


if __name__ == "__main__":
    main()
