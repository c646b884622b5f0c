"""``shardgen build``: shard contents read back with webdataset, determinism, resume after a kill, bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    HAND,
    LEFT,
    SCAN_H,
    SCAN_W,
    SIDE,
    TOP,
    UPSCALED_LINE,
    assemble,
    build_args,
    cli,
    content,
    files,
    huge_png,
    line_of,
    png,
    read_split,
    rect,
    tiny_scan_case,
    write_scan,
    write_xml,
)
from PIL import Image

from shardgen import schema
from shardgen.__main__ import main
from shardgen.classes import ClassMap
from shardgen.cvat import parse_cvat
from shardgen.raster import rasterize
from shardgen.splits import assign_split
from shardgen.synth import write_synthetic

REPO = Path(__file__).resolve().parents[1]
N_SYNTH = 12
SMALL = ["--image-size", "192", "--tile", "64", "--stride", "32", "--split-ratios", "train=0.5,val=0.25,test=0.25"]
SMALL_RATIOS = {"train": 0.5, "val": 0.25, "test": 0.25}


# ---------------------------------------------------------------------------------------------- helpers


def hand_case(tmp_path: Path, shapes: list[str], name="a.png", pixels=None) -> tuple[Path, Path]:
    """One hand-made scan and its XML under tmp_path/data; returns (data dir, xml path)."""
    data = tmp_path / "data"
    write_scan(data / "images" / name, pixels)
    return data, write_xml(data / "annotations" / "ann.xml", [(name, shapes)])


def crop(mask: np.ndarray) -> np.ndarray:
    """A source-resolution hand-made mask cropped to its content."""
    return mask[TOP : TOP + SIDE, LEFT : LEFT + SIDE]


# --------------------------------------------------------------------------------------- synthetic data


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("synth")
    write_synthetic(data, N_SYNTH, seed=3, size_range=(180, 230))
    return data


@pytest.fixture(scope="module")
def built(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "ds"
    assert main([str(a) for a in build_args(synth, out, *SMALL, "--shard-size", 75, "--quiet")]) == 0
    return out


def reference_mask(ann, path: Path, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The crop-resized label mask of one scan, computed here from the scan and its shapes."""
    cmap = ClassMap.load()
    full = rasterize(ann, lambda s: cmap.paint_value(cmap.lookup(s.label), "multiclass", "merge"))
    rgb = np.asarray(Image.open(path).convert("RGB"))
    content_at = np.argwhere(rgb.any(axis=2))
    (top, left), (bottom, right) = content_at.min(0), content_at.max(0) + 1
    rows = top + np.floor((np.arange(size) + 0.5) * (bottom - top) / size).astype(int)
    cols = left + np.floor((np.arange(size) + 0.5) * (right - left) / size).astype(int)
    return full[np.ix_(rows, cols)], (int(left), int(top), int(right), int(bottom))


