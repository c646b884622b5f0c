"""The training loop: one process per device, DDP when launched by torchrun.

    python -m trainer --config demo.yaml                                  # CPU smoke run
    python -m trainer --config configs/unet.yaml optim.lr=3e-4 data.batch_size=16
    torchrun --standalone --nproc_per_node=8 -m trainer --config u2net.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        --rdzv_id=diamond --max-restarts=2 -m trainer --config u2net.yaml   # on each node
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
import warnings
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from shardgen import schema, storage
from shardgen.reader import StorageUnavailable

from . import checkpoint, dist, runlog
from .augment import GpuAugment
from .config import Config, to_dict
from .data import class_histogram, rank_share, reraise, train_loader, val_loader
from .decision import AreaTuner, Decision, ThresholdTuner
from .losses import build_loss
from .metrics import ConfusionMatrix
from .models import build_model

log = logging.getLogger("trainer")


class TrainError(RuntimeError):
    pass


def lr_factor(step: int, total: int, cfg) -> float:
    """LR multiplier at ``step``: linear warmup, then cosine down to ``min_lr_ratio`` (or constant)."""
    if cfg.schedule != "cosine":
        return 1.0
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of a rank's torch RNG (augmentation draws) from ``step`` on: ranks must not augment alike."""
    return random.Random(f"torch/{seed}/{rank}/{step}").getrandbits(63)


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name and bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


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
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes, or the sigmoid of a single (binary) logit."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)


@torch.no_grad()
def evaluate(model, batches, augment, n_classes, class_names, device, amp, tuner=None) -> dict:
    """Validation metrics from a confusion matrix summed over every rank, plus ``samples`` (tiles seen by all
    ranks together) and ``pixels`` (scored, i.e. not ignored, pixels). ``batches``: ``reraise(val loader)``.
    ``tuner`` (a decision.ThresholdTuner or AreaTuner) also sees every batch's probabilities and is reduced."""
    model.eval()
    augment.eval()
    cm = ConfusionMatrix(max(n_classes, 2), class_names=class_names, device=device)
    samples = torch.zeros((), dtype=torch.int64, device=device)
    for images, masks, _ in batches:
        x, y = augment(images.to(device, non_blocking=True), masks.to(device, non_blocking=True))
        with amp:
            logits = model(x)
        cm.update(y, predict(logits.float()))
        if tuner is not None:
            tuner.update(probabilities(logits), y)
        samples += images.shape[0]
    cm.reduce_from_all_processes()  # every rank reaches this once, whatever its share
    dist.all_reduce(samples)
    if tuner is not None:
        tuner.reduce(dist.all_reduce)
    model.train()
    augment.train()
    return {**cm.compute(), "samples": int(samples), "pixels": int(cm.mat.sum())}


def tuned_metrics(metrics: dict, tuner: ThresholdTuner, class_names: list[str]) -> dict:
    """``metrics`` plus the tuned thresholds, the IoU each reaches and their mean over scored classes."""
    thresholds, ious = tuner.best()
    scored = [v for v in ious if v is not None]
    return {**metrics, "thresholds": thresholds, "tuned_iou": dict(zip(class_names[1:], ious, strict=True)),
            "tuned_miou": sum(scored) / len(scored) if scored else None}  # fmt: skip


