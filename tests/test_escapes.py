"""Names read from input files never reach outside their folder: an XML's image names (``--images``), a
manifest's shard URLs (the dataset) and a run's ``latest.json`` (the run folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import HAND, build_args, cli, files, line_of, write_scan, write_xml

from shardgen import schema, storage
from shardgen.__main__ import main
from trainer import checkpoint


@pytest.mark.parametrize("name", ["../other/a.png", "ABSOLUTE", "..\\other\\a.png", "images/../../other/a.png"])
def test_image_names_that_leave_the_images_folder_are_refused(tmp_path, capsys, name):
    data = tmp_path / "data"
    write_scan(data / "images" / "a.png")  # the basename exists inside --images too: no fallback to it either
    outside = data / "other" / "a.png"
    write_scan(outside)
    name = str(outside) if name == "ABSOLUTE" else name
    xml = write_xml(data / "annotations" / "ann.xml", [(name, [])])
    rc, out, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND))
    assert rc == 2, out + err
    line = line_of(xml, "<image ")
    assert err.strip() == f"shardgen: error: {xml}:{line}: image name {name!r} leaves the images folder"
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_image_names_in_subfolders_of_the_images_folder_still_build(tmp_path, capsys):
    data = tmp_path / "data"
    write_scan(data / "images" / "batch1" / "a.png")
    write_xml(data / "annotations" / "ann.xml", [("batch1/./a.png", [])])
    assert cli(capsys, *build_args(data, tmp_path / "out", *HAND))[0] == 0


@pytest.fixture
def dataset(tmp_path, capsys) -> Path:
    data = tmp_path / "data"
    write_scan(data / "images" / "a.png")
    write_xml(data / "annotations" / "ann.xml", [("a.png", [])])
    out = tmp_path / "ds"
    assert cli(capsys, *build_args(data, out, *HAND))[0] == 0
    return out


@pytest.mark.parametrize("url", ["../elsewhere/train-000000.tar", "/etc/hostname", "s3://other-bucket/x.tar",
                                 "sub/../../x.tar", ""])  # fmt: skip
def test_shard_urls_that_leave_the_dataset_are_refused(tmp_path, capsys, dataset, url):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(dataset / "train-000000.tar", elsewhere / "train-000000.tar")
    murl = dataset / "manifest.json"
    manifest = json.loads(murl.read_text())
    manifest["splits"]["train"]["shards"][0]["url"] = url
    murl.write_text(json.dumps(manifest))
    expected = f"{murl}: shard URL {url!r} of split 'train' leaves the dataset folder"
    with pytest.raises(schema.ManifestError) as e:
        schema.read_manifest(str(dataset))
    assert str(e.value) == expected
    assert main(["verify", str(dataset)]) == 2
    assert capsys.readouterr().err.strip() == f"shardgen: error: {expected}"


def test_shard_urls_inside_the_dataset_are_read(dataset):
    before = files(dataset)
    manifest = schema.read_manifest(str(dataset))
    assert schema.shard_urls(manifest, "train") == [str(dataset / "train-000000.tar")]
    assert files(dataset) == before


@pytest.mark.parametrize("name", ["../other/last.pt", "/etc/hostname", "s3://bucket/run/last.pt", ".."])
def test_latest_json_naming_a_checkpoint_outside_the_run_is_refused(tmp_path, name):
    run = tmp_path / "run"
    storage.write_bytes_atomic(str(run / "latest.json"), json.dumps({"checkpoint": name, "step": 3}).encode())
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.latest(str(run))
    assert str(e.value) == f"{run / 'latest.json'}: checkpoint {name!r} leaves the run folder {run}"


def test_latest_json_names_its_own_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    checkpoint.save(run, "last", {"step": 2, "model": {}, "meta": {}})
    assert checkpoint.latest(run) == str(tmp_path / "run" / "last.pt")
    assert checkpoint.load(checkpoint.latest(run))["step"] == 2
