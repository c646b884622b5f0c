"""The training loop: one process per device, DDP when launched by torchrun.

    python -m trainer --config demo.yaml                                  # CPU smoke run
    python -m trainer --config configs/unet.yaml optim.lr=3e-4 data.batch_size=16
    torchrun --standalone --nproc_per_node=8 -m trainer --config u2net.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        --rdzv_id=diamond --max-restarts=2 -m trainer --config u2net.yaml   # on each node
"""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from shardgen.reader import StorageUnavailable

from . import dist, runlog
from .config import Config
from .data import class_histogram, reraise, train_loader, val_loader
from .decision import ThresholdTuner, decide, probabilities, tuned_metrics
from .losses import build_loss
from .metrics import ConfusionMatrix
from .setup import build_run, check_before_start, load_datasets
from .state import RunState, TrainError, resume_url

log = logging.getLogger("trainer")


def apply_gradients(raw_model, optimizer, loss_sum: torch.Tensor, grad_clip: float) -> bool:
    """Clip, then step unless the loss or gradient norm is non-finite on any rank; True if the step was taken.

    Every rank must take the same decision, or DDP's next all-reduce would pair mismatched steps.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip or float("inf"))
    ok = dist.all_reduce((~torch.isfinite(loss_sum + grad_norm)).float(), op=dist.MAX).item() == 0
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ok


def predict(logits: torch.Tensor) -> torch.Tensor:
    """Class ids from logits: argmax, or sigmoid > 0.5 for a single (binary) channel."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.max(1).indices  # argmax(1), faster on CPU


@torch.no_grad()
def validation_metrics(run: RunState, batches, tuner: ThresholdTuner | None = None) -> dict:
    """Validation metrics of ``run.model`` from a confusion matrix summed over every rank, plus ``samples``
    (tiles seen by all ranks together) and ``pixels`` (scored, i.e. not ignored, pixels). ``batches``:
    ``reraise(val loader)``. ``tuner`` also sees every batch's probabilities and is reduced. Storage that
    stays down on any rank raises StorageUnavailable on every rank."""
    model, augment, device = run.model, run.augment, run.device
    model.eval()
    augment.eval()
    cm = ConfusionMatrix(max(run.n_classes, 2), class_names=run.names, device=device)
    samples = torch.zeros((), dtype=torch.int64, device=device)
    failure = None
    try:
        for images, masks in batches:
            x, y = augment(images.to(device, non_blocking=True), masks.to(device, non_blocking=True))
            with run.amp:
                logits = model(x)
            cm.update(y, predict(logits.float()))
            if tuner is not None:
                tuner.update(probabilities(logits), y)
            samples += images.shape[0]
    except StorageUnavailable as e:
        failure = str(e)
    # Every rank reaches this once, whatever its share; an outage on one rank stops all of them here together.
    failure = dist.any_rank(failure)
    model.train()
    augment.train()
    if failure is not None:
        raise StorageUnavailable(failure)
    cm.reduce_from_all_processes()
    dist.all_reduce(samples)
    if tuner is not None:
        tuner.reduce(dist.all_reduce)
    return {**cm.compute(), "samples": int(samples), "pixels": int(cm.mat.sum())}


def next_batch(batches):
    """The next training batch; storage that stays down on any rank raises StorageUnavailable on all ranks at
    this step, so they can save a checkpoint together instead of waiting in DDP for a rank that is gone."""
    try:
        batch, failure = next(batches), None
    except StorageUnavailable as e:
        batch, failure = None, str(e)
    if (failure := dist.any_rank(failure)) is not None:
        raise StorageUnavailable(failure)
    return batch


# -------------------------------------------------------------------------------------------------- loop


