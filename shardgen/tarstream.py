"""Tar streams: a small ustar/pax/GNU header reader, and shard members serialized where they are made.

Python's ``tarfile`` parses each 512-byte header field by field in Python (``frombuf``, ``nts``, ``nti``),
which cost the training loader about a tenth of its time on top of the PNG decode (issue 9). Shards are plain
ustar written by ``tarfile`` itself, so this reader slices the few fields it needs from each header and
checks the header checksum as tarfile does. It also reads pax (``x``) and GNU long-name (``L``) headers, so
tars from other writers with long member names keep working, and it is stricter than ``tarfile`` in stream
mode: a garbled header or a stream cut short anywhere raises `TarError`, where tarfile stops quietly after
its first member.

Writing: ``sample_bytes`` turns one WebDataset sample into its tar members, byte for byte as
``webdataset.TarWriter`` (tarfile's "w|" stream, pax format) writes them, and ``end_of_archive`` adds
tarfile's closing blocks. shardgen's pool workers serialize their own samples this way, so the process that
writes the shards only appends bytes (issue 9: that serial process had limited the build's scaling).

Member names are returned as text and never used as filesystem paths.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR = frozenset(b"07\0")  # REGTYPE, CONTTYPE, and AREGTYPE (old tars' NUL)
META = frozenset(b"xgLK")  # pax extended, pax global, GNU long name, GNU long link: data describes the next header
NO_DATA = frozenset(b"123456")  # links, devices, directories, FIFOs: their size field is not followed by data


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
