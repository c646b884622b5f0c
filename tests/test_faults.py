"""Faults a long job meets: corrupt shards, a killed DDP rank, a killed shard build on S3, and bad inputs at
the trainer and evaluate boundary.

- Corrupt shards: training skips the broken samples, logs each with its shard and key and reports the total;
  validation, ``python -m evaluate`` and ``shardgen verify`` fail and name the shard.
- A rank SIGKILLed under ``torchrun --max-restarts`` is restarted with its group, which resumes from the last
  checkpoint and ends at the step and learning rate of an uninterrupted run; a group that fails to form is
  retried in the process instead of burning a restart.
- ``shardgen build --workers 2`` SIGKILLed while writing to S3, then rerun, ends byte-identical to an
  uninterrupted build, and no manifest ever lists a partial shard.
- Bad inputs to evaluate (the trainer's side is in test_train.py) are one-line errors with exit code 2.

The data are helpers.tiny_dataset's tiny synthetic shards (64 px tiles) and its 4-step narrow U-Net.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import NARROW, tiny_dataset
from helpers import write_config as tiny_write_config

from evaluate.__main__ import main as evaluate_main
from shardgen import schema, storage
from shardgen.__main__ import main as shardgen_main
from shardgen.synth import write_synthetic
from trainer import __main__ as trainer_cli
from trainer import checkpoint
from trainer.config import load_config
from trainer.setup import lr_factor

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Shards: train 2 x 2 images, val 1 image, test 2 + 1 images; and a unet checkpoint trained on them."""
    return tiny_dataset(tmp_path_factory)


def subprocess_env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def error_lines(stderr: str) -> list[str]:
    """Non-empty stderr lines, without tqdm's carriage-return redraws of a progress bar."""
    return [line for line in stderr.split("\n") if line.strip() and "\r" not in line]


def write_config(path: Path, dataset: str, out: Path, **sections) -> str:
    """``helpers.write_config`` with a smaller shuffle buffer and validation only at the checkpoints."""
    sections["data"] = {"shuffle_buffer": 10, **sections.get("data", {})}
    sections["train"] = {"val_every": 4, "ckpt_every": 4, **sections.get("train", {})}
    return tiny_write_config(path, dataset, out, **sections)


def run_trainer(capsys, *argv) -> tuple[int, dict | None, list[str]]:
    """``python -m trainer`` in-process: (exit code, the JSON summary or None, stderr lines)."""
    rc = trainer_cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, json.loads(out.strip().splitlines()[-1]) if rc == 0 else None, error_lines(err)


def run_evaluate(capsys, *argv) -> tuple[int, list[str]]:
    rc = evaluate_main([str(a) for a in argv])
    return rc, error_lines(capsys.readouterr().err)


# --------------------------------------------------------------------------------------- corrupt shards


def _rewrite_tar(path: Path, garble_key: str) -> None:
    """Rebuild the tar at ``path`` with the same member names and sizes, the mask of ``garble_key`` replaced
    by random bytes of the same length."""
    rng = np.random.default_rng(0)
    src = io.BytesIO(path.read_bytes())
    with tarfile.open(fileobj=src) as tar, tarfile.open(path, "w", format=tar.format) as out:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name == f"{garble_key}.mask.png":
                data = rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()
            out.addfile(m, io.BytesIO(data))


