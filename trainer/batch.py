"""What DataLoader workers hand the main process: batches decoded in place, their counts beside them, and
their errors as data.

- ``BatchBuffer``: one batch's uint8 tensors, filled tile by tile; PIL decodes each PNG straight into the
  batch (torch.stack would copy every tile again).
- ``Slots``: where a worker fills its batches. Sending a fresh tensor from a worker costs a new shared-memory
  segment per batch, mapped by both processes, its descriptor passed over a socket: on 2 cores a sizeable
  share of a 1-worker loader's time (bench/README.md). So the main process maps a few anonymous shared pages
  per worker before the workers fork; a worker fills a free one and sends only its place (``SlotBatch``), and
  the main process copies the batch out (into pinned memory when pinning: the copy it makes anyway) and
  frees the slot at once. Nothing but stdlib ``mmap`` and public torch calls, and a batch the consumer keeps
  is its own copy.
- ``Counts``: the corrupt samples a worker skipped and the storage retries it made, in shared memory, one
  row per worker: the main process reads the totals whenever it likes, and the batches carry only pixels.
- ``carry`` / ``uncarry``: torch re-raises an exception from a worker as a RuntimeError wrapping the worker's
  traceback, so its type and one-line message (the error a user should see) would be lost. A worker's stream
  yields the errors its caller knows how to report as a ``Carried`` item, and the main process raises them
  again, type and message intact (used by the trainer's loaders and by evaluate's).
"""

from __future__ import annotations

import itertools
import math
import mmap
import multiprocessing as mp
import os
import weakref
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import get_worker_info

from shardgen import schema
from shardgen.reader import CorruptSample

FREE, BUSY = 0, 1  # a slot's first byte
HEADER = 64  # bytes before a slot's pixels: the flag, and their alignment
_SLOTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # token -> Slots, in every process
_TOKENS = itertools.count()


def decode(url: str, key: str, parts: dict) -> tuple[np.ndarray, np.ndarray]:
    """Raw tar members -> (image uint8 (C, H, W), mask uint8 (H, W)) arrays; CorruptSample if unreadable."""
    try:
        image, mask, _ = schema.decode_sample(parts)
    except Exception as e:  # a bad member can fail in PIL, zlib or json in many ways
        raise CorruptSample(url, key, f"cannot decode: {type(e).__name__}: {e}") from None
    if image.shape[1:] != mask.shape:
        raise CorruptSample(url, key, f"image {image.shape[1:]} and mask {mask.shape} differ in size")
    return image, mask


