"""Tar members serialized where they are made (reading them: ``shardgen.reader.regular_members``).

``sample_bytes`` turns one WebDataset sample into its tar members, byte for byte as
``webdataset.TarWriter`` (tarfile's "w|" stream, pax format) writes them, and ``end_of_archive`` adds
tarfile's closing blocks. shardgen's pool workers serialize their own samples this way, so the process that
writes the shards only appends bytes (a serial writing process limits a build's scaling).
"""

from __future__ import annotations

import tarfile

from .reader import BLOCK

MEMBER_MODE = 0o444  # webdataset.TarWriter's defaults: shards keep the bytes that writer gave them
MEMBER_OWNER = "bigdata"
RECORD = tarfile.RECORDSIZE  # a "w|" stream pads the archive to a multiple of 20 blocks


def sample_bytes(key: str, parts: dict[str, bytes], mtime: int = 0) -> bytes:
    """The tar members ``{key}.{ext}`` of one sample, extensions in sorted order, as webdataset writes them."""
    out = []
    for ext in sorted(parts):
        data = parts[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), mtime, MEMBER_MODE
        info.uname = info.gname = MEMBER_OWNER
        out += [info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"), data, bytes(-len(data) % BLOCK)]
    return b"".join(out)


def end_of_archive(size: int) -> bytes:
    """What tarfile appends to ``size`` bytes of members when it closes a "w|" stream: two zero blocks,
    then zeros up to a whole record."""
    return bytes(2 * BLOCK + (-(size + 2 * BLOCK) % RECORD))
