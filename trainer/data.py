"""Shard streams for training and validation, read through the dataset's manifest (never globbed).

Training: an infinite, resampled stream. Each (seed, rank, worker, epoch) draws its shards and shuffles its
samples with its own RNG, so two runs with the same seed see the same samples, and every rank simply takes
``steps`` batches: ranks can never disagree on the step count, whatever the shard count. A resumed run keys
its RNGs with the step it resumes at as well, so it draws fresh samples instead of replaying the start.

Validation: images are dealt to ranks round-robin and shards to workers, so every sample is seen exactly
once across the job. Ranks may hold unequal counts; validation runs no collective until the confusion
matrices are summed, so it cannot hang.

Decoding happens in the DataLoader workers, straight into the batch's uint8 tensors (``BatchBuffer``, in
shared memory); masks are decoded by PIL as stored, so label values are exact. Batches are (images uint8
(B, C, H, W), masks uint8 (B, H, W), skipped), where ``skipped`` counts the corrupt training samples the
worker dropped since its previous batch. Storage retries (see shardgen.reader) travel the same way, as an
`IoRetries` item ahead of the batch they delayed; `reraise` totals them.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shardgen import schema
from shardgen.reader import CorruptSample, StorageUnavailable, iter_shard

from . import sampling
from .carry import carry, uncarry
from .config import DataConfig

log = logging.getLogger(__name__)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def decode(url: str, key: str, parts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw tar members -> (image uint8 (C, H, W), mask uint8 (H, W)) tensors of their own; CorruptSample if
    unreadable. (The loaders decode with ``decode_arrays`` straight into their batch buffers.)"""
    image, mask = decode_arrays(url, key, parts)
    return torch.from_numpy(image.copy()), torch.from_numpy(mask.copy())


def decode_arrays(url: str, key: str, parts: dict) -> tuple[np.ndarray, np.ndarray]:
    """As ``decode``, but read-only numpy views of the decoded pixels: no copy until ``BatchBuffer.add``."""
    try:
        image, mask, _ = schema.decode_sample(parts, copy=False)
    except Exception as e:  # a bad member can fail in PIL, zlib or json in many ways
        raise CorruptSample(url, key, f"cannot decode: {type(e).__name__}: {e}") from None
    if image.shape[1:] != mask.shape:
        raise CorruptSample(url, key, f"image {image.shape[1:]} and mask {mask.shape} differ in size")
    return image, mask


class BatchBuffer:
    """One batch's (images (B, C, H, W), masks (B, H, W)) uint8 tensors, filled tile by tile.

    Each tile's pixels are copied once, from the decoder's bytes into their slot; in a DataLoader worker the
    tensors are allocated in shared memory, so handing the batch to the main process copies nothing more
    (torch.stack and then the move to shared memory would copy every tile twice again).
    """

    def __init__(self, size: int):
        self.size, self.count = size, 0
        self.images = self.masks = None  # tensors, allocated with the first tile (its shape sets the batch's)

    def add(self, url: str, key: str, image: np.ndarray, mask: np.ndarray) -> None:
        if self.images is None:
            self.images, self.masks = _alloc((self.size, *image.shape), (self.size, *mask.shape))
        if image.shape != self.images.shape[1:] or mask.shape != self.masks.shape[1:]:
            raise CorruptSample(url, key, f"image {image.shape} and mask {mask.shape} differ from the batch's "
                                          f"first tile, {tuple(self.images.shape[1:])}")  # fmt: skip
        self.images.numpy()[self.count] = image  # numpy views of the tensors: copies from read-only arrays
        self.masks.numpy()[self.count] = mask
        self.count += 1

    @property
    def full(self) -> bool:
        return self.count == self.size

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part of the batch; the buffer starts a new one."""
        images, masks = self.images[: self.count], self.masks[: self.count]
        self.count, self.images, self.masks = 0, None, None
        return images, masks


def _alloc(image_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized uint8 (images, masks) in one storage: in a DataLoader worker a shared-memory one, made
    directly as torch's own default_collate makes it. (``torch.empty().share_memory_()`` would fault in and
    copy ordinary memory first: ~10x slower on a busy 2-core machine.) One storage sends one file
    descriptor to the main process per batch, not two."""
    n_image, n_mask = math.prod(image_shape), math.prod(mask_shape)
    if get_worker_info() is not None and hasattr(torch.UntypedStorage, "_new_shared"):
        storage = torch.UntypedStorage._new_shared(n_image + n_mask)
        flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    else:
        flat = torch.empty(n_image + n_mask, dtype=torch.uint8)
        if get_worker_info() is not None:
            flat.share_memory_()
    return flat[:n_image].view(image_shape), flat[n_image:].view(mask_shape)


