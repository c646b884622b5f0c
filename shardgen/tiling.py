"""The tile grid: 400x400 tiles at stride 200 over the 1200x1200 crop, 25 tiles per image.

Tile (i, j) covers rows ``y = stride*i .. y+tile`` and columns ``x = stride*j .. x+tile``; tiles are listed
row-major (i outer, j inner), the order in which shardgen writes them and evaluate reassembles them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TileGrid:
    image_size: int = 1200  # side of the square crop the tiles cover
    tile: int = 400  # side of one tile
    stride: int = 200  # step between tile origins

    def __post_init__(self):
        if self.tile <= 0 or self.stride <= 0 or self.image_size <= 0:
            raise ValueError(f"tile grid sizes must be positive: {self}")
        if self.tile > self.image_size:
            raise ValueError(f"tile {self.tile} is larger than the image {self.image_size}")
        if (self.image_size - self.tile) % self.stride:
            raise ValueError(
                f"tile grid does not cover the image exactly: ({self.image_size} - {self.tile}) "
                f"is not a multiple of stride {self.stride}"
            )
        if self.stride > self.tile:
            raise ValueError(f"stride {self.stride} > tile {self.tile} leaves gaps between tiles")

    @property
    def n(self) -> int:
        """Tiles per side."""
        return (self.image_size - self.tile) // self.stride + 1

    @property
    def count(self) -> int:
        """Tiles per image."""
        return self.n * self.n

    def positions(self) -> list[tuple[int, int, int, int]]:
        """(i, j, y, x) for every tile, row-major."""
        return [(i, j, i * self.stride, j * self.stride) for i in range(self.n) for j in range(self.n)]

    def cut(self, image, channels_last: bool = False) -> list:
        """The tiles of ``image`` as views, in ``positions()`` order: an (S, S) or (C, S, S) numpy array or
        torch tensor gives (t, t) or (C, t, t) tiles; with ``channels_last``, (S, S, C) gives (t, t, C)."""
        t = self.tile
        if channels_last:
            return [image[y : y + t, x : x + t] for _, _, y, x in self.positions()]
        return [image[..., y : y + t, x : x + t] for _, _, y, x in self.positions()]

    def paste(self, tiles, out, weight=None):
        """Put ``tiles`` ((count, ..., t, t), ``positions()`` order) into ``out`` (..., S, S) and return it.

        Without ``weight`` each tile is assigned to its window, so where tiles overlap the later one stays
        (tiles cut from one image agree there). With ``weight`` (t, t), each tile is multiplied by it and
        added in place: the weighted sum that blending divides by the summed weights.
        """
        if len(tiles) != self.count:
            raise ValueError(f"{len(tiles)} tiles for a grid of {self.count}")
        t = self.tile
        for k, (_, _, y, x) in enumerate(self.positions()):
            window = out[..., y : y + t, x : x + t]
            if weight is None:
                window[...] = tiles[k]
            elif hasattr(window, "addcmul_"):  # torch: no temporary for the product
                window.addcmul_(tiles[k], weight)
            else:
                window += tiles[k] * weight
        return out
