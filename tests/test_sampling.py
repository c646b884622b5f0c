"""Defect-aware sampling and crops in the training stream (trainer.sampling through trainer.data.TrainTiles).

The shards here are hand-made: tile n is all background except, for a few tiles, a square of one class, and
its first pixel carries n so a batch says which tiles it holds.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shardgen import schema
from trainer import sampling
from trainer.config import DataConfig
from trainer.data import TrainTiles

SIDE = 32
RARE, COMMON = 1, 2  # class ids: 2% and 8% of the tiles


def defect_of(n: int) -> int:
    """The class of tile n's defect square, 0 for none."""
    return RARE if n % 50 == 7 else COMMON if n % 50 in (3, 13, 23, 33) else 0


def write_shards(root: Path, tiles: int = 400, per_shard: int = 100) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(tiles // per_shard):
        path = root / schema.shard_name("train", s)
        with tarfile.open(path, "w") as tar:
            for n in range(s * per_shard, (s + 1) * per_shard):
                image = np.zeros((SIDE, SIDE), np.uint8)
                image[0, 0], image[0, 1] = n % 256, n // 256
                mask = np.zeros((SIDE, SIDE), np.uint8)
                mask[20:24, 4:8] = defect_of(n)  # off-centre, so an uncentred crop often misses it
                meta = {"image_id": f"t{n}", "class_pixels": np.bincount(mask.ravel(), minlength=3).tolist()}
                key = f"t{n}_0_0"
                for name, data in ((f"{key}.image.png", schema.encode_png(image)),
                                   (f"{key}.mask.png", schema.encode_png(mask)),
                                   (f"{key}.json", json.dumps(meta).encode())):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("sampling"))


def stream(urls, batches: int, seed: int = 0, start_step: int = 0, **cfg) -> list:
    cfg = DataConfig(**{"batch_size": 4, "workers": 0, "shuffle_buffer": 40, **cfg})
    it = iter(TrainTiles(urls, cfg, seed=seed, rank=0, start_step=start_step))
    return [next(it) for _ in range(batches)]


def classes_in(batches) -> list[int]:
    """The defect class held by each tile of ``batches`` (0: none)."""
    return [int(m.max()) for _, masks in batches for m in masks]


@pytest.mark.parametrize("share", [0.3, 0.5, 0.67, 1.0])
def test_forced_count_is_the_share_in_expectation(share):
    rng = random.Random(0)
    counts = np.array([sampling.forced_count(share, 4, rng) for _ in range(4000)])
    assert set(counts.tolist()) <= {int(share * 4), int(share * 4) + 1}  # floor or ceil, never further
    # The mean's standard deviation is at most 0.5 / sqrt(4000) = 0.008; rounding 0.67 to 3 of 4 is 0.32 off.
    assert abs(counts.mean() - share * 4) < 0.04


def test_a_whole_forced_count_takes_no_draw():
    """So a stream without the sampler (share 0) is not perturbed by it."""
    rng = random.Random(0)
    state = rng.getstate()
    assert [sampling.forced_count(s, b, rng) for s, b in ((0.0, 8), (0.5, 4), (1.0, 8))] == [0, 2, 8]
    assert rng.getstate() == state
    sampling.forced_count(0.5, 3, rng)  # 1.5 of 3 needs a draw
    assert rng.getstate() != state


def test_without_the_sampler_defect_tiles_come_at_their_rate(urls):
    held = classes_in(stream(urls, 150, defect_share=0.0))
    assert 0.05 < np.mean(np.array(held) > 0) < 0.16  # 10% of the tiles hold a defect


def test_defect_share_fills_each_batch_and_balances_classes(urls):
    batches = stream(urls, 150, defect_share=0.5)
    held = np.array(classes_in(batches)).reshape(150, 4)
    # After the pool's first defect tile, every batch holds at least its 2 forced defect tiles.
    assert (np.count_nonzero(held[10:], axis=1) >= 2).all()
    # Forced share 0.5 plus the stream's own 10%: about 0.55 of all tiles.
    assert 0.5 < np.mean(held > 0) < 0.62
    # Classes balanced among those present: the rare class (1 tile in 5 defect tiles) gets ~half the draws.
    defects = held[held > 0]
    assert 0.35 < np.mean(defects == RARE) < 0.6