class Slots:
    """The batch slots of each of a loader's workers: anonymous shared mappings of up to ``nbytes`` pixels,
    made before the workers fork (so the loaders start their workers with ``fork_context()``)."""

    def __init__(self, workers: int, per_worker: int, nbytes: int):
        self.nbytes, self.token = nbytes, next(_TOKENS)
        self.maps = [[mmap.mmap(-1, HEADER + nbytes) for _ in range(per_worker)] for _ in range(workers)]
        _SLOTS[self.token] = self

    def fresh(self) -> Slots:
        """New slots of the same shape: one set per iteration of a loader, so no slot left BUSY by an iteration
        dropped mid-way and no worker of another, concurrent iteration shares them."""
        return Slots(len(self.maps), len(self.maps[0]), self.nbytes)

    def take(self, nbytes: int) -> tuple[int, mmap.mmap] | None:
        """A free slot of this worker, flagged BUSY, as (index, mapping); None outside a worker, for a batch
        that does not fit, or while every slot is in flight."""
        info = get_worker_info()
        if info is None or nbytes > self.nbytes or info.id >= len(self.maps):
            return None
        for i, m in enumerate(self.maps[info.id]):
            if m[0] == FREE:
                m[0] = BUSY
                return i, m
        return None

    def copy_out(self, batch: SlotBatch, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch in a slot as (images, masks) tensors of its own; the slot is free again."""
        m = self.maps[batch.worker][batch.slot]
        n_image, n_mask = (batch.count * math.prod(shape) for shape in (batch.image_shape, batch.mask_shape))
        full = batch.size * math.prod(batch.image_shape)  # the masks start after a full batch of images
        out = torch.empty(n_image + n_mask, dtype=torch.uint8, pin_memory=pin)
        pixels, dest = np.frombuffer(m, np.uint8, full + n_mask, HEADER), out.numpy()
        dest[:n_image] = pixels[:n_image]  # numpy's copy: one memcpy, where torch's would wake its thread pool
        dest[n_image:] = pixels[full:]
        del pixels, dest
        m[0] = FREE
        return out[:n_image].view(batch.count, *batch.image_shape), out[n_image:].view(batch.count, *batch.mask_shape)


class SlotBatch:
    """Where a worker left a batch: a few numbers through the DataLoader's queue instead of its pixels."""

    def __init__(self, token: int, worker: int, slot: int, size: int, count: int, image_shape, mask_shape):
        self.token, self.worker, self.slot, self.size, self.count = token, worker, slot, size, count
        self.image_shape, self.mask_shape = tuple(image_shape), tuple(mask_shape)

    def tensors(self, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return _SLOTS[self.token].copy_out(self, pin)

    def pin_memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the DataLoader's pinning thread asks for: the batch copied straight into pinned memory."""
        return self.tensors(pin=True)


def fork_context():
    """The start method slots need, workers inheriting the main process's mappings; None where there is none."""
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None


class BatchBuffer:
    """One batch's (images (B, C, H, W), masks (B, H, W)) uint8 tensors, filled tile by tile: in a free slot
    of ``slots`` when there is one (in a worker), else in memory of its own."""

    def __init__(self, size: int, slots: Slots | None = None):
        self.size, self.count, self.slots, self.slot = size, 0, slots, None
        self.images = self.masks = None  # tensors, allocated with the first tile (its shape sets the batch's)

    def _alloc(self, image_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> None:
        n_image, n_mask = math.prod(image_shape), math.prod(mask_shape)
        taken = self.slots.take(n_image + n_mask) if self.slots is not None else None
        if taken is None:
            flat = torch.empty(n_image + n_mask, dtype=torch.uint8)  # one storage: one transfer
        else:
            self.slot, m = taken
            flat = torch.frombuffer(m, dtype=torch.uint8, count=n_image + n_mask, offset=HEADER)
        self.images, self.masks = flat[:n_image].view(image_shape), flat[n_image:].view(mask_shape)

    def _drop(self) -> None:
        """Forget the batch without sending it (its slot is free again)."""
        self.count, self.images, self.masks = 0, None, None
        if self.slot is not None:
            self.slots.maps[get_worker_info().id][self.slot][0] = FREE
            self.slot = None

    def add(self, url: str, key: str, image: np.ndarray, mask: np.ndarray) -> None:
        if self.images is None:
            self._alloc((self.size, *image.shape), (self.size, *mask.shape))
        if image.shape != self.images.shape[1:] or mask.shape != self.masks.shape[1:]:
            raise CorruptSample(url, key, f"image {image.shape} and mask {mask.shape} differ from the batch's "
                                          f"first tile, {tuple(self.images.shape[1:])}")  # fmt: skip
        self.images.numpy()[self.count] = image  # numpy views of the tensors
        self.masks.numpy()[self.count] = mask
        self.count += 1

    def decode(self, url: str, key: str, parts: dict) -> None:
        """Decode a raw sample into the next place; CorruptSample if it cannot be read or does not fit."""
        first = self.images is None
        if first:  # the batch takes its shapes from this tile's PNG headers
            image_shape, mask_shape = (schema.png_shape(parts.get(k, b"")) for k in (schema.IMAGE_KEY, schema.MASK_KEY))
            if image_shape is None or mask_shape is None:  # decode() says what is wrong
                self.add(url, key, *decode(url, key, parts))
                return
            channels = image_shape[2:] or (1,)
            self._alloc((self.size, *channels, *image_shape[:2]), (self.size, *mask_shape))
        try:
            schema.decode_sample(parts, self.images.numpy()[self.count], self.masks.numpy()[self.count])
        except Exception as e:  # as in decode(), and a tile of another size than the batch's first
            if first:  # a broken first tile must not set the batch's shapes
                self._drop()
            raise CorruptSample(url, key, f"cannot decode: {type(e).__name__}: {e}") from None
        self.count += 1

    @property
    def full(self) -> bool:
        return self.count == self.size

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | SlotBatch:
        """The filled part of the batch, (images, masks) or where it lies in a slot; the buffer starts a new
        batch."""
        item = (self.images[: self.count], self.masks[: self.count])
        if self.slot is not None:
            item = SlotBatch(self.slots.token, get_worker_info().id, self.slot, self.size, self.count,
                             self.images.shape[1:], self.masks.shape[1:])  # fmt: skip
        self.count, self.images, self.masks, self.slot = 0, None, None, None
        return item


class Counts:
    """Per-worker counters of a loader's dataset in shared memory: each DataLoader worker (or the main
    process, without workers) adds to its own row, the main process sums them. Made before the workers
    start, so forked and spawned workers alike share it."""

    SKIPPED, RETRIES = 0, 1

    def __init__(self, workers: int):
        self.table = torch.zeros(workers + 1, 2, dtype=torch.int64).share_memory_()

    def add(self, column: int, n: int = 1) -> None:
        info = get_worker_info()
        self.table[0 if info is None else info.id + 1, column] += n  # one writer per row and column

    @property
    def skipped(self) -> int:
        return int(self.table[:, self.SKIPPED].sum())

    @property
    def retries(self) -> int:
        return int(self.table[:, self.RETRIES].sum())


def spare_core() -> bool:
    """Whether this DataLoader worker's helper thread (read-ahead in trainer.data) would run on a core of
    its own: only when the node's workers (this rank's times ``LOCAL_WORLD_SIZE``) leave one free. With a
    worker per core it only contends with the workers."""
    info = get_worker_info()
    if info is None:
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return info.num_workers * int(os.environ.get("LOCAL_WORLD_SIZE", "1")) < cores


class Carried:
    """An error from a worker, travelling as an item of its stream (exceptions pickle with their args)."""

    def __init__(self, error: Exception):
        self.error = error


def carry(items: Iterable, errors: type[Exception] | tuple[type[Exception], ...]) -> Iterator:
    """``items``, ending with a ``Carried`` item instead of raising one of ``errors``."""
    try:
        yield from items
    except errors as e:
        yield Carried(e)


def uncarry(item):
    """``item``, or the error it carries raised."""
    if isinstance(item, Carried):
        raise item.error
    return item
