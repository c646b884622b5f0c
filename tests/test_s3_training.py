"""Remote training end to end against a real S3 server (SeaweedFS from conftest), credentials from the
environment only: ``shardgen build --out s3://...``, two-rank ``torchrun -m trainer`` reading the shards from
S3 and writing its run to S3, then ``python -m evaluate`` scoring the test split straight from S3.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import tb_scalars

from shardgen import schema, storage
from shardgen.synth import write_synthetic
from trainer import checkpoint

pytestmark = pytest.mark.s3

ROOT = Path(__file__).resolve().parents[1]
# A group that fails to form says so with one of these; anything else is a real failure, not retried.
RENDEZVOUS_FAILURES = ("DistNetworkError", "RendezvousConnectionError", "connectFullMesh", "Connection refused",
                       "Address already in use", "EADDRINUSE")  # fmt: skip
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run(cmd: list[str], logs: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a CLI with the test's environment (AWS_* of the s3_env fixture); keep its output in ``logs``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    logs += [proc.stdout, proc.stderr]
    return proc


def torchrun(config: Path, logs: list[str]) -> subprocess.CompletedProcess:
    """Two CPU ranks (gloo) on a c10d rendezvous; retried once if the group failed to form."""
    for attempt in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{free_port()}",
               "-m", "trainer", "--config", str(config)]  # fmt: skip
        proc = run(cmd, logs, timeout=150)
        if proc.returncode == 0 or attempt == 2 or not any(s in proc.stderr for s in RENDEZVOUS_FAILURES):
            return proc
    raise AssertionError("unreachable")


def test_build_train_on_two_ranks_and_evaluate_all_on_s3(s3_env, s3_server, tmp_path):
    data, run_url = f"{s3_env}/ds", f"{s3_env}/runs/x"
    logs: list[str] = []

    raw = tmp_path / "raw"
    write_synthetic(raw, 8, seed=3, size_range=(180, 230))
    built = run([sys.executable, "-m", "shardgen", "build", "--annotations", str(raw / "annotations"),
                 "--images", str(raw / "images"), "--out", data, "--image-size", "192", "--tile", "64",
                 "--stride", "32", "--shard-size", "25", "--split-ratios", "train=0.2,val=0.3,test=0.5",
                 "--quiet"], logs, timeout=120)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    manifest = schema.read_manifest(data)
    # Splits hash the stone ids (stone_00000..7): these ratios give 4 train, 2 val and 2 test scans.
    assert {k: len(v["shards"]) for k, v in manifest["splits"].items()} == {"train": 4, "val": 2, "test": 2}

    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"train": f"{data}/manifest.json", "batch_size": 4, "workers": 1, "shuffle_buffer": 8,
                 "pin_memory": False},
        "model": {"name": "unet", "kwargs": {"channels": [4, 4, 8, 8, 8]}},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"out_dir": run_url, "steps": STEPS, "device": "cpu", "log_every": 1, "val_every": 3,
                  "ckpt_every": 3},
    }))  # fmt: skip
    trained = torchrun(config, logs)
    assert trained.returncode == 0, trained.stderr[-4000:]
    (line,) = [x for x in trained.stdout.splitlines() if x.startswith("{")]  # rank 0 alone prints it
    summary = json.loads(line)
    assert summary["rank_steps"] == [STEPS, STEPS] and summary["params_in_sync"]
    assert summary["val_samples"] == manifest["splits"]["val"]["samples"] == 50
    assert summary["out_dir"] == run_url and summary["io_retries"] == 0

    # The whole run directory lives in the bucket: checkpoints, the pointer, the metrics and the config.
    fs, root = storage.fs_for(run_url)
    names = {p.rsplit("/", 1)[1] for p in fs.ls(root, detail=False)}
    assert {"last.pt", "best.pt", "latest.json", "metrics.csv", "config.yaml"} <= names
    assert checkpoint.latest(run_url) == f"{run_url}/last.pt"
    state = checkpoint.load(f"{run_url}/last.pt")
    assert state["step"] == STEPS and state["meta"]["config"]["data"]["train"] == f"{data}/manifest.json"
    metrics_csv = storage.read_text(f"{run_url}/metrics.csv")
    rows = list(csv.DictReader(io.StringIO(metrics_csv)))
    assert [int(r["step"]) for r in rows if r["phase"] == "val"] == [3, 6] and rows[-1]["phase"] == "end"

    # TensorBoard events land in the run folder on S3 too, and the log says where.
    assert f"TensorBoard events: {run_url}/tb (" in trained.stderr
    tb = tmp_path / "tb"
    fs.get(f"{root}/tb/", str(tb), recursive=True)
    scalars = tb_scalars(tb)
    assert scalars["train/loss"] == list(range(1, STEPS + 1)) and scalars["val/miou"] == [3, 6]

    out = tmp_path / "eval"
    evaluated = run([sys.executable, "-m", "evaluate", "--checkpoint", f"{run_url}/last.pt", "--data", data,
                     "--split", "test", "--out", str(out), "--device", "cpu", "--workers", "1"],
                    logs, timeout=120)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == manifest["splits"]["test"]["images"] == 2

    # Credentials came from the environment only: they are in no log, no artifact and no checkpoint.
    artifacts = {
        "logs": "\n".join(logs),
        "manifest": storage.read_text(f"{data}/manifest.json"),
        "config.yaml": storage.read_text(f"{run_url}/config.yaml"),
        "metrics.csv": metrics_csv,
        "metrics.json": (out / "metrics.json").read_text(),
        "checkpoint meta": json.dumps(state["meta"]),
    }
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key  # the keys the commands did use
    for secret in (s3_server.secret_key, s3_server.access_key):
        leaked = [name for name, text in artifacts.items() if secret in text]
        assert not leaked, f"credential found in {leaked}"
    assert f"step {STEPS}/{STEPS}" in artifacts["logs"]  # the search above did cover the trainer's log
