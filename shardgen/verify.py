"""``shardgen verify URL``: check every shard against the manifest's sha256, size and sample count."""

from __future__ import annotations

import hashlib
import sys

from . import schema, storage
from .reader import CorruptSample, members


class _HashingReader:
    """Wraps a stream so tarfile can read it while its bytes are hashed on the way."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


def check_shard(url: str, expected: dict) -> list[str]:
    """Problems with one shard (empty when it matches the manifest). Its samples are counted by the readers'
    own member iteration (``shardgen.reader.members``), so verify accepts exactly what training reads."""
    try:
        with storage.open_url(url, "rb") as f:
            reader = _HashingReader(f)
            samples = sum(1 for _ in members(reader, url))
            while reader.read(1 << 20):  # hash anything after the end-of-archive blocks too
                pass
    except FileNotFoundError:
        return ["missing"]
    except CorruptSample as e:
        return [f"unreadable: {e.reason}"]  # "broken tar: ..."
    except (OSError, EOFError) as e:
        return [f"unreadable tar: {e}"]
    problems = []
    if reader.size != expected["bytes"]:
        problems.append(f"{reader.size} bytes, manifest says {expected['bytes']}")
    if reader.sha.hexdigest() != expected["sha256"]:
        problems.append("sha256 differs from the manifest")
    if samples != expected["samples"]:
        problems.append(f"{samples} samples, manifest says {expected['samples']}")
    return problems


def verify(url: str) -> int:
    manifest = schema.read_manifest(url)
    bad = total = 0
    for split, info in manifest["splits"].items():
        for shard, shard_url in zip(info["shards"], schema.shard_urls(manifest, split), strict=True):
            total += 1
            problems = check_shard(shard_url, shard)
            if problems:
                bad += 1
                print(f"BAD {shard_url}: {'; '.join(problems)}")
    print(f"{total - bad}/{total} shards OK" + (f", {bad} bad" if bad else ""), file=sys.stderr if bad else sys.stdout)
    return 1 if bad else 0
