"""trainer.train and ``python -m trainer``: the models learn, a run leaves its outputs, a killed run resumes
where its last checkpoint left off, NaN steps are skipped and bounded, and bad inputs are one-line errors.

Runs use shardgen-built synthetic shards of 64 px tiles and a narrow U-Net on the CPU.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import NARROW, build_tiny, fixed_batch_losses, scored_pixels, tb_scalars, write_config

from shardgen import schema
from trainer import __main__ as cli
from trainer import checkpoint, runlog
from trainer import train as train_mod
from trainer.augment import AugmentConfig, GpuAugment, NormalizeConfig
from trainer.config import DataConfig, LossConfig, load_config
from trainer.data import class_histogram, val_loader
from trainer.losses import build_loss
from trainer.models import build_model

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """8 synthetic scans -> train 150 tiles (2 shards), val 50 tiles (1 shard), test empty."""
    tmp = tmp_path_factory.mktemp("data")
    manifest = schema.read_manifest(build_tiny(tmp, 8))
    assert [manifest["splits"][s]["samples"] for s in ("train", "val", "test")] == [150, 50, 0]
    return str(tmp / "shards")


def run_main(capsys, *argv) -> tuple[int, dict | None, list[str]]:
    """``python -m trainer`` in-process: (exit code, the JSON summary line or None, stderr lines)."""
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1]) if rc == 0 else None
    # tqdm draws its bar on stderr with carriage returns; only the other lines count.
    return rc, summary, [line for line in err.split("\n") if line.strip() and "\r" not in line]


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


# ---------------------------------------------------------------------------------------------- learning


@pytest.mark.parametrize(
    "name, kwargs, lr, steps, batch, crop",
    [("unet", NARROW, 2e-2, 30, 4, 64), ("u2netp", {}, 1e-2, 20, 2, 32)],  # u2netp: deep supervision, slow
)
def test_loss_halves_on_a_fixed_batch(shards, name, kwargs, lr, steps, batch, crop):
    torch.manual_seed(0)
    manifest = schema.read_manifest(shards)
    images, masks = next(iter(val_loader(manifest, "val", DataConfig(batch_size=batch, workers=0), 0, 1, False)))
    x, y = GpuAugment(AugmentConfig(), NormalizeConfig()).eval()(images, masks)
    x, y = x[..., :crop, :crop], y[..., :crop, :crop]
    model = build_model(name, 1, len(manifest["classes"]), **kwargs)
    loss_fn = build_loss(LossConfig(), len(manifest["classes"]), class_histogram(manifest, "train"))
    losses = fixed_batch_losses(model, loss_fn, x, y, lr=lr, steps=steps)
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def unet_run(shards, tmp_path_factory):
    """A 4-step run through ``python -m trainer``'s main: (config path, out dir, JSON summary)."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = write_config(tmp / "run.yaml", shards, tmp / "out")
    out, err = io.StringIO(), io.StringIO()  # capsys is per test; this run is shared by several
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["--config", cfg])
    assert rc == 0, err.getvalue()
    return cfg, tmp / "out", json.loads(out.getvalue().strip().splitlines()[-1])


def test_run_writes_checkpoints_metrics_config_and_a_summary(shards, unet_run):
    cfg_path, out, summary = unet_run
    assert {"last.pt", "best.pt", "latest.json", "metrics.csv", "config.yaml"} <= {p.name for p in out.iterdir()}
    assert summary["steps"] == 4 and summary["rank_steps"] == [4] and summary["params_in_sync"] is True
    assert summary["bad_steps"] == 0 and summary["skipped_samples"] == 0
    # Validation scored every val tile once, and exactly the pixels that are not 255.
    assert summary["val_samples"] == 50
    assert summary["val_pixels"] == scored_pixels(shards, "val")
    rows = read_csv(out / "metrics.csv")
    assert [(r["step"], r["phase"]) for r in rows] == [("2", "train"), ("2", "val"), ("4", "train"),
                                                      ("4", "val"), ("", "end")]  # fmt: skip
    assert summary["val_miou"] == pytest.approx(float(rows[3]["miou"]))
    # best.pt is chosen by the mIoU at the thresholds tuned on each validation.
    assert summary["best_miou"] == pytest.approx(max(float(rows[1]["tuned_miou"]), float(rows[3]["tuned_miou"])))
    # Storing the final decision in best.pt does not move the resume pointer off last.pt.
    assert json.loads((out / "latest.json").read_text()) == {"checkpoint": "last.pt", "step": 4}
    decision = checkpoint.load(str(out / "best.pt"))["meta"]["decision"]
    assert decision["kind"] == "tuned"
    assert len(decision["thresholds"]) == len(decision["min_area"]) == len(decision["min_peak"]) == 10
    state = checkpoint.load(str(out / "last.pt"))
    assert state["step"] == 4 and state["meta"]["model"] == "unet" and state["meta"]["n_classes"] == 11
    assert all(s["step"] == 4 for s in state["optimizer"]["state"].values())
    assert load_config(str(out / "config.yaml")) == load_config(cfg_path)


