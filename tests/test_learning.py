"""The recipe learns: a CPU run of well under a minute on tiny synthetic scans finds defects that an all-background
prediction (defect IoU 0) never does. Guards the whole chain -- sampler, crops, losses, optimizer, tuned
decision -- against a change that still "trains" but no longer learns."""

from __future__ import annotations

import time

import pytest
from tiny import TINY_GRID

from shardgen.__main__ import main as shardgen_main
from shardgen.synth import write_synthetic
from trainer.config import load_config
from trainer.train import train

MARGIN = 0.05  # validation defect IoU the run must reach (it reaches ~0.1); all-background scores 0


@pytest.fixture(scope="module")
def binary_shards(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("learn")
    write_synthetic(tmp / "raw", 16, seed=3, size_range=(300, 340))
    out = str(tmp / "shards")
    rc = shardgen_main(["build", "--annotations", str(tmp / "raw" / "annotations"), "--images",
                        str(tmp / "raw" / "images"), "--out", out, *TINY_GRID, "--mode", "binary",
                        "--split-method", "exact", "--split-ratios", "train=0.75,val=0.25,test=0",
                        "--quiet"])  # fmt: skip
    assert rc == 0
    return out


@pytest.mark.usefixtures("one_torch_thread")
def test_a_short_cpu_run_beats_all_background(binary_shards, tmp_path):
    config = tmp_path / "learn.yaml"
    config.write_text(f"""
data: {{train: {binary_shards}, batch_size: 8, workers: 0, shuffle_buffer: 50, pin_memory: false,
        defect_share: 0.5}}
model: {{name: unet, kwargs: {{channels: [8, 16, 32, 64, 128]}}}}
optim: {{lr: 6.0e-3, warmup_steps: 10}}
train: {{out_dir: {tmp_path / "run"}, steps: 200, device: cpu, log_every: 50, val_every: 200, ckpt_every: 200}}
""")
    start = time.perf_counter()  # sized to ~30 s on a 2-core CI machine; the time is reported, not asserted
    summary = train(load_config(str(config)))
    seconds = time.perf_counter() - start
    val = summary["last_val"]
    assert val["tuned_miou"] >= MARGIN, f"validation defect IoU {val['tuned_miou']:.3f} after {seconds:.0f} s"
    assert summary["decision"]["kind"] == "tuned"
