"""trainer.data: exact masks through the DataLoader, a deterministic infinite training stream, and validation
that sees every tile exactly once across ranks and workers.

Most tests read hand-made shards (``write_dataset``): tile k of image n carries (n, k) in its first two
pixels, so a batch says which tiles it holds, and its mask holds every label 0..10 and 255.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import build_tiny
from PIL import Image
from torch.utils.data import DataLoader

from shardgen import schema
from shardgen.reader import CorruptSample
from trainer import sampling
from trainer.config import DataConfig
from trainer.data import TrainTiles, ValTiles, rank_share, reraise, train_loader, val_loader

LABELS = np.array([*range(11), 255], dtype=np.uint8)  # every class id of configs/classes.yaml and ignore
CLASSES = ["background", "Pinpoint", "Crystal", "Needle", "Feather", "Internal_graining", "Cloud",
           "Twinning_wisp", "Nick", "Pit", "Burn_mark"]  # fmt: skip


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tile_pixels(n: int, k: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (side, side) tagged (n, k) in its first two pixels, and a mask holding all of LABELS."""
    image = np.random.default_rng(1000 * n + k).integers(0, 256, (side, side), dtype=np.uint8)
    image[0, :2] = n, k
    mask = np.resize(np.roll(LABELS, n + k), (side, side))
    return image, mask


