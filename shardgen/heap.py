"""A roomy glibc heap for the duration of a Dask shard task.

Dask's nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.pre-spawn-environ``)
so that they hand freed memory back to the OS quickly. Setting it also freezes glibc's mmap threshold at
128 KiB: every tile buffer, PNG and array of a scan (most are larger) is then its own ``mmap``, faulted in
page by page and unmapped when freed, and a shard task ran markedly slower than a local pool worker on the
same scans (figures: bench/README.md).
``roomy_heap`` raises both thresholds while a task runs, then puts back the values the worker started with
and trims the heap, so the worker still returns its memory between tasks. Elsewhere (no such variable, or
not glibc) it changes nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
GLIBC_MMAP_THRESHOLD = 128 * 1024  # glibc's mmap threshold once the trim threshold is set
ROOMY_MMAP_THRESHOLD = 64 << 20  # a scan's largest buffers stay on the heap
ROOMY_TRIM_THRESHOLD = 256 << 20  # and freeing them does not shrink it


def _libc():
    """The C library if it has glibc's mallopt and malloc_trim, else None."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # TypeError: Windows has no "this process" library
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_lock = threading.Lock()
_inside = 0  # blocks of this process inside roomy_heap now (a Dask worker may run tasks on several threads)


@contextmanager
def roomy_heap() -> Iterator[None]:
    """Raise glibc's mmap and trim thresholds while the block runs, where the worker was started with
    ``MALLOC_TRIM_THRESHOLD_``; then restore the worker's values and trim the heap. The thresholds are
    process-wide, so concurrent blocks (task threads) count: the first one in raises them, the last one out
    restores them."""
    global _inside
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    libc = _libc() if trim is not None else None
    if libc is None or not trim.isdigit():
        yield
        return
    with _lock:
        _inside += 1
        if _inside == 1:
            libc.mallopt(M_MMAP_THRESHOLD, ROOMY_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, ROOMY_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0:
                mmap = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
                libc.mallopt(M_MMAP_THRESHOLD, int(mmap) if mmap.isdigit() else GLIBC_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, int(trim))
                libc.malloc_trim(0)