def test_round_trip_with_webdataset_and_exact_masks(synth, built):
    manifest = schema.read_manifest(str(built))
    anns = {a.name: a for xml in (synth / "annotations").glob("*.xml") for a in parse_cvat(xml)}
    assert manifest["tiles_per_image"] == 25 and manifest["classes"] == ClassMap.load().names
    seen_images, all_values = set(), set()
    for split in ("train", "val", "test"):
        info = manifest["splits"][split]
        samples = read_split(built, split)
        assert len(samples) == info["samples"] == 25 * info["images"]
        hist = np.zeros(11, np.int64)
        for shard in info["shards"]:
            data = (built / shard["url"]).read_bytes()
            assert shard["url"].startswith(f"{split}-") and not shard["url"].endswith(".partial")
            assert len(data) == shard["bytes"] and schema.storage.sha256_of(str(built / shard["url"]))[0] == shard[
                "sha256"
            ]
        for start in range(0, len(samples), 25):
            tiles = samples[start : start + 25]
            image_id = tiles[0]["__key__"].rsplit("_", 2)[0]
            assert image_id not in seen_images  # an image's 25 tiles are consecutive ...
            seen_images.add(image_id)
            assert len({t["__url__"] for t in tiles}) == 1  # ... and in one shard
            name = f"{image_id}.png"
            ref, box = reference_mask(anns[name], synth / "images" / name, 192)
            ref_image = np.asarray(
                Image.open(synth / "images" / name).convert("L").resize((192, 192), Image.Resampling.LANCZOS, box=box)
            )
            for k, t in enumerate(tiles):
                i, j = divmod(k, 5)
                assert t["__key__"] == f"{image_id}_{i}_{j}"
                assert sorted(k for k in t if not k.startswith("__")) == ["image.png", "json", "mask.png"]
                meta = json.loads(t["json"])
                y, x = 32 * i, 32 * j
                assert meta["image_id"] == meta["stone_id"] == image_id
                assert (meta["row"], meta["col"], meta["y"], meta["x"]) == (i, j, y, x)
                assert (meta["tile"], meta["stride"], meta["image_size"]) == (64, 32, 192)
                assert meta["source_image"] == name and meta["xml_file"] == "batch_000.xml"
                assert meta["crop_box"] == list(box)
                assert meta["scale"] == pytest.approx([192 / (box[2] - box[0]), 192 / (box[3] - box[1])])
                assert meta["split"] == split == assign_split(image_id, SMALL_RATIOS)
                with Image.open(io.BytesIO(t["mask.png"])) as m, Image.open(io.BytesIO(t["image.png"])) as im:
                    assert (m.mode, m.size, im.mode, im.size) == ("L", (64, 64), "L", (64, 64))
                    mask, image = np.asarray(m), np.asarray(im)
                np.testing.assert_array_equal(mask, ref[y : y + 64, x : x + 64])
                np.testing.assert_array_equal(image, ref_image[y : y + 64, x : x + 64])
                counts = np.bincount(mask.ravel(), minlength=256)
                assert meta["class_pixels"] == counts[:11].tolist() and meta["ignored_pixels"] == counts[255]
                hist += counts[:11]
                all_values |= set(np.unique(mask).tolist())
        assert info["class_pixels"] == hist.tolist()
        assert info["bytes"] == sum(s["bytes"] for s in info["shards"])
    assert seen_images == {f"stone_{i:05d}" for i in range(N_SYNTH)}
    assert all_values <= set(range(11)) | {255} and len(all_values) >= 6
    # 3 images per shard (75 samples), so the splits with more images span several shards.
    assert max(len(manifest["splits"][s]["shards"]) for s in ("train", "val", "test")) >= 2


def test_small_dataset_exact_split_fills_every_split_and_the_summary_warns_about_hash(tmp_path, capsys):
    data = tmp_path / "raw"
    write_synthetic(data, 10, seed=3, size_range=(180, 230))
    grid = SMALL[:6]  # the default ratios 0.6/0.1/0.3
    rc, out, err = cli(capsys, *build_args(data, tmp_path / "hash", *grid, "--quiet"))
    assert rc == 0
    # The stable hash puts all 10 stones in train; the summary says so and names the fix.
    assert ("stones per split (hash): train 10 = 100.0% (asked 60.0%), val 0 = 0.0% (asked 10.0%), "
            "test 0 = 0.0% (asked 30.0%)") in out  # fmt: skip
    assert "warning: split 'val' is empty (0 of 10 stones, asked 10.0%): the trainer validates on it" in err
    assert "warning: split 'test' is empty (0 of 10 stones, asked 30.0%): evaluate scores it" in err
    assert "more than 5 percentage points: train 100.0% (asked 60.0%)" in err and "--split-method exact" in err
    hashed = schema.read_manifest(str(tmp_path / "hash"))
    assert hashed["options"]["split_method"] == "hash"
    assert hashed["splits"]["train"]["images"] == sum(assign_split(f"stone_{i:05d}") == "train" for i in range(10))

    rc, out, err = cli(capsys, *build_args(data, tmp_path / "exact", *grid, "--split-method", "exact", "--quiet"))
    assert rc == 0 and "warning" not in err
    assert ("stones per split (exact): train 6 = 60.0% (asked 60.0%), val 1 = 10.0% (asked 10.0%), "
            "test 3 = 30.0% (asked 30.0%)") in out  # fmt: skip
    exact = schema.read_manifest(str(tmp_path / "exact"))
    assert exact["options"]["split_method"] == "exact"
    assert {s: exact["splits"][s]["images"] for s in ("train", "val", "test")} == {"train": 6, "val": 1, "test": 3}
    for split in ("train", "val", "test"):  # the tiles say the same as the manifest
        assert {json.loads(x["json"])["split"] for x in read_split(tmp_path / "exact", split)} == {split}


