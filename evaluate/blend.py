"""Reassembling full images from the overlapping tile grid: blended probabilities and exact masks.

Predictions: every tile's class probabilities are weighted by an importance map and summed into the full
image, then divided by the summed weights -- what MONAI's ``sliding_window_inference`` does with
``overlap=0.5`` on this grid, so ``"gaussian"`` down-weights the tile borders where a network sees
zero padding instead of context. Probabilities are blended, not logits or argmaxes, so the result is still
a distribution per pixel.

Ground truth: overlapping tiles of one image were cut from the same mask, so they must agree exactly;
a disagreement means the shards are corrupt or mixed up and is an error, never averaged away.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from shardgen.tiling import TileGrid

BLEND_MODES = ("mean", "gaussian")
MIN_WEIGHT = 1e-3  # MONAI's floor for importance weights, so no pixel of a tile is weighted zero


def importance_map(
    tile: int,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(tile, tile) weights; ``gaussian`` equals ``monai.data.utils.compute_importance_map`` exactly.

    MONAI's definition: a separable, unnormalized Gaussian (peak just below 1 for an even tile) with
    sigma = sigma_scale * tile, computed in float32, then clamped from below at max(min weight, 1e-3).
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"unknown blend mode {mode!r}; valid: {', '.join(BLEND_MODES)}")
    if mode == "mean":
        return torch.ones((tile, tile), device=device, dtype=dtype)
    g = gaussian_profile(tile, sigma_scale, device)
    w = g.unsqueeze(-1) * g[None]
    return w.clamp_(min=max(w.min().item(), MIN_WEIGHT)).to(dtype)


def gaussian_profile(tile: int, sigma_scale: float = 0.125, device: torch.device | str = "cpu") -> torch.Tensor:
    """(tile,) float32: the gaussian importance map's separable factor, before its floor."""
    sigma = tile * sigma_scale
    x = torch.arange(-(tile - 1) / 2.0, (tile - 1) / 2.0 + 1, dtype=torch.float, device=device)
    return torch.exp(x**2 / (-2 * sigma**2))


def blend_tiles(
    tile_probs: torch.Tensor, grid: TileGrid, mode: str = "gaussian", sigma_scale: float = 0.125
) -> torch.Tensor:
    """(count, C, tile, tile) tile probabilities in ``grid.positions()`` order -> (C, size, size).

    Each weighted tile is added into its window in place, on whatever device the probabilities live: no
    unfolded copy of the tiles is made (``F.fold`` needs one and was ~8x slower on CPU).
    """
    t, s = grid.tile, grid.image_size
    if tile_probs.ndim != 4 or tile_probs.shape[0] != grid.count or tile_probs.shape[2:] != (t, t):
        raise ValueError(
            f"tile probabilities have shape {tuple(tile_probs.shape)}, expected ({grid.count}, C, {t}, {t})"
        )
    w, weight = _weights(grid, mode, sigma_scale, tile_probs.device, tile_probs.dtype)
    if tile_probs.device.type == "cpu" and t % grid.stride == 0:
        return _blend_cells(tile_probs, grid, w, weight)
    total = grid.paste(tile_probs, tile_probs.new_zeros((tile_probs.shape[1], s, s)), weight=w)
    return total.div_(weight)


def _blend_cells(tile_probs: torch.Tensor, grid: TileGrid, w: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``blend_tiles`` on the CPU, one stride x stride cell of the image at a time: each cell is written by
    its first covering tile, completed by the others in the same (tile) order and divided while it is
    still in cache, so the full image is never zero-filled nor swept again for the division. Same sums in
    the same order as the tile loop: the result is identical."""
    t, st = grid.tile, grid.stride
    per_side, cells = grid.n, grid.image_size // st
    span = t // st  # tiles covering a cell, per axis
    out = tile_probs.new_empty((tile_probs.shape[1], grid.image_size, grid.image_size))
    for ci in range(cells):
        rows = range(max(0, ci - span + 1), min(per_side, ci + 1))
        for cj in range(cells):
            cols = range(max(0, cj - span + 1), min(per_side, cj + 1))
            y, x = ci * st, cj * st
            cell = out[:, y : y + st, x : x + st]
            first = True
            for i in rows:
                for j in cols:
                    oy, ox = y - i * st, x - j * st  # the cell inside tile (i, j)
                    part = tile_probs[i * per_side + j, :, oy : oy + st, ox : ox + st]
                    wpart = w[oy : oy + st, ox : ox + st]
                    if first:
                        torch.mul(part, wpart, out=cell)
                        first = False
                    else:
                        cell.addcmul_(part, wpart)
            cell.div_(weight[:, y : y + st, x : x + st])
    return out


@functools.lru_cache(maxsize=8)
def _weights(grid: TileGrid, mode: str, sigma_scale: float, device: torch.device, dtype: torch.dtype):
    """(importance map (t, t), summed weights of the full image (1, S, S)), the same for every image: made
    once per grid and device, so blending an image neither recomputes them nor waits on the device (the
    map's floor reads its minimum on the host)."""
    t, s = grid.tile, grid.image_size
    w = importance_map(t, mode, sigma_scale, device=device, dtype=dtype)
    weight = grid.paste(w.new_ones((1, t, t)).expand(grid.count, 1, t, t), w.new_zeros((1, s, s)), weight=w)
    return w, weight


def reassemble_mask(tile_masks, grid: TileGrid, image_id: str) -> np.ndarray:
    """(count, tile, tile) integer masks in ``grid.positions()`` order -> (size, size), same dtype.

    Raises ``ValueError`` naming ``image_id`` when overlapping tiles disagree on any pixel.
    """
    tiles = np.asarray(tile_masks)
    t, s = grid.tile, grid.image_size
    if tiles.shape != (grid.count, t, t):
        raise ValueError(
            f"{image_id}: ground-truth tiles have shape {tiles.shape}, expected ({grid.count}, {t}, {t})"
        )
    full = grid.paste(tiles, np.empty((s, s), dtype=tiles.dtype))
    # Every pixel now holds some tile's value; all tiles agree iff each equals its window of the result.
    windows = np.lib.stride_tricks.sliding_window_view(full, (t, t))[:: grid.stride, :: grid.stride]
    differ = windows.reshape(tiles.shape) != tiles
    if differ.any():
        k = int(np.flatnonzero(differ.reshape(grid.count, -1).any(1))[0])
        i, j = grid.positions()[k][:2]
        raise ValueError(
            f"{image_id}: overlapping ground-truth tiles disagree on {int(differ.sum())} tile pixels "
            f"(first at tile ({i}, {j}))"
        )
    return full
