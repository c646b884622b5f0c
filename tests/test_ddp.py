"""Two-process DDP on the CPU (gloo): ``torchrun --standalone --nproc_per_node=2 -m trainer``.

The run's own summary line reports what every rank did (gathered from all ranks): the step count of each
rank, whether their parameters are bit-identical, and how many validation tiles and scored pixels the
all-reduced validation saw. The test checks those against the shards, with 3 validation shards of unequal
share between the 2 ranks, then resumes the run on both ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import build_tiny, scored_pixels

from evaluate.inference import load_model
from evaluate.tune import tune_model
from shardgen import schema
from trainer import checkpoint
from trainer.dist import param_digest
from trainer.models import build_model

ROOT = Path(__file__).resolve().parents[1]
# A group that fails to form says so with one of these; anything else is a real failure, not retried.
RENDEZVOUS_FAILURES = ("DistNetworkError", "RendezvousConnectionError", "connectFullMesh", "Connection refused",
                       "Address already in use", "EADDRINUSE")  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """9 synthetic scans, one per shard: 6 train shards and 3 val shards (75 val tiles)."""
    tmp = tmp_path_factory.mktemp("ddp")
    build_tiny(tmp, 9, shard_size=25, ratios="train=0.5,val=0.5,test=0")
    val = schema.read_manifest(str(tmp / "shards"))["splits"]["val"]
    assert len(val["shards"]) == 3 and val["samples"] == 75  # rank 0 validates images 0 and 2, rank 1 image 1
    return str(tmp / "shards")


def torchrun(config: str, *overrides: str) -> tuple[dict, str]:
    """Run 2 ranks; returns (the JSON summary line, stderr). Retried once if the group failed to form."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer", "--config", config, *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for attempt in (1, 2):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=250)
        if proc.returncode == 0 or attempt == 2 or not any(s in proc.stderr for s in RENDEZVOUS_FAILURES):
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone prints the summary
    return json.loads(lines[0]), proc.stderr


def test_two_ranks_agree_and_validate_every_sample_once(shards, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"train": shards, "batch_size": 4, "workers": 1, "shuffle_buffer": 20, "pin_memory": False},
        "model": {"name": "unet", "kwargs": {"channels": [4, 6, 8, 10, 12]}},
        "optim": {"lr": 0.01, "warmup_steps": 2},
        "train": {"out_dir": str(out), "steps": 6, "device": "cpu", "log_every": 3, "val_every": 3,
                  "ckpt_every": 3},
    }))  # fmt: skip
    summary, _ = torchrun(str(config))
    assert summary["rank_steps"] == [6, 6]
    assert summary["params_in_sync"] is True
    assert summary["val_samples"] == 75  # 50 on rank 0, 25 on rank 1, each tile once
    assert summary["val_pixels"] == scored_pixels(shards, "val")
    state = checkpoint.load(str(out / "last.pt"))
    assert state["step"] == 6
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # The decision the 2 ranks tuned together, each on its share of the val scans, is one process's on all.
    model = load_model(str(out / "last.pt"), torch.device("cpu"))
    alone, _ = tune_model(model, schema.read_manifest(shards), "val", beta=2.0, workers=0)
    assert state["meta"]["decision"] == alone.to_json()

    summary, err = torchrun(str(config), "train.steps=8")  # both ranks resume from step 6
    assert f"resumed from {out / 'last.pt'} at step 6" in err
    assert summary["rank_steps"] == [8, 8] and summary["params_in_sync"] is True
    assert summary["val_samples"] == 75


def test_param_digest_tells_bit_identical_weights_apart():
    torch.manual_seed(0)
    a = build_model("unet", 1, 2, channels=[4, 6, 8, 10, 12])
    b = build_model("unet", 1, 2, channels=[4, 6, 8, 10, 12])
    b.load_state_dict(a.state_dict())
    assert param_digest(a) == param_digest(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert param_digest(a) != param_digest(b)
