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
import tarfile
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from . import storage

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


def _check_end(tar: tarfile.TarFile) -> None:
    """Raise unless the stream ended on end-of-archive zero blocks. After the first member, tarfile stops
    quietly at a header cut short or garbled, so a truncated shard would pass for a shorter one."""
    stream = tar.fileobj
    complete = stream.tell() - tar.offset == tarfile.BLOCKSIZE  # the block tarfile read as the next header
    while complete and (chunk := stream.read(1 << 16)):
        complete = chunk.count(0) == len(chunk)
    if not complete:
        raise tarfile.ReadError("unexpected end of archive")


def members(stream, url: str, skip: int = 0) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) of the tar read from ``stream`` in order, after the first ``skip`` samples; a tar
    that is broken or cut short raises CorruptSample naming ``url``. Member names only give key and ext."""
    key, parts, index = None, {}, 0
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        try:
            for member in tar:
                if not member.isreg():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                k, _, ext = name.partition(".")
                if k != key:
                    if key is not None:
                        if index >= skip:
                            yield key, parts
                        index += 1
                    key, parts = k, {}
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                parts[ext] = data
            _check_end(tar)
        except tarfile.TarError as e:
            raise CorruptSample(url, key or "(start of shard)", f"broken tar: {e}") from None
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