@pytest.mark.parametrize("handoff", ["shared memory", "pipe"])
def test_workers_do_not_change_a_single_byte(synth, built, tmp_path, capsys, monkeypatch, handoff):
    """With 2 workers (scans dispatched largest last, handed over in shared memory or, where it cannot be
    mapped, through the pool's pipe) the shards are those of a build in this one process."""
    if handoff == "pipe":
        monkeypatch.setattr("shardgen.distribute.HANDOFF_MAX_BYTES", 1)
    rc, out, _ = cli(capsys, *build_args(synth, tmp_path / "w2", *SMALL, "--shard-size", 75, "--quiet", "--workers", 2))
    assert rc == 0 and "(0 reused)" in out
    assert files(tmp_path / "w2") == files(built)


@pytest.mark.parametrize("damage", ["delete shard and record", "truncate shard"])
def test_resume_reuses_intact_shards_and_ends_with_the_same_bytes(synth, built, tmp_path, capsys, damage):
    out = tmp_path / "ds"
    shutil.copytree(built, out)
    manifest = schema.read_manifest(str(out))
    names = [s["url"] for split in ("train", "val", "test") for s in manifest["splits"][split]["shards"]]
    last = out / names[-1]
    (out / "manifest.json").unlink()  # the crash came before the manifest
    if damage == "truncate shard":
        last.write_bytes(last.read_bytes()[:5000])
    else:
        last.unlink()
        (out / "_build" / f"{last.name}.json").unlink()
    (out / f"{last.name}.partial").write_bytes(b"half a shard")  # left by the killed writer
    before = {n: (out / n).stat() for n in names[:-1]}
    rc, stdout, _ = cli(capsys, *build_args(synth, out, *SMALL, "--shard-size", 75, "--quiet"))
    assert rc == 0
    assert f"shards: {len(names)} ({len(names) - 1} reused)" in stdout
    for n, st in before.items():  # reused, not rewritten
        assert (out / n).stat().st_ino == st.st_ino and (out / n).stat().st_mtime_ns == st.st_mtime_ns
    assert files(out) == files(built)


def test_changed_options_are_not_reused(synth, built, tmp_path, capsys):
    out = tmp_path / "ds"
    shutil.copytree(built, out)
    args = build_args(synth, out, *SMALL, "--shard-size", 75, "--reflections", "ignore", "--quiet")
    rc, stdout, _ = cli(capsys, *args)
    assert rc == 0 and "(0 reused)" in stdout
    values = set()
    for split in ("train", "val", "test"):
        for s in read_split(out, split):
            values |= set(np.unique(png(s["mask.png"])).tolist())
    assert 255 in values  # the synthetic data has reflections: now ignored, no longer their parent class


