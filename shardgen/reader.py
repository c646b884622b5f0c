"""Streaming samples out of shard URLs, with retries for storage faults and clear errors for corrupt data.

Used by the trainer and the evaluator (and the tests) so that every reader treats faults the same way:

- a storage fault (connection refused or reset, timeouts, 5xx answers: see `is_transient`) is retried with
  exponential backoff; the shard is reopened and the samples already yielded are skipped, so nothing is lost
  or repeated. `retry_call` gives one-shot operations (a checkpoint upload) the same policy;
- corrupt data (a truncated tar, a garbage member, an undecodable PNG) is a ``CorruptSample`` that names the
  shard URL and the sample key; the caller decides whether to skip it (training) or fail (validation).

Tar headers are read here too (``regular_members``): Python's ``tarfile`` parses each 512-byte header
field by field in Python, which cost the training loader about a tenth of its time on top of the PNG
decode. Shards are plain ustar written by ``tarfile`` itself, so this reader slices the few fields it needs
from each header and checks the header checksum as tarfile does. It also reads pax (``x``) and GNU
long-name (``L``) headers, so tars from other writers with long member names keep working, and it is
stricter than ``tarfile`` in stream mode: a garbled header or a stream cut short anywhere raises
``TarError``, where tarfile stops quietly after its first member.

Tar member names are only split into key and extension, never used as filesystem paths.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from . import storage

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_WAIT_S = 30.0  # cap of one backoff wait
BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR = frozenset(b"07\0")  # REGTYPE, CONTTYPE, and AREGTYPE (old tars' NUL)
META = frozenset(b"xgLK")  # pax extended, pax global, GNU long name, GNU long link: data describes the next header
NO_DATA = frozenset(b"123456")  # links, devices, directories, FIFOs: their size field is not followed by data

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


class ShardUnreadable(StorageUnavailable):
    """A shard no retry will bring back: missing, or refused (permissions). The message names it."""


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
            if isinstance(e, OSError) and not is_transient(e):
                reason = "not found" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {_first_line(e)}"
                raise ShardUnreadable(f"{url}: shard {reason}") from None
            retry.failed(e)


# ------------------------------------------------------------------------------------------ tar headers


class TarError(Exception):
    """The bytes are not a complete tar archive; the message says what is wrong and where, and ``member`` names
    the member whose data was cut short (None for a broken header)."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def _number(field: bytes, offset: int) -> int:
    """An octal (or GNU base-256) numeric header field, as tarfile's ``nti`` reads it."""
    if field[0] in (0o200, 0o377):  # base-256, for sizes of 8 GiB and more
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0o377 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise TarError(f"invalid header at byte {offset}") from None


def _checksum_ok(header: bytes, offset: int) -> bool:
    stored = _number(header[148:156], offset)
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as 8 spaces
    if stored == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 8 * 32  # some old writers
    return stored == signed


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_path(data: bytes, offset: int) -> str | None:
    """The ``path`` record of a pax extended header ("LEN path=VALUE\\n" records), if any."""
    pos, path = 0, None
    while pos < len(data) and data[pos] != 0:
        length_text, _, _ = data[pos : pos + 20].partition(b" ")
        try:
            length = int(length_text)
        except ValueError:
            raise TarError(f"invalid pax header at byte {offset}") from None
        if length <= 0:
            raise TarError(f"invalid pax header at byte {offset}")
        record = data[pos : pos + length]
        keyword, _, value = record[len(length_text) + 1 :].rstrip(b"\n").partition(b"=")
        if keyword == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


def _read_exactly(read, n: int, member: str | None = None) -> bytes:
    data = read(n)
    if len(data) != n:
        raise TarError("unexpected end of data", member)
    return data


def regular_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular member of the tar read from ``stream`` (anything with ``read(n)``), in
    order; other members (directories, links) are skipped. The archive must end on its end-of-archive zero
    blocks followed by nothing but zeros; otherwise, or on a bad header, `TarError` is raised."""
    read, offset, long_name = stream.read, 0, None
    while True:
        header = read(BLOCK)
        if len(header) != BLOCK:
            raise TarError("empty file" if offset == 0 and not header else "unexpected end of archive")
        if header == ZERO_BLOCK:  # end of archive: what follows (the second zero block, record padding) is zeros
            while chunk := read(1 << 16):
                if chunk.count(0) != len(chunk):
                    raise TarError(f"data after the end-of-archive block at byte {offset}")
            return
        if not _checksum_ok(header, offset):
            raise TarError(f"bad checksum in the member header at byte {offset}")
        size, kind = _number(header[124:136], offset), header[156]
        if size < 0:
            raise TarError(f"invalid header at byte {offset}")
        padding = -size % BLOCK
        if kind in META:
            data = _read_exactly(read, size + padding)[:size]
            if kind == ord("L"):
                long_name = _text(data)
            elif kind == ord("x"):
                long_name = _pax_path(data, offset) or long_name
            offset += BLOCK + size + padding
            continue
        name = long_name
        if name is None:
            name = _text(header[:100])
            if header[257:262] == b"ustar" and header[345] != 0:  # ustar splits long names into prefix/name
                name = f"{_text(header[345:500])}/{name}"
        long_name = None
        if kind in REGULAR:
            data = _read_exactly(read, size, name)
            if padding:
                _read_exactly(read, padding, name)
            yield name, data
        elif kind not in NO_DATA and size:
            _read_exactly(read, size + padding, name)
        offset += BLOCK + (0 if kind in NO_DATA else size + padding)