def test_finished_run_resumes_to_a_later_step(unet_run, tmp_path, capsys, caplog):
    """resume=auto continues from latest.json: the optimizer keeps counting from the checkpoint."""
    cfg_path, finished, _ = unet_run
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    caplog.set_level(logging.INFO, logger="trainer")
    rc, summary, _ = run_main(capsys, "--config", cfg_path, f"train.out_dir={out}", "train.steps=6")
    assert rc == 0 and summary["steps"] == 6
    assert f"resumed from {out / 'last.pt'} at step 4" in caplog.text
    state = checkpoint.load(str(out / "last.pt"))
    assert all(s["step"] == 6 for s in state["optimizer"]["state"].values())
    assert [r["step"] for r in read_csv(out / "metrics.csv") if r["phase"] == "train"] == ["2", "4", "6"]


def test_a_run_past_the_steps_asked_for_is_an_error_that_changes_nothing(unet_run, tmp_path, capsys):
    cfg_path, finished, _ = unet_run
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    rc, _, err = run_main(capsys, "--config", cfg_path, f"train.out_dir={out}", "train.steps=2")
    assert rc == 2 and err == [f"trainer: error: {out / 'last.pt'} is at step 4, past the 2 steps asked for; raise "
                               "train.steps, or train into another train.out_dir"]  # fmt: skip
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # config.yaml too


def test_tensorboard_events_go_to_tb_dir_and_the_log_says_where(unet_run, tmp_path, capsys, caplog):
    cfg_path, finished, _ = unet_run
    assert tb_scalars(finished / "tb")["val/miou"] == [2, 4]  # the default: {out_dir}/tb
    caplog.set_level(logging.INFO, logger="trainer")
    tb = tmp_path / "tb"
    rc, _, _ = run_main(capsys, "--config", cfg_path, f"train.out_dir={tmp_path / 'out'}", f"train.tb_dir={tb}")
    assert rc == 0
    assert f"TensorBoard events: {tb} (tensorboard --logdir {tb})" in caplog.text
    scalars = tb_scalars(tb)
    assert scalars["train/loss"] == [2, 4] and scalars["val/miou"] == [2, 4]
    assert not (tmp_path / "out" / "tb").exists()


def test_remote_tensorboard_upload_failure_is_a_warning_and_the_next_upload_catches_up(
    unet_run, tmp_path, monkeypatch, caplog
):
    cfg = load_config(unet_run[0], [f"train.out_dir={tmp_path / 'out'}", "train.tb_dir=memory://tb-retry/tb"])
    logger = runlog.RunLog(cfg, total_steps=2, enabled=True)
    real_write, failures = runlog.storage.write_bytes_atomic, []

    def write(url, data):
        if url.startswith("memory://") and not failures:
            failures.append(url)
            raise OSError("storage down")
        real_write(url, data)

    monkeypatch.setattr(runlog.storage, "write_bytes_atomic", write)
    logger.train_step(1, torch.tensor(0.5), 1e-3, 4, 0.1, 0.0, 0, False)  # not a log step: nothing uploaded
    logger.train_step(2, torch.tensor(0.5), 1e-3, 4, 0.1, 0.0, 0, False)  # a log line: the first upload fails
    assert "TensorBoard events not uploaded to memory://tb-retry/tb (sent again at the next upload): storage down" in (
        caplog.text
    )
    stage = logger._tb_stage
    logger.close(skipped=0)  # uploads again, whole
    fs, root = runlog.storage.fs_for("memory://tb-retry/tb")
    (name,) = [p.rsplit("/", 1)[1] for p in fs.ls(root, detail=False)]
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / name).write_bytes(fs.cat_file(f"{root}/{name}"))
    assert tb_scalars(tmp_path / "tb")["train/loss"] == [2]
    assert not os.path.exists(stage)  # the local staging folder is removed at the end


