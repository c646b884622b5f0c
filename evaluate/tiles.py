"""The tiles of each image out of a split's shards, checked complete, for full-image evaluation.

shardgen writes the ``count`` tiles of an image consecutively in one shard, in ``TileGrid.positions()``
order, keyed ``{image_id}_{i}_{j}``. An image is read as one group of consecutive keys and must hold exactly
those tiles in that order; each shard must hold as many images and samples as the manifest says. Anything
else -- a missing, repeated or misplaced tile, an image split across shards, a shard that is shorter or
longer than recorded, a sample that does not decode -- is an ``EvaluateError`` naming the shard and the
image: scoring fewer images than the split has would report a number for a different test set.

Images are dealt round-robin to ranks by their position in the split (image k goes to rank k % world,
as in training's validation), and shards to DataLoader workers; every rank still reads every key, so the
structure checks see the whole split, but decodes only its own images.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shardgen import schema
from shardgen.reader import CorruptSample, iter_shard
from shardgen.tiling import TileGrid
from trainer.batch import carry, uncarry

from . import EvaluateError


@dataclass
class ImageTiles:
    image_id: str
    shard: str  # URL of the shard holding the image
    meta: dict  # the first tile's json (source_image, crop_box, ...)
    images: torch.Tensor  # uint8 (count, C, t, t), grid order
    masks: torch.Tensor  # uint8 (count, t, t), grid order


def grid_of(manifest: dict) -> TileGrid:
    """The manifest's tile grid, which must agree with its ``tiles_per_image``."""
    url = manifest.get("_url", "manifest")
    try:
        grid = TileGrid(int(manifest["image_size"]), int(manifest["tile"]), int(manifest["stride"]))
    except (KeyError, TypeError, ValueError) as e:
        raise EvaluateError(f"{url}: no valid tile grid: {e}") from None
    if manifest.get("tiles_per_image") != grid.count:
        raise EvaluateError(
            f"{url}: tiles_per_image is {manifest.get('tiles_per_image')}, the grid {grid} has {grid.count}"
        )
    return grid


def _split_key(url: str, key: str) -> tuple[str, int, int]:
    """(image_id, row, col) of a sample key. The image id names output files, so it must be a plain name."""
    try:
        image_id, i, j = schema.parse_key(key)
    except ValueError:
        raise EvaluateError(f"{url}: sample key {key!r} is not IMAGEID_ROW_COL") from None
    if not image_id or image_id.startswith(".") or any(c in image_id for c in "/\\\0"):
        raise EvaluateError(f"{url}: sample key {key!r}: image id {image_id!r} is not a plain file name")
    return image_id, i, j


def _groups(url: str, retries: int) -> Iterator[tuple[str, list[tuple[str, dict]]]]:
    """(image_id, [(key, parts), ...]) for each run of consecutive keys of one image in a shard."""
    current, group = None, []
    try:
        for key, parts in iter_shard(url, retries=retries):
            image_id = _split_key(url, key)[0]
            if image_id != current and group:
                yield current, group
                group = []
            current = image_id
            group.append((key, parts))
    except FileNotFoundError:
        raise EvaluateError(f"{url}: shard not found") from None
    except CorruptSample as e:
        raise EvaluateError(str(e)) from None
    except OSError as e:  # StorageUnavailable after the retries, permissions, ...
        raise EvaluateError(str(e) if url in str(e) else f"{url}: cannot read shard: {e}") from None
    if group:
        yield current, group


def _check_keys(url: str, image_id: str, keys: list[str], grid: TileGrid) -> None:
    expected = [schema.sample_key(image_id, i, j) for i, j, _, _ in grid.positions()]
    if keys == expected:
        return
    have = set(keys)
    missing = [k.removeprefix(image_id + "_") for k in expected if k not in have]
    if missing:
        raise EvaluateError(
            f"{url}: image {image_id!r} is incomplete: {len(have & set(expected))} of {grid.count} tiles, "
            f"missing tile {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
        )
    if len(keys) != len(expected):
        raise EvaluateError(f"{url}: image {image_id!r} has {len(keys)} tiles, expected {grid.count}")
    k = next(k for k, (a, b) in enumerate(zip(keys, expected, strict=True)) if a != b)
    raise EvaluateError(f"{url}: image {image_id!r}: tile {k} is {keys[k]!r}, expected {expected[k]!r}")