def train(cfg: Config) -> dict:
    check_before_start(cfg)
    device = dist.setup(cfg.train.device)
    rank, world = dist.rank(), dist.world_size()
    manifest, val_manifest, n_train, n_val = load_datasets(cfg, world)
    run = build_run(cfg, device, manifest, n_train)
    if url := resume_url(cfg):
        run.resume(url)
        if run.step > run.total:  # before anything of the run is written again
            raise TrainError(f"{url} is at step {run.step}, past the {run.total} steps asked for; raise "
                             f"train.steps, or train into another train.out_dir")  # fmt: skip
    run.forward = torch.compile(run.model) if cfg.train.compile else run.model
    if world > 1:
        run.forward = DDP(run.forward, device_ids=[device.index] if device.type == "cuda" else None)
    pin = cfg.data.pin_memory and device.type == "cuda"
    # start_step=run.step: a resumed run draws fresh samples, not a replay of the first ones.
    batches = reraise(train_loader(manifest, cfg.data.train_split, cfg.data, cfg.train.seed, rank, run.step, pin))
    val = Validation(val_loader(val_manifest, cfg.data.val_split, cfg.data, rank, world, pin), val_manifest,
                     cfg.data.val_split, n_val)  # fmt: skip
    run.logger = logger = runlog.RunLog(cfg, run.total, enabled=dist.is_main(), start_step=run.step)
    loss_fn = build_loss(cfg.loss, run.n_classes, class_histogram(manifest, cfg.data.train_split)).to(device)
    global_batch = cfg.data.batch_size * world * cfg.optim.accum_steps
    plateau = isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    last_metrics, bad_in_row = None, 0
    run.forward.train()
    # The context closes the bar on an error too, so an error message starts on a line of its own.
    with tqdm(total=run.total, initial=run.step, desc="train", unit="step", disable=not dist.is_main()) as bar:
        while run.step < run.total:
            t0 = time.perf_counter()
            loss_sum, wait = accumulate(run, batches, loss_fn)
            bad = not apply_gradients(run.model, run.optimizer, loss_sum, cfg.optim.grad_clip)
            if bad:
                bad_in_row += 1
                run.bad_total += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", run.step, bad_in_row)
                if bad_in_row >= cfg.train.max_bad_steps:
                    raise TrainError(f"{bad_in_row} non-finite losses in a row at step {run.step}; aborting")
            else:
                bad_in_row = 0
            if not plateau:
                with warnings.catch_warnings():  # a skipped first step is no misuse of the scheduler
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                    run.scheduler.step()
            run.step += 1
            bar.update(1)
            logger.train_step(run.step, loss_sum, run.optimizer.param_groups[0]["lr"], global_batch,
                              time.perf_counter() - t0, wait, run.skipped_before + run.skipped_here, bad)  # fmt: skip
            if run.step % cfg.train.val_every == 0 or run.step == run.total:
                last_metrics = validate(run, val)
            if run.step % cfg.train.ckpt_every == 0 and run.step < run.total:  # the last one: see finish()
                run.save("last")
    return finish(run, batches, val, last_metrics)


def accumulate(run: RunState, batches, loss_fn) -> tuple[torch.Tensor, float]:
    """Forward and backward over ``optim.accum_steps`` micro-batches: (summed loss, seconds waiting for data)."""
    cfg, device, accum = run.cfg, run.device, run.cfg.optim.accum_steps
    wait, loss_sum = 0.0, torch.zeros((), device=device)
    for micro in range(accum):
        tw = time.perf_counter()
        try:
            images, masks = next_batch(batches)  # uint8 (B, C, H, W), uint8 (B, H, W)
        except StorageUnavailable as e:
            raise run.outage(e) from None
        wait += time.perf_counter() - tw
        run.skipped_here = batches.skipped
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        x, y = run.augment(images, masks)  # on the device: float (B, C, H, W), long (B, H, W)
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Gradients are all-reduced only on the last micro-batch of an accumulation.
        sync = run.forward.no_sync() if dist.world_size() > 1 and micro < accum - 1 else nullcontext()
        with sync, run.amp:
            loss = loss_fn(run.forward(x), y) / accum
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum, wait


@dataclass
class Validation:
    loader: object  # this rank's val_loader
    manifest: dict  # the manifest validated on
    split: str
    samples: int  # tiles of the split, over all ranks
    retries: int = 0  # storage retries of this rank's validation reads so far (training's: BatchStream.io_retries)