def _truncate(path: Path, member: int, inside: str) -> str:
    """Cut the tar at ``path`` in the data or at the header of its ``member``-th member; returns the key of
    the sample the reader is in when the data ends."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    m = members[member]
    cut = m.offset_data + m.size // 2 if inside == "data" else m.offset
    with path.open("r+b") as f:
        f.truncate(cut)
    return members[member if inside == "data" else member - 1].name.split(".", 1)[0]


@pytest.fixture(scope="module")
def corrupt(tiny, tmp_path_factory) -> SimpleNamespace:
    """A copy of the tiny shards with the manifest unchanged and four broken shards:

    train-000000: a garbage mask member; train-000001: truncated in a member's data; val-000000: truncated
    at a member header, where tarfile itself stops quietly; test-000001: a garbage mask member.
    """
    root = tmp_path_factory.mktemp("corrupt") / "shards"
    shutil.copytree(tiny.shards, root)
    keys = {}
    for name in ("train-000000.tar", "test-000001.tar"):
        with tarfile.open(root / name) as tar:
            keys[name] = tar.getnames()[3 * 2].split(".", 1)[0]  # the third sample
        _rewrite_tar(root / name, keys[name])
    keys["train-000001.tar"] = _truncate(root / "train-000001.tar", 3 * 5, "data")
    keys["val-000000.tar"] = _truncate(root / "val-000000.tar", 3 * 10, "header")
    return SimpleNamespace(root=root, keys=keys, urls={n: str(root / n) for n in keys})


def test_training_skips_corrupt_samples_logs_each_and_reports_the_total(tiny, corrupt, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    # Uniform draws (no defect pool), so 16 steps read both shards to their broken members.
    cfg = write_config(tmp_path / "c.yaml", str(corrupt.root), out, data={"val": str(tiny.shards), "defect_share": 0.0},
                       train={"steps": 16, "val_every": 16, "ckpt_every": 16})  # fmt: skip
    caplog.set_level(logging.WARNING, logger="trainer")
    rc, summary, err = run_trainer(capsys, "--config", cfg)
    assert rc == 0 and summary["steps"] == 16, err

    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping corrupt sample: ")]
    garbled, truncated = corrupt.urls["train-000000.tar"], corrupt.urls["train-000001.tar"]
    for message in skips:  # each names its shard and sample
        assert message.startswith((f"skipping corrupt sample: {garbled}: ", f"skipping corrupt sample: {truncated}: "))
    assert f"{garbled}: sample {corrupt.keys['train-000000.tar']!r}: cannot decode: " in "\n".join(skips)
    assert f"{truncated}: sample {corrupt.keys['train-000001.tar']!r}: broken tar: " in "\n".join(skips)
    # Every skip is counted once, in the summary line and in metrics.csv's last row.
    assert summary["skipped_samples"] == len(skips) >= 2
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows[-1]["phase"] == "end" and int(rows[-1]["skipped_samples"]) == len(skips)
    assert f"skipped {len(skips)} corrupt training samples in total" in caplog.text
    assert checkpoint.load(str(out / "last.pt"))["skipped_samples"] == len(skips)


@pytest.mark.parametrize("workers", [0, 1])
def test_validation_on_a_corrupt_shard_fails_and_names_it(tiny, corrupt, tmp_path, capsys, workers):
    cfg = write_config(tmp_path / "c.yaml", str(tiny.shards), tmp_path / "run",
                       data={"val": str(corrupt.root), "workers": workers},
                       train={"steps": 2, "val_every": 2})  # fmt: skip
    rc, _, err = run_trainer(capsys, "--config", cfg)
    assert rc == 2 and len(err) == 1, err
    url, key = corrupt.urls["val-000000.tar"], corrupt.keys["val-000000.tar"]
    assert err[0] == f"trainer: error: {url}: sample {key!r}: broken tar: unexpected end of archive"
    assert not (tmp_path / "run" / "last.pt").exists()


def test_evaluate_on_a_corrupt_shard_fails_and_names_it(tiny, corrupt, tmp_path, capsys):
    """Validation split, read in this process: the shard cut at a member header."""
    rc, err = run_evaluate(capsys, "--checkpoint", tiny.ckpt, "--data", corrupt.root, "--split", "val",
                           "--out", tmp_path, "--device", "cpu", "--workers", "0")  # fmt: skip
    url, key = corrupt.urls["val-000000.tar"], corrupt.keys["val-000000.tar"]
    assert rc == 2 and err == [f"evaluate: error: {url}: sample {key!r}: broken tar: unexpected end of archive"]
    assert not (tmp_path / "metrics.json").exists()


def test_evaluate_command_names_a_garbled_shard_in_one_line(tiny, corrupt, tmp_path):
    """The real command, a DataLoader worker decoding: the second test shard fails after the first scored."""
    cmd = [sys.executable, "-m", "evaluate", "--checkpoint", str(tiny.ckpt), "--data", str(corrupt.root),
           "--split", "test", "--out", str(tmp_path), "--device", "cpu", "--workers", "1"]  # fmt: skip
    # Bytes, not text=True, which would turn the progress bar's carriage returns into line breaks.
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, timeout=120)
    url, key = corrupt.urls["test-000001.tar"], corrupt.keys["test-000001.tar"]
    stderr = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b""
    lines = error_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"evaluate: error: {url}: sample {key!r}: cannot decode: UnidentifiedImageError")
    assert not (tmp_path / "metrics.json").exists()


def test_verify_names_every_bad_shard(tiny, corrupt, capsys):
    assert shardgen_main(["verify", str(tiny.shards)]) == 0
    assert "5/5 shards OK" in capsys.readouterr().out

    assert shardgen_main(["verify", str(corrupt.root)]) == 1
    out, err = capsys.readouterr()
    bad = sorted(line.split(": ", 1)[0].removeprefix("BAD ") for line in out.splitlines() if line.startswith("BAD "))
    assert bad == sorted(corrupt.urls.values()) and "1/5 shards OK, 4 bad" in err
    # Same length, same members: only the checksum tells the garbled shards apart.
    assert f"BAD {corrupt.urls['train-000000.tar']}: sha256 differs from the manifest\n" in out


# ---------------------------------------------------------------------------------------- killed DDP rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env else None


@pytest.mark.timeout(240)
def test_killed_rank_restarts_its_group_which_resumes_to_the_same_end(tiny, tmp_path):
    total, every = 12, 4
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "ddp.yaml", str(tiny.shards), out,
                       data={"val_split": "test"},  # 3 images: 2 ranks both get a batch's worth
                       train={"steps": total, "ckpt_every": every, "val_every": every, "log_every": every})  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{_free_port()}",
           "-m", "trainer", "--config", cfg]  # fmt: skip
    log = tmp_path / "torchrun.log"
    with log.open("wb") as stderr:  # a file, not a pipe nobody reads while the job runs
        proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=stderr,
                                start_new_session=True)  # fmt: skip
    latest, killed_at = out / "latest.json", None
    try:
        deadline = time.monotonic() + 150
        while killed_at is None:
            assert proc.poll() is None, f"torchrun ended before the kill: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint in time: {log.read_text()[-3000:]}"
            if latest.exists() and json.loads(latest.read_text())["step"] >= every:
                victim = next(pid for pid in _children(proc.pid) if _rank_of(pid) == 1)
                os.kill(victim, signal.SIGKILL)
                killed_at = json.loads(latest.read_text())["step"]
            time.sleep(0.01)
        stdout, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert killed_at < total, "the job finished before the kill landed"
    # latest.json names best.pt when the kill came between the best and the last checkpoint of a step.
    resumed = re.findall(rf"resumed from {re.escape(str(out))}/(?:last|best)\.pt at step (\d+)", text)
    assert len(resumed) == 1 and int(resumed[0]) >= killed_at, text[-4000:]

    summary = json.loads(next(line for line in stdout.decode().splitlines() if line.startswith("{")))
    assert summary["rank_steps"] == [total, total] and summary["params_in_sync"] is True
    assert summary["val_samples"] == 75  # all 3 test images, after the restart too
    state = checkpoint.load(str(out / "last.pt"))
    optim = load_config(cfg).optim
    expected_lr = optim.lr * lr_factor(total, total, optim)
    assert state["step"] == total and state["scheduler"]["last_epoch"] == total
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([expected_lr])
    assert state["scheduler"]["_last_lr"] == pytest.approx([expected_lr])
    assert all(int(s["step"]) == total for s in state["optimizer"]["state"].values())
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    for phase in ("train", "val"):  # each step once: what the killed group wrote after its checkpoint is replaced
        assert [int(r["step"]) for r in rows if r["phase"] == phase] == list(range(every, total + 1, every))


_FLAKY_JOIN = """
import json, sys, torch, torch.distributed as td
from trainer import dist
real, calls = td.init_process_group, []
def flaky(*args, **kwargs):  # rank 1's first attempt fails, as a gloo connect after a restart may
    calls.append(1)
    if dist.local_rank() == 1 and len(calls) == 1:
        raise td.DistNetworkError("connectFullMesh failed: Connection refused")
    return real(*args, **kwargs)
