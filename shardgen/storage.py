"""URL I/O for the whole project: local paths, ``s3://bucket/prefix``, ``memory://...`` and any fsspec URL.

Credentials are never handled here. s3fs/botocore read ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_REGION``/``AWS_DEFAULT_REGION`` and the shared config files
themselves, so `storage_options` returns only non-secret settings (safe to log) and nothing secret is
ever written or printed.

Filesystem instances are cached per process, keyed by protocol, storage options and a digest of the
credential-related environment. fsspec's own instance cache is bypassed because its key would not
change when only the (deliberately absent) credentials change in the environment, which would keep
serving a client signed with stale keys. Call `clear_cache()` to force fresh clients.

Shards are written on streams opened here (``open_url``; an S3 upload is committed when the stream is
closed) and read by ``shardgen.reader``; nothing goes through webdataset's own URL openers (gopen).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import uuid
from pathlib import PurePosixPath, PureWindowsPath

import fsspec

# Schemes whose objects appear whole or not at all on close and that have no real directories.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "memory"})
HASH_CHUNK = 1 << 20
# Environment variables that change who we are or where we connect; part of the cache key.
_IDENTITY_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_")

_cache: dict[tuple, fsspec.AbstractFileSystem] = {}
_cache_pid = os.getpid()
_cache_lock = threading.Lock()
_forked_away: list[fsspec.AbstractFileSystem] = []  # a forked parent's instances (see fs_for)


def _protocol(url: str) -> str:
    proto, _ = fsspec.core.split_protocol(url)
    return proto or "file"


def is_local(url: str) -> bool:
    return _protocol(url) in ("file", "local")


def to_local_path(url: str) -> str:
    """``file:///a/b`` or ``/a/b`` -> ``/a/b``; a remote URL raises ValueError."""
    if not is_local(url):
        raise ValueError(f"{url}: not a local path")
    return fsspec.core.split_protocol(url)[1]


def storage_options(url: str) -> dict:
    """Non-secret fsspec options for `url` (safe to log)."""
    if _protocol(url) not in ("s3", "s3a"):
        return {}
    # Listings would otherwise be cached per instance, so a shard another process wrote after our
    # last listing would look missing to exists().
    opts: dict = {"use_listings_cache": False}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def _identity_digest() -> str:
    items = sorted((k, v) for k, v in os.environ.items() if k.startswith(_IDENTITY_ENV_PREFIXES))
    return hashlib.sha256(repr(items).encode()).hexdigest()


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def fs_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving `url` and the path to pass to its methods."""
    global _cache_pid
    proto = _protocol(url)
    cls = fsspec.get_filesystem_class(proto)
    opts = storage_options(url)
    key = (proto, tuple(sorted(opts.items())), _identity_digest())
    with _cache_lock:
        # Async clients (s3fs) do not survive fork: a DataLoader worker must build its own.
        if _cache_pid != os.getpid():
            # The parent's clients share its sockets and its event loop's epoll instance with this child:
            # closing them here (their finalizers would, once dropped) unregisters the parent's pooled
            # connections from that epoll, and the parent's next request waits forever. Keep them, unused.
            _forked_away.extend(_cache.values())
            _cache.clear()
            _cache_pid = os.getpid()
        fs = _cache.get(key)
        if fs is None:
            fs = _cache[key] = cls(skip_instance_cache=True, **opts)
    return fs, cls._strip_protocol(url)


def join(url: str, *parts: str) -> str:
    """Append path components with "/" (URLs) or os.path.join (local); leading "/" of parts is ignored."""
    parts = tuple(p.strip("/") for p in parts if p.strip("/"))
    if is_local(url) and "://" not in url:
        return os.path.join(url, *parts)
    proto, sep, rest = url.partition("://")
    rest = rest.rstrip("/")
    return proto + sep + "/".join((rest, *parts) if rest else parts)


def leaves_folder(name: str) -> bool:
    """True for a relative name that does not stay inside the folder it is resolved in: absolute, climbing out
    with ``..``, written with / or with \\ (a Windows export, a drive letter), or a URL of its own. Such a name
    in an input file (an XML's image, a manifest's shard, a run's ``latest.json``) could reach any file the
    process can read, so it is refused, never resolved."""
    if not name or "://" in name:
        return True
    for path in (PurePosixPath(name), PureWindowsPath(name)):
        if path.is_absolute() or path.anchor or ".." in path.parts:
            return True
    return False


def exists(url: str) -> bool:
    fs, path = fs_for(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = fs_for(url)
    return fs.cat_file(path)


def read_text(url: str, encoding: str = "utf-8") -> str:
    return read_bytes(url).decode(encoding)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` so that readers see either the old object/file or the complete new one.

    Local: temp file in the same directory, fsync, os.replace (parents are created). Object
    stores: one PUT (or a multipart upload that becomes visible only when completed).
    """
    fs, path = fs_for(url)
    if not is_local(url):
        fs.pipe_file(path, data)
        return
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 applies the umask, so the result has ordinary file permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Persist the rename itself, not only the file contents.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_url(url: str, mode: str = "rb"):
    """An open file object; for object stores a write is committed by close()."""
    fs, path = fs_for(url)
    return fs.open(path, mode)


def makedirs(url: str) -> None:
    """Create a directory and its parents; a no-op for object stores (s3fs would create buckets)."""
    if _protocol(url) in OBJECT_STORE_PROTOCOLS:
        return
    fs, path = fs_for(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str) -> None:
    """Delete one file/object; a missing one is not an error (S3 deletes behave the same way)."""
    fs, path = fs_for(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def rename(src: str, dst: str) -> None:
    """Move ``src`` over ``dst``: os.replace locally (atomic), copy + delete on object stores (``dst`` appears
    whole, since one object write is atomic)."""
    if is_local(src) and "://" not in src:
        os.replace(src, dst)
        return
    fs, path = fs_for(src)
    fs.mv(path, fs_for(dst)[1])


def abort_uploads(url: str) -> int:
    """Abort the unfinished S3 multipart uploads of objects directly in the folder ``url`` (not in its
    subfolders); returns how many. A process killed while streaming a large object leaves its upload open,
    and the store keeps (and bills) its parts until someone aborts it. A no-op elsewhere: other filesystems
    have no such leftovers (the temporary shards a killed build did finish are deleted by
    ``shard.remove_partials``)."""
    if _protocol(url) not in ("s3", "s3a"):
        return 0
    fs, path = fs_for(url)
    bucket, _, folder = path.rstrip("/").partition("/")
    prefix = folder + "/" if folder else ""
    ask, uploads = {"Bucket": bucket, "Prefix": prefix}, []
    while True:
        page = fs.call_s3("list_multipart_uploads", **ask)
        uploads += [u for u in page.get("Uploads", []) if "/" not in u["Key"][len(prefix) :]]
        if not page.get("IsTruncated"):
            break
        ask.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])
    for u in uploads:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    return len(uploads)


def sha256_of(url: str) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file/object, streamed in chunks."""
    h = hashlib.sha256()
    size = 0
    with open_url(url, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
