"""Streaming samples out of shard URLs, with retries for storage faults and clear errors for corrupt data.

Used by the trainer and the evaluator (and the tests) so that every reader treats faults the same way:

- a storage fault (connection refused or reset, timeouts, 5xx answers: see `is_transient`) is retried with
  exponential backoff; the shard is reopened and the samples already yielded are skipped, so nothing is lost
  or repeated. `retry_call` gives one-shot operations (a checkpoint upload) the same policy;
- corrupt data (a truncated tar, a garbage member, an undecodable PNG) is a ``CorruptSample`` that names the
  shard URL and the sample key; the caller decides whether to skip it (training) or fail (validation).

Tar member names are only split into key and extension, never used as filesystem paths.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from . import storage
from .tarstream import TarError, regular_members

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_WAIT_S = 30.0  # cap of one backoff wait

# OSErrors that a retry cannot fix: a missing object, no access, a malformed request (s3fs turns S3 error
# codes into these errnos; anything else it cannot name becomes EIO, which is retried).
PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOSYS,
                              errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG})  # fmt: skip


def _client_fault_types() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the S3 client stack that are not OSErrors.

    With the server down, aiobotocore raises botocore's ``EndpointConnectionError`` (a ``BotoCoreError``,
    not an ``OSError``), a dropped response ``ConnectionClosedError``/``ReadTimeoutError``, and s3fs lets
    aiohttp's ``ClientPayloadError``/``ServerDisconnectedError`` through. Credential, parameter and
    parsing errors of botocore are deliberately not listed: retrying them cannot help.
    """
    types: list[type[BaseException]] = []
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        types += [BotoConnectionError, HTTPClientError]
    except ImportError:  # no S3 support installed: nothing of it can be raised either
        pass
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError

        types += [ClientConnectionError, ClientPayloadError]
    except ImportError:
        pass
    return tuple(types)


_CLIENT_FAULTS = _client_fault_types()


class CorruptSample(Exception):
    """A sample that cannot be read; ``url`` and ``key`` say which."""

    def __init__(self, url: str, key: str, reason: str):
        super().__init__(f"{url}: sample {key!r}: {reason}")
        self.url, self.key, self.reason = url, key, reason

    def __reduce__(self):  # DataLoader workers pickle exceptions; keep all three fields
        return type(self), (self.url, self.key, self.reason)


class StorageUnavailable(OSError):
    """Storage kept failing after the whole retry budget."""


def is_transient(e: BaseException) -> bool:
    """A storage fault worth retrying: the connection, not the request or the data, is at fault."""
    if isinstance(e, (StorageUnavailable, CorruptSample)):  # a budget already spent; bad bytes stay bad
        return False
    if isinstance(e, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False  # raised with or without an errno
    if isinstance(e, OSError):  # includes TimeoutError, ConnectionError and aiohttp's ClientOSError
        return e.errno not in PERMANENT_ERRNOS
    return isinstance(e, _CLIENT_FAULTS)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Retry:
    """The retry policy of every storage access, for one operation or one stream (``what`` names it).

    Call ``failed(e)`` from the ``except`` block of an attempt: an error that is not transient is re-raised
    at once; a transient one is logged, reported to ``on_retry(what, attempt, e)`` and waited out (waits
    doubling from ``backoff`` seconds, capped at 30 s), until ``retries`` attempts in a row have failed and
    ``StorageUnavailable`` is raised. ``succeeded()`` after progress starts a new fault episode.
    """

    def __init__(self, what: str, retries: int, backoff: float, on_retry=None):
        self.what, self.retries, self.backoff, self.on_retry = what, retries, backoff, on_retry
        self.attempt = 0  # failed attempts in a row

    def failed(self, e: Exception) -> None:
        if not is_transient(e):
            raise e
        self.attempt += 1
        if self.attempt >= self.retries:
            raise StorageUnavailable(
                f"{self.what}: storage failed {self.attempt} times in a row, giving up: "
                f"{type(e).__name__}: {_first_line(e)}"
            ) from e
        if self.on_retry is not None:
            self.on_retry(self.what, self.attempt, e)
        log.warning("%s: storage failed (%s: %s); retry %d/%d", self.what, type(e).__name__, _first_line(e),
                    self.attempt, self.retries - 1)  # fmt: skip
        time.sleep(min(self.backoff * 2 ** (self.attempt - 1), MAX_WAIT_S))

    def succeeded(self) -> None:
        self.attempt = 0


def retry_call(
    fn: Callable[[], T],
    what: str,
    *,
    retries: int = 6,
    backoff: float = 0.5,
    on_retry: Callable[[str, int, Exception], None] | None = None,
) -> T:
    """``fn()``, retried like `iter_shard` reads: transient faults up to ``retries`` attempts in all, waits
    doubling from ``backoff`` seconds; then ``StorageUnavailable`` naming ``what``. Other errors pass at once."""
    retry = Retry(what, retries, backoff, on_retry)
    while True:
        try:
            return fn()
        except Exception as e:
            retry.failed(e)


def _split(name: str) -> tuple[str, str]:
    """A member name's (key, ext): its base name split at the first dot."""
    key, _, ext = name.rsplit("/", 1)[-1].partition(".")
    return key, ext


def members(stream, url: str, skip: int = 0) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) of the tar read from ``stream`` in order, after the first ``skip`` samples; a tar
    that is broken or cut short raises CorruptSample naming ``url``. Member names only give key and ext."""
    key, parts, index = None, {}, 0
    try:
        for name, data in regular_members(stream):
            k, ext = _split(name)
            if k != key:
                if key is not None:
                    if index >= skip:
                        yield key, parts
                    index += 1
                key, parts = k, {}
            parts[ext] = data
    except TarError as e:  # a member cut short names its own sample, which may not have started yet
        where = _split(e.member)[0] if e.member is not None else key
        raise CorruptSample(url, where or "(start of shard)", f"broken tar: {e}") from None
    if key is not None and index >= skip:
        yield key, parts


def _members(url: str, skip: int) -> Iterator[tuple[str, dict]]:
    with storage.open_url(url, "rb") as f:
        yield from members(f, url, skip)


def iter_shard(
    url: str,
    *,
    retries: int = 6,
    backoff: float = 0.5,
    on_retry: Callable[[str, int, Exception], None] | None = None,
) -> Iterator[tuple[str, dict]]:
    """Samples of one shard as (key, {ext: bytes}), surviving storage faults.

    ``retries`` is the total number of attempts per fault episode; waits double from ``backoff`` seconds
    (capped at 30 s); ``on_retry(url, attempt, error)`` is called before each wait. After the budget,
    ``StorageUnavailable`` is raised; a missing shard or a permanent error (`is_transient`) raises at once.
    """
    retry, done = Retry(url, retries, backoff, on_retry), 0
    while True:
        try:
            for item in _members(url, done):
                yield item
                done += 1
                retry.succeeded()  # progress resets the budget: it is per outage, not per shard
            return
        except Exception as e:
            retry.failed(e)


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