@pytest.mark.parametrize("share", [0.3, 0.67, 1.0])
def test_defect_tiles_come_at_the_share_in_expectation(urls, share):
    """Forced tiles all hold a defect, streamed ones 10% of the time: share + (1 - share) / 10 of the tiles hold
    one (rounding the forced count, then streaming a tile ahead of the forced ones, would give 0.33 for 0.3 and
    0.78 for 0.67 and 1.0)."""
    held = np.array(classes_in(stream(urls, 300, defect_share=share))).reshape(300, 4)
    assert abs(np.mean(held > 0) - (share + (1 - share) / 10)) < 0.025
    if share == 1.0:  # the pool holds a defect tile before the shuffle buffer fills: no tile is streamed
        assert (held > 0).all()


@pytest.mark.parametrize("share", [0.5, 0.67])  # a fixed and a random forced count per batch
def test_sampler_stream_is_seeded(urls, share):
    a = stream(urls, 20, defect_share=share, crop=16)
    b = stream(urls, 20, defect_share=share, crop=16)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    whole = stream(urls, 20, defect_share=share)  # whole tiles keep their tag pixel
    c = stream(urls, 20, seed=1, defect_share=share)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(whole, c, strict=True))
    resumed = stream(urls, 20, start_step=20, defect_share=share)  # a resume draws fresh samples
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(whole, resumed, strict=True))


def test_forced_crops_hold_their_defect(urls):
    """16 px crops of 32 px tiles whose 4 px defect sits off-centre: forced crops always keep it."""
    batches = stream(urls, 100, defect_share=0.5, crop=16)
    assert all(images.shape[-2:] == (16, 16) and masks.shape[-2:] == (16, 16) for images, masks in batches)
    held = np.array(classes_in(batches)).reshape(100, 4)
    assert (np.count_nonzero(held[10:], axis=1) >= 2).all()
    plain = np.array(classes_in(stream(urls, 100, defect_share=0.0, crop=16)))
    assert np.mean(plain > 0) < 0.12  # uniform crops often miss it


def test_crop_window_puts_the_focus_pixel_in_the_central_half():
    mask = torch.zeros((64, 64), dtype=torch.uint8)
    rng = random.Random(0)
    for y, x in [(0, 0), (63, 63), (30, 2), (10, 50), (32, 32)]:
        mask.zero_()
        mask[y, x] = 3
        for _ in range(20):
            top, left = sampling.crop_window(mask, 24, rng, focus=3)
            assert 0 <= top <= 40 and 0 <= left <= 40
            assert top <= y < top + 24 and left <= x < left + 24
            if 6 <= y <= 57:  # away from the border the pixel lies in the window's central half
                assert top + 6 <= y < top + 18


def test_crop_window_draws_objects_not_pixels():
    """A 900 px blob beside a 1 px pinpoint: each object gets about half of the focused windows (drawing a
    pixel of the class uniformly would centre the pinpoint once in 901 draws)."""
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[10:40, 10:40] = 2  # the blob, top left
    mask[120, 120] = 2  # the pinpoint, bottom right: no 24 px window holds both
    rng = random.Random(0)
    windows = [sampling.crop_window(mask, 24, rng, focus=2) for _ in range(400)]
    pinpoint = sum(top <= 120 < top + 24 and left <= 120 < left + 24 for top, left in windows)
    blob = sum(top < 40 and (mask[top : top + 24, left : left + 24] == 2).any() for top, left in windows)
    assert pinpoint + blob == 400
    assert 160 <= pinpoint <= 240  # binomial(400, 0.5): 5 sigma either side


def test_crop_larger_than_the_tile_is_an_error(urls):
    with pytest.raises(ValueError, match=r"data.crop=64 is larger than the \(32, 32\) tiles"):
        stream(urls, 1, crop=64)


def test_json_without_class_pixels_is_skipped_and_counted(tmp_path):
    """The sampler reads class_pixels before decoding; a json without it is a corrupt sample, not a crash."""
    path = tmp_path / schema.shard_name("train", 0)
    blank = schema.encode_png(np.zeros((SIDE, SIDE), np.uint8))
    with tarfile.open(path, "w") as tar:
        for n in range(8):
            meta = {"image_id": f"t{n}", **({"class_pixels": [SIDE * SIDE, 0, 0]} if n % 2 else {})}
            for name, data in ((f"t{n}_0_0.image.png", blank), (f"t{n}_0_0.mask.png", blank),
                               (f"t{n}_0_0.json", json.dumps(meta).encode())):  # fmt: skip
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    tiles = TrainTiles([str(path)], DataConfig(batch_size=2, workers=0, shuffle_buffer=2, defect_share=0.5), 0, 0)
    it = iter(tiles)
    for _ in range(6):
        next(it)
    assert tiles.counts.skipped >= 8  # 4 per pass over the shard, 12 tiles drawn
