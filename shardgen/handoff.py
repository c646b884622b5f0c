"""Handing a scan's tar bytes from a local build's pool workers to the writing process through shared memory.

Returning ~2.6 MB of bytes from a ``multiprocessing`` pool worker pickles them, pushes them through a pipe
64 KB at a time and unpickles them again: CPU time of the single writing process, on cores the workers
need. A ``Handoff`` is shared memory mapped before the pool forks: a worker
copies its bytes into a free slot and returns the slot's number; the writing process copies them out and
frees the slot. A worker that finds no free slot, or bytes larger than a slot, returns the bytes as before.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
from dataclasses import dataclass

FREE, TAKEN = 0, 1


@dataclass(frozen=True)
class Slot:
    """Where a worker left its bytes."""

    index: int
    size: int


class Handoff:
    """``slots`` slots of ``capacity`` bytes in anonymous shared memory, and a lock for the workers taking them.
    Pages are committed as they are first written, so unused capacity costs only address space."""

    def __init__(self, slots: int, capacity: int):
        self.capacity = capacity
        self.memory = mmap.mmap(-1, slots * capacity)  # MAP_SHARED | MAP_ANONYMOUS: shared with forked children
        self.state = mmap.mmap(-1, slots)  # FREE / TAKEN, one byte per slot
        self.lock = mp.get_context("fork").Lock()

    def put(self, data: bytes) -> Slot | bytes:
        """In a worker: ``data`` copied into a free slot, or ``data`` itself if none is free or it is too big."""
        if len(data) > self.capacity:
            return data
        with self.lock:  # only workers take slots; the writing process only frees them
            index = self.state.find(bytes([FREE]))
            if index < 0:
                return data
            self.state[index] = TAKEN
        start = index * self.capacity
        self.memory[start : start + len(data)] = data
        return Slot(index, len(data))

    def take(self, item: Slot | bytes) -> bytes:
        """In the writing process: the bytes a worker handed over; their slot is free again."""
        if not isinstance(item, Slot):
            return item
        start = item.index * self.capacity
        data = self.memory[start : start + item.size]
        self.state[item.index] = FREE
        return data
