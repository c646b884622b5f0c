"""Shard streams for training and validation, read through the dataset's manifest (never globbed).

Training: an infinite, resampled stream. Each (seed, rank, worker, epoch) draws its shards and shuffles its
samples with its own RNG, so two runs with the same seed see the same samples, and every rank simply takes
``steps`` batches: ranks can never disagree on the step count, whatever the shard count. A resumed run keys
its RNGs with the step it resumes at as well, so it draws fresh samples instead of replaying the start.

Validation: images are dealt to ranks round-robin and shards to workers, so every sample is seen exactly
once across the job. Ranks may hold unequal counts; validation runs no collective until the confusion
matrices are summed, so it cannot hang.

Decoding happens in the DataLoader workers, straight into the batch's uint8 tensors (``BatchBuffer``, in a
worker's shared slot that ``TileLoader`` copies out: see trainer.batch); masks are decoded by PIL as stored,
so label values are exact. Batches are (images uint8 (B, C, H, W), masks
uint8 (B, H, W)). The corrupt training samples a worker skipped and the storage retries it made (see
shardgen.reader) are counted beside the batches, in the dataset's shared ``Counts``; ``BatchStream`` reads
the totals.

The whole path from shard bytes to a batch on the device: shardgen/storage.py opens a shard URL,
shardgen/reader.py streams its tar members with retries, shardgen/schema.py decodes a sample's PNGs, this
module draws and deals samples (with trainer/sampling.py's defect-aware draws and crops) and runs the
loaders, and trainer/batch.py fills the batches and counts; trainer/train.py moves them to the device.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shardgen import schema
from shardgen.reader import CorruptSample, StorageUnavailable, iter_shard

from . import sampling
from .batch import BatchBuffer, Counts, SlotBatch, Slots, carry, decode, fork_context, spare_core, uncarry
from .config import DataConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
READ_AHEAD = 16  # training samples read ahead of the decoder by a thread, where a core is spare (a few MB)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainTiles(IterableDataset):
    """Infinite batches of training tiles for one rank."""

    def __init__(self, urls: list[str], cfg: DataConfig, seed: int, rank: int, start_step: int = 0):
        self.urls, self.cfg, self.seed, self.rank, self.start_step = urls, cfg, seed, rank, start_step
        self.counts = Counts(cfg.workers)  # corrupt samples skipped, storage retries
        self.slots: Slots | None = None  # the workers' batch slots, set by the loader

    def shards(self, worker: int) -> Iterator[str]:
        """Shard URLs drawn with replacement, one epoch's worth per RNG."""
        epoch = 0
        while True:
            rng = random.Random(f"shards/{self.seed}/{self.rank}/{worker}/{self.start_step}/{epoch}")
            for _ in range(len(self.urls)):
                yield rng.choice(self.urls)
            epoch += 1

    def samples(self, worker: int) -> Iterator[tuple[str, str, dict]]:
        """Raw samples (url, key, members with the json parsed), undecoded; a sample or shard that cannot be
        read is logged with its shard and key, counted, and skipped."""
        raw = self._raw(worker)
        for url, key, parts in read_ahead(raw, READ_AHEAD) if spare_core() else raw:
            if isinstance(parts, CorruptSample):
                self._skip(parts)
                continue
            yield url, key, parts

    def _raw(self, worker: int) -> Iterator[tuple[str, str, dict | CorruptSample]]:
        """(url, key, members with the json parsed) of the drawn shards, read (and parsed) in the read-ahead
        thread; an unreadable sample comes as (url, key, CorruptSample), and ends its shard if the shard
        breaks off there."""
        for url in self.shards(worker):
            try:
                yield from ((url, key, self._parse(url, key, parts)) for key, parts in _read(self, url))
            except CorruptSample as e:
                yield url, e.key, e

    def _parse(self, url: str, key: str, parts: dict) -> dict | CorruptSample:
        try:
            meta = json.loads(parts[schema.META_KEY])
            if self.cfg.defect_share:  # the sampler reads class_pixels before anything is decoded
                sampling.defect_classes(meta)
        except Exception as e:  # missing member, bad bytes, bad json: many ways
            return CorruptSample(url, key, f"cannot decode: {type(e).__name__}: {e}")
        return {**parts, schema.META_KEY: meta}

    def _skip(self, e: CorruptSample) -> None:
        log.warning("skipping corrupt sample: %s", e)
        self.counts.add(Counts.SKIPPED)

    def _tile(self, raw, rng: random.Random, batch: BatchBuffer, focus: int | None = None) -> bool:
        """A raw sample decoded, cropped (``data.crop``) and added to ``batch``; False, counted, if it
        cannot be decoded."""
        try:
            if self.cfg.crop:
                image, mask = sampling.crop(*decode(*raw), self.cfg.crop, rng, focus)
                batch.add(raw[0], raw[1], image, mask)
            else:
                batch.decode(*raw)
        except CorruptSample as e:
            self._skip(e)
            return False
        return True

    def __iter__(self):
        return carry(self._batches(), (CorruptSample, StorageUnavailable))

    def _batches(self):
        worker, _ = _worker()
        rng = random.Random(f"shuffle/{self.seed}/{self.rank}/{worker}/{self.start_step}")
        size, share = self.cfg.batch_size, self.cfg.defect_share
        forced = sampling.forced_count(share, size, rng)  # drawn afresh for every batch
        pool = sampling.DefectPool(self.cfg.shuffle_buffer)
        buffer, batch = [], BatchBuffer(size, self.slots)
        for raw in self.samples(worker):  # yields undecoded samples in shard order
            if share:
                pool.add(raw, sampling.defect_classes(raw[2][schema.META_KEY]))
            if len(buffer) < self.cfg.shuffle_buffer:
                buffer.append(raw)
                continue
            # The stream gives the batch's first size - forced samples, the pool the rest; while the pool is
            # empty the stream fills the batch. A sample read while the stream owes the batch nothing is not
            # shuffled in; it has fed the pool.
            if batch.count < size - forced or not pool:
                k = rng.randrange(len(buffer))  # reservoir-style shuffle: emit a random element, keep the new one
                buffer[k], raw = raw, buffer[k]
                self._tile(raw, rng, batch)
            while size - forced <= batch.count < size and (drawn := pool.draw(rng)):
                focus, pooled = drawn
                if not self._tile(pooled, rng, batch, focus):
                    pool.discard(pooled)
            if batch.full:
                yield batch.take()
                forced = sampling.forced_count(share, size, rng)