def test_resume_after_a_real_sigkill(synth, tmp_path, capsys):
    # One image per shard and 600 px crops: enough work left after the first shard to kill the build mid-way.
    args = ["--image-size", "600", "--tile", "200", "--stride", "100", "--shard-size", "25", "--quiet"]
    reference = tmp_path / "reference"
    assert cli(capsys, *build_args(synth, reference, *args))[0] == 0
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "shardgen", *map(str, build_args(synth, killed, *args, "--workers", "2"))]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list((killed / "_build").glob("*.json")):
            assert proc.poll() is None, f"build exited before the kill: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no shard finished in 120 s"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the build and its pool workers, like an OOM kill of the job
        proc.wait()
        proc.stderr.close()
    assert not (killed / "manifest.json").exists()
    finished = len(list((killed / "_build").glob("*.json")))
    assert 1 <= finished < N_SYNTH
    rc, stdout, _ = cli(capsys, *build_args(synth, killed, *args, "--workers", "2"))
    assert rc == 0
    # Every shard with a completion record is intact (the record is written after the rename) and reused.
    assert f"shards: {N_SYNTH} ({finished} reused)" in stdout
    assert files(killed) == files(reference)
    assert not list(killed.glob("*.partial"))
    listed = [s["url"] for info in schema.read_manifest(str(killed))["splits"].values() for s in info["shards"]]
    assert len(listed) == N_SYNTH and not [u for u in listed if ".partial" in u]


# ------------------------------------------------------------------------------------- hand-made scans


def test_crust_crop_at_scale_one_keeps_every_pixel(tmp_path, capsys):
    pixels = content(1)
    data, _ = hand_case(tmp_path, [rect("Pit", 20, 30, 40, 50)], pixels=pixels)
    rc, _, _ = cli(capsys, *build_args(data, tmp_path / "out", *HAND, "--channels", 3))
    assert rc == 0
    samples = read_split(tmp_path / "out", "train")
    assert [s["__key__"] for s in samples] == ["a_0_0", "a_0_1", "a_1_0", "a_1_1"]
    np.testing.assert_array_equal(assemble(samples, "image.png"), pixels)
    meta = json.loads(samples[0]["json"])
    assert meta["crop_box"] == [LEFT, TOP, LEFT + SIDE, TOP + SIDE]
    assert meta["scale"] == [1.0, 1.0] and meta["source_size"] == [SCAN_W, SCAN_H]
    expected = np.zeros((SCAN_H, SCAN_W), np.uint8)
    expected[30:51, 20:41] = 9
    np.testing.assert_array_equal(assemble(samples, "mask.png"), crop(expected))


@pytest.mark.parametrize(
    "mode, reflections, reflection, pit",
    [
        ("multiclass", "merge", 2, 9),
        ("multiclass", "ignore", 255, 9),
        ("multiclass", "background", 0, 9),
        ("binary", "merge", 1, 1),
        ("binary", "ignore", 255, 1),
    ],
)
def test_reflection_policies_and_binary_mode(tmp_path, capsys, mode, reflections, reflection, pit):
    shapes = [rect("Crystal", 10, 12, 30, 30), rect("Crystal_Reflection", 40, 40, 60, 60), rect("Pit", 50, 15, 70, 25)]
    data, _ = hand_case(tmp_path, shapes)
    args = build_args(data, tmp_path / "out", *HAND, "--mode", mode, "--reflections", reflections)
    assert cli(capsys, *args)[0] == 0
    crystal = 1 if mode == "binary" else 2
    expected = np.zeros((SCAN_H, SCAN_W), np.uint8)
    expected[12:31, 10:31] = crystal
    expected[40:61, 40:61] = reflection
    expected[15:26, 50:71] = pit
    mask = assemble(read_split(tmp_path / "out", "train"), "mask.png")
    np.testing.assert_array_equal(mask, crop(expected))
    manifest = schema.read_manifest(str(tmp_path / "out"))
    assert manifest["mode"] == mode
    assert manifest["classes"] == (["background", "defect"] if mode == "binary" else ClassMap.load().names)
    assert manifest["splits"]["train"]["class_pixels"] == np.bincount(
        mask.ravel(), minlength=256
    )[: len(manifest["classes"])].tolist()