def _decode(url: str, image_id: str, group, grid: TileGrid, channels: int) -> ImageTiles:
    images, masks, first = [], [], None
    for (key, parts), (i, j, y, x) in zip(group, grid.positions(), strict=True):
        try:
            image, mask, meta = schema.decode_sample(parts)
        except Exception as e:  # a bad member fails in PIL, zlib or json in many ways
            raise EvaluateError(f"{url}: sample {key!r}: cannot decode: {type(e).__name__}: {e}") from None
        t = grid.tile
        if image.shape != (channels, t, t) or mask.shape != (t, t):
            raise EvaluateError(
                f"{url}: sample {key!r}: image {image.shape} and mask {mask.shape}, expected "
                f"({channels}, {t}, {t}) and ({t}, {t})"
            )
        where = (meta.get("image_id"), meta.get("row"), meta.get("col"), meta.get("y"), meta.get("x"))
        if where != (image_id, i, j, y, x):
            raise EvaluateError(
                f"{url}: sample {key!r}: its json places it at {json.dumps(where)}, expected "
                f"{json.dumps([image_id, i, j, y, x])}"
            )
        images.append(image)
        masks.append(mask)
        first = first or meta
    return ImageTiles(
        image_id, url, first, torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))
    )


def iter_images(
    manifest: dict,
    split: str,
    rank: int = 0,
    world: int = 1,
    shards: list[int] | None = None,
    retries: int = 6,
) -> Iterator[ImageTiles]:
    """The decoded tiles of this rank's images, shard by shard (all shards, or the indices in ``shards``)."""
    grid = grid_of(manifest)
    records = schema.split_info(manifest, split)["shards"]
    urls = schema.shard_urls(manifest, split)
    offsets = schema.image_offsets(manifest, split)
    for k in range(len(urls)) if shards is None else shards:
        url, record = urls[k], records[k]
        seen, samples = set(), 0
        for image_id, group in _groups(url, retries):
            if image_id in seen:
                raise EvaluateError(f"{url}: the tiles of image {image_id!r} are not consecutive")
            _check_keys(url, image_id, [key for key, _ in group], grid)
            index = offsets[k] + len(seen)
            seen.add(image_id)
            samples += len(group)
            if index % world == rank:
                yield _decode(url, image_id, group, grid, manifest["channels"])
        if (len(seen), samples) != (record["images"], record["samples"]):
            raise EvaluateError(
                f"{url}: holds {len(seen)} images in {samples} samples, the manifest says "
                f"{record['images']} images in {record['samples']} samples"
            )


class _Images(IterableDataset):
    """``iter_images`` for one rank, shards dealt to DataLoader workers. An EvaluateError travels as an item
    (trainer.batch) so the main process reports it in one line instead of a worker traceback."""

    def __init__(self, manifest: dict, split: str, rank: int, world: int):
        self.manifest, self.split, self.rank, self.world = manifest, split, rank, world

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        n = len(schema.split_info(self.manifest, self.split)["shards"])
        shards = list(range(worker, n, workers))
        return carry(iter_images(self.manifest, self.split, self.rank, self.world, shards), EvaluateError)


def image_loader(manifest: dict, split: str, rank: int, world: int, workers: int) -> Iterator[ImageTiles]:
    """This rank's images, decoded by ``workers`` processes (0: in this process); raises EvaluateError."""
    n = len(schema.split_info(manifest, split)["shards"])
    loader = DataLoader(
        _Images(manifest, split, rank, world),
        batch_size=None,
        num_workers=min(workers, n),
        collate_fn=_identity,
    )
    for item in loader:
        yield uncarry(item)


def _identity(item):
    return item
