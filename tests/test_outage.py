"""Storage outages against a real S3 server (SeaweedFS from conftest), SIGKILLed in the middle of the work.

- the server restarts on the same ports and data directory, with every object intact;
- which errors the readers retry: the S3 client stack's connection errors are not all OSErrors;
- a checkpoint upload waits out a restart, and one that gives up leaves the previous checkpoint in charge;
- training reads retry with backoff through a kill and restart, count the retries and finish every step;
- an outage longer than the retry budget ends the run with a one-line error and a checkpoint to resume from,
  also under 2-rank DDP, where the ranks agree on the outage and save together.

botocore retries a refused connection itself (AWS_MAX_ATTEMPTS, 5 attempts by default), which would hide a
short outage from the readers; the tests set it to 1 so that the readers' own backoff is what they measure.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ReadTimeoutError
from helpers import build_tiny

from shardgen import schema, storage
from shardgen.reader import CorruptSample, StorageUnavailable, is_transient, retry_call
from trainer import checkpoint

ROOT = Path(__file__).resolve().parents[1]
# Kill to serving again. The outages last up to 10 s and the restart takes 3-7 s here; the bound
# leaves room for a loaded machine (the retry budgets below cover far longer outages).
RESTART_LIMIT_S = 20.0


def test_only_connection_faults_are_retried():
    down = EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k")
    assert not isinstance(down, OSError)  # why an `except OSError` alone would not retry an outage
    for e in (down, ReadTimeoutError(endpoint_url="http://x"), aiohttp.ClientPayloadError("cut"),
              aiohttp.ServerDisconnectedError(), ConnectionResetError(), TimeoutError(), OSError(errno.EIO, "5xx")):
        assert is_transient(e), e  # fmt: skip
    for e in (FileNotFoundError("k"), PermissionError("denied"), OSError(errno.EINVAL, "bad bucket name"),
              NoCredentialsError(), CorruptSample("s3://b/k", "x", "bad png"), StorageUnavailable("spent"),
              ValueError("x")):
        assert not is_transient(e), e  # fmt: skip

    calls, waits = [], []
    with pytest.raises(StorageUnavailable, match=r"^s3://b/k: storage failed 3 times in a row, giving up: "
                                                  r"EndpointConnectionError: Could not connect"):  # fmt: skip
        retry_call(lambda: calls.append(1) or (_ for _ in ()).throw(down), "s3://b/k", retries=3, backoff=0.01,
                   on_retry=lambda url, attempt, e: waits.append(attempt))  # fmt: skip
    assert len(calls) == 3 and waits == [1, 2]
    with pytest.raises(PermissionError):  # at once, no retry
        retry_call(lambda: calls.append(1) or (_ for _ in ()).throw(PermissionError("no")), "u", retries=5)
    assert len(calls) == 4


def restart_timed(server) -> float:
    """SIGKILL and restart; the server must come back on the same endpoint and data directory."""
    before = (server.endpoint, server.port, server.data_dir)
    t0 = time.monotonic()
    server.restart()
    took = time.monotonic() - t0
    assert (server.endpoint, server.port, server.data_dir) == before
    assert took < RESTART_LIMIT_S, f"restart took {took:.1f}s"
    return took


@pytest.mark.s3
def test_checkpoint_upload_survives_a_restart_and_a_failed_one_keeps_the_old(s3_env, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    run = f"{s3_env}/run"
    checkpoint.save(run, "last", {"step": 1, "model": {}, "meta": {}})
    s3_server.kill()
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match="last.pt: storage failed 2 times in a row"):
        checkpoint.save(run, "last", {"step": 2, "model": {}, "meta": {}}, retries=2, backoff=0.1)
    assert time.monotonic() - t0 < 10  # refused connections fail fast: the budget, not a hang, ends it
    s3_server.start()
    assert checkpoint.load(checkpoint.latest(run))["step"] == 1  # the old checkpoint, whole, still in charge

    # Kill again and restart while the upload is retrying: it waits the outage out (waits 0.5, 1, 2, 4 s...).
    s3_server.kill()
    took = []
    restarter = threading.Thread(target=lambda: took.append(restart_timed(s3_server)))
    restarter.start()
    try:
        checkpoint.save(run, "last", {"step": 3, "model": {}, "meta": {}}, retries=8, backoff=0.5)
    finally:
        restarter.join()
    assert took and checkpoint.load(checkpoint.latest(run))["step"] == 3
    assert json.loads(storage.read_text(f"{run}/latest.json")) == {"checkpoint": "last.pt", "step": 3}


def build(tmp_path: Path, url: str) -> dict:
    """8 tiny scans, one per shard (4 train, 2 val, 2 test): a new shard is opened every ~6 steps."""
    build_tiny(tmp_path, 8, seed=5, shard_size=25, ratios="train=0.2,val=0.3,test=0.5", out=url)
    return schema.read_manifest(url)


def start_trainer(tmp_path: Path, data: str, steps: int, io_retries: int, io_backoff: float, ranks: int = 1):
    """``python -m trainer`` (or 2-rank ``torchrun``) in the background, data from S3 and (see the callers)
    checkpoints on local disk."""
    config = tmp_path / "outage.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"train": data, "batch_size": 4, "workers": 1, "shuffle_buffer": 4, "pin_memory": False,
                 "io_retries": io_retries, "io_backoff": io_backoff},
        "model": {"name": "unet", "kwargs": {"channels": [4, 4, 8, 8, 8]}},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"out_dir": str(tmp_path / "run"), "steps": steps, "device": "cpu", "log_every": 1,
                  "val_every": steps, "ckpt_every": steps},
    }))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "AWS_MAX_ATTEMPTS": "1"}
    stderr = tmp_path / "stderr.txt"
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    with open(tmp_path / "stdout.txt", "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, *launch, "-m", "trainer", "--config", str(config)], cwd=ROOT,
                                env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)  # fmt: skip
    return proc, stderr


def wait_for_step(proc, stderr: Path, step: int, timeout: float = 90, fail: bool = True) -> bool:
    """Wait for rank 0's log line of ``step``; False (or a test failure with ``fail``) if it never comes."""
    deadline = time.monotonic() + timeout
    while f" step {step}/" not in stderr.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            if not fail:
                return False
            pytest.fail(f"trainer never reached step {step}:\n{stderr.read_text()[-3000:]}")
        time.sleep(0.05)
    return True


