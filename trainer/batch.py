"""Batch buffers of the loaders: decoded tiles copied once, into memory the main process maps as it is.

In a DataLoader worker a batch travels to the main process in shared memory. Fresh shared memory for every
batch costs the worker as much as 9 % of its time (allocating, zeroing and mapping 2.5 MB per batch of eight
400 px tiles, then unmapping it: measured with perf on 2 cores; issue 9), and the main process maps and
unmaps it again. So each worker decodes into a small ring of shared-memory *slots*, mapped once, and reuses
a slot only once the main process has handed it back:

- a slot starts with a flag byte: BUSY while a batch in it may still be read, FREE once it may be rewritten.
  The worker sets it BUSY when it takes the slot; only the main process sets it FREE.
- the main process hands a slot back when nothing references its memory any more (`Lent`): the consumer
  dropped the batch and every view of it. A batch the consumer keeps is never overwritten: with every slot
  lent, the worker decodes into fresh shared memory instead, as without a ring.
- with pinned memory, the DataLoader's pinning thread copies a batch (`SlotBatch.pin_memory`) and hands its
  slot straight back.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys

import numpy as np
import torch
from torch.utils.data import get_worker_info

from shardgen import schema
from shardgen.reader import CorruptSample

MADV_POPULATE_WRITE = 23  # Linux >= 5.14; elsewhere, or refused, pages fault in on first write as usual
FREE, BUSY, ONCE = 0, 1, 2  # a slot's flag byte; ONCE: fresh memory outside the ring, never reused
HEADER = 64  # bytes before a slot's tiles: the flag, and the tiles' alignment
KEEP_MAPPED = 64  # slots the main process keeps mapped once handed back, ready for their next batch


def decode(url: str, key: str, parts: dict) -> tuple[np.ndarray, np.ndarray]:
    """Raw tar members -> (image uint8 (C, H, W), mask uint8 (H, W)) arrays; CorruptSample if unreadable."""
    try:
        image, mask, _ = schema.decode_sample(parts)
    except Exception as e:  # a bad member can fail in PIL, zlib or json in many ways
        raise CorruptSample(url, key, f"cannot decode: {type(e).__name__}: {e}") from None
    if image.shape[1:] != mask.shape:
        raise CorruptSample(url, key, f"image {image.shape[1:]} and mask {mask.shape} differ in size")
    return image, mask


class SlotBatch(tuple):
    """(images, masks, skipped) from a worker's slot, as it reaches the main process (see the module doc)."""

    __slots__ = ()

    def pin_memory(self) -> tuple:
        """Pinned copies, as the DataLoader's pinning thread asks for; the slot is handed back at once."""
        images, masks, skipped = self
        pinned = (images.pin_memory(), masks.pin_memory(), skipped)
        images.untyped_storage()[0] = FREE
        return pinned