# ---------------------------------------------------------------------------------------- kill and resume


def _poll_and_kill(cmd: list[str], latest: Path, at_least: int, timeout: float = 180.0) -> int:
    """Start ``cmd``, SIGKILL it once ``latest`` names step >= ``at_least``; returns that step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = latest.parent.with_suffix(".stderr")  # a file, not a pipe nobody reads while the run goes on
    with log.open("wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.exists() and json.loads(latest.read_text())["step"] >= at_least:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (-signal.SIGKILL, 0), log.read_text()[-2000:]
    return json.loads(latest.read_text())["step"]


def test_killed_run_resumes_from_its_last_checkpoint(shards, tmp_path, capsys, caplog):
    """A SIGKILLed run, started again with the same command, ends where an uninterrupted run ends: same step
    count, optimizer step counts, scheduler position and LR. The weights differ (the resumed run draws fresh
    samples rather than replaying the interrupted epoch), so they are not compared."""
    total = 12
    common = {"train": {"steps": total, "ckpt_every": 4, "val_every": 2}, "data": {"batch_size": 12}}
    cfg_a = write_config(tmp_path / "a.yaml", shards, tmp_path / "a", **common)
    rc, summary_a, _ = run_main(capsys, "--config", cfg_a)
    assert rc == 0 and summary_a["steps"] == total

    cfg_b = write_config(tmp_path / "b.yaml", shards, tmp_path / "b", **common)
    cmd = [sys.executable, "-m", "trainer", "--config", cfg_b]
    for _attempt in range(3):  # the kill must land before the run finishes; a loaded machine may be slow to poll
        killed_at = _poll_and_kill(cmd, tmp_path / "b" / "latest.json", at_least=4)
        if killed_at < total:
            break
        shutil.rmtree(tmp_path / "b")
    assert 4 <= killed_at < total

    caplog.set_level(logging.INFO, logger="trainer")
    rc, summary_b, _ = run_main(capsys, "--config", cfg_b)  # the same command again
    assert rc == 0 and summary_b["steps"] == total
    assert f"at step {killed_at}" in caplog.text and "resumed from" in caplog.text

    a, b = checkpoint.load(str(tmp_path / "a" / "last.pt")), checkpoint.load(str(tmp_path / "b" / "last.pt"))
    assert a["step"] == b["step"] == total
    steps_a = [int(s["step"]) for s in a["optimizer"]["state"].values()]
    steps_b = [int(s["step"]) for s in b["optimizer"]["state"].values()]
    assert steps_a == steps_b == [total] * len(steps_a)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == total
    assert a["scheduler"]["_last_lr"] == b["scheduler"]["_last_lr"]
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    # The history has each step once: rows the killed attempt wrote after its checkpoint were replaced.
    rows = read_csv(tmp_path / "b" / "metrics.csv")
    for phase in ("train", "val"):
        assert [int(r["step"]) for r in rows if r["phase"] == phase] == list(range(2, total + 1, 2))


# -------------------------------------------------------------------------------------------- NaN guard


class _NanOnCalls(torch.nn.Module):
    """The real loss, but NaN on the given (1-based) calls."""

    def __init__(self, inner: torch.nn.Module, bad: set[int] | None):
        super().__init__()
        self.inner, self.bad, self.calls = inner, bad, 0

    def forward(self, outputs, target):
        self.calls += 1
        loss = self.inner(outputs, target)
        return loss * float("nan") if self.bad is None or self.calls in self.bad else loss


def _patch_loss(monkeypatch, bad: set[int] | None) -> None:
    real = train_mod.build_loss
    monkeypatch.setattr(train_mod, "build_loss", lambda *a, **k: _NanOnCalls(real(*a, **k), bad))


def test_nan_steps_are_skipped_warned_and_counted(shards, tmp_path, monkeypatch, capsys, caplog):
    _patch_loss(monkeypatch, bad={2, 3})
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out", train={"steps": 6, "max_bad_steps": 3})
    rc, summary, _ = run_main(capsys, "--config", cfg)
    assert rc == 0 and summary["steps"] == 6 and summary["bad_steps"] == 2
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert warnings == ["step 1: non-finite loss or gradient, step skipped (1 in a row)",
                        "step 2: non-finite loss or gradient, step skipped (2 in a row)"]  # fmt: skip
    state = checkpoint.load(str(tmp_path / "out" / "last.pt"))
    assert all(int(s["step"]) == 4 for s in state["optimizer"]["state"].values())  # 2 updates were skipped
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_too_many_nan_steps_in_a_row_abort(shards, tmp_path, monkeypatch, capsys):
    _patch_loss(monkeypatch, bad=None)
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out", train={"steps": 6, "max_bad_steps": 3})
    rc, _, err = run_main(capsys, "--config", cfg)
    assert rc == 2 and err == ["trainer: error: 3 non-finite losses in a row at step 2; aborting"]


# ----------------------------------------------------------------------------------------------- errors


def _dataset_with_manifest(tmp_path: Path, shards: str, edit) -> str:
    root = tmp_path / "ds"
    root.mkdir(parents=True)
    text = (Path(shards) / "manifest.json").read_text()
    (root / "manifest.json").write_text(edit(text))
    return str(root)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.train={tmp}/nothing", "{tmp}/nothing/manifest.json: no manifest"),
        ("data.train={corrupt}", "manifest.json: not valid JSON"),
        ("data.train={v2}", "manifest format version 2, this code reads version 1; rebuild the shards"),
        ("data.train_split=test", "split 'test' has no samples"),
        ("data.val_split=test", "split 'test' has no samples"),
        ("data.val_split=holdout", "no split 'holdout' (has ['test', 'train', 'val'])"),
        ("data.batch_size=64", "rank 0 of 1 validates 50 samples of split 'val', fewer than data.batch_size=64"),
        ("data.crop=96", "data.crop=96 is larger than the 64 px tiles of"),
        ("train.resume={tmp}/none.pt", "{tmp}/none.pt: checkpoint not found"),
        ("optim.lrr=1", "unknown key 'lrr'; valid keys: lr,"),
        ("model.name=u2netp", "got an unexpected keyword argument 'channels'"),
    ],
)
def test_bad_input_is_a_one_line_error(shards, tmp_path, capsys, override, message):
    corrupt = _dataset_with_manifest(tmp_path / "c", shards, lambda t: t[: len(t) // 2])
    v2 = _dataset_with_manifest(tmp_path / "v", shards, lambda t: json.dumps({**json.loads(t), "format_version": 2}))
    fill = {"tmp": tmp_path, "corrupt": corrupt, "v2": v2}
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out")
    rc, _, err = run_main(capsys, "--config", cfg, override.format(**fill))
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("trainer: error: ") and message.format(**fill) in err[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model={name: u2netp}", "checkpoint has model='unet', this run has model='u2netp'"),
        ("model.kwargs={channels: [4, 6, 8, 10, 14]}", "weights do not fit this model: size mismatch for"),
    ],
)
def test_checkpoint_of_another_model_is_a_clear_error(unet_run, tmp_path, capsys, override, message):
    cfg_path, out, _ = unet_run
    ckpt = tmp_path / "other.pt"
    ckpt.write_bytes((out / "last.pt").read_bytes())
    rc, _, err = run_main(capsys, "--config", cfg_path, f"train.out_dir={tmp_path / 'new'}", f"train.resume={ckpt}",
                          override)  # fmt: skip
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"trainer: error: {ckpt}: {message}"), err


def test_latest_json_outside_the_run_folder_is_a_one_line_error(shards, tmp_path, capsys):
    """train.resume: auto follows latest.json only inside its run folder; nothing is loaded from elsewhere."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "latest.json").write_text(json.dumps({"checkpoint": "../elsewhere/last.pt", "step": 3}))
    cfg = write_config(tmp_path / "c.yaml", shards, out)
    rc, _, err = run_main(capsys, "--config", cfg)
    assert rc == 2 and err == [f"trainer: error: {out / 'latest.json'}: checkpoint '../elsewhere/last.pt' leaves "
                               f"the run folder {out}"]
    assert sorted(p.name for p in out.iterdir()) == ["latest.json"]