@pytest.mark.s3
def test_training_rides_out_a_server_kill_and_restart(s3_env, s3_server, tmp_path):
    steps = 40  # a batch is 4 tiles, a shard 25: reads go on long after the kill at step 3
    build(tmp_path, f"{s3_env}/ds")
    proc, stderr = start_trainer(tmp_path, f"{s3_env}/ds", steps, io_retries=10, io_backoff=0.25)
    try:
        wait_for_step(proc, stderr, 3)
        down = restart_timed(s3_server)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    log = stderr.read_text()
    assert proc.returncode == 0, log[-4000:]
    summary = json.loads((tmp_path / "stdout.txt").read_text().splitlines()[-1])
    assert summary["steps"] == steps and summary["val_samples"] == 50
    # Every retry was logged by the reader and counted into the run's total (both ways: log and summary).
    retried = [line for line in log.splitlines() if "storage failed (" in line and "; retry " in line]
    assert retried and "retry 1/9" in retried[0], log[-4000:]
    assert summary["io_retries"] == len(retried)
    assert f"{len(retried)} storage retries in this run, all recovered" in log
    rows = list(csv.DictReader(open(tmp_path / "run/metrics.csv")))
    assert rows[-1]["phase"] == "end" and int(rows[-1]["io_retries"]) == len(retried)
    print(f"server down {down:.1f}s (kill to ready); {len(retried)} retries")


@pytest.mark.s3
@pytest.mark.parametrize("ranks", [1, 2])
def test_outage_past_the_retry_budget_stops_with_a_checkpoint(s3_env, s3_server, tmp_path, ranks):
    # Checkpoints go to local disk here: with the only S3 server down, no checkpoint could reach S3 either.
    build(tmp_path, f"{s3_env}/ds")
    for attempt in (1, 2):  # a 2-rank group that fails to form (gloo on a loaded machine) gets one more try
        proc, stderr = start_trainer(tmp_path, f"{s3_env}/ds", 500, io_retries=3, io_backoff=0.2, ranks=ranks)
        if wait_for_step(proc, stderr, 3, fail=attempt == 2 or ranks == 1):
            break
    try:
        s3_server.kill()
        t0 = time.monotonic()
        proc.wait(timeout=90)  # 3 refused attempts, 0.2 + 0.4 s of waits: it must not hang
        took = time.monotonic() - t0
    finally:
        proc.kill()
        s3_server.start()  # the session's server, for the tests after this one
    log = stderr.read_text()
    assert proc.returncode == (2 if ranks == 1 else 1), log[-4000:]  # torchrun: 1 when a worker failed
    assert took < 45
    # Every rank says the same words; two ranks share stderr, so their lines may run into each other.
    errors = re.findall(r"trainer: error: .*?(?:to resume|either: .*?$)", log, re.MULTILINE)
    assert len(errors) == ranks and len(set(errors)) == 1, log[-4000:]
    error = errors[0]
    assert error.startswith("trainer: error: storage unavailable at step "), log[-4000:]
    assert "storage failed 3 times in a row, giving up: EndpointConnectionError" in error
    if ranks > 1:
        assert "at step " in error and ": rank " in error  # which rank met the outage first
    step = int(error.split("storage unavailable at step ")[1].split(":")[0])
    assert step >= 3 and f"saved {tmp_path / 'run' / 'last.pt'} (step {step})" in error
    state = checkpoint.load(checkpoint.latest(str(tmp_path / "run")))
    assert state["step"] == step and len(state["rng"]) == ranks


@pytest.mark.parametrize("name", ["config.yaml", "metrics.csv"])
def test_run_log_writes_retry_like_the_other_writes(tmp_path, monkeypatch, caplog, name):
    """config.yaml and metrics.csv go to out_dir, the storage of the checkpoints: a fault that a checkpoint
    upload rides out must not end the run while the metrics are saved."""
    from trainer.config import Config
    from trainer.runlog import RunLog

    real, failures = storage.write_bytes_atomic, []

    def flaky(url, data):
        if url.endswith(name) and len(failures) < 2:
            failures.append(url)
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        real(url, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", flaky)
    cfg = Config()
    cfg.train.out_dir, cfg.data.io_backoff = str(tmp_path / "run"), 0.01
    log = RunLog(cfg, total_steps=2, enabled=True)
    log.val(1, {"miou": 0.5, "per_class": {"defect": {"iou": 0.5}}})
    log.close(skipped=0)
    assert len(failures) == 2 and "retry 2/5" in caplog.text
    assert (tmp_path / "run" / "config.yaml").is_file()
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["phase"] for r in rows] == ["val", "end"]
