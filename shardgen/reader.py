"""Streaming samples out of shard URLs, with retries for storage faults and clear errors for corrupt data.

Used by the trainer and the evaluator (and the tests) so that every reader treats faults the same way:

- a storage fault (connection refused or reset, timeouts: ``OSError``) is retried with exponential backoff;
  the shard is reopened and the samples already yielded are skipped, so nothing is lost or repeated;
- corrupt data (a truncated tar, a garbage member, an undecodable PNG) is a ``CorruptSample`` that names the
  shard URL and the sample key; the caller decides whether to skip it (training) or fail (validation).

Tar member names are only split into key and extension, never used as filesystem paths.
"""

from __future__ import annotations

import logging
import tarfile
import time
from collections.abc import Callable, Iterator

from . import storage

log = logging.getLogger(__name__)


class CorruptSample(Exception):
    """A sample that cannot be read; ``url`` and ``key`` say which."""

    def __init__(self, url: str, key: str, reason: str):
        super().__init__(f"{url}: sample {key!r}: {reason}")
        self.url, self.key, self.reason = url, key, reason

    def __reduce__(self):  # DataLoader workers pickle exceptions; keep all three fields
        return type(self), (self.url, self.key, self.reason)


class StorageUnavailable(OSError):
    """Storage kept failing after the whole retry budget."""


def _members(url: str, skip: int) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) of the tar at ``url`` in order, after the first ``skip`` samples."""
    key, parts, index = None, {}, 0
    with storage.open_url(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
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
        except tarfile.TarError as e:
            raise CorruptSample(url, key or "(start of shard)", f"broken tar: {e}") from None
    if key is not None and index >= skip:
        yield key, parts


def iter_shard(
    url: str,
    *,
    retries: int = 6,
    backoff: float = 0.5,
    on_retry: Callable[[str, int, Exception], None] | None = None,
) -> Iterator[tuple[str, dict]]:
    """Samples of one shard as (key, {ext: bytes}), surviving storage faults.

    ``retries`` is the total number of attempts per fault episode; waits double from ``backoff`` seconds
    (capped at 30 s). After the budget, ``StorageUnavailable`` is raised; a missing shard raises at once.
    """
    done, attempt = 0, 0
    while True:
        try:
            for item in _members(url, done):
                yield item
                done += 1
                attempt = 0  # progress resets the budget: it is per outage, not per shard
            return
        except (FileNotFoundError, PermissionError):
            raise
        except CorruptSample:
            raise
        except OSError as e:
            attempt += 1
            if attempt >= retries:
                raise StorageUnavailable(f"{url}: storage failed {attempt} times in a row, giving up: {e}") from e
            if on_retry is not None:
                on_retry(url, attempt, e)
            log.warning("%s: read failed (%s); retry %d/%d", url, e, attempt, retries - 1)
            time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))