def test_command_line_error_is_exactly_one_stderr_line(tmp_path):
    """The real CLI, nothing else on stderr (no traceback, no log line, no warning)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  train: {tmp_path}/missing\ntrain:\n  device: cpu\n  out_dir: {tmp_path}/out\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", str(cfg)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"trainer: error: {tmp_path}/missing/manifest.json: no manifest (the dataset is missing " \
                          "or its build did not finish)\n"


def test_checkpoint_of_other_classes_is_a_clear_error(unet_run, tmp_path, capsys):
    cfg_path, out, _ = unet_run
    state = checkpoint.load(str(out / "last.pt"))
    state["meta"]["classes"] = ["background", "Dust", *state["meta"]["classes"][2:]]
    ckpt = tmp_path / "other.pt"
    torch.save(state, ckpt)
    rc, _, err = run_main(capsys, "--config", cfg_path, f"train.out_dir={tmp_path / 'new'}", f"train.resume={ckpt}")
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"trainer: error: {ckpt}: checkpoint has classes=["), err


@pytest.mark.parametrize(
    "edit, key, train_value, val_value",
    [
        ({"mode": "binary", "classes": ["background", "defect"]}, "classes", "CLASSES", ["background", "defect"]),
        ({"mode": "binary"}, "mode", "multiclass", "binary"),
        ({"channels": 3}, "channels", 1, 3),
        ({"tile": 32, "stride": 32, "tiles_per_image": 36}, "tile", 64, 32),
        ({"image_size": 256, "tiles_per_image": 49}, "image_size", 192, 256),
    ],
)
def test_separate_val_set_built_otherwise_is_a_one_line_error(shards, tmp_path, capsys, edit, key, train_value,
                                                              val_value):  # fmt: skip
    """A binary data.val under a multiclass training set would be scored as background/Pinpoint, silently."""
    val = _dataset_with_manifest(tmp_path / "v", shards, lambda t: json.dumps({**json.loads(t), **edit}))
    train_value = schema.read_manifest(shards)["classes"] if train_value == "CLASSES" else train_value
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out")
    rc, _, err = run_main(capsys, "--config", cfg, f"data.val={val}")
    assert rc == 2 and err == [
        f"trainer: error: data.val {val}/manifest.json has {key}={val_value!r} but data.train {shards}/manifest.json "
        f"has {key}={train_value!r}; build both with the same options"
    ], err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_model_whose_weights_diverge_is_never_saved(shards, tmp_path, monkeypatch, capsys, caplog):
    """An update that leaves a weight non-finite (a finite loss and gradient can still overflow it): no
    checkpoint is written (nothing would evaluate it) and the run stops with one line."""
    real = train_mod.apply_gradients

    def diverging(model, *args):
        ok = real(model, *args)
        next(model.parameters()).data[0] = float("inf")
        return ok

    monkeypatch.setattr(train_mod, "apply_gradients", diverging)
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out", train={"steps": 2, "ckpt_every": 1})
    rc, _, err = run_main(capsys, "--config", cfg)
    assert rc == 2 and err == ["trainer: error: step 1: the model's weights are no longer finite (NaN or inf; is "
                               "optim.lr 0.01 too high?); no checkpoint written"]  # fmt: skip
    assert not list((tmp_path / "out").glob("*.pt"))


def test_a_log_window_of_skipped_steps_shows_its_loss_as_nan(shards, tmp_path, monkeypatch, capsys, caplog):
    _patch_loss(monkeypatch, bad={1, 2})
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out", train={"steps": 4, "log_every": 2})
    caplog.set_level(logging.INFO, logger="trainer")
    rc, _, _ = run_main(capsys, "--config", cfg)
    steps = [m for r in caplog.records if (m := r.getMessage()).startswith("step ") and "/4 loss " in m]
    assert rc == 0 and " loss nan " in steps[0] and " loss nan " not in steps[1], steps


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.inf", "config.optim.lr: expected a finite number, got inf"),
    ("optim.lr=.nan", "config.optim.lr: expected a finite number, got nan"),
    ("optim.betas=[0.9, 2.0]", "config.optim: betas must each lie in [0, 1), got [0.9, 2.0]"),
])  # fmt: skip
def test_non_finite_or_out_of_range_optimizer_values_are_config_errors(shards, tmp_path, capsys, override, message):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out")
    rc, _, err = run_main(capsys, "--config", cfg, override)
    assert rc == 2 and len(err) == 1 and err[0].endswith(message), err
    assert not (tmp_path / "out").exists()
