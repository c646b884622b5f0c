"""``shardgen build`` and ``shardgen verify`` against a real S3 server (SeaweedFS from conftest)."""

from __future__ import annotations

import pytest

from shardgen import schema, storage
from shardgen.__main__ import main
from shardgen.reader import iter_shard
from shardgen.synth import write_synthetic

pytestmark = pytest.mark.s3

ARGS = ["--image-size", "192", "--tile", "64", "--stride", "32", "--shard-size", "50",
        "--split-ratios", "train=0.5,val=0.25,test=0.25", "--quiet"]  # fmt: skip


def test_build_to_s3_read_back_verify_and_detect_a_corrupt_shard(s3_env, s3_server, tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic(data, 5, seed=1, size_range=(180, 230))
    inputs = ["--annotations", str(data / "annotations"), "--images", str(data / "images")]
    url = f"{s3_env}/ds"
    captured = []

    def cli(*args) -> tuple[int, str]:
        rc = main([*args])
        out, err = capsys.readouterr()
        captured.append(out + err)
        return rc, out + err

    assert cli("build", *inputs, "--out", url, *ARGS)[0] == 0
    local = tmp_path / "local"
    assert cli("build", *inputs, "--out", str(local), *ARGS)[0] == 0

    manifest = schema.read_manifest(url)
    names = [s["url"] for info in manifest["splits"].values() for s in info["shards"]]
    assert len(names) >= 2
    # The same bytes as a local build, and nothing left behind but shards, records and the manifest.
    assert storage.read_bytes(f"{url}/manifest.json") == (local / "manifest.json").read_bytes()
    for name in names:
        assert storage.read_bytes(f"{url}/{name}") == (local / name).read_bytes()
    fs, root = storage.fs_for(url)
    listed = sorted(p.rsplit("/", 1)[1] for p in fs.ls(root, detail=False))
    assert listed == sorted([*names, "manifest.json", "_build"])  # no .partial object left behind

    for split, info in manifest["splits"].items():
        urls = schema.shard_urls(manifest, split)
        assert all(u.startswith(f"{url}/{split}-") for u in urls)
        samples = [parts for u in urls for _, parts in iter_shard(u)]
        assert len(samples) == info["samples"] == 25 * info["images"]
        for s in samples:
            image, mask, meta = schema.decode_sample(s)
            assert image.shape == (1, 64, 64) and mask.shape == (64, 64) and meta["split"] == split

    rc, out = cli("verify", url)
    assert rc == 0 and f"{len(names)}/{len(names)} shards OK" in out
    rc, out = cli("build", *inputs, "--out", url, *ARGS)
    assert rc == 0 and f"({len(names)} reused)" in out

    bad = f"{url}/{names[0]}"
    storage.write_bytes_atomic(bad, storage.read_bytes(bad)[:3000])
    rc, out = cli("verify", url)
    assert rc == 1
    assert f"BAD {bad}:" in out and f"{len(names) - 1}/{len(names)} shards OK, 1 bad" in out

    secret = s3_server.secret_key
    records = [storage.read_text(f"{url}/_build/{n}.json") for n in names]
    for text in [storage.read_text(f"{url}/manifest.json"), *records, *captured]:
        assert secret not in text


def test_a_rerun_aborts_the_uploads_a_killed_build_left_open(s3_env, tmp_path, capsys):
    """A build killed while streaming a large shard leaves a multipart upload whose parts the store keeps (and
    bills) forever; the rerun aborts those of its own folder and leaves any other folder's alone."""
    data = tmp_path / "data"
    write_synthetic(data, 2, seed=1, size_range=(180, 230))
    fs, root = storage.fs_for(s3_env)
    bucket = root.strip("/")
    for key in ("ds/train-000000.tar.partial", "ds/runs/last.pt", "ds-other/train-000000.tar.partial"):
        upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 99)
    args = ["--annotations", str(data / "annotations"), "--images", str(data / "images"), *ARGS]
    assert main(["build", *args, "--out", f"{s3_env}/ds"]) == 0
    assert f"aborted 1 unfinished uploads left in {s3_env}/ds by an earlier build" in capsys.readouterr().out
    left = sorted(u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []))
    assert left == ["ds-other/train-000000.tar.partial", "ds/runs/last.pt"]
    assert main(["build", *args, "--out", f"{s3_env}/ds"]) == 0
    assert "aborted" not in capsys.readouterr().out