def test_stone_id_regex_keeps_a_stones_images_in_one_split(tmp_path, capsys):
    stones = ["S2", "S5", "S6", "S7"]
    names = [f"{s}.v{v}.png" for s in stones for v in (1, 2, 3)]
    # Without grouping these images would scatter: each stone has views hashed into different splits.
    assert all(len({assign_split(f"{s}-v{v}") for v in (1, 2, 3)}) > 1 for s in stones)
    data = tmp_path / "data"
    for k, name in enumerate(names):
        write_scan(data / "images" / name, content(k))
    write_xml(data / "annotations" / "ann.xml", [(n, []) for n in names])
    args = build_args(data, tmp_path / "out", *HAND[:6], "--stone-id-regex", r"^(S\d+)-", "--quiet")
    assert cli(capsys, *args)[0] == 0
    found = {}
    for split in ("train", "val", "test"):
        for s in read_split(tmp_path / "out", split):
            meta = json.loads(s["json"])
            assert meta["image_id"] == s["__key__"].rsplit("_", 2)[0]
            found[meta["image_id"]] = (meta["stone_id"], split)
    assert len(found) == len(names)
    for image_id, (stone, split) in found.items():
        assert stone == image_id.split("-")[0] and split == assign_split(stone)


def test_non_covering_grid_fails_before_touching_the_output(tmp_path, capsys):
    data, _ = hand_case(tmp_path, [])
    out = tmp_path / "out"
    assert cli(capsys, *build_args(data, out, *HAND))[0] == 0
    manifest = (out / "manifest.json").read_bytes()
    rc, _, err = cli(capsys, *build_args(data, out, *HAND, "--stride", 24))
    assert rc == 2
    assert err.strip() == (
        "shardgen: error: tile grid does not cover the image exactly: (64 - 32) is not a multiple of stride 24"
    )
    assert (out / "manifest.json").read_bytes() == manifest  # the earlier complete dataset is left alone
    assert cli(capsys, *build_args(data, tmp_path / "new", *HAND, "--tile", 48))[0] == 2
    assert not (tmp_path / "new").exists()


def test_image_without_shapes_is_an_empty_mask_with_progress_and_summary(tmp_path, capsys):
    data, _ = hand_case(tmp_path, [])
    rc, out, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND[:-1]))  # without --quiet
    assert rc == 0
    assert "100%" in err and "1/1" in err  # the tqdm bar
    assert "images: 1  tiles: train 4, val 0, test 0  shards: 1 (0 reused)" in out
    assert "throughput:" in out and f"manifest: {tmp_path / 'out' / 'manifest.json'}" in out
    samples = read_split(tmp_path / "out", "train")
    assert len(samples) == 4 and all(not png(s["mask.png"]).any() for s in samples)
    assert schema.read_manifest(str(tmp_path / "out"))["splits"]["train"]["class_pixels"] == [4 * 32 * 32] + [0] * 10


# ------------------------------------------------------------------------------------------- bad input


def test_malformed_xml_names_file_and_line_and_writes_nothing(tmp_path, capsys):
    data, xml = hand_case(tmp_path, [rect("Pit", 5, 5, 9, 9)])
    xml.write_text(xml.read_text().replace("  </image>", "  </imagex>"))
    rc, _, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND))
    assert rc == 2
    assert err.startswith(f"shardgen: error: {xml}:{line_of(xml, '</imagex>')}: malformed XML")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_polygon_with_fewer_than_three_points_is_skipped_counted_and_warned(tmp_path, capsys):
    two = '<polygon label="Crystal" points="5,40;60,40" z_order="0"/>'
    data, xml = hand_case(tmp_path, [two, rect("Pit", 20, 20, 30, 30)])
    rc, out, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND))
    assert rc == 0
    assert f"warning: {xml}:{line_of(xml, '5,40;60,40')}: polygon with fewer than 3 points" in err
    assert "skipped: 1 x polygon with fewer than 3 points" in out
    manifest = schema.read_manifest(str(tmp_path / "out"))
    assert manifest["skipped"] == {"polygon with fewer than 3 points": 1}
    expected = np.zeros((SCAN_H, SCAN_W), np.uint8)
    expected[20:31, 20:31] = 9
    np.testing.assert_array_equal(assemble(read_split(tmp_path / "out", "train"), "mask.png"), crop(expected))