class ValTiles(IterableDataset):
    """Every validation tile exactly once across ranks; corrupt data raises (nothing is quietly dropped).

    Images are dealt round-robin to ranks in manifest order (image k goes to rank k % world), so shares
    differ by at most one image whatever the shard count; each worker streams a subset of the shards and
    keeps its rank's images.
    """

    def __init__(self, manifest: dict, split: str, cfg: DataConfig, rank: int, world: int):
        self.urls = schema.shard_urls(manifest, split)
        self.offsets = schema.image_offsets(manifest, split)
        self.cfg, self.rank, self.world = cfg, rank, world
        self.counts = Counts(cfg.workers)  # storage retries (nothing is skipped)
        self.slots: Slots | None = None  # the workers' batch slots, set by the loader

    def __iter__(self):
        return carry(self._batches(), (CorruptSample, StorageUnavailable))

    def _batches(self):
        worker, workers = _worker()
        batch = BatchBuffer(self.cfg.batch_size, self.slots)
        for url, offset in list(zip(self.urls, self.offsets, strict=True))[worker::workers]:
            index, current = offset - 1, None
            for key, parts in _read(self, url):
                image_id = schema.parse_key(key)[0]
                if image_id != current:  # the 25 tiles of an image are consecutive in one shard
                    index, current = index + 1, image_id
                if index % self.world != self.rank:
                    continue
                batch.decode(url, key, parts)
                if batch.full:
                    yield batch.take()
        if batch.count:
            yield batch.take()


def _read(ds: TrainTiles | ValTiles, url: str):
    """Samples of one shard with the configured retry policy; each retry is counted in ``ds.counts``."""

    def count(_url, _attempt, _error) -> None:
        ds.counts.add(Counts.RETRIES)

    return iter_shard(url, retries=ds.cfg.io_retries, backoff=ds.cfg.io_backoff, on_retry=count)


