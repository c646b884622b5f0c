"""What a training run carries from step to step, and how it is saved, resumed and saved on the way out.

``RunState`` is the run's one context: the model (unwrapped, and as the steps run it: compiled, DDP), its
augmentation, autocast and class names, the optimizer and scheduler, and the counters a checkpoint records.
``save`` is a collective: every rank calls it at the same step (the skipped-sample total is summed and the
RNG states gathered); rank 0 writes, and a failed write is raised on every rank alike, so no rank
waits at a barrier for a rank that has given up. ``outage`` is the way out when storage stays down past the
retry budget: the ranks have already agreed on it (``dist.any_rank``), so all of them save together.
"""

from __future__ import annotations

import io
import logging
import random
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from shardgen import storage
from shardgen.reader import StorageUnavailable

from . import checkpoint, dist
from .config import Config

log = logging.getLogger("trainer")


class TrainError(RuntimeError):
    pass


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of a rank's torch RNG (augmentation draws) from ``step`` on: ranks must not augment alike."""
    return random.Random(f"torch/{seed}/{rank}/{step}").getrandbits(63)


def resume_url(cfg: Config) -> str | None:
    """The checkpoint to continue from: ``latest.json`` of out_dir (auto), none, or the path given."""
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume == "auto":
        return checkpoint.latest(cfg.train.out_dir)
    return cfg.train.resume


@dataclass
class RunState:
    cfg: Config
    device: torch.device
    model: torch.nn.Module  # unwrapped: checkpoints and validation never go through DDP
    optimizer: torch.optim.Optimizer
    scheduler: object
    meta: dict  # model, channels, classes, mode, config, grid: what a checkpoint must match to be loaded
    augment: torch.nn.Module  # GpuAugment: train-mode augmentation, eval-mode normalization
    amp: AbstractContextManager  # the forward passes' autocast
    names: list[str]  # class names as the logs show them
    total: int  # steps of the whole run
    forward: torch.nn.Module = None  # the model as the steps run it: compiled and/or DDP-wrapped
    logger: object = None  # runlog.RunLog; flushed with each checkpoint
    best_state: dict | None = field(default=None, repr=False)  # best.pt's contents, kept to add its decision
    step: int = 0
    best: float = -1.0  # best validation score so far
    skipped_before: int = 0  # corrupt samples skipped by earlier attempts of this run
    skipped_here: int = 0  # corrupt samples this rank's loader skipped in this attempt
    bad_total: int = 0  # non-finite steps skipped, all attempts

    @property
    def n_classes(self) -> int:
        return int(self.meta["n_classes"])

    def resume(self, url: str) -> None:
        """Load the checkpoint at ``url`` into the model, optimizer, scheduler, counters and RNGs (a checkpoint
        written before the GradScaler was dropped resumes too: its scaler entry is ignored); an existing
        ``best.pt`` is kept in memory, to be written again with its decision at the end."""
        state = checkpoint.load(url)
        checkpoint.check_compatible(state, self.meta, url)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:  # same architecture name, other widths (model.kwargs)
            lines = str(e).splitlines()  # a header, then one line per mismatch
            raise checkpoint.CheckpointError(
                f"{url}: weights do not fit this model: {lines[min(1, len(lines) - 1)].strip()}"
            ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best, self.skipped_before = state["step"], state["best_miou"], state["skipped_samples"]
        self.bad_total, rngs = state.get("bad_steps", 0), state.get("rng")
        rank, world = dist.rank(), dist.world_size()
        if isinstance(rngs, list) and len(rngs) == world:  # one RNG state per rank
            checkpoint.set_rng_state(rngs[rank])
        else:
            torch.manual_seed(rank_seed(self.cfg.train.seed, rank, self.step))
        log.info("resumed from %s at step %d", url, self.step)
        best = storage.join(self.cfg.train.out_dir, "best.pt")
        present = dist.all_gather_object(storage.exists(best))
        if len(set(present)) > 1:  # every rank tunes the same weights at the end
            raise TrainError(f"{best}: ranks disagree on whether it exists ({present}); is out_dir shared?")
        if self.cfg.train.tune_decision and present[0]:
            self.best_state = checkpoint.load(best)

    def skipped_total(self) -> int:
        """Corrupt samples skipped by every rank and attempt; a collective, called by all ranks alike."""
        here = dist.all_reduce(torch.tensor(self.skipped_here, device=self.device))
        return self.skipped_before + int(here.item())

    def state(self, copy: bool = False) -> dict:
        """The checkpoint's contents now (with ``copy``, CPU copies the next steps cannot change); a collective
        (the skipped-sample total is summed and the RNG states gathered over ranks), called by every rank."""
        if not all(bool(torch.isfinite(p).all()) for p in self.model.state_dict().values() if p.is_floating_point()):
            raise TrainError(f"step {self.step}: the model's weights are no longer finite (NaN or inf; is optim.lr "
                             f"{self.cfg.optim.lr} too high?); no checkpoint written")  # fmt: skip
        skipped = self.skipped_total()
        rngs = dist.all_gather_object(checkpoint.rng_state())
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step, "best_miou": self.best,
                 "skipped_samples": skipped, "bad_steps": self.bad_total, "rng": rngs,
                 "meta": dict(self.meta)}  # fmt: skip
        if not copy:
            return state
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        return torch.load(buf, map_location="cpu", weights_only=True)

    def save(self, name: str, state: dict | None = None, pointer: bool = True) -> str:
        """``{out_dir}/{name}.pt`` (``state``, or the state now) from rank 0, every rank taking part; an OSError
        (StorageUnavailable once the upload retries are spent) is raised on every rank. ``pointer``: whether
        ``latest.json`` then names it."""
        state = self.state() if state is None else state
        out, failure = self.cfg.train.out_dir, None
        if dist.is_main():  # uploads get the shard readers' retry policy: the same storage, the same outages
            try:
                checkpoint.save(out, name, state, retries=self.cfg.data.io_retries, backoff=self.cfg.data.io_backoff,
                                pointer=pointer)  # fmt: skip
                if self.logger is not None:
                    self.logger.flush()  # metrics.csv holds every row up to the checkpoint a resume starts from
            except OSError as e:
                failure = str(e) if isinstance(e, StorageUnavailable) else f"{out}: cannot save {name}.pt: {e}"
        # Also the barrier: no rank runs ahead of a checkpoint it might need to resume from.
        failure = dist.all_gather_object(failure)[0]
        if failure is not None:
            raise StorageUnavailable(failure)
        return storage.join(out, f"{name}.pt")

    def outage(self, e: StorageUnavailable) -> TrainError:
        """The one-line error that ends a run whose data storage stayed down past the retry budget, after saving
        a checkpoint to resume from. Every rank calls it at the same step (see ``dist.any_rank``)."""
        where = f"storage unavailable at step {self.step}: {e}"
        try:
            url = self.save("last")
        except OSError as save_error:  # out_dir on the same failed storage
            return TrainError(f"{where}; no checkpoint could be saved either: {save_error}")
        return TrainError(f"{where}; saved {url} (step {self.step}), rerun with the same train.out_dir to resume")