def finish_decision(cfg, raw_model, val_batches, augment, n_classes, names, device, amp, step) -> Decision | None:
    """Minimum component areas tuned on validation with the best model at its tuned thresholds; the whole
    decision is stored in ``best.pt`` (and ``last.pt`` when it holds the same step). Loads the best weights
    into ``raw_model``. None when there is no best checkpoint with tuned thresholds."""
    url = storage.join(cfg.train.out_dir, "best.pt")
    try:
        state = checkpoint.load(url)  # every rank reads it: out_dir is shared by design
    except checkpoint.CheckpointError:
        return None
    found = Decision.from_meta(state["meta"])
    if found is None:
        return None
    raw_model.load_state_dict(state["model"])
    tuner = AreaTuner(found, len(found.thresholds))
    evaluate(raw_model, reraise(val_batches), augment, n_classes, names, device, amp, tuner)
    decision = Decision("tuned", found.thresholds, tuner.best()[0])
    io = dict(retries=cfg.data.io_retries, backoff=cfg.data.io_backoff, pointer=False)
    if dist.is_main():
        state["meta"]["decision"] = decision.to_json()
        checkpoint.save(cfg.train.out_dir, "best", state, **io)
        if state["step"] == step:
            last = checkpoint.load(storage.join(cfg.train.out_dir, "last.pt"))
            last["meta"]["decision"] = decision.to_json()
            checkpoint.save(cfg.train.out_dir, "last", last, **io)
        log.info("decision tuned on %s: thresholds %s, minimum areas %s px", cfg.data.val_split,
                 dict(zip(names[1:], decision.thresholds, strict=True)),
                 dict(zip(names[1:], decision.min_area, strict=True)))  # fmt: skip
    dist.barrier()
    return decision