class BatchStream:
    """A loader's batches, with the errors its workers carried raised (see trainer.batch); ``skipped`` and
    ``io_retries`` are its dataset's totals so far, over every worker."""

    def __init__(self, loader):
        self.loader, self.items = loader, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.items is None:  # workers start on the first batch asked for, as with a plain loop
            self.items = iter(self.loader)
        return uncarry(next(self.items))

    def close(self) -> None:
        """Stop the workers (their prefetching too), so the totals stay what the consumed batches cost."""
        self.items = None

    @property
    def skipped(self) -> int:
        return self.loader.dataset.counts.skipped

    @property
    def io_retries(self) -> int:
        return self.loader.dataset.counts.retries


def reraise(loader) -> BatchStream:
    """Iterate a loader, raising the errors its workers carried (see trainer.carry)."""
    return BatchStream(loader)


def rank_share(manifest: dict, split: str, rank: int, world: int) -> int:
    """Samples of ``split`` that ``rank`` validates."""
    return schema.rank_images(manifest, split, rank, world) * manifest["tiles_per_image"]


class TileLoader(DataLoader):
    """A DataLoader of (images, masks) batches: a worker's ``SlotBatch`` is copied out of its slot here (or by
    the pinning thread, when pinning), which frees the slot for the worker's next batch."""

    def __iter__(self):
        slots = self.dataset.slots
        if slots is not None:  # this iteration's own, made before its workers fork; kept alive while it runs
            slots = self.dataset.slots = slots.fresh()
        for item in super().__iter__():
            yield item.tensors() if isinstance(item, SlotBatch) else item


def _loader(ds: TrainTiles | ValTiles, cfg: DataConfig, workers: int, pin: bool, sample_bytes: int) -> DataLoader:
    """``sample_bytes``: one sample's image and mask pixels, the size of the workers' batch slots."""
    kw = {}
    if workers:
        kw = dict(prefetch_factor=cfg.prefetch_factor, persistent_workers=False)
        if (context := fork_context()) is not None:  # the prefetched batches, the one being filled, a spare
            ds.slots = Slots(workers, cfg.prefetch_factor + 2, cfg.batch_size * sample_bytes)
            kw["multiprocessing_context"] = context
    return TileLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin, collate_fn=_as_is, **kw)


def _as_is(item):
    """The loaders' items as the datasets yield them (the default would turn the tuples into lists)."""
    return item


def train_loader(manifest: dict, split: str, cfg: DataConfig, seed: int, rank: int, start_step: int, pin: bool):
    urls = schema.shard_urls(manifest, split)
    side = cfg.crop or int(manifest["tile"])
    return _loader(TrainTiles(urls, cfg, seed, rank, start_step), cfg, cfg.workers, pin,
                   (int(manifest["channels"]) + 1) * side * side)  # fmt: skip


def val_loader(manifest: dict, split: str, cfg: DataConfig, rank: int, world: int, pin: bool):
    ds = ValTiles(manifest, split, cfg, rank, world)
    side = int(manifest["tile"])
    return _loader(ds, cfg, min(cfg.workers, len(ds.urls)), pin, (int(manifest["channels"]) + 1) * side * side)


def class_histogram(manifest: dict, split: str) -> np.ndarray:
    return np.asarray(schema.split_info(manifest, split)["class_pixels"], dtype=np.int64)


def read_ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items``, produced by a helper thread up to ``depth`` items ahead of the consumer, in order.

    Reading a shard is mostly system calls that release the GIL, so the thread copies the next samples'
    bytes while the consumer decodes (which releases it too): reading leaves the consumer's core. An error
    raised by ``items`` is raised to the consumer at its place in the stream. Closing the returned
    generator stops the thread and closes ``items``.
    """
    out: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as e:  # raised in the consumer instead
            put((False, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    threading.Thread(target=produce, name="read-ahead", daemon=True).start()
    try:
        while True:
            ok, item = out.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()


_END = object()
