"""shardgen.storage: local atomic writes, URL joins, hashing, memory:// and a real S3 server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from webdataset.gopen import gopen_schemes

from shardgen import storage
from shardgen.reader import iter_shard


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_atomic_write_creates_parents_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "manifest.json"
    storage.write_bytes_atomic(str(target), b"old")
    storage.write_bytes_atomic(str(target), b"new contents")
    assert target.read_bytes() == b"new contents"
    assert os.listdir(target.parent) == ["manifest.json"]
    # Ordinary permissions (umask applied), not the 0600 of a mkstemp file.
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_atomic_write_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        storage.write_bytes_atomic(str(target), "not bytes")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["manifest.json"]


@pytest.mark.parametrize(
    "base, parts, expected",
    [
        ("/data/shards", ("train", "a.tar"), os.path.join("/data/shards", "train", "a.tar")),
        ("rel", ("x",), os.path.join("rel", "x")),
        ("s3://bucket", ("ds", "train-000000.tar"), "s3://bucket/ds/train-000000.tar"),
        ("s3://bucket/prefix/", ("/ds/", "m.json"), "s3://bucket/prefix/ds/m.json"),
        ("memory://", ("a", "b"), "memory://a/b"),
        ("memory://root", ("a",), "memory://root/a"),
        ("file:///tmp/x", ("y",), "file:///tmp/x/y"),
    ],
)
def test_join(base, parts, expected):
    assert storage.join(base, *parts) == expected


def test_local_helpers(tmp_path):
    assert storage.is_local(str(tmp_path)) and storage.is_local(f"file://{tmp_path}")
    assert not storage.is_local("s3://b/k") and not storage.is_local("memory://x")
    assert storage.to_local_path(f"file://{tmp_path}/a") == f"{tmp_path}/a"
    with pytest.raises(ValueError, match="s3://b/k: not a local path"):
        storage.to_local_path("s3://b/k")
    d = storage.join(str(tmp_path), "a", "b")
    storage.makedirs(d)
    assert os.path.isdir(d)


def test_sha256_of_streams_whole_file(tmp_path):
    data = os.urandom(storage.HASH_CHUNK * 2 + 123)  # spans several read chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert storage.sha256_of(str(path)) == (hashlib.sha256(data).hexdigest(), len(data))


def test_memory_round_trip():
    base = f"memory://storage-test-{uuid.uuid4().hex}"
    url = storage.join(base, "dir", "x.json")
    assert not storage.exists(url)
    storage.makedirs(storage.join(base, "dir"))  # no-op, must not fail
    storage.write_bytes_atomic(url, b'{"a": 1}')
    assert storage.exists(url)
    assert json.loads(storage.read_text(url)) == {"a": 1}
    assert storage.sha256_of(url) == (hashlib.sha256(b'{"a": 1}').hexdigest(), 8)
    storage.remove(url)
    storage.remove(url)  # missing is fine
    assert not storage.exists(url)


def write_tars(base: str, samples: list[dict], per_tar: int) -> list[str]:
    """Tars written as shardgen writes them: webdataset's TarWriter on a stream that storage opened."""
    urls = []
    for k in range(0, len(samples), per_tar):
        urls.append(storage.join(base, f"s-{k // per_tar:06d}.tar"))
        with storage.open_url(urls[-1], "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False, mtime=0)
            for sample in samples[k : k + per_tar]:
                writer.write(sample)
            writer.close()
    return urls


def test_memory_tar_round_trip():
    base = f"memory://wds-{uuid.uuid4().hex}"
    urls = write_tars(base, [{"__key__": f"k{i}", "txt": f"v{i}".encode()} for i in range(3)], per_tar=2)
    got = [(key, parts["txt"]) for url in urls for key, parts in iter_shard(url)]
    assert got == [("k0", b"v0"), ("k1", b"v1"), ("k2", b"v2")]


def test_no_webdataset_opener_is_registered():
    """Shards are written on streams storage opens and read by shardgen.reader: webdataset's gopen is unused."""
    import evaluate.tiles  # noqa: F401  (every reader and writer of shards imported)
    import shardgen.build  # noqa: F401
    import trainer.data  # noqa: F401

    assert not {"s3", "memory"} & set(gopen_schemes)
    assert not [f for f in gopen_schemes.values() if getattr(f, "__module__", "").startswith("shardgen")]


def test_storage_options_never_contain_credentials(monkeypatch):
    secret = "SECRET-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-" + uuid.uuid4().hex)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "TOKEN-" + uuid.uuid4().hex)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    opts = storage.storage_options("s3://bucket/key")
    assert opts == {"use_listings_cache": False, "endpoint_url": "http://127.0.0.1:1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")  # the S3-specific one wins
    assert storage.storage_options("s3://bucket/key")["endpoint_url"] == "http://127.0.0.1:2"
    assert storage.storage_options("/local/path") == {}
    assert storage.storage_options("memory://x") == {}


@pytest.mark.s3
def test_s3_bytes_round_trip(s3_env):
    url = storage.join(s3_env, "meta", "manifest.json")
    assert not storage.exists(url)
    storage.makedirs(storage.join(s3_env, "meta"))  # no-op for object stores
    storage.write_bytes_atomic(url, b'{"shards": 3}')
    assert storage.exists(url)
    assert storage.read_text(url) == '{"shards": 3}'
    storage.write_bytes_atomic(url, b"replaced")
    assert storage.read_bytes(url) == b"replaced"
    assert storage.sha256_of(url) == (hashlib.sha256(b"replaced").hexdigest(), 8)
    storage.remove(url)
    assert not storage.exists(url)


@pytest.mark.s3
def test_s3_credentials_come_from_the_environment(s3_env, s3_server, monkeypatch):
    url = storage.join(s3_env, "k.bin")
    storage.write_bytes_atomic(url, b"x")
    assert s3_server.secret_key not in repr(storage.storage_options(url))
    # A changed environment must take effect at once: no client cached with the old keys.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_server.secret_key)
    with pytest.raises(PermissionError):
        storage.read_bytes(url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    assert storage.read_bytes(url) == b"x"


@pytest.mark.s3
def test_s3_tar_round_trip(s3_env):
    samples = [
        {"__key__": f"scan{i:02d}_t{i % 5}", "image.png": _png(i), "json": json.dumps({"i": i}).encode()}
        for i in range(7)
    ]
    urls = write_tars(storage.join(s3_env, "ds"), samples, per_tar=3)
    fs, path = storage.fs_for(storage.join(s3_env, "ds"))
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(path))
    assert names == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    got = [(key, parts) for url in urls for key, parts in iter_shard(url)]
    assert [key for key, _ in got] == [s["__key__"] for s in samples]
    for (_, parts), s in zip(got, samples, strict=True):
        assert parts["image.png"] == s["image.png"] and parts["json"] == s["json"]


@pytest.mark.s3
def test_s3_objects_survive_server_restart(s3_env, s3_server):
    before = storage.join(s3_env, "before.bin")
    storage.write_bytes_atomic(before, b"persisted")
    s3_server.restart()  # SIGKILL + start on the same data dir and ports
    # The cached client's pooled connections died with the server; botocore reconnects.
    assert storage.read_bytes(before) == b"persisted"
    after = storage.join(s3_env, "after.bin")
    storage.write_bytes_atomic(after, b"new")
    assert storage.read_bytes(after) == b"new"