class TrainTiles(IterableDataset):
    """Infinite batches of training tiles for one rank."""

    def __init__(self, urls: list[str], cfg: DataConfig, seed: int, rank: int, start_step: int = 0):
        self.urls, self.cfg, self.seed, self.rank, self.start_step = urls, cfg, seed, rank, start_step
        self.skipped = 0  # corrupt samples dropped in this worker and not yet reported with a batch
        self.retries = 0  # storage retries in this worker not yet reported

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
        for url in self.shards(worker):
            try:
                for key, parts in _read(self, url):
                    try:
                        meta = json.loads(parts[schema.META_KEY])
                        if self.cfg.defect_share:  # the sampler reads class_pixels before anything is decoded
                            sampling.defect_classes(meta)
                    except Exception as e:  # missing member, bad bytes, bad json: many ways
                        self._skip(CorruptSample(url, key, f"cannot decode: {type(e).__name__}: {e}"))
                        continue
                    yield url, key, {**parts, schema.META_KEY: meta}
            except CorruptSample as e:  # the rest of a broken shard is unreadable
                self._skip(e)

    def _skip(self, e: CorruptSample) -> None:
        log.warning("skipping corrupt sample: %s", e)
        self.skipped += 1

    def _tile(self, raw, rng: random.Random, batch: BatchBuffer, focus: int | None = None) -> bool:
        """A raw sample decoded, cropped (``data.crop``) and added to ``batch``; False, counted, if it
        cannot be decoded."""
        try:
            image, mask = decode_arrays(*raw)
            image, mask = sampling.crop(image, mask, self.cfg.crop, rng, focus)
            batch.add(raw[0], raw[1], image, mask)
        except CorruptSample as e:
            self._skip(e)
            return False
        return True

    def __iter__(self):
        return carry(self._batches(), (CorruptSample, StorageUnavailable))

    def _batches(self):
        worker, _ = _worker()
        rng = random.Random(f"shuffle/{self.seed}/{self.rank}/{worker}/{self.start_step}")
        size = self.cfg.batch_size
        forced = sampling.forced_count(self.cfg.defect_share, size)
        pool = sampling.DefectPool(self.cfg.shuffle_buffer)
        buffer, batch = [], BatchBuffer(size)
        for raw in self.samples(worker):  # yields undecoded samples in shard order
            if forced:
                pool.add(raw, sampling.defect_classes(raw[2][schema.META_KEY]))
            if len(buffer) < self.cfg.shuffle_buffer:
                buffer.append(raw)
                continue
            k = rng.randrange(len(buffer))  # reservoir-style shuffle: emit a random element, keep the new one
            buffer[k], raw = raw, buffer[k]
            self._tile(raw, rng, batch)
            # The forced share comes last, from the pool; while the pool is empty the stream fills the batch.
            while size - forced <= batch.count < size and (drawn := pool.draw(rng)):
                focus, pooled = drawn
                if not self._tile(pooled, rng, batch, focus):
                    pool.discard(pooled)
            if batch.full:
                yield from _retries(self)
                yield (*batch.take(), self.skipped)  # (images, masks, skipped)
                self.skipped = 0


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
        self.retries = 0

    def __iter__(self):
        return carry(self._batches(), (CorruptSample, StorageUnavailable))

    def _batches(self):
        worker, workers = _worker()
        batch = BatchBuffer(self.cfg.batch_size)
        for url, offset in list(zip(self.urls, self.offsets, strict=True))[worker::workers]:
            index, current = offset - 1, None
            for key, parts in _read(self, url):
                image_id = schema.parse_key(key)[0]
                if image_id != current:  # the 25 tiles of an image are consecutive in one shard
                    index, current = index + 1, image_id
                if index % self.world != self.rank:
                    continue
                batch.add(url, key, *decode_arrays(url, key, parts))
                if batch.full:
                    yield from _retries(self)
                    yield (*batch.take(), 0)
        yield from _retries(self)
        if batch.count:
            yield (*batch.take(), 0)


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
    if ds.retries:
        yield IoRetries(ds.retries)
        ds.retries = 0


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


def _loader(ds: IterableDataset, cfg: DataConfig, workers: int, pin: bool) -> DataLoader:
    kw = dict(prefetch_factor=cfg.prefetch_factor, persistent_workers=False) if workers else {}
    return DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin, **kw)


def train_loader(manifest: dict, split: str, cfg: DataConfig, seed: int, rank: int, start_step: int, pin: bool):
    urls = schema.shard_urls(manifest, split)
    return _loader(TrainTiles(urls, cfg, seed, rank, start_step), cfg, cfg.workers, pin)


def val_loader(manifest: dict, split: str, cfg: DataConfig, rank: int, world: int, pin: bool):
    ds = ValTiles(manifest, split, cfg, rank, world)
    return _loader(ds, cfg, min(cfg.workers, len(ds.urls)), pin)


def class_histogram(manifest: dict, split: str) -> np.ndarray:
    return np.asarray(schema.split_info(manifest, split)["class_pixels"], dtype=np.int64)