def write_dataset(root: Path, shards: dict[str, list[int]], tiles: int = 4, side: int = 16,
                  corrupt: set[tuple[int, int]] = frozenset()) -> dict:  # fmt: skip
    """Write ``{split: [images in shard 0, images in shard 1, ...]}`` and its manifest; returns the manifest.

    Images are numbered from 0 within each split; ``corrupt`` lists (image, tile) whose mask.png is garbage.
    """
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, counts in shards.items():
        records, n = [], 0
        hist = np.zeros(len(CLASSES), dtype=np.int64)
        for index, count in enumerate(counts):
            name = schema.shard_name(split, index)
            with tarfile.open(root / name, "w") as tar:
                for _ in range(count):
                    for k in range(tiles):
                        image, mask = tile_pixels(n, k, side)
                        hist += np.bincount(mask[mask != 255], minlength=len(CLASSES))
                        key = schema.sample_key(f"img{n:03d}", k // 2, k % 2)
                        bad = (n, k) in corrupt
                        _tar_member(tar, f"{key}.image.png", schema.encode_png(image))
                        _tar_member(tar, f"{key}.mask.png", b"not a png" if bad else schema.encode_png(mask))
                        pixels = np.bincount(mask[mask != 255], minlength=len(CLASSES)).tolist()
                        meta = {"image_id": f"img{n:03d}", "class_pixels": pixels}
                        _tar_member(tar, f"{key}.json", json.dumps(meta).encode())
                    n += 1
            data = (root / name).read_bytes()
            records.append({"url": name, "samples": count * tiles, "images": count, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
        splits[split] = {"shards": records, "samples": n * tiles, "images": n,
                         "bytes": sum(r["bytes"] for r in records), "class_pixels": hist.tolist()}  # fmt: skip
    manifest = {"format": schema.FORMAT, "format_version": schema.FORMAT_VERSION, "classes": CLASSES,
                "mode": "multiclass", "ignore_index": 255, "channels": 1, "image_size": 2 * side, "tile": side,
                "stride": side, "tiles_per_image": tiles, "options": {}, "skipped": {}, "splits": splits}  # fmt: skip
    (root / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    return schema.read_manifest(str(root))


def ids(batches) -> list[tuple[int, int]]:
    """(image, tile) of every tile in ``batches``, read from the tag pixels."""
    return [(int(img[0, 0, 0]), int(img[0, 0, 1])) for images, _ in batches for img in images]


def take(loader, k: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(k)]


def _check_masks(batches, side: int) -> None:
    for images, masks in batches:
        for img, mask in zip(images, masks, strict=True):
            assert np.array_equal(mask.numpy(), tile_pixels(int(img[0, 0, 0]), int(img[0, 0, 1]), side)[1])


# ------------------------------------------------------------------------------------------ exact masks


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A dataset built by shardgen from synthetic scans: 8 images of 192 px, 64 px tiles."""
    tmp = tmp_path_factory.mktemp("built")
    return schema.read_manifest(build_tiny(tmp, 8))


def _masks_in_shards(manifest: dict, split: str) -> list[np.ndarray]:
    """Every mask.png of ``split`` in shard order, decoded by PIL straight from the tar files."""
    out = []
    for url in schema.shard_urls(manifest, split):
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".mask.png"):
                    out.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read()))))
    return out


def test_shardgen_masks_arrive_exactly_as_stored(built):
    expected = _masks_in_shards(built, "val")
    cfg = DataConfig(batch_size=7, workers=1)
    got = [m.numpy() for _, masks in val_loader(built, "val", cfg, 0, 1, pin=False) for m in masks]
    assert len(got) == len(expected) == built["splits"]["val"]["samples"]
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == np.uint8 and np.array_equal(a, b)
    # The shuffled, resampled training stream only ever yields stored masks, unchanged.
    stored = {m.tobytes() for m in _masks_in_shards(built, "train")}
    labels = set()
    for _, masks in take(train_loader(built, "train", cfg, seed=0, rank=0, start_step=0, pin=False), 12):
        for m in masks.numpy():
            assert m.tobytes() in stored
            labels |= set(np.unique(m).tolist())
    assert labels <= {*range(11), 255} and len(labels) > 2


@pytest.mark.parametrize("workers", [0, 1])
def test_every_label_and_ignore_survive_the_loader(tmp_path, workers):
    manifest = write_dataset(tmp_path, {"train": [2], "val": [1, 1]})
    cfg = DataConfig(batch_size=3, workers=workers, shuffle_buffer=4)
    val = list(val_loader(manifest, "val", cfg, 0, 1, pin=False))
    train = take(train_loader(manifest, "train", cfg, seed=0, rank=0, start_step=0, pin=False), 6)
    for batches in (val, train):
        _check_masks(batches, side=16)
        assert set(np.unique(np.concatenate([m.numpy().ravel() for _, m in batches]))) == set(LABELS.tolist())
        assert all(i.dtype == m.dtype == torch.uint8 for i, m in batches)


# ------------------------------------------------------------------------------------- training stream


@pytest.fixture
def small(tmp_path):
    return write_dataset(tmp_path, {"train": [1, 1, 2]})  # 4 images, 16 tiles, in shards of unequal size


def _stream(manifest, seed=0, rank=0, start_step=0, workers=0, k=12):
    cfg = DataConfig(batch_size=3, workers=workers, shuffle_buffer=5)
    return ids(take(train_loader(manifest, "train", cfg, seed, rank, start_step, pin=False), k))


def test_train_stream_is_infinite_and_deterministic(small):
    first = _stream(small)
    assert len(first) == 36 > small["splits"]["train"]["samples"]  # more batches than one pass holds
    assert set(first) <= {(n, k) for n in range(4) for k in range(4)}
    assert _stream(small) == first
    assert _stream(small, seed=1) != first
    assert _stream(small, rank=1) != first  # ranks draw their own samples
    assert _stream(small, start_step=8) != first  # a resumed run does not replay the run's first batches


def test_train_stream_is_deterministic_with_workers(small):
    two = _stream(small, workers=2)
    assert _stream(small, workers=2) == two
    assert _stream(small, seed=1, workers=2) != two


@pytest.mark.parametrize("share", [0.3, 0.67, 1.0])
def test_the_pool_gives_the_defect_share_of_each_batch_in_expectation(small, monkeypatch, share):
    """Samples drawn from the defect pool, counted per batch through the loader: share * 4 in expectation
    (rounding the count, then streaming a tile ahead of the forced ones, would give 1 of 4 for 0.3 and 3 of 4
    for 0.67 and 1.0), and all of them for share 1.0 (every tile of ``small`` holds defects: the pool is never
    empty)."""
    drawn, draw = [0], sampling.DefectPool.draw

    def counted(pool, rng):
        pick = draw(pool, rng)
        drawn[0] += pick is not None
        return pick

    monkeypatch.setattr(sampling.DefectPool, "draw", counted)
    cfg = DataConfig(batch_size=4, workers=0, shuffle_buffer=5, defect_share=share)
    batches = iter(train_loader(small, "train", cfg, seed=0, rank=0, start_step=0, pin=False))
    per_batch = []
    for _ in range(500):
        before = drawn[0]
        next(batches)
        per_batch.append(drawn[0] - before)
    assert set(per_batch) <= {int(share * 4), int(share * 4) + 1}
    # The mean's standard deviation is at most 0.5 / sqrt(500) = 0.022 samples of a batch.
    assert abs(np.mean(per_batch) - share * 4) < 0.1


def test_corrupt_training_sample_is_skipped_and_counted_but_fails_validation(tmp_path):
    manifest = write_dataset(tmp_path, {"train": [1], "val": [1]}, corrupt={(0, 2)})
    urls = schema.shard_urls(manifest, "train")
    cfg = DataConfig(batch_size=3, workers=0, shuffle_buffer=2, defect_share=0.0)  # the plain stream
    tiles = TrainTiles(urls, cfg, seed=0, rank=0)
    batches = take(tiles, 4)
    assert (0, 2) not in ids(batches)  # 12 tiles drawn from the 3 good ones of 4
    assert tiles.counts.skipped >= 3  # one per pass over the shard
    pooled = DataConfig(batch_size=3, workers=0, shuffle_buffer=2, defect_share=1.0)  # every tile from the pool
    tiles = TrainTiles(urls, pooled, seed=0, rank=0)
    batches = take(tiles, 4)
    assert (0, 2) not in ids(batches) and tiles.counts.skipped >= 1
    with pytest.raises(CorruptSample, match=r"val-000000.tar: sample 'img000_1_0': cannot decode"):
        list(reraise(ValTiles(manifest, "val", cfg, rank=0, world=1)))


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [2, 3])
def test_validation_sees_every_sample_once_across_ranks(tmp_path, world, workers):
    """3 shards of unequal size, 2 or 3 ranks: each tile is validated by exactly one rank, once."""
    manifest = write_dataset(tmp_path, {"val": [2, 1, 2]})
    cfg = DataConfig(batch_size=3)
    seen = []
    for rank in range(world):
        loader = DataLoader(ValTiles(manifest, "val", cfg, rank, world), batch_size=None, num_workers=workers)
        batches = list(loader)
        _check_masks(batches, side=16)
        mine = ids(batches)
        assert len(mine) == rank_share(manifest, "val", rank, world)
        assert {n % world for n, _ in mine} <= {rank}  # image n goes to rank n % world
        seen += mine
    assert len(seen) == len(set(seen)) == manifest["splits"]["val"]["samples"] == 20


def test_val_loader_caps_workers_at_the_shard_count(tmp_path):
    manifest = write_dataset(tmp_path, {"val": [1, 1]})
    loader = val_loader(manifest, "val", DataConfig(batch_size=2, workers=6), 0, 1, pin=False)
    assert loader.num_workers == 2
    assert sorted(ids(loader)) == [(n, k) for n in range(2) for k in range(4)]


def test_rank_share(tmp_path):
    manifest = write_dataset(tmp_path, {"val": [3, 2]})  # 5 images of 4 tiles
    assert [rank_share(manifest, "val", r, 1) for r in range(1)] == [20]
    assert [rank_share(manifest, "val", r, 2) for r in range(2)] == [12, 8]
    assert [rank_share(manifest, "val", r, 3) for r in range(3)] == [8, 8, 4]
    assert [rank_share(manifest, "val", r, 8) for r in range(8)] == [4] * 5 + [0] * 3


# ------------------------------------------------------------------------- decoding into batch buffers


@pytest.mark.parametrize("channels", [1, 3])
def test_decoding_into_a_buffer_gives_the_stored_pixels(channels):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (37, 53) if channels == 1 else (37, 53, 3), dtype=np.uint8)
    data = schema.encode_png(pixels)
    assert schema.png_shape(data) == pixels.shape
    out = np.full(pixels.shape, 7, dtype=np.uint8)
    assert schema.decode_png(data, out) is out and np.array_equal(out, pixels)
    assert np.array_equal(schema.decode_png(data), pixels)
    with pytest.raises(ValueError, match=r"does not fit the buffer's \(53, 37"):
        schema.decode_png(data, np.empty((53, 37, 3)[: pixels.ndim], dtype=np.uint8))


def test_png_shape_refuses_what_decode_png_does_not_read():
    assert schema.png_shape(b"not a png") is None
    assert schema.png_shape(schema.encode_png(np.zeros((4, 4), np.uint16))) is None  # 16-bit grey
    assert schema.png_shape(schema.encode_png(np.zeros((4, 4, 4), np.uint8))) is None  # RGBA


def test_a_broken_first_tile_does_not_set_the_batch_shape():
    from trainer.batch import BatchBuffer

    def sample(side: int, n: int, mask: bytes | None = None) -> dict:
        image, m = tile_pixels(n, 0, side)
        return {schema.IMAGE_KEY: schema.encode_png(image), schema.MASK_KEY: mask or schema.encode_png(m),
                schema.META_KEY: b"{}"}

    batch = BatchBuffer(2)
    broken = sample(99, 0, mask=schema.encode_png(np.zeros((99, 99), np.uint8))[:60])  # valid header, cut data
    with pytest.raises(CorruptSample, match="cannot decode"):
        batch.decode("u", "k0", broken)
    batch.decode("u", "k1", sample(16, 1))
    with pytest.raises(CorruptSample, match="does not fit"):
        batch.decode("u", "k2", sample(20, 2))  # another size than the batch's first tile
    batch.decode("u", "k3", sample(16, 3))
    images, masks = batch.take()
    assert [int(i[0, 0, 0]) for i in images] == [1, 3]
    assert all(np.array_equal(m.numpy(), tile_pixels(n, 0, 16)[1]) for n, m in zip((1, 3), masks, strict=True))


@pytest.mark.parametrize("read_ahead", [False, True])
def test_a_worker_streams_the_pixels_of_the_in_process_stream(small, monkeypatch, read_ahead):
    """With and without the read-ahead thread a worker yields the same batches, pixel for pixel, as the
    stream run in this process."""
    monkeypatch.setattr("trainer.data.spare_core", lambda: read_ahead)  # the forked worker inherits the patch
    cfg = DataConfig(batch_size=3, shuffle_buffer=5, workers=0)
    inproc = take(train_loader(small, "train", cfg, 0, 0, 0, pin=False), 8)
    cfg = DataConfig(batch_size=3, shuffle_buffer=5, workers=1)
    worker = take(train_loader(small, "train", cfg, 0, 0, 0, pin=False), 8)
    for (i0, m0), (i1, m1) in zip(inproc, worker, strict=True):
        assert torch.equal(i0, i1) and torch.equal(m0, m1)
    _check_masks(worker, side=16)


def test_worker_counts_reach_the_main_process_beside_the_batches(tmp_path):
    """What workers skip is counted in shared memory, not in the batches: the stream's total sees both
    workers' skips, and every batch is pixels only."""
    manifest = write_dataset(tmp_path, {"train": [1, 1]}, corrupt={(0, 2), (1, 1)})
    cfg = DataConfig(batch_size=3, workers=2, shuffle_buffer=2, defect_share=0.0)
    stream = reraise(train_loader(manifest, "train", cfg, seed=0, rank=0, start_step=0, pin=False))
    batches = [next(stream) for _ in range(8)]
    assert all(len(batch) == 2 for batch in batches)  # (images, masks)
    assert (0, 2) not in ids(batches) and (1, 1) not in ids(batches)
    stream.close()
    assert stream.skipped >= 2 and stream.io_retries == 0


def test_a_worker_reuses_its_few_batch_slots(small):
    """A worker fills its batches in a few shared slots and sends where they lie; each is copied out on
    receipt and its slot reused: 30 batches, all through slots, in at most prefetch_factor + 2 of them."""
    from trainer.batch import SlotBatch

    cfg = DataConfig(batch_size=3, shuffle_buffer=5, workers=1, prefetch_factor=2)
    loader = train_loader(small, "train", cfg, 0, 0, 0, pin=False)
    raw = DataLoader.__iter__(loader)  # the worker's items, before TileLoader copies them out
    slots, kept = set(), []
    for _ in range(30):
        item = next(raw)
        assert isinstance(item, SlotBatch)  # a worker that found no free slot would send the pixels instead
        slots.add(item.slot)
        kept.append(item.tensors())
    assert slots <= set(range(cfg.prefetch_factor + 2))
    inproc = take(train_loader(small, "train", DataConfig(batch_size=3, shuffle_buffer=5, workers=0), 0, 0, 0,
                               pin=False), 30)  # fmt: skip
    for (i0, m0), (i1, m1) in zip(inproc, kept, strict=True):  # no kept batch was overwritten by a later one
        assert torch.equal(i0, i1) and torch.equal(m0, m1)


def test_without_fork_the_workers_send_their_batches_whole(small, monkeypatch):
    monkeypatch.setattr("trainer.data.fork_context", lambda: None)
    cfg = DataConfig(batch_size=3, shuffle_buffer=5, workers=1)
    loader = train_loader(small, "train", cfg, 0, 0, 0, pin=False)
    assert loader.dataset.slots is None
    worker = take(loader, 8)
    inproc = take(train_loader(small, "train", DataConfig(batch_size=3, shuffle_buffer=5, workers=0), 0, 0, 0,
                               pin=False), 8)  # fmt: skip
    for (i0, m0), (i1, m1) in zip(inproc, worker, strict=True):
        assert torch.equal(i0, i1) and torch.equal(m0, m1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_come_out_of_their_slots_pinned(small):
    cfg = DataConfig(batch_size=3, shuffle_buffer=5, workers=1)
    images, masks = next(iter(train_loader(small, "train", cfg, 0, 0, 0, pin=True)))
    assert images.is_pinned() and masks.is_pinned()