def validate(run: RunState, val: Validation) -> dict:
    """Validate, step a plateau schedule, log, and keep the best checkpoint (by the IoU at tuned thresholds
    when tuning: the model is judged by a decision, not by argmax; the decision it is saved with is tuned at
    the end of the run, on whole scans, so its state stays in memory until then)."""
    cfg = run.cfg
    stream = reraise(val.loader)
    tuner = ThresholdTuner(max(1, run.n_classes - 1), run.device) if cfg.train.tune_decision else None
    try:
        metrics = validation_metrics(run, stream, tuner)
    except StorageUnavailable as e:
        raise run.outage(e) from None
    val.retries = stream.io_retries  # the dataset's total over every validation
    if metrics["samples"] != val.samples:  # the dealing to ranks and workers lost or repeated tiles
        raise TrainError(f"{val.manifest['_url']}: validation saw {metrics['samples']} samples of split {val.split!r}, "
                         f"the manifest lists {val.samples}")  # fmt: skip
    if tuner is not None:
        metrics = tuned_metrics(metrics, tuner, run.names)
    score = metrics["tuned_miou" if tuner is not None else "miou"] or 0.0
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(score)
    run.logger.val(run.step, metrics)
    if score > run.best:
        run.best = score
        state = run.state(copy=cfg.train.tune_decision)
        if cfg.train.tune_decision:
            run.best_state = state
        if run.step < run.total or not cfg.train.tune_decision:  # the last step's best: see finish()
            run.save("best", state)
    return metrics


def finish(run: RunState, batches, val: Validation, last_metrics) -> dict:
    """Totals over ranks, the end row of the logs, the ranks' agreement check, and the last checkpoints
    written with the decisions tuned for their weights."""
    cfg, device = run.cfg, run.device
    batches.close()  # no worker reads on: what it skipped or retried while prefetching would be counted late
    run.skipped_here = batches.skipped
    skipped = run.skipped_total()
    io_retries = int(dist.all_reduce(torch.tensor(batches.io_retries + val.retries, device=device)).item())
    if io_retries and dist.is_main():
        log.warning("%d storage retries in this run, all recovered (see the warnings above)", io_retries)
    run.logger.close(skipped, io_retries)
    # DDP keeps ranks in lockstep with identical weights; say so, or loudly say it did not.
    ranks = dist.all_gather_object((run.step, dist.param_digest(run.model)))
    in_sync = len(set(ranks)) == 1
    if not in_sync:
        log.warning("ranks disagree: steps %s, parameter digests %s", [s for s, _ in ranks], [d for _, d in ranks])
    elif dist.world_size() > 1:
        log.info("%d ranks took %d steps each and hold identical parameters", dist.world_size(), run.step)
    states = {"best": run.best_state} if run.best_state is not None else {}
    states["last"] = run.state()
    decisions = {}
    try:
        if cfg.train.tune_decision:
            decisions = decide(run, val, states)
    except Exception as e:
        # Nothing trained is lost: saved without decisions where every rank stops alike (TrainError is agreed
        # on) or there is one rank; another error on one rank must not send it into a save's collective alone.
        if isinstance(e, TrainError) or dist.world_size() == 1:
            for name, state in states.items():
                run.save(name, state, pointer=name == "last")
        raise
    for name, state in states.items():
        if name in decisions:
            state["meta"] = {**state["meta"], "decision": decisions[name].to_json()}
        run.save(name, state, pointer=name == "last")
    decision = decisions.get("best") or decisions.get("last")
    return {"steps": run.step, "best_miou": run.best, "decision": decision and decision.to_json(),
            "last_val": last_metrics, "skipped_samples": skipped,
            "bad_steps": run.bad_total, "rank_steps": [s for s, _ in ranks], "params_in_sync": in_sync,
            "io_retries": io_retries, "out_dir": cfg.train.out_dir}  # fmt: skip