td.init_process_group = flaky
dist.setup("cpu")
total = dist.all_reduce(torch.ones(1)).item()
result = {"rank": dist.rank(), "world": dist.world_size(), "sum": total, "attempts": len(calls)}
with open(sys.argv[1] + f"/rank{dist.rank()}.json", "w") as f:
    json.dump(result, f)
dist.cleanup()
"""


@pytest.mark.timeout(120)
def test_a_group_that_fails_to_form_is_retried_without_a_restart(tmp_path):
    script = tmp_path / "join.py"
    script.write_text(_FLAKY_JOIN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=0",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{_free_port()}", str(script), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"rank": 0, "world": 2, "sum": 2.0, "attempts": 1},
                     {"rank": 1, "world": 2, "sum": 2.0, "attempts": 2}]  # fmt: skip
    assert "process group failed to form (connectFullMesh failed: Connection refused); retry 1/2" in proc.stderr


# ------------------------------------------------------------------------------------ killed S3 shard build


def _six_scan_build(tmp_path: Path) -> tuple[list[str], Path]:
    """``shardgen build`` arguments (all but --out) for 6 synthetic scans, one per shard (600 px crops), and
    the folder of their uninterrupted build, to compare an interrupted and resumed build with."""
    raw = tmp_path / "raw"
    write_synthetic(raw, 6, seed=2, size_range=(180, 230))
    args = ["build", "--annotations", str(raw / "annotations"), "--images", str(raw / "images"),
            "--image-size", "600", "--tile", "200", "--stride", "100", "--shard-size", "25",
            "--split-ratios", "train=0.5,val=0.25,test=0.25", "--quiet"]  # fmt: skip
    reference = tmp_path / "reference"
    assert shardgen_main([*args, "--out", str(reference)]) == 0
    return args, reference


def _assert_same_bytes(out: Path, reference: Path) -> None:
    for name in [p.name for p in reference.glob("*.tar")] + ["manifest.json"]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


# The build to kill: scans dispatched in build order, and only the first two ever finish (each claims one of
# two slot files in $SLOW_SCANS_DIR; every later scan waits forever), so one or two shards land and the build
# then stands still until the kill, however fast or slowly a loaded machine runs it and its S3 server lists the
# bucket. The forked pool workers inherit the patch; the test checks the slot files, so a patch that stopped
# applying fails it.
SLOW_SCANS = """
import faulthandler, os, signal, sys, time
faulthandler.register(signal.SIGUSR2, all_threads=True)  # a test that finds it hung asks where
# SIGINT as a shell's foreground command has it: a blocked or ignored SIGINT inherited from the test runner
# (seen in full-suite runs only) would make the Ctrl-C test measure the runner, not the build.
inherited = (signal.getsignal(signal.SIGINT), signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
if inherited != (signal.default_int_handler, False):
    print("SIGINT inherited as", inherited, file=sys.stderr)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)
