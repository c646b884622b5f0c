"""What a run reports, on rank 0: log lines, TensorBoard events, metrics.csv and the resolved config.

TensorBoard events go to ``train.tb_dir``, by default ``{out_dir}/tb``. TensorBoard's writer only writes
local files, so for an ``s3://`` (or other remote) folder they are written to a local temporary folder and
uploaded whole: at most every TB_UPLOAD_EVERY_S at a log line, at each validation and checkpoint, and at
the end. A failed upload is a warning, never the end of a run: the next one sends the whole files again.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import tempfile
import time

import torch

from shardgen import storage
from shardgen.reader import retry_call

from .config import Config, dump_yaml

log = logging.getLogger("trainer")
TB_UPLOAD_EVERY_S = 60.0  # remote TensorBoard folders: seconds between uploads at log lines


class RunLog:
    def __init__(self, cfg: Config, total_steps: int, enabled: bool, start_step: int = 0):
        self.cfg, self.total, self.enabled = cfg, total_steps, enabled
        self.rows: list[dict] = []
        self._loss, self._n, self._time, self._wait, self._samples = 0.0, 0, 0.0, 0.0, 0
        self.tb = None
        self._tb_stage: str | None = None  # local folder of events bound for a remote tb folder
        self._tb_uploaded = 0.0  # time.monotonic() of the last upload
        if not enabled:
            return
        out = cfg.train.out_dir
        storage.makedirs(out)
        old = storage.join(out, "metrics.csv")
        if start_step and storage.exists(old):
            # A resumed run continues the history up to its checkpoint; rows a killed attempt wrote after
            # that step are replaced by the ones this run writes again (and an old "end" row is dropped).
            rows = csv.DictReader(io.StringIO(storage.read_text(old)))
            self.rows = [r for r in rows if r.get("step") and int(r["step"]) <= start_step]
        # The resolved config sits next to the checkpoints, so a run can always be reproduced.
        self._write(storage.join(out, "config.yaml"), dump_yaml(cfg).encode())
        self._open_tb(start_step)

    def _open_tb(self, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tb_url = self.cfg.train.tb_dir or storage.join(self.cfg.train.out_dir, "tb")
        if storage.is_local(self.tb_url):
            folder = storage.to_local_path(self.tb_url)
        else:
            folder = self._tb_stage = tempfile.mkdtemp(prefix="trainer-tb-")
        # purge_step hides the events a killed attempt wrote after the checkpoint it resumes from (on S3 too:
        # each attempt writes its own event file into the same folder).
        self.tb = SummaryWriter(folder, purge_step=start_step + 1 if start_step else None)
        if self._tb_stage:
            log.info("TensorBoard events: %s (written to %s, uploaded every %.0f s, at validations and at the "
                     "end; tensorboard --logdir %s)", self.tb_url, folder, TB_UPLOAD_EVERY_S, self.tb_url)  # fmt: skip
        else:
            log.info("TensorBoard events: %s (tensorboard --logdir %s)", folder, folder)

    def _upload_tb(self) -> None:
        """Copy the staged event files whole to the remote tb folder."""
        if not (self.tb and self._tb_stage):
            return
        self.tb.flush()
        self._tb_uploaded = time.monotonic()
        try:
            for name in sorted(os.listdir(self._tb_stage)):
                with open(os.path.join(self._tb_stage, name), "rb") as f:
                    storage.write_bytes_atomic(storage.join(self.tb_url, name), f.read())
        except OSError as e:
            log.warning("TensorBoard events not uploaded to %s (sent again at the next upload): %s", self.tb_url, e)

    @staticmethod
    def class_names(classes: list[str], binary: bool) -> list[str]:
        return ["background", "defect"] if binary else list(classes)

    def train_step(self, step, loss: torch.Tensor, lr, global_batch, seconds, wait, skipped, bad) -> None:
        if not self.enabled:
            return
        if not bad:
            self._loss += float(loss)  # one host sync per step on rank 0; the step is done anyway
            self._n += 1
        self._time += seconds
        self._wait += wait
        self._samples += global_batch
        if step % self.cfg.train.log_every and step != self.total:
            return
        loss_avg = self._loss / self._n if self._n else float("nan")  # every step of the window was skipped
        rate = self._samples / max(self._time, 1e-9)
        wait_frac = self._wait / max(self._time, 1e-9)
        log.info("step %d/%d loss %.4f lr %.3g %.1f samples/s data-wait %.0f%% skipped %d",
                 step, self.total, loss_avg, lr, rate, 100 * wait_frac, skipped)  # fmt: skip
        self._row(step=step, phase="train", loss=loss_avg, lr=lr, samples_per_s=rate, data_wait=wait_frac,
                  skipped_samples=skipped)  # fmt: skip
        if self.tb:
            self.tb.add_scalar("train/loss", loss_avg, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/samples_per_s", rate, step)
            self.tb.add_scalar("train/data_wait", wait_frac, step)
            if time.monotonic() - self._tb_uploaded >= TB_UPLOAD_EVERY_S:
                self._upload_tb()
        self._loss, self._n, self._time, self._wait, self._samples = 0.0, 0, 0.0, 0.0, 0

    def val(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        ious = {f"iou_{k}": v["iou"] for k, v in metrics["per_class"].items()}
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        log.info("val step %d: mIoU %s | %s", step, fmt(metrics["miou"]),
                 " ".join(f"{k[4:]} {fmt(v)}" for k, v in ious.items()))  # fmt: skip
        tuned = metrics.get("tuned_miou")  # mIoU at the thresholds tuned on this validation
        if tuned is not None:
            log.info("val step %d: tuned mIoU %.3f at thresholds %s", step, tuned, metrics["thresholds"])
        self._row(step=step, phase="val", miou=metrics["miou"], tuned_miou=tuned, **ious)
        if self.tb:
            if metrics["miou"] is not None:
                self.tb.add_scalar("val/miou", metrics["miou"], step)
            if tuned is not None:
                self.tb.add_scalar("val/tuned_miou", tuned, step)
            for k, v in ious.items():
                if v is not None:
                    self.tb.add_scalar(f"val/{k}", v, step)
        self.flush()

    def _row(self, **row) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        fields = []
        for row in self.rows:
            fields += [k for k in row if k not in fields]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(self.rows)
        self._write(storage.join(self.cfg.train.out_dir, "metrics.csv"), buf.getvalue().encode())
        self._upload_tb()

    def _write(self, url: str, data: bytes) -> None:
        """One write to out_dir with the retry policy of the shard reads and checkpoint uploads: an S3 hiccup
        while the metrics are saved must not end a run that its checkpoint upload would have survived."""
        retries, backoff = self.cfg.data.io_retries, self.cfg.data.io_backoff
        retry_call(lambda: storage.write_bytes_atomic(url, data), url, retries=retries, backoff=backoff)

    def close(self, skipped: int, io_retries: int = 0) -> None:
        if not self.enabled:
            return
        self._row(phase="end", skipped_samples=skipped, io_retries=io_retries)
        if skipped:
            log.warning("skipped %d corrupt training samples in total (see the warnings above)", skipped)
        if self.tb:
            self.tb.close()  # before the last upload (in flush), so the uploaded files are complete
        self.flush()
        if self._tb_stage:
            shutil.rmtree(self._tb_stage, ignore_errors=True)
