"""Shard streams for training and validation, read through the dataset's manifest (never globbed).

Training: an infinite, resampled stream. Each (seed, rank, worker, epoch) draws its shards and shuffles its
samples with its own RNG, so two runs with the same seed see the same samples, and every rank simply takes
``steps`` batches: ranks can never disagree on the step count, whatever the shard count. A resumed run keys
its RNGs with the step it resumes at as well, so it draws fresh samples instead of replaying the start.

Validation: images are dealt to ranks round-robin and shards to workers, so every sample is seen exactly
once across the job. Ranks may hold unequal counts; validation runs no collective until the confusion
matrices are summed, so it cannot hang.

Decoding happens in the DataLoader workers, straight into the batch's uint8 tensors (``BatchBuffer``, in
a worker's reusable shared-memory slots, handed back by the loader's iterator: see trainer.batch); masks
are decoded by PIL as stored, so label values are exact. Batches
are (images uint8 (B, C, H, W), masks uint8 (B, H, W), skipped), where ``skipped`` counts the corrupt
training samples the worker dropped since its previous batch. Storage retries (see shardgen.reader)
travel the same way, as an `IoRetries` item ahead of the batch they delayed; `reraise` totals them.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shardgen import schema
from shardgen.reader import CorruptSample, StorageUnavailable, iter_shard, read_ahead

from . import sampling
from .batch import BatchBuffer, Lent, SlotBatch, decode, spare_core
from .carry import carry, uncarry
from .config import DataConfig

log = logging.getLogger(__name__)
READ_AHEAD = 16  # training samples read ahead of the decoder by a thread, where a core is spare (a few MB)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainTiles(IterableDataset):
    """Infinite batches of training tiles for one rank."""

    def __init__(self, urls: list[str], cfg: DataConfig, seed: int, rank: int, start_step: int = 0):
        self.urls, self.cfg, self.seed, self.rank, self.start_step = urls, cfg, seed, rank, start_step
        self.skipped = 0  # corrupt samples dropped in this worker and not yet reported with a batch
        self.retries = self.retries_reported = 0  # storage retries in this worker, and those reported

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
        self.skipped += 1

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
        buffer, batch = [], BatchBuffer(size, _slots(self.cfg))
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
                yield from _retries(self)
                yield batch.take(self.skipped)  # (images, masks, skipped)
                self.skipped = 0
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
        self.retries = self.retries_reported = 0

    def __iter__(self):
        return carry(self._batches(), (CorruptSample, StorageUnavailable))

    def _batches(self):
        worker, workers = _worker()
        batch = BatchBuffer(self.cfg.batch_size, _slots(self.cfg))
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
                    yield from _retries(self)
                    yield batch.take(0)
        yield from _retries(self)
        if batch.count:
            yield batch.take(0)


def _slots(cfg: DataConfig) -> int:
    """A worker's batch slots: its prefetched batches, the one it fills, the consumer's current and previous
    ones (handed back a batch late), and one to spare."""
    return cfg.prefetch_factor + 3


def _read(ds: TrainTiles | ValTiles, url: str):
    """Samples of one shard with the configured retry policy; each retry is counted in ``ds.retries``."""

    def count(_url, _attempt, _error) -> None:
        ds.retries += 1

    return iter_shard(url, retries=ds.cfg.io_retries, backoff=ds.cfg.io_backoff, on_retry=count)


class IoRetries:
    """Storage retries a worker made since its previous batch (the reader logged each one)."""

    def __init__(self, count: int):
        self.count = count


def _retries(ds: TrainTiles | ValTiles):
    # ``retries`` only grows (in the read-ahead thread when training), ``retries_reported`` is only written
    # here: no update can be lost between the two threads.
    if ds.retries > ds.retries_reported:
        retries = ds.retries
        yield IoRetries(retries - ds.retries_reported)
        ds.retries_reported = retries


class BatchStream:
    """A loader's batches, with the errors its workers carried raised (see trainer.carry) and their storage
    retries totalled in ``io_retries``."""

    def __init__(self, loader):
        self.loader, self.items = loader, None
        self.io_retries = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.items is None:  # workers start on the first batch asked for, as with a plain loop
            self.items = iter(self.loader)
        while True:
            item = uncarry(next(self.items))
            if isinstance(item, IoRetries):
                self.io_retries += item.count
                continue
            return item


def reraise(loader) -> BatchStream:
    """Iterate a loader, raising the errors its workers carried (see trainer.carry)."""
    return BatchStream(loader)


def rank_share(manifest: dict, split: str, rank: int, world: int) -> int:
    """Samples of ``split`` that ``rank`` validates."""
    return schema.rank_images(manifest, split, rank, world) * manifest["tiles_per_image"]


class TileLoader(DataLoader):
    """A DataLoader whose iterator hands the workers' batch slots back once the consumer lets go of their
    batches (trainer.batch); it yields plain (images, masks, skipped) tuples."""

    def __iter__(self):
        lent, items = Lent(), super().__iter__()
        while True:
            lent.hand_back()  # before waiting for the next batch, so its worker can reuse the slots sooner
            item = next(items, None)
            if item is None:
                return
            yield lent.track(item) if isinstance(item, SlotBatch) else item
            del item  # a batch the consumer dropped is handed back at the next call


def _loader(ds: IterableDataset, cfg: DataConfig, workers: int, pin: bool) -> DataLoader:
    kw = dict(prefetch_factor=cfg.prefetch_factor, persistent_workers=False) if workers else {}
    return TileLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin, collate_fn=_as_is, **kw)


def _as_is(item):
    """The loaders' items as the datasets yield them (the default would turn a SlotBatch into a list)."""
    return item


def train_loader(manifest: dict, split: str, cfg: DataConfig, seed: int, rank: int, start_step: int, pin: bool):
    urls = schema.shard_urls(manifest, split)
    return _loader(TrainTiles(urls, cfg, seed, rank, start_step), cfg, cfg.workers, pin)


def val_loader(manifest: dict, split: str, cfg: DataConfig, rank: int, world: int, pin: bool):
    ds = ValTiles(manifest, split, cfg, rank, world)
    return _loader(ds, cfg, min(cfg.workers, len(ds.urls)), pin)


def class_histogram(manifest: dict, split: str) -> np.ndarray:
    return np.asarray(schema.split_info(manifest, split)["class_pixels"], dtype=np.int64)