import shardgen.distribute as distribute
from shardgen.__main__ import main
process_image = distribute.process_image
def gated(*a):
    for slot in range(2):
        try:
            os.close(os.open(os.path.join(os.environ["SLOW_SCANS_DIR"], f"slot{slot}"), os.O_CREAT | os.O_EXCL))
            return process_image(*a)
        except FileExistsError:
            continue
    time.sleep(3600)  # killed before it wakes
distribute.process_image = gated
distribute._dispatch_order = lambda todo, workers: list(range(len(todo)))
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.s3
@pytest.mark.timeout(240)
def test_killed_s3_build_resumes_to_the_bytes_of_an_uninterrupted_build(s3_env, s3_server, tmp_path, capsys):
    n_images = 6
    args, reference = _six_scan_build(tmp_path)
    url = f"{s3_env}/ds"
    fs, root = storage.fs_for(url)

    def listed(sub: str = "") -> list[str]:
        path = f"{root}/{sub}".rstrip("/")
        with contextlib.suppress(FileNotFoundError):
            return sorted(p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False, refresh=True))
        return []

    # SLOW_SCANS: the build finishes the shards of its first two scans, then stands still until killed.
    cmd = [sys.executable, "-c", SLOW_SCANS, *args, "--out", url, "--workers", "2"]
    slots = tmp_path / "slots"
    slots.mkdir()
    env = subprocess_env(**s3_server.env(), SLOW_SCANS_DIR=str(slots))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not listed("_build"):
            assert proc.poll() is None, f"build exited before the kill: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no shard finished in 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the build and its pool workers, like an OOM kill of the job
        proc.wait()
        proc.stderr.close()
    finished = len(listed("_build"))
    assert sorted(p.name for p in slots.iterdir()) == ["slot0", "slot1"]  # the gate ran in the pool workers
    assert 1 <= finished <= 2
    assert "manifest.json" not in listed()  # an incomplete build has no manifest to read

    assert shardgen_main([*args, "--out", url, "--workers", "2"]) == 0
    assert f"shards: {n_images} ({finished} reused)" in capsys.readouterr().out
    manifest = schema.read_manifest(url)
    names = [s["url"] for info in manifest["splits"].values() for s in info["shards"]]
    assert len(names) == n_images and not [n for n in names if "partial" in n]
    assert listed() == sorted([*names, "manifest.json", "_build"])  # no .partial object left behind
    for name in [*names, "manifest.json"]:
        assert storage.read_bytes(f"{url}/{name}") == (reference / name).read_bytes(), name