class BatchBuffer:
    """One batch's (images (B, C, H, W), masks (B, H, W)) uint8 tensors, filled tile by tile.

    ``decode`` has PIL write a tile's pixels straight into their slot (the batch's first tile, which sets
    its shapes, and RGB images are copied once); in a DataLoader worker the tensors live in one of the
    worker's shared-memory slots, so handing the batch to the main process copies nothing more
    (torch.stack and then the move to shared memory would copy every tile twice again).
    """

    def __init__(self, size: int, slots: int = 4):
        """``slots``: the worker's ring of shared-memory batches; more than the batches it can have in
        flight (prefetched, being filled, held by the consumer) or it falls back to fresh memory."""
        self.size, self.count = size, 0
        self.images = self.masks = None  # tensors, allocated with the first tile (its shape sets the batch's)
        self.ring = Ring(slots) if get_worker_info() is not None else None

    def _alloc(self, image_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> None:
        n_image, n_mask = math.prod(image_shape), math.prod(mask_shape)
        if self.ring is None:
            flat, start = torch.empty(n_image + n_mask, dtype=torch.uint8), 0
        else:
            flat, start = self.ring.take(HEADER + n_image + n_mask), HEADER
        self.images = flat[start : start + n_image].view(image_shape)
        self.masks = flat[start + n_image :].view(mask_shape)

    def _drop(self) -> None:
        """Forget the batch's tensors without sending them (its slot, if any, is free again)."""
        if self.ring is not None and self.images is not None:
            self.images.untyped_storage()[0] = FREE
        self.count, self.images, self.masks = 0, None, None

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
        """Decode a raw sample into the next slot; CorruptSample if it cannot be read or does not fit."""
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

    def take(self, skipped: int) -> tuple:
        """The filled part of the batch as the loader's item (images, masks, skipped); the buffer starts a
        new batch."""
        item = (self.images[: self.count], self.masks[: self.count], skipped)
        self.count, self.images, self.masks = 0, None, None
        return item if self.ring is None else SlotBatch(item)


def spare_core() -> bool:
    """Whether this DataLoader worker's helper thread (read-ahead in trainer.data) would run on a core of
    its own: only when the node's workers (this rank's times ``LOCAL_WORLD_SIZE``) leave one free. With a
    worker per core it only contends with the workers."""
    info = get_worker_info()
    if info is None:
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return info.num_workers * int(os.environ.get("LOCAL_WORLD_SIZE", "1")) < cores


class Ring:
    """A worker's shared-memory batch slots, each a flat uint8 storage with its flag byte first."""

    def __init__(self, slots: int):
        self.slots: list[tuple[torch.Tensor, np.ndarray]] = []  # (storage as a tensor, numpy view of its flag)
        self.limit = slots

    def take(self, nbytes: int) -> torch.Tensor:
        """A slot of ``nbytes``, flagged BUSY: a free one, or a new one while the ring is not full, or else
        fresh shared memory outside the ring (every slot is lent)."""
        for i, (flat, flag) in enumerate(self.slots):
            if flag[0] == FREE:
                if flat.numel() != nbytes:  # batches of another size (a new crop or channel count)
                    self.slots[i] = flat, flag = _shared(nbytes)
                break
        else:
            flat, flag = _shared(nbytes)
            if len(self.slots) == self.limit:  # every slot is lent
                flag[0] = ONCE
                return flat
            self.slots.append((flat, flag))
        flag[0] = BUSY
        return flat


class Lent:
    """The main process's side of the worker slots: the slots of the batches it handed out, each handed back
    (flag FREE) once nothing but this object references its memory. It keeps up to ``KEEP_MAPPED`` handed
    back slots mapped, so that their next batches need no new mapping (torch finds them by file)."""

    def __init__(self):
        self.slots: dict[int, list] = {}  # data_ptr -> [UntypedStorage, lent?], oldest first

    def track(self, batch: SlotBatch) -> tuple:
        storage = batch[0].untyped_storage()
        self.slots.pop(storage.data_ptr(), None)
        self.slots[storage.data_ptr()] = [storage, True]
        return tuple(batch)

    def hand_back(self) -> None:
        """Flag FREE every lent slot nobody references any more (the storage held here is the one user)."""
        if _use_count is None:  # cannot tell: slots stay lent and workers use fresh memory, as without a ring
            return
        for ptr, entry in list(self.slots.items()):
            if entry[1] and _use_count(entry[0]._cdata) == 1:
                if entry[0][0] == ONCE:  # no worker writes it again: nothing to keep mapped
                    del self.slots[ptr]
                    continue
                entry[0][0], entry[1] = FREE, False
        for ptr in [ptr for ptr, (_, lent) in self.slots.items() if not lent][: max(0, len(self.slots) - KEEP_MAPPED)]:
            del self.slots[ptr]  # the oldest handed-back slots: their workers may have ended


_use_count = getattr(torch._C, "_storage_Use_Count", None)  # references to a storage, across tensors and views


def _shared(nbytes: int) -> tuple[torch.Tensor, np.ndarray]:
    """A slot: uninitialized uint8 shared memory, faulted in, and a numpy view of its flag byte. Made
    directly as torch's own default_collate makes it (``torch.empty().share_memory_()`` would fault in and
    copy ordinary memory first: ~10x slower on a busy 2-core machine)."""
    if hasattr(torch.UntypedStorage, "_new_shared"):
        flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))
    else:
        flat = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
    _populate(flat)
    return flat, flat[:1].numpy()


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _madvise()


def _populate(flat: torch.Tensor) -> None:
    """Fault in every page of ``flat`` in one system call (ctypes releases the GIL meanwhile)."""
    if _MADVISE is None or not flat.numel():
        return
    start = flat.data_ptr() - flat.data_ptr() % mmap.PAGESIZE
    _MADVISE(start, flat.data_ptr() + flat.numel() - start, MADV_POPULATE_WRITE)  # a refusal changes nothing
