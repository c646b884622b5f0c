"""Crust removal and the 1200x1200 resize, and their inverse.

The crust is the border rows and columns that are entirely black (every colour channel exactly 0 in the
source values, before any scaling to 8 bits). The crop box is the
bounding box of the remaining content; the crop is resized to ``size x size``: the image with Lanczos, the
mask with nearest so class ids stay exact. ``Geometry`` records the crop box and scale so that predictions
can be mapped back onto the original scan (``uncrop``); evaluate imports this module rather than copying it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scanfile import DEFAULT_MAX_PIXELS, ScanError, read_scan, to_8bit

# A crust crop enlarged more than this to the training square is warned about: its detail is interpolated
# (a 100 px scan reaches 1200 px at 12x) and small defects are blurred over many pixels.
UPSCALE_WARNING = 2.0


class CrustError(ScanError):
    """The scan has no content once the crust is removed."""


@dataclass(frozen=True)
class Geometry:
    width: int  # original scan width
    height: int  # original scan height
    box: tuple[int, int, int, int]  # crop box (left, top, right, bottom), right/bottom exclusive
    size: int  # side of the square the crop is resized to

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): resized pixels per source pixel."""
        left, top, right, bottom = self.box
        return self.size / (right - left), self.size / (bottom - top)

    @property
    def upscale(self) -> float:
        """How much the crop is enlarged along its shorter side (below 1: it is reduced)."""
        return max(self.scale)


def crust_box(pixels: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the non-black content of an (H, W) or (H, W, C) array; None if all black."""
    # Reductions run over long contiguous axes: any() over a trailing axis of 3 channels is ~30x slower.
    rows = np.flatnonzero(pixels.reshape(pixels.shape[0], -1).any(axis=1))
    if rows.size == 0:
        return None
    cols = pixels.any(axis=0)
    cols = np.flatnonzero(cols.any(axis=1) if cols.ndim == 2 else cols)
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def geometry_of(pixels: np.ndarray, size: int = 1200, name: str = "image") -> Geometry:
    box = crust_box(pixels)
    if box is None:
        raise CrustError(f"{name}: image is entirely black, no content after crust removal")
    return Geometry(width=pixels.shape[1], height=pixels.shape[0], box=box, size=size)


def open_scan(
    data: bytes, name: str, channels: int, size: int = 1200, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, Geometry]:
    """Decode a scan and find its crust: (the scan as L or RGB for ``channels`` 1 or 3, its geometry).

    The crust is judged on the source values (``shardgen.scanfile.read_scan``: upright, alpha dropped,
    16-bit and float kept) before they are scaled to 8 bits: a pixel is crust only if every channel is
    exactly 0, so a 16-bit value of 1..128 is content although it rounds to 0. A colour scan becomes grey
    through Pillow's ``convert("L")`` after the 8-bit scaling. shardgen's build and evaluate's predict both
    read scans through this, so a model sees at prediction time exactly the preprocessing it was trained on.
    ``ScanError`` names ``name`` for an unreadable, oversized (``max_pixels``) or unsupported scan.
    """
    pixels = read_scan(data, name, max_pixels)
    geom = geometry_of(pixels, size, name=name)
    image = Image.fromarray(to_8bit(pixels))
    del pixels  # the source copy may be twice the 8-bit one: free it before the caller resizes
    wanted = "RGB" if channels == 3 else "L"
    return (image if image.mode == wanted else image.convert(wanted)), geom


def crop_resize(image: Image.Image, geom: Geometry, resample=Image.Resampling.LANCZOS) -> Image.Image:
    """Crop ``image`` to the crust box and resize it to ``geom.size`` square."""
    return image.resize((geom.size, geom.size), resample=resample, box=geom.box)


def crop_resize_mask(mask: np.ndarray, geom: Geometry) -> np.ndarray:
    """The mask counterpart of ``crop_resize``: nearest, so labels stay exact."""
    out = Image.fromarray(mask).resize((geom.size, geom.size), Image.Resampling.NEAREST, box=geom.box)
    return np.asarray(out)


def uncrop(mask: np.ndarray, geom: Geometry, fill: int = 0) -> np.ndarray:
    """Map a ``size x size`` mask back onto the original scan: undo the resize (nearest), re-pad the crust."""
    left, top, right, bottom = geom.box
    back = Image.fromarray(mask).resize((right - left, bottom - top), Image.Resampling.NEAREST)
    out = np.full((geom.height, geom.width), fill, dtype=mask.dtype)
    out[top:bottom, left:right] = np.asarray(back)
    return out


def geometry_from_meta(meta: dict) -> Geometry:
    """The crop geometry recorded in a tile's json (for mapping predictions back onto the scan)."""
    w, h = meta["source_size"]
    return Geometry(width=w, height=h, box=tuple(meta["crop_box"]), size=meta["image_size"])