def test_missing_image_fails_or_is_counted_with_skip_missing(tmp_path, capsys):
    data = tmp_path / "data"
    write_scan(data / "images" / "a.png")
    xml = write_xml(data / "annotations" / "ann.xml", [("a.png", []), ("gone.png", [])])
    rc, _, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND))
    assert rc == 2
    assert f"{xml}:{line_of(xml, 'gone.png')}: image 'gone.png' not found" in err and "--skip-missing" in err
    assert not (tmp_path / "out").exists()
    rc, out, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND, "--skip-missing"))
    assert rc == 0
    assert "skipped: 1 x image missing" in out and "images: 1 " in out
    assert f"warning: {xml}:{line_of(xml, 'gone.png')}: image 'gone.png' not found" in err
    manifest = schema.read_manifest(str(tmp_path / "out"))
    assert manifest["skipped"] == {"image missing": 1} and manifest["splits"]["train"]["images"] == 1


def test_image_size_disagreeing_with_the_xml_names_both_sizes(tmp_path, capsys):
    data = tmp_path / "data"
    write_scan(data / "images" / "a.png")
    xml = write_xml(data / "annotations" / "ann.xml", [("a.png", [])], size=(80, 80))
    rc, _, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND))
    assert rc == 2
    image = data / "images" / "a.png"
    assert err.strip() == (
        f"shardgen: error: {image}: image is {SCAN_W}x{SCAN_H} but {xml}:{line_of(xml, 'a.png')} says 80x80"
    )


def _corrupt(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "bit flip":  # inside the compressed pixel data
        k = data.index(b"IDAT") + 40
        return data[:k] + bytes([data[k] ^ 0xFF]) + data[k + 1 :]
    return b"not a png at all"


@pytest.mark.parametrize("how, workers", [("truncated", 1), ("truncated", 2), ("bit flip", 1), ("garbage", 1)])
def test_corrupt_png_is_a_one_line_error_naming_the_file(tmp_path, capsys, how, workers):
    data = tmp_path / "data"
    write_scan(data / "images" / "a.png")
    write_scan(data / "images" / "b.png", content(2))
    write_xml(data / "annotations" / "ann.xml", [("a.png", []), ("b.png", [])])
    bad = data / "images" / "b.png"
    bad.write_bytes(_corrupt(bad.read_bytes(), how))
    rc, _, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND, "--workers", workers))
    assert rc == 2
    assert err.startswith(f"shardgen: error: {bad}: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_failed_rebuild_leaves_no_manifest(tmp_path, capsys):
    """A dataset whose rebuild failed part-way is marked incomplete rather than mixing old and new shards."""
    data, _ = hand_case(tmp_path, [])
    out = tmp_path / "out"
    assert cli(capsys, *build_args(data, out, *HAND))[0] == 0
    image = data / "images" / "a.png"
    image.write_bytes(image.read_bytes()[:-200])
    rc, _, err = cli(capsys, *build_args(data, out, *HAND))
    assert rc == 2 and str(image) in err
    assert not (out / "manifest.json").exists()
    rc, _, err = cli(capsys, "verify", out)
    assert rc == 2 and "no manifest" in err


def test_all_black_image_is_a_clear_error(tmp_path, capsys):
    data, _ = hand_case(tmp_path, [], pixels=np.zeros((SIDE, SIDE, 3), np.uint8))
    rc, _, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND))
    assert rc == 2
    image = data / "images" / "a.png"
    assert err.strip() == f"shardgen: error: {image}: image is entirely black, no content after crust removal"