# ----------------------------------------------------------------------------------- bad evaluate inputs


def _with_manifest(src: Path, dest: Path, edit) -> Path:
    """A dataset whose manifest is ``edit(manifest dict)`` of ``src``'s, shards copied."""
    shutil.copytree(src, dest)
    manifest = json.loads((src / "manifest.json").read_text())
    edit(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _empty_test_split(m: dict) -> None:
    m["splits"]["test"].update(samples=0, images=0, bytes=0, shards=[], class_pixels=[0] * len(m["classes"]))


@pytest.mark.parametrize(
    "edit, split, message",
    [
        (lambda m: m.update(format_version=2), "test",
         "manifest.json: manifest format version 2, this code reads version 1; rebuild the shards with this shardgen"),
        (_empty_test_split, "test", "manifest.json: split 'test' has no images"),
        (lambda m: None, "holdout", "manifest.json: no split 'holdout' (has ['test', 'train', 'val'])"),
    ],
)  # fmt: skip
def test_evaluate_rejects_a_bad_dataset_in_one_line(tiny, tmp_path, capsys, edit, split, message):
    data = _with_manifest(tiny.shards, tmp_path / "ds", edit)
    rc, err = run_evaluate(capsys, "--checkpoint", tiny.ckpt, "--data", data, "--split", split, "--out",
                           tmp_path / "o", "--device", "cpu", "--workers", "0")  # fmt: skip
    assert rc == 2 and err == [f"evaluate: error: {data}/{message}"]


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"model": "u2netp", "kwargs": {}}, "cannot rebuild the model: Error(s) in loading state_dict for U2NetP"),
        ({"kwargs": {"channels": [4, 6, 8, 10, 14]}}, "cannot rebuild the model: Error(s) in loading state_dict"),
        ({"model": "vit"}, "cannot rebuild the model: "),
    ],
)
def test_evaluate_rejects_a_checkpoint_of_another_model(tiny, tmp_path, capsys, meta, message):
    state = checkpoint.load(str(tiny.ckpt))
    state["meta"]["model"] = meta.get("model", state["meta"]["model"])
    state["meta"]["config"]["model"]["kwargs"] = meta.get("kwargs", NARROW)
    ckpt = tmp_path / "other.pt"
    torch.save(state, ckpt)
    rc, err = run_evaluate(capsys, "--checkpoint", ckpt, "--data", tiny.shards, "--out", tmp_path / "o",
                           "--device", "cpu", "--workers", "0")  # fmt: skip
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"evaluate: error: {ckpt}: {message}"), err


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_evaluate_and_predict_refuse_a_checkpoint_with_non_finite_weights(tiny, tmp_path, capsys, command):
    state = checkpoint.load(str(tiny.ckpt))
    first = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][first].view(-1)[0] = float("nan")
    ckpt = tmp_path / "diverged.pt"
    torch.save(state, ckpt)
    if command == "evaluate":
        args = ["--checkpoint", ckpt, "--data", tiny.shards]
    else:
        args = ["predict", "--checkpoint", ckpt, "--images", tiny.raw / "images"]
    rc, err = run_evaluate(capsys, *args, "--out", tmp_path / "o", "--device", "cpu")
    assert rc == 2 and err == [f"evaluate: error: {ckpt}: the model's weights are not finite (NaN or inf): it "
                               "diverged"], err  # fmt: skip