def train(cfg: Config) -> dict:
    device = dist.setup(cfg.train.device)
    rank, world = dist.rank(), dist.world_size()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    manifest = schema.read_manifest(cfg.data.train)
    val_manifest = schema.read_manifest(cfg.data.val) if cfg.data.val else manifest
    n_train = schema.split_info(manifest, cfg.data.train_split)["samples"]
    if n_train == 0:
        raise TrainError(f"{manifest['_url']}: split {cfg.data.train_split!r} has no samples")
    n_val = schema.split_info(val_manifest, cfg.data.val_split)["samples"]
    if n_val == 0:
        raise TrainError(f"{val_manifest['_url']}: split {cfg.data.val_split!r} has no samples")
    # The last rank gets the fewest images; checking it on every rank makes all ranks fail alike.
    share = rank_share(val_manifest, cfg.data.val_split, world - 1, world)
    if share < cfg.data.batch_size:
        raise TrainError(
            f"{val_manifest['_url']}: rank {world - 1} of {world} validates {share} samples of split "
            f"{cfg.data.val_split!r}, fewer than data.batch_size={cfg.data.batch_size}; lower the batch size"
        )

    classes, binary = manifest["classes"], manifest["mode"] == "binary"
    n_classes = 1 if binary else len(classes)
    try:
        model = build_model(cfg.model.name, manifest["channels"], n_classes, **cfg.model.kwargs).to(device)
    except (TypeError, ValueError) as e:  # model.kwargs the model does not take, or values it rejects
        raise TrainError(f"model {cfg.model.name!r} with model.kwargs {cfg.model.kwargs}: {e}") from None
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(rank_seed(cfg.train.seed, rank, 0))
    augment = GpuAugment(cfg.augment, cfg.normalize).to(device)
    loss_fn = build_loss(cfg.loss, n_classes, class_histogram(manifest, cfg.data.train_split)).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    global_batch = cfg.data.batch_size * world * cfg.optim.accum_steps
    total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * n_train / global_batch))
    if cfg.optim.schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.optim.plateau_factor, patience=cfg.optim.plateau_patience
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.optim))
    use_bf16 = device.type == "cuda" and cfg.train.amp in ("auto", "bf16")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    scaler = torch.amp.GradScaler(enabled=False)  # bf16 needs no loss scaling; kept for the checkpoint format
    meta = {"model": cfg.model.name, "in_channels": manifest["channels"], "n_classes": n_classes,
            "classes": classes, "mode": manifest["mode"], "config": to_dict(cfg),
            "grid": {k: manifest[k] for k in ("image_size", "tile", "stride")}}  # fmt: skip

    step, best, skipped_before, bad_total = 0, -1.0, 0, 0  # skipped_before: skipped by earlier attempts
    resume = checkpoint.latest(cfg.train.out_dir) if cfg.train.resume == "auto" else None
    resume = cfg.train.resume if cfg.train.resume not in ("auto", "none") else resume
    if resume:
        state = checkpoint.load(resume)
        checkpoint.check_compatible(state, meta, resume)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:  # same architecture name, other widths (model.kwargs)
            lines = str(e).splitlines()  # a header, then one line per mismatch
            raise checkpoint.CheckpointError(
                f"{resume}: weights do not fit this model: {lines[min(1, len(lines) - 1)].strip()}"
            ) from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, best, skipped_before = state["step"], state["best_miou"], state["skipped_samples"]
        bad_total, rngs = state.get("bad_steps", 0), state.get("rng")
        if isinstance(rngs, list) and len(rngs) == world:  # one RNG state per rank
            checkpoint.set_rng_state(rngs[rank])
        else:
            torch.manual_seed(rank_seed(cfg.train.seed, rank, step))
        log.info("resumed from %s at step %d", resume, step)

    raw_model = model  # unwrapped, for checkpoints and validation (no DDP collectives in eval)
    if cfg.train.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    pin = cfg.data.pin_memory and device.type == "cuda"
    # start_step=step: a resumed run draws fresh samples, not a replay of the first ones.
    batches = reraise(train_loader(manifest, cfg.data.train_split, cfg.data, cfg.train.seed, rank, step, pin))
    val_batches = val_loader(val_manifest, cfg.data.val_split, cfg.data, rank, world, pin)
    logger = runlog.RunLog(cfg, total, enabled=dist.is_main(), start_step=step)
    last_metrics = None
    names = logger.class_names(classes, binary)
    n_defect = max(1, n_classes - 1)
    decision = None  # the thresholds tuned with the current best model, saved in its checkpoint's meta

    skipped_here = 0  # corrupt samples this rank's loader skipped in this attempt
    val_retries = 0  # storage retries of this rank's validation reads (training reads: batches.io_retries)

    def skipped_total() -> int:  # a collective: every rank calls it at the same points
        return skipped_before + int(dist.all_reduce(torch.tensor(skipped_here, device=device)).item())

    def save(name: str) -> str:
        skipped = skipped_total()
        saved_meta = {**meta, "decision": decision.to_json()} if decision is not None else meta
        rngs = dist.all_gather_object(checkpoint.rng_state())
        url = storage.join(cfg.train.out_dir, f"{name}.pt")
        if dist.is_main():  # uploads get the shard readers' retry policy: the same storage, the same outages
            checkpoint.save(cfg.train.out_dir, name, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "best_miou": best, "skipped_samples": skipped, "bad_steps": bad_total, "rng": rngs,
                "meta": saved_meta,
            }, retries=cfg.data.io_retries, backoff=cfg.data.io_backoff)  # fmt: skip
            logger.flush()  # metrics.csv holds every row up to the checkpoint a resume starts from
        dist.barrier()  # no rank runs ahead of a checkpoint it might need to resume from
        return url

    def outage(e: StorageUnavailable) -> TrainError:
        """The one-line error that ends a run whose data storage stayed down past the retry budget, after
        saving a checkpoint to resume from where that is safe."""
        where = f"storage unavailable at step {step}: {e}"
        if world > 1:  # saving is a collective that the other ranks, still training, would never join
            return TrainError(f"rank {rank}: {where}; resume from the last periodic checkpoint")
        try:
            url = save("last")
        except OSError as save_error:  # out_dir on the same failed storage
            return TrainError(f"{where}; no checkpoint could be saved either: {save_error}")
        return TrainError(f"{where}; saved {url} (step {step}), rerun with the same train.out_dir to resume")

    model.train()
    bad_in_row = 0
    # The context closes the bar on an error too, so an error message starts on a line of its own.
    with tqdm(total=total, initial=step, desc="train", unit="step", disable=not dist.is_main()) as bar:
        while step < total:
            t0 = time.perf_counter()
            wait, loss_sum = 0.0, torch.zeros((), device=device)
            for micro in range(cfg.optim.accum_steps):
                tw = time.perf_counter()
                try:
                    images, masks, skipped = next(batches)  # uint8 (B, C, H, W), uint8 (B, H, W)
                except StorageUnavailable as e:
                    raise outage(e) from None
                wait += time.perf_counter() - tw
                skipped_here += skipped
                images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
                x, y = augment(images, masks)  # kornia on the device: float (B, C, H, W), long (B, H, W)
                if cfg.train.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                # Gradients are all-reduced only on the last micro-batch of an accumulation.
                sync = model.no_sync() if world > 1 and micro < cfg.optim.accum_steps - 1 else nullcontext()
                with sync, amp:
                    loss = loss_fn(model(x), y) / cfg.optim.accum_steps
                loss.backward()
                loss_sum += loss.detach()
            bad = not apply_gradients(raw_model, optimizer, loss_sum, cfg.optim.grad_clip)
            if bad:
                bad_in_row += 1
                bad_total += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, bad_in_row)
                if bad_in_row >= cfg.train.max_bad_steps:
                    raise TrainError(f"{bad_in_row} non-finite losses in a row at step {step}; aborting")
            else:
                bad_in_row = 0
            if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                with warnings.catch_warnings():  # a skipped first step is no misuse of the scheduler
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                    scheduler.step()
            step += 1
            bar.update(1)
            logger.train_step(step, loss_sum, optimizer.param_groups[0]["lr"], global_batch,
                              time.perf_counter() - t0, wait, skipped_before + skipped_here, bad)  # fmt: skip

            if step % cfg.train.val_every == 0 or step == total:
                val_stream = reraise(val_batches)
                tuner = ThresholdTuner(n_defect, device) if cfg.train.tune_decision else None
                try:
                    metrics = evaluate(raw_model, val_stream, augment, n_classes, names, device, amp, tuner)
                except StorageUnavailable as e:
                    raise outage(e) from None
                val_retries += val_stream.io_retries
                if metrics["samples"] != n_val:  # the dealing to ranks and workers lost or repeated tiles
                    raise TrainError(f"{val_manifest['_url']}: validation saw {metrics['samples']} samples of split "
                                     f"{cfg.data.val_split!r}, the manifest lists {n_val}")
                if tuner is not None:
                    metrics = tuned_metrics(metrics, tuner, names)
                last_metrics = metrics
                # The model is judged by the decision it will be used with: tuned thresholds when tuning.
                score = metrics["tuned_miou" if tuner is not None else "miou"] or 0.0
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(score)
                logger.val(step, metrics)
                if score > best:
                    best = score
                    if tuner is not None:
                        decision = Decision("tuned", metrics["thresholds"], [0] * n_defect)
                    save("best")
            if step % cfg.train.ckpt_every == 0 or step == total:
                save("last")
    skipped = skipped_total()
    io_retries = int(dist.all_reduce(torch.tensor(batches.io_retries + val_retries, device=device)).item())
    if io_retries and dist.is_main():
        log.warning("%d storage retries in this run, all recovered (see the warnings above)", io_retries)
    logger.close(skipped, io_retries)
    # DDP keeps ranks in lockstep with identical weights; say so, or loudly say it did not.
    ranks = dist.all_gather_object((step, param_digest(raw_model)))
    in_sync = len(set(ranks)) == 1
    if not in_sync:
        log.warning("ranks disagree: steps %s, parameter digests %s", [s for s, _ in ranks], [d for _, d in ranks])
    elif world > 1:
        log.info("%d ranks took %d steps each and hold identical parameters", world, step)
    if cfg.train.tune_decision:
        decision = finish_decision(cfg, raw_model, val_batches, augment, n_classes, names, device, amp, step)
    return {"steps": step, "best_miou": best, "decision": decision and decision.to_json(),
            "last_val": last_metrics, "skipped_samples": skipped,
            "bad_steps": bad_total, "rank_steps": [s for s, _ in ranks], "params_in_sync": in_sync,
            "io_retries": io_retries, "out_dir": cfg.train.out_dir}  # fmt: skip
