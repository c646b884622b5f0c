"""shardgen.tarstream: the loader's tar reader agrees with tarfile on every tar format and refuses broken ones."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from shardgen.reader import TarError, regular_members

LONG = "deep/" * 30 + "stone_00001_0_0.image.png"  # 175 characters: needs a pax, GNU or ustar-prefix name


def _tar(fmt: int, names: list[str], sizes: list[int], with_dir: bool = True) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if with_dir:
            info = tarfile.TarInfo("somedir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, size in zip(names, sizes, strict=True):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(rng.integers(0, 256, size, dtype=np.uint8).tobytes()))
        link = tarfile.TarInfo("a-link")
        link.type, link.linkname = tarfile.SYMTYPE, "k0.json"
        tar.addfile(link)
    return buf.getvalue()


def _reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile_for_every_format(fmt):
    names = ["k0.image.png", "k0.mask.png", "k0.json", "sub/k1.image.png", "k1.json"]
    sizes = [0, 1, 511, 512, 70_001]
    if fmt != tarfile.USTAR_FORMAT:
        names.append(LONG)
        sizes.append(1000)
    data = _tar(fmt, names, sizes)
    got = list(regular_members(io.BytesIO(data)))
    assert got == _reference(data)
    assert [name for name, _ in got] == names  # the directory and the symlink are skipped


def test_ustar_prefix_names_are_joined():
    name = "p" * 120 + "/stone_00001_0_0.json"  # ustar stores the directory part in the prefix field
    data = _tar(tarfile.USTAR_FORMAT, [name], [3], with_dir=False)
    assert [n for n, _ in regular_members(io.BytesIO(data))] == [name]


def _shard() -> bytes:
    return _tar(tarfile.PAX_FORMAT, ["a.image.png", "a.json", "b.image.png"], [700, 10, 300], with_dir=False)


@pytest.mark.parametrize(
    "cut, message, member",
    [
        (0, "empty file", None),
        (100, "unexpected end of archive", None),  # inside the first header
        (512 + 300, "unexpected end of data", "a.image.png"),  # inside a member's data
        (512 + 1024, "unexpected end of archive", None),  # exactly at the next header
    ],
)
def test_a_tar_cut_short_raises_and_names_the_member(cut, message, member):
    data = _shard()
    with pytest.raises(TarError) as e:
        list(regular_members(io.BytesIO(data[:cut])))
    assert str(e.value) == message and e.value.member == member


def test_a_tar_without_its_end_blocks_is_refused():
    data = _shard()
    end = len(data) - data[::-1].index(next(b for b in data[::-1] if b)) - 1  # last non-zero byte
    cut = (end // 512 + 1) * 512  # every member complete, no end-of-archive block
    with pytest.raises(TarError, match="unexpected end of archive"):
        list(regular_members(io.BytesIO(data[:cut])))


def test_a_garbled_header_is_refused_where_tarfile_stops_quietly():
    data = bytearray(_shard())
    second = 512 + 1024  # header of a.json
    data[second + 10] ^= 0xFF
    with pytest.raises(TarError, match=f"bad checksum in the member header at byte {second}"):
        list(regular_members(io.BytesIO(bytes(data))))


def test_bytes_after_the_end_of_archive_are_refused():
    data = _shard() + b"garbage"
    with pytest.raises(TarError, match="data after the end-of-archive block"):
        list(regular_members(io.BytesIO(data)))


def test_samples_serialize_to_the_bytes_of_webdataset_tarwriter():
    """shardgen's workers serialize samples themselves; the shards keep the bytes webdataset wrote."""
    import webdataset as wds

    from shardgen.tarstream import end_of_archive, sample_bytes

    rng = np.random.default_rng(0)
    samples = [{"__key__": f"stone_{n:05d}_0_{n}", "mask.png": rng.bytes(n * 300 + 1), "json": b"{}",
                "image.png": rng.bytes(1000 * n)} for n in range(23)]  # fmt: skip
    expected = io.BytesIO()
    writer = wds.TarWriter(expected, encoder=False, mtime=0)
    for s in samples:
        writer.write(s)
    writer.close()
    members = b"".join(sample_bytes(s["__key__"], {k: v for k, v in s.items() if k != "__key__"}) for s in samples)
    assert members + end_of_archive(len(members)) == expected.getvalue()
