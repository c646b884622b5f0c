"""Batch buffers of the loaders: decoded tiles copied once, into memory the main process maps as it is.

In a DataLoader worker a batch travels to the main process in shared memory. Fresh shared memory costs
the worker a page fault per 4 KiB page on first write, about 1 ms per batch of eight 400 px tiles (8 % of
decoding them, measured on a 2-core Xeon; issue 9). So the worker's next batch is allocated and faulted in
(``MADV_POPULATE_WRITE``, one system call) by a helper thread while the current one is being filled: that
work leaves the worker's critical path, onto a core that is otherwise waiting. Buffers are never reused:
the main process may keep any batch as long as it likes.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import queue
import sys
import threading

import numpy as np
import torch
from torch.utils.data import get_worker_info

from shardgen import schema
from shardgen.reader import CorruptSample

MADV_POPULATE_WRITE = 23  # Linux >= 5.14; elsewhere, or refused, pages fault in on first write as usual


def decode(url: str, key: str, parts: dict) -> tuple[np.ndarray, np.ndarray]:
    """Raw tar members -> (image uint8 (C, H, W), mask uint8 (H, W)) arrays; CorruptSample if unreadable."""
    try:
        image, mask, _ = schema.decode_sample(parts)
    except Exception as e:  # a bad member can fail in PIL, zlib or json in many ways
        raise CorruptSample(url, key, f"cannot decode: {type(e).__name__}: {e}") from None
    if image.shape[1:] != mask.shape:
        raise CorruptSample(url, key, f"image {image.shape[1:]} and mask {mask.shape} differ in size")
    return image, mask


class BatchBuffer:
    """One batch's (images (B, C, H, W), masks (B, H, W)) uint8 tensors, filled tile by tile.

    ``decode`` has PIL write a tile's pixels straight into their slot (the batch's first tile, which sets
    its shapes, and RGB images are copied once); in a DataLoader worker the tensors live in shared memory, so
    handing the batch to the main process copies nothing more (torch.stack and then the move to shared
    memory would copy every tile twice again).
    """

    def __init__(self, size: int, helper: bool = False):
        """``helper``: a thread prepares the next batch's shared memory (see `spare_core`)."""
        self.size, self.count = size, 0
        self.images = self.masks = None  # tensors, allocated with the first tile (its shape sets the batch's)
        if get_worker_info() is None:
            self.alloc = _plain
        else:
            self.alloc = SharedAllocator() if helper else _shared

    def add(self, url: str, key: str, image: np.ndarray, mask: np.ndarray) -> None:
        if self.images is None:
            self.images, self.masks = self.alloc((self.size, *image.shape), (self.size, *mask.shape))
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
            self.images, self.masks = self.alloc((self.size, *channels, *image_shape[:2]), (self.size, *mask_shape))
        try:
            schema.decode_sample(parts, self.images.numpy()[self.count], self.masks.numpy()[self.count])
        except Exception as e:  # as in decode(), and a tile of another size than the batch's first
            if first:  # a broken first tile must not set the batch's shapes
                self.images = self.masks = None
            raise CorruptSample(url, key, f"cannot decode: {type(e).__name__}: {e}") from None
        self.count += 1

    @property
    def full(self) -> bool:
        return self.count == self.size

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part of the batch; the buffer starts a new one."""
        images, masks = self.images[: self.count], self.masks[: self.count]
        self.count, self.images, self.masks = 0, None, None
        return images, masks


def spare_core() -> bool:
    """Whether this DataLoader worker's helper threads (batch allocation here, read-ahead in trainer.data)
    would run on a core of their own: only when the node's workers (this rank's times ``LOCAL_WORLD_SIZE``)
    leave one free. With a worker per core they only contend with the workers (2 workers on 2 cores: 1.67x
    of one worker with them, 1.8x without; bench/README.md)."""
    info = get_worker_info()
    if info is None:
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return info.num_workers * int(os.environ.get("LOCAL_WORLD_SIZE", "1")) < cores


Shapes = tuple[tuple[int, ...], tuple[int, ...]]


def _split(flat: torch.Tensor, image_shape: tuple[int, ...], mask_shape: tuple[int, ...]):
    n_image = math.prod(image_shape)
    return flat[:n_image].view(image_shape), flat[n_image:].view(mask_shape)


def _plain(image_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return _split(torch.empty(math.prod(image_shape) + math.prod(mask_shape), dtype=torch.uint8),
                  image_shape, mask_shape)  # fmt: skip


def _shared(image_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized uint8 (images, masks) in one shared-memory storage, faulted in. Made directly as torch's
    own default_collate makes it (``torch.empty().share_memory_()`` would fault in and copy ordinary memory
    first: ~10x slower on a busy 2-core machine); one storage sends one file descriptor per batch, not two."""
    n = math.prod(image_shape) + math.prod(mask_shape)
    if hasattr(torch.UntypedStorage, "_new_shared"):
        flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n))
    else:
        flat = torch.empty(n, dtype=torch.uint8).share_memory_()
    _populate(flat)
    return _split(flat, image_shape, mask_shape)


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


class SharedAllocator:
    """Shared batch tensors, the next one made by a helper thread while the caller fills the current one.

    A call for the shapes of the previous call takes the prepared pair and orders the next; other shapes
    are allocated on the spot. The helper is a daemon thread: it dies with the worker process.
    """

    def __init__(self):
        self.orders: queue.SimpleQueue[Shapes | None] = queue.SimpleQueue()
        self.ready: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: Shapes | None = None  # shapes of the pair being prepared
        # The thread holds the queues, not the allocator, so that ``__del__`` can stop it.
        threading.Thread(target=_serve, args=(self.orders, self.ready), name="batch-alloc", daemon=True).start()

    def __call__(self, image_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        shapes = (image_shape, mask_shape)
        prepared = None
        if self.pending is not None:
            prepared = self.ready.get()
            if isinstance(prepared, Exception):
                raise prepared
        pair = prepared if self.pending == shapes else _shared(*shapes)
        self.pending = shapes
        self.orders.put(shapes)
        return pair

    def __del__(self):
        self.orders.put(None)


def _serve(orders: queue.SimpleQueue, ready: queue.SimpleQueue) -> None:
    while (shapes := orders.get()) is not None:
        try:
            ready.put(_shared(*shapes))
        except Exception as e:  # raised to the caller, in its own thread
            ready.put(e)
