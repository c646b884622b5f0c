"""Tile reassembly: blended probabilities match MONAI's sliding-window inference; GT tiles must agree."""

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from evaluate.blend import blend_tiles, importance_map, reassemble_mask
from shardgen.tiling import TileGrid

GRID = TileGrid()  # 1200 / 400 / 200: the production grid


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 3, padding=1)
    ).eval()
    return lambda x: torch.softmax(net(x), dim=1)


def test_grid_matches_monai_windows():
    """overlap=0.5 with roi 400 on 1200 scans exactly our 5x5 tile origins, in the same order."""
    interval = _get_scan_interval((1200, 1200), (400, 400), 2, (0.5, 0.5))
    slices = dense_patch_slices((1200, 1200), (400, 400), interval)
    assert [(sy.start, sx.start) for sy, sx in slices] == [(y, x) for _, _, y, x in GRID.positions()]
    assert {(sy.stop - sy.start, sx.stop - sx.start) for sy, sx in slices} == {(400, 400)}


@pytest.mark.parametrize("tile", [400, 7])
@pytest.mark.parametrize("mode,monai_mode", [("gaussian", "gaussian"), ("mean", "constant")])
def test_importance_map_equals_monai(tile, mode, monai_mode):
    ours = importance_map(tile, mode)
    ref = compute_importance_map((tile, tile), mode=monai_mode, sigma_scale=0.125)
    assert ours.shape == (tile, tile)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_unknown_mode_lists_valid():
    with pytest.raises(ValueError, match="mean, gaussian"):
        importance_map(400, "median")


@torch.no_grad()
def test_blend_equals_sliding_window_inference(model):
    torch.manual_seed(1)
    image = torch.rand(1, 1, 1200, 1200)
    t = GRID.tile
    tiles = torch.cat([image[:, :, y : y + t, x : x + t] for _, _, y, x in GRID.positions()])
    probs = torch.cat([model(b) for b in tiles.split(10)])
    results = {}
    for mode, monai_mode in [("mean", "constant"), ("gaussian", "gaussian")]:
        ours = blend_tiles(probs, GRID, mode)
        ref = sliding_window_inference(
            image,
            roi_size=400,
            sw_batch_size=10,
            predictor=model,
            overlap=0.5,
            mode=monai_mode,
            sigma_scale=0.125,
        )[0]
        assert ours.shape == (3, 1200, 1200)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.sum(0), torch.ones(1200, 1200), rtol=0, atol=1e-5)
        results[mode] = ours
    # The tiles disagree at their zero-padded borders, so the weighting must matter.
    assert (results["mean"] - results["gaussian"]).abs().max() > 1e-3


def test_blend_rejects_wrong_tile_count():
    with pytest.raises(ValueError, match=r"expected \(25, C, 400, 400\)"):
        blend_tiles(torch.zeros(24, 3, 400, 400), GRID)


def _cut(mask: np.ndarray, grid: TileGrid) -> np.ndarray:
    t = grid.tile
    return np.stack([mask[y : y + t, x : x + t] for _, _, y, x in grid.positions()])


def test_reassemble_mask_roundtrip():
    grid = TileGrid(image_size=12, tile=4, stride=2)
    mask = np.random.default_rng(0).integers(0, 11, (12, 12), dtype=np.uint8)
    mask[0, 0] = 255
    out = reassemble_mask(_cut(mask, grid), grid, "scan_001")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, mask)


def test_reassemble_mask_names_image_on_disagreement():
    grid = TileGrid(image_size=12, tile=4, stride=2)
    tiles = _cut(np.zeros((12, 12), np.uint8), grid)
    tiles[0, 3, 3] = 4  # pixel (3, 3) is also covered by tiles (0, 1), (1, 0) and (1, 1), which say 0
    with pytest.raises(
        ValueError, match=r"scan_042\.png: overlapping ground-truth tiles disagree .*tile \(0, 0\)"
    ):
        reassemble_mask(tiles, grid, "scan_042.png")


def test_reassemble_mask_rejects_wrong_shape():
    with pytest.raises(ValueError, match="scan_7"):
        reassemble_mask(np.zeros((25, 400, 399), np.uint8), GRID, "scan_7")


@pytest.mark.parametrize("grid", [GRID, TileGrid(12, 4, 2), TileGrid(12, 6, 3), TileGrid(8, 8, 4)])
def test_cpu_cell_blend_is_identical_to_the_tile_loop(grid):
    """On the CPU, blend_tiles writes each stride cell once; the sums and their order are those of adding the
    weighted tiles into a zeroed image one by one, so the result must be bit for bit the same."""
    torch.manual_seed(3)
    t, s = grid.tile, grid.image_size
    probs = torch.rand(grid.count, 3, t, t)
    w = importance_map(t, "gaussian")
    total, weight = torch.zeros(3, s, s), torch.zeros(1, s, s)
    for k, (_, _, y, x) in enumerate(grid.positions()):
        total[:, y : y + t, x : x + t].addcmul_(probs[k], w)
        weight[:, y : y + t, x : x + t] += w
    assert torch.equal(blend_tiles(probs, grid, "gaussian"), total / weight)


def test_tile_grid_cut_and_paste_round_trip_numpy_and_torch():
    """TileGrid.cut and paste are the one place tiles are cut and put back (shardgen, predict, evaluate)."""
    grid = TileGrid(12, 6, 3)
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    tiles = grid.cut(hwc, channels_last=True)
    assert len(tiles) == grid.count and all(t.shape == (6, 6, 3) for t in tiles)
    assert all(np.shares_memory(t, hwc) for t in tiles)  # views, no copies
    chw = torch.from_numpy(hwc.transpose(2, 0, 1).copy())
    stacked = torch.stack(grid.cut(chw))
    for (_, _, y, x), tile in zip(grid.positions(), stacked, strict=True):
        assert torch.equal(tile, chw[:, y : y + 6, x : x + 6])
    np.testing.assert_array_equal(grid.paste(stacked.numpy(), np.zeros((3, 12, 12), np.uint8)), chw.numpy())
    assert torch.equal(grid.paste(stacked, torch.zeros(3, 12, 12, dtype=torch.uint8)), chw)
    # Weighted: each tile times the weight, added; numpy and torch agree with a hand-written sum.
    probs, w = torch.rand(grid.count, 2, 6, 6, dtype=torch.float64), torch.rand(6, 6, dtype=torch.float64)
    expected = torch.zeros(2, 12, 12, dtype=torch.float64)
    for k, (_, _, y, x) in enumerate(grid.positions()):
        expected[:, y : y + 6, x : x + 6] += probs[k] * w
    assert torch.allclose(grid.paste(probs, torch.zeros(2, 12, 12, dtype=torch.float64), weight=w), expected)
    summed = grid.paste(probs.numpy(), np.zeros((2, 12, 12)), weight=w.numpy())
    np.testing.assert_allclose(summed, expected.numpy())
    with pytest.raises(ValueError, match="8 tiles for a grid of 9"):
        grid.paste(probs[:8], torch.zeros(2, 12, 12, dtype=torch.float64))