def test_unknown_label_fails_or_is_a_counted_warning(tmp_path, capsys):
    data, xml = hand_case(tmp_path, [rect("Scratch", 5, 5, 30, 30), rect("Pit", 40, 40, 50, 50)])
    where = f"{xml}:{line_of(xml, 'Scratch')}"
    rc, _, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND))
    assert rc == 2
    assert err.startswith(f"shardgen: error: {where}: unknown label 'Scratch'") and "--unknown-labels ignore" in err
    assert not (tmp_path / "out").exists()
    rc, out, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND, "--unknown-labels", "ignore"))
    assert rc == 0
    assert f"warning: {where}: unknown label 'Scratch'" in err
    assert "skipped: 1 x unknown label 'Scratch'" in out
    assert schema.read_manifest(str(tmp_path / "out"))["skipped"] == {"unknown label 'Scratch'": 1}
    expected = np.zeros((SCAN_H, SCAN_W), np.uint8)
    expected[40:51, 40:51] = 9  # the unknown shape paints nothing
    np.testing.assert_array_equal(assemble(read_split(tmp_path / "out", "train"), "mask.png"), crop(expected))


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    data, _ = hand_case(tmp_path, [])
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in build_args(data, tmp_path / "out", "--split-ratios", "train=0.9,val=0.2")])
    assert exit_info.value.code == 2
    assert "--split-ratios must give train, val and test, non-negative, summing to 1" in capsys.readouterr().err
    rc, _, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND, "--stone-id-regex", "(a"))
    assert rc == 2 and "--stone-id-regex '(a' is not a valid regular expression" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_scan_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    """A 20000x20000 PNG (400 M pixels, over Pillow's bomb limit) named in a valid XML: one line naming the file
    and its size, nothing written, and the scan never decoded: the build's peak memory stays far below the
    400 MB that Pillow's decoding of it would take."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    huge = data / "images" / "huge.png"
    huge.write_bytes(huge_png(20000, 20000))
    write_xml(data / "annotations" / "ann.xml", [("huge.png", [])], size=(20000, 20000))
    code = ("import resource, sys; from shardgen.__main__ import main; "
            "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; before = peak(); "
            "rc = main(sys.argv[1:]); print(peak() - before); sys.exit(rc)")  # fmt: skip
    argv = [sys.executable, "-c", code, *map(str, build_args(data, tmp_path / "out", *HAND))]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"shardgen: error: {huge}: scan is 20000x20000 = 400,000,000 pixels, more than the limit of 178,956,970 "
        "(raise it with --max-pixels if the scan is genuine)"
    )
    assert int(proc.stdout.split()[-1]) < 100_000  # growth of the peak RSS during the build, KiB
    assert not (tmp_path / "out").exists()


def test_max_pixels_refuses_or_deliberately_admits_a_scan(tmp_path, capsys):
    data, _ = hand_case(tmp_path, [])
    image = data / "images" / "a.png"
    pixels = SCAN_W * SCAN_H
    rc, _, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND, "--max-pixels", pixels - 1))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"shardgen: error: {image}: scan is {SCAN_W}x{SCAN_H} = {pixels:,} pixels, more than")
    assert not (tmp_path / "out").exists()
    assert cli(capsys, *build_args(data, tmp_path / "out", *HAND, "--max-pixels", pixels))[0] == 0
    with pytest.raises(SystemExit):
        main([str(a) for a in build_args(data, tmp_path / "o2", *HAND, "--max-pixels", "0")])
    assert "--max-pixels '0' is not a positive integer" in capsys.readouterr().err


def test_xml_files_naming_no_images_are_refused(tmp_path, capsys):
    data = tmp_path / "data"
    write_scan(data / "images" / "a.png")
    for k in range(2):
        (data / "annotations").mkdir(parents=True, exist_ok=True)
        (data / "annotations" / f"ann{k}.xml").write_text("<annotations><version>1.1</version></annotations>\n")
    rc, _, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND))
    assert rc == 2
    assert err.strip() == f"shardgen: error: {data / 'annotations'}: no images in 2 XML files"
    assert not (tmp_path / "out").exists()
    # Images named but all missing, skipped with --skip-missing, would be the same empty dataset.
    write_xml(data / "annotations" / "ann0.xml", [("gone.png", [])])
    rc, _, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND, "--skip-missing"))
    assert rc == 2 and "all 1 images named in the XML are missing" in err
    assert not (tmp_path / "out").exists()


def test_upscaled_tiny_scans_are_named_and_counted_in_the_summary(tmp_path, capsys):
    data, tiny = tiny_scan_case(tmp_path)
    rc, out, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND))
    assert rc == 0
    assert f"warning: {tiny}: crust crop 20x20 is upscaled 3.2x to 64x64 (more than 2x)" in err
    assert UPSCALED_LINE in out
    assert "big.png" not in out + err
    assert schema.read_manifest(str(tmp_path / "out"))["splits"]["train"]["images"] == 2  # still built
    # A resumed build reuses the shard and reports the same warning and summary line from its record.
    rc, out2, err2 = cli(capsys, *build_args(data, tmp_path / "out", *HAND))
    assert rc == 0 and "(1 reused)" in out2
    assert err2 == err and UPSCALED_LINE in out2


def test_annotations_are_found_in_subfolders_in_any_case_and_listed(tmp_path, capsys):
    data = tmp_path / "data"
    write_scan(data / "images" / "a.png")
    write_scan(data / "images" / "b.png", content(1))
    write_xml(data / "annotations" / "top.xml", [("a.png", [])])
    deeper = data / "annotations" / "task 2" / "Annotations.XML"
    deeper.parent.mkdir(parents=True)
    write_xml(deeper, [("b.png", [])])
    (data / "annotations" / "notes.txt").write_text("not CVAT")
    rc, out, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND))
    assert rc == 0, err
    assert "images: 2 " in out
    assert f"annotations: 2 XML files: {deeper}, {data / 'annotations' / 'top.xml'}" in out


def test_a_rebuild_with_other_shards_leaves_only_its_own(synth, built, tmp_path, capsys):
    out = tmp_path / "ds"
    shutil.copytree(built, out)
    before = sorted(p.name for p in out.glob("*.tar"))
    rc, stdout, err = cli(capsys, *build_args(synth, out, *SMALL, "--shard-size", 1000, "--quiet"))
    assert rc == 0, err
    manifest = schema.read_manifest(str(out))
    listed = sorted(s["url"] for info in manifest["splits"].values() for s in info["shards"])
    assert len(before) > len(listed)  # 75-sample shards before, one shard per split now
    assert sorted(p.name for p in out.glob("*.tar")) == listed
    assert sorted(p.name for p in (out / "_build").iterdir()) == [f"{n}.json" for n in listed]
    assert "shards and records of an earlier build into" in stdout
    assert main([str(a) for a in build_args(synth, tmp_path / "fresh", *SMALL, "--shard-size", 1000, "--quiet")]) == 0
    for name in [*listed, "manifest.json"]:
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_a_shard_replaced_after_its_record_fails_the_build_naming_it(synth, tmp_path, capsys, monkeypatch):
    """What a late attempt of a killed Dask client does: it replaces a finished shard under its final name.
    The build reads every shard back before the manifest: it fails naming the shard, drops its record, and
    the rerun rebuilds it to the bytes of a clean build."""
    import shardgen.shard as shard_mod

    out = tmp_path / "ds"
    real = shard_mod.build_shard

    def then_replaced(out_url, shard, *args, **kwargs):
        record = real(out_url, shard, *args, **kwargs)
        if shard.name == "train-000000.tar":
            (out / shard.name).write_bytes(b"another attempt's bytes")
        return record

    monkeypatch.setattr("shardgen.distribute.build_shard", then_replaced)
    rc, _, err = cli(capsys, *build_args(synth, out, *SMALL, "--shard-size", 75, "--quiet"))
    assert rc == 2 and err.strip().splitlines()[-1] == (
        f"shardgen: error: {out}: train-000000.tar changed after its record was written (another build writing "
        "into the same folder?); rerun the build to rebuild it")  # fmt: skip
    assert not (out / "manifest.json").exists() and not (out / "_build" / "train-000000.tar.json").exists()
    monkeypatch.undo()
    rc, stdout, _ = cli(capsys, *build_args(synth, out, *SMALL, "--shard-size", 75, "--quiet"))
    assert rc == 0
    fresh = tmp_path / "fresh"
    assert main([str(a) for a in build_args(synth, fresh, *SMALL, "--shard-size", 75, "--quiet")]) == 0
    for p in fresh.glob("*.tar"):
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