@pytest.mark.timeout(120)
def test_ctrl_c_stops_a_build_in_one_line_and_a_rerun_completes_it(tmp_path, capsys):
    args, reference = _six_scan_build(tmp_path)
    out = tmp_path / "out"
    slots = tmp_path / "slots"
    slots.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SCANS, *args, "--out", str(out), "--workers", "2"], cwd=ROOT,
                            env=subprocess_env(SLOW_SCANS_DIR=str(slots)), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not list((out / "_build").glob("*.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the build and its pool workers
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGUSR2)  # where it hangs: faulthandler's dump of every thread
            time.sleep(2)
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the build did not stop on SIGINT:\n" + proc.communicate()[1][-8000:]) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "shardgen: interrupted; rerun the same command to resume (finished " \
                                           "shards are reused)"  # fmt: skip
    capsys.readouterr()
    assert shardgen_main([*args, "--out", str(out)]) == 0
    _assert_same_bytes(out, reference)


def test_a_checkpoint_whose_data_fails_its_crc_is_refused(tiny, tmp_path, capsys):
    data = bytearray(tiny.ckpt.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)  # a weight tensor's bytes
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.compress_size // 2] ^= 0xFF  # one flipped byte
    ckpt = tmp_path / "flipped.pt"
    ckpt.write_bytes(bytes(data))
    rc, err = run_evaluate(capsys, "--checkpoint", ckpt, "--data", tiny.shards, "--out", tmp_path / "o",
                           "--device", "cpu", "--workers", "0")  # fmt: skip
    assert rc == 2 and err == [f"evaluate: error: {ckpt}: damaged checkpoint (member {info.filename} fails its "
                               "CRC check)"], err  # fmt: skip


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("case", ["out_dir file", "tb_dir file", "cuda", "zero channels"])
def test_train_setup_faults_are_one_line_errors(tiny, tmp_path, capsys, case):
    overrides = {
        "out_dir file": [f"train.out_dir={_a_file(tmp_path)}"],
        "tb_dir file": [f"train.tb_dir={_a_file(tmp_path)}"],
        "cuda": ["train.device=cuda"],
        "zero channels": ["model.kwargs={channels: [0, 0]}"],
    }[case]
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    cfg = write_config(tmp_path / "c.yaml", str(tiny.shards), tmp_path / "run", train={"steps": 1})
    rc, _, err = run_trainer(capsys, "--config", cfg, *overrides)
    expected = {
        "out_dir file": f"train.out_dir {tmp_path / 'a_file'} is a file, not a folder",
        "tb_dir file": f"train.tb_dir {tmp_path / 'a_file'} is a file, not a folder",
        "cuda": "train.device is cuda but no CUDA device is available (train.device: auto uses one where there is one)",
        "zero channels": "model 'unet' with model.kwargs {'channels': [0, 0]}: UNet channels must be positive "
                         "integers, got (0, 0)",
    }[case]  # fmt: skip
    assert rc == 2 and err == [f"trainer: error: {expected}"], err


@pytest.mark.parametrize("case", ["out is a file", "text named .png", "no such folder"])
def test_evaluate_and_predict_input_faults_are_one_line_errors(tiny, tmp_path, capsys, case):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.png").write_text("hello")
    if case == "out is a file":
        args = ["--checkpoint", tiny.ckpt, "--data", tiny.shards, "--out", _a_file(tmp_path)]
        expected = f"--out {tmp_path / 'a_file'} is a file, not a folder"
    elif case == "text named .png":
        args = ["predict", "--checkpoint", tiny.ckpt, "--images", scans, "--out", tmp_path / "o"]
        expected = f"{scans / 'a.png'}: not an image Pillow can identify (PNG, JPEG, TIFF or BMP)"
    else:
        args = ["predict", "--checkpoint", tiny.ckpt, "--images", tmp_path / "nowhere", "--out", tmp_path / "o"]
        expected = f"{tmp_path / 'nowhere'}: no such folder"
    rc, err = run_evaluate(capsys, *args, "--device", "cpu")
    assert rc == 2 and err == [f"evaluate: error: {expected}"], err


@pytest.mark.parametrize("split", ["val", "train"])
def test_a_missing_shard_stops_training_in_one_line_and_leaves_a_checkpoint(tiny, tmp_path, capsys, split):
    data = tmp_path / "ds"
    shutil.copytree(tiny.shards, data)
    missing = data / f"{split}-000000.tar"
    kept = missing.read_bytes()
    missing.unlink()
    out = tmp_path / "run"
    # Validation reads the missing val shard at step 2; training draws the missing train shard at its first batch.
    cfg = write_config(tmp_path / "c.yaml", str(data), out, data={"defect_share": 0.0},
                       train={"steps": 4, "val_every": 2, "ckpt_every": 4})  # fmt: skip
    rc, _, err = run_trainer(capsys, "--config", cfg)
    step = 2 if split == "val" else 0
    assert rc == 2 and len(err) == 1, err
    assert err[0] == f"trainer: error: storage unavailable at step {step}: {missing}: shard not found; saved " \
        f"{out / 'last.pt'} (step {step}), rerun with the same train.out_dir to resume", err  # fmt: skip
    missing.write_bytes(kept)
    rc, summary, err = run_trainer(capsys, "--config", cfg)
    assert rc == 0 and summary["steps"] == 4, err


def test_evaluate_refuses_shards_cut_on_another_grid_than_the_checkpoint(tiny, tmp_path, capsys):
    state = checkpoint.load(str(tiny.ckpt))
    trained = dict(state["meta"]["grid"])
    state["meta"]["grid"] = {**trained, "tile": trained["tile"] * 2, "stride": trained["stride"] * 2}
    ckpt = tmp_path / "other_grid.pt"
    torch.save(state, ckpt)
    rc, err = run_evaluate(capsys, "--checkpoint", ckpt, "--data", tiny.shards, "--out", tmp_path / "o",
                           "--device", "cpu", "--workers", "0")  # fmt: skip
    g = state["meta"]["grid"]
    assert rc == 2 and len(err) == 1 and err[0].startswith(
        f"evaluate: error: {ckpt}: checkpoint trained on a grid of image size {g['image_size']}, tile {g['tile']}, "
        f"stride {g['stride']} but {tiny.shards}/manifest.json has {trained['image_size']}, {trained['tile']}, "
        f"{trained['stride']}"
    ), err  # fmt: skip


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_rerun_into_the_same_folder_leaves_only_its_own_images(tiny, tmp_path, capsys, command):
    out = tmp_path / "o"
    subs = ("predictions", "overlays", "side_by_side") if command == "evaluate" else ("masks", "overlays")
    for sub in subs:
        (out / sub).mkdir(parents=True)
        (out / sub / "stone_from_another_run.png").write_bytes(b"old")
    (out / "notes.txt").write_text("the user's own")
    if command == "evaluate":
        args = ["--checkpoint", tiny.ckpt, "--data", tiny.shards, "--workers", "0"]
    else:
        args = ["predict", "--checkpoint", tiny.ckpt, "--images", tiny.raw / "images"]
    rc, err = run_evaluate(capsys, *args, "--out", out, "--device", "cpu")
    assert rc == 0, err
    for sub in subs:
        names = [p.name for p in (out / sub).iterdir()]
        assert names and "stone_from_another_run.png" not in names
    assert (out / "notes.txt").read_text() == "the user's own"


# The build whose pool worker dies: the worker processing the third scan SIGKILLs itself, as the OOM killer
# would; the marker file makes that happen once, whichever worker draws it.
KILLED_WORKER = """
import os, signal, sys
import shardgen.distribute as distribute
from shardgen.__main__ import main
process_image = distribute.process_image
def dying(job, opts):
    if os.path.basename(job.path) == os.environ["KILL_SCAN"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return process_image(job, opts)
distribute.process_image = dying
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(120)
def test_a_build_whose_worker_is_killed_fails_in_one_line_and_a_rerun_completes_it(tmp_path, capsys):
    args, reference = _six_scan_build(tmp_path)
    out = tmp_path / "out"
    victim = "stone_00003.png"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", KILLED_WORKER, *args, "--out", str(out), "--workers", "2"],
                          cwd=ROOT, env=subprocess_env(KILL_SCAN=victim), capture_output=True, text=True,
                          timeout=90)  # fmt: skip
    assert time.monotonic() - t0 < 30
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("shardgen: error: a build worker died (killed, or out of memory?) while processing "
                               "one of: ") and victim in lines[0], lines  # fmt: skip
    assert lines[0].endswith("rerun the same command to resume (finished shards are reused)")
    capsys.readouterr()
    assert shardgen_main([*args, "--out", str(out)]) == 0
    _assert_same_bytes(out, reference)


@pytest.mark.parametrize("split", ["train", "test"])
def test_scoring_scans_the_checkpoint_trained_on_is_flagged_loudly(tiny, tmp_path, capsys, split):
    """The checkpoint records the sha256 of its training scans (the manifest lists each split's): scoring
    them warns in the headline, metrics.json and the report; held-out scans do not."""
    assert checkpoint.load(str(tiny.ckpt))["meta"]["train_scans"]
    out = tmp_path / "o"
    rc = evaluate_main([str(a) for a in ("--checkpoint", tiny.ckpt, "--data", tiny.shards, "--split", split,
                                         "--out", out, "--device", "cpu", "--workers", "0")])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    images = schema.split_info(schema.read_manifest(str(tiny.shards)), split)["images"]
    if split == "train":
        assert metrics["trained_on"] == {"scans": images, "of": images}
        assert stdout.strip().splitlines()[-1].startswith(f"WARNING: {images} of {images} scans trained on | ")
        assert f"warning: {images} of the {images} scans of split 'train' are among the checkpoint's" in stderr
        assert "among the checkpoint&#39;s training scans" in (out / "report.html").read_text()
    else:
        assert "trained_on" not in metrics and "WARNING" not in stdout and 'class="warning"' not in \
            (out / "report.html").read_text()  # fmt: skip
