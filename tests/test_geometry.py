"""Crust removal and its inverse, the tile grid, and stone-based split assignment."""

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from shardgen.crust import CrustError, crop_resize, crop_resize_mask, crust_box, geometry_from_meta, geometry_of, uncrop
from shardgen.splits import (
    DEFAULT_RATIOS,
    SPLITS,
    assign_split,
    assign_splits,
    exact_counts,
    parse_ratios,
    share_warnings,
    stone_id_of,
    unit_hash,
)
from shardgen.tiling import TileGrid

# Uneven crust: a different width on every side.
LEFT, TOP, RIGHT, BOTTOM = 3, 7, 11, 5


def scan(content: np.ndarray) -> np.ndarray:
    """``content`` padded with black crust of LEFT/TOP/RIGHT/BOTTOM pixels."""
    pad = ((TOP, BOTTOM), (LEFT, RIGHT)) + ((0, 0),) * (content.ndim - 2)
    return np.pad(content, pad)


def rgb_content(h: int, w: int, seed: int = 0) -> np.ndarray:
    content = np.random.default_rng(seed).integers(1, 256, (h, w, 3), dtype=np.uint8)
    content[5:9, 5:9] = 0  # black inside the content is content, not crust
    content[0, : w // 2] = 0  # so is a partly black edge row ...
    content[h // 2 :, 0] = 0  # ... and a partly black edge column
    return content


def test_crust_box_on_uneven_borders():
    pixels = scan(rgb_content(40, 50))
    h, w = pixels.shape[:2]
    assert crust_box(pixels) == (LEFT, TOP, w - RIGHT, h - BOTTOM)
    # Grayscale input, and one non-zero channel is enough to be content.
    gray = np.zeros((30, 20), np.uint8)
    gray[4, 6] = gray[20, 15] = 9
    assert crust_box(gray) == (6, 4, 16, 21)
    rgb = np.zeros((30, 20, 3), np.uint8)
    rgb[2, 3, 2] = 1
    assert crust_box(rgb) == (3, 2, 4, 3)


def test_all_black_scan_is_a_clear_error():
    with pytest.raises(CrustError, match=r"scan\.png: image is entirely black"):
        geometry_of(np.zeros((10, 12, 3), np.uint8), 64, name="scan.png")


def test_crop_at_scale_one_keeps_content_pixels_exactly():
    content = rgb_content(64, 64)
    pixels = scan(content)
    geom = geometry_of(pixels, 64)
    assert geom.box == (LEFT, TOP, LEFT + 64, TOP + 64)
    assert geom.scale == (1.0, 1.0)
    assert (geom.width, geom.height) == (pixels.shape[1], pixels.shape[0])
    out = np.asarray(crop_resize(Image.fromarray(pixels), geom))
    np.testing.assert_array_equal(out, content)
    mask = scan(np.random.default_rng(1).integers(0, 11, (64, 64), dtype=np.uint8))
    np.testing.assert_array_equal(crop_resize_mask(mask, geom), mask[TOP : TOP + 64, LEFT : LEFT + 64])


def test_mask_resize_is_nearest_and_keeps_label_values():
    pixels = scan(rgb_content(50, 37))  # not square: x and y scales differ
    geom = geometry_of(pixels, 96)
    assert geom.scale == pytest.approx((96 / 37, 96 / 50))
    mask = np.random.default_rng(2).choice(np.array([0, 3, 10, 255], np.uint8), size=pixels.shape[:2])
    out = crop_resize_mask(mask, geom)
    assert out.shape == (96, 96)
    # Nearest: output pixel centre (r + 0.5) / scale falls in source pixel floor(...), offset by the box.
    rows = TOP + np.floor((np.arange(96) + 0.5) * 50 / 96).astype(int)
    cols = LEFT + np.floor((np.arange(96) + 0.5) * 37 / 96).astype(int)
    np.testing.assert_array_equal(out, mask[np.ix_(rows, cols)])


@pytest.mark.parametrize("side, size", [(64, 64), (32, 96), (48, 96)])
def test_uncrop_round_trip_is_exact_at_integer_upscales(side, size):
    pixels = scan(rgb_content(side, side))
    geom = geometry_of(pixels, size)
    mask = np.zeros(pixels.shape[:2], np.uint8)
    mask[TOP : TOP + side, LEFT : LEFT + side] = np.random.default_rng(3).integers(0, 11, (side, side))
    back = uncrop(crop_resize_mask(mask, geom), geom, fill=0)
    assert back.shape == mask.shape
    np.testing.assert_array_equal(back, mask)


def test_uncrop_fills_the_crust_and_survives_the_json_of_a_tile():
    pixels = scan(rgb_content(50, 37))
    geom = geometry_of(pixels, 192)
    meta = {"crop_box": list(geom.box), "source_size": [geom.width, geom.height], "image_size": 192}
    assert geometry_from_meta(meta) == geom
    blob = np.zeros((pixels.shape[0], pixels.shape[1]), np.uint8)
    blob[TOP + 10 : TOP + 30, LEFT + 5 : LEFT + 25] = 4
    back = uncrop(crop_resize_mask(blob, geom), geom, fill=255)
    assert (back[:TOP] == 255).all() and (back[:, :LEFT] == 255).all()
    assert (back[-BOTTOM:] == 255).all() and (back[:, -RIGHT:] == 255).all()
    inner = (slice(TOP, TOP + 50), slice(LEFT, LEFT + 37))
    # Downscaling 192 -> 50/37 by nearest is lossless here: each source pixel owns >= 3 output pixels.
    np.testing.assert_array_equal(back[inner], blob[inner])


# ---------------------------------------------------------------------------------------------- tiling


def test_default_grid_is_25_tiles_at_multiples_of_200():
    grid = TileGrid()
    assert (grid.n, grid.count) == (5, 25)
    positions = grid.positions()
    assert positions == [(i, j, 200 * i, 200 * j) for i in range(5) for j in range(5)]
    # The last tiles end exactly at the image edge.
    assert max(y for _, _, y, _ in positions) + 400 == 1200


@pytest.mark.parametrize(
    "size, tile, stride, n", [(192, 64, 32, 5), (64, 32, 32, 2), (600, 200, 100, 5), (64, 64, 8, 1)]
)
def test_configurable_grids(size, tile, stride, n):
    grid = TileGrid(size, tile, stride)
    assert grid.count == n * n
    covered = np.zeros((size, size), np.int32)
    for _, _, y, x in grid.positions():
        covered[y : y + tile, x : x + tile] += 1
    assert covered.min() >= 1


@pytest.mark.parametrize(
    "size, tile, stride, reason",
    [
        (1200, 400, 300, "does not cover the image exactly"),
        (200, 64, 32, "does not cover the image exactly"),
        (64, 128, 32, "larger than the image"),
        (192, 32, 40, "leaves gaps"),
        (192, 64, 0, "must be positive"),
    ],
)
def test_non_covering_grids_are_rejected(size, tile, stride, reason):
    with pytest.raises(ValueError, match=reason):
        TileGrid(size, tile, stride)


# ---------------------------------------------------------------------------------------------- splits


def test_split_assignments_are_pinned():
    # Changing the hash would move stones of every existing dataset between splits (test leaking into train).
    expected = {"stone_00000": "train", "stone_00010": "test", "stone_00021": "val", "stone_00028": "val",
                "stone_00035": "test", "S001": "test"}  # fmt: skip
    assert {s: assign_split(s) for s in expected} == expected


def test_adding_stones_never_moves_existing_ones_and_ratios_hold():
    old = [f"stone_{i:05d}" for i in range(1000)]
    before = {s: assign_split(s) for s in old}
    new = [f"new-{i}" for i in range(1000)]
    everything = {s: assign_split(s) for s in new + old}  # assignment must not depend on the other stones
    assert {s: everything[s] for s in old} == before
    counts = Counter(everything.values())
    for split in SPLITS:
        assert abs(counts[split] / 2000 - DEFAULT_RATIOS[split]) < 0.04, counts
    custom = {"train": 0.5, "val": 0.25, "test": 0.25}
    counts = Counter(assign_split(s, custom) for s in everything)
    for split in SPLITS:
        assert abs(counts[split] / 2000 - custom[split]) < 0.04, counts
    assert {assign_split(s, {"train": 0.0, "val": 0.0, "test": 1.0}) for s in old} == {"test"}


def test_hash_method_is_the_per_stone_hash():
    stones = [f"stone_{i:05d}" for i in range(300)]
    assert assign_splits(stones, DEFAULT_RATIOS, "hash") == {s: assign_split(s) for s in stones}
    with pytest.raises(ValueError, match="--split-method must be one of hash, exact"):
        assign_splits(stones, DEFAULT_RATIOS, "random")


@pytest.mark.parametrize("ratios", [DEFAULT_RATIOS, {"train": 0.5, "val": 0.25, "test": 0.25},
                                    {"train": 0.8, "val": 0.0, "test": 0.2},
                                    {"train": 0.98, "val": 0.01, "test": 0.01}])  # fmt: skip
def test_exact_counts_are_the_requested_proportions(ratios):
    positive = [s for s in SPLITS if ratios[s] > 0]
    for n in range(60):
        counts = exact_counts(n, ratios)
        assert sum(counts.values()) == n
        assert all(counts[s] == 0 for s in SPLITS if ratios[s] == 0)
        if n >= len(positive):
            assert all(counts[s] >= 1 for s in positive), (n, counts)
        # Within one stone of n * ratio once every quota reaches one stone (before that, small splits are
        # topped up to one stone each, taken from the largest).
        tolerance = 1 if all(n * ratios[s] >= 1 for s in positive) else len(positive)
        assert all(abs(counts[s] - n * ratios[s]) < tolerance for s in SPLITS), (n, counts)
    assert exact_counts(10, DEFAULT_RATIOS) == {"train": 6, "val": 1, "test": 3}
    assert exact_counts(40, DEFAULT_RATIOS) == {"train": 24, "val": 4, "test": 12}


def test_exact_method_cuts_the_hash_order():
    stones = [f"stone_{i:05d}" for i in range(40)]
    split_of = assign_splits(reversed(stones), DEFAULT_RATIOS, "exact")  # the input order does not matter
    in_hash_order = [split_of[s] for s in sorted(stones, key=unit_hash)]
    assert in_hash_order == ["train"] * 24 + ["val"] * 4 + ["test"] * 12
    # The hash alone leaves 40 stones 29/5/6, which the build summary warns about.
    counts = Counter(assign_splits(stones, DEFAULT_RATIOS, "hash").values())
    assert [counts[s] for s in SPLITS] == [29, 5, 6]
    warned = share_warnings({s: counts[s] for s in SPLITS}, DEFAULT_RATIOS, "hash")
    assert "train 72.5% (asked 60.0%), test 15.0% (asked 30.0%)" in warned[0] and "--split-method exact" in warned[1]
    assert share_warnings({"train": 24, "val": 4, "test": 12}, DEFAULT_RATIOS, "exact") == []
    assert share_warnings({"train": 10, "val": 0, "test": 0}, {"train": 1.0, "val": 0.0, "test": 0.0}, "hash") == []


def test_parse_ratios():
    assert parse_ratios("test=0.3, train=0.6,val=0.1") == {"train": 0.6, "val": 0.1, "test": 0.3}
    bad_ratios = ["train=0.6,val=0.1", "train=0.7,val=0.1,test=0.3", "train=1.2,val=-0.2,test=0",
                  "train=x,val=0.5,test=0.5", "train=nan,val=0.5,test=0.5", "train=0.5,val=0.5,test=0,foo=0"]
    for bad in bad_ratios:
        with pytest.raises(ValueError, match="--split-ratios must give train, val and test"):
            parse_ratios(bad)


def test_stone_id_regex():
    assert stone_id_of("S001-view2", None) == "S001-view2"
    assert stone_id_of("S001-view2", r"^(S\d+)-") == "S001"
    assert stone_id_of("lot7_S001-view2", r"S\d+") == "S001"  # no group: the whole match
    with pytest.raises(ValueError, match=r"does not match image id 'other'"):
        stone_id_of("other", r"^(S\d+)-")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        stone_id_of("S001", r"(S\d+")
    with pytest.raises(ValueError, match="empty stone id"):
        stone_id_of("view2", r"(S\d+)?view")
