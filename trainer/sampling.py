"""Defect-aware batch composition and random crops for the training stream (nnU-Net's foreground
oversampling, adapted to a streamed, resampled dataset).

Defects cover well under 1% of a scan's pixels, so uniformly drawn tiles teach a network mostly background.
``DefectPool`` keeps, per defect class, the most recent training samples holding that class (their raw tar
members: nothing is decoded until a sample is drawn), chosen from the per-tile ``class_pixels`` that every
sample's json carries. Each batch then takes ``defect_share`` of its samples, in expectation, as "forced"
samples from the pool -- a class drawn uniformly among the classes in the pool, then a tile holding it --
and the rest from the shuffled stream as before (a batch may draw all of its samples from the pool once the
pool holds any). With ``data.crop`` set, every sample is cut to a random ``crop x crop`` window; a forced
sample's window is centred on a random *object* of its class (an 8-connected component, drawn uniformly,
then a random pixel of it in the window's central half), so the defect is seen with context rather than at
a border. Drawing a pixel of the class uniformly instead (nnU-Net's rule) centres the crops on whatever
object has the most pixels: a 5,000 px cloud beside a 13 px pinpoint gets the window 385 times for each
time the pinpoint gets it, and small defects, which decide object recall, are hardly ever the lesson.

All draws come from the worker's seeded ``random.Random``: the same seed gives the same batches.
"""

from __future__ import annotations

import random
from collections import deque

import numpy as np
import torch
from scipy import ndimage

from .decision import EIGHT  # 8-connectivity: objects as the object metrics count them


def defect_classes(meta: dict) -> list[int]:
    """Class ids 1.. that have pixels in this tile, from the sample json's ``class_pixels``."""
    return [c for c, n in enumerate(meta["class_pixels"]) if c > 0 and n > 0]


def forced_count(share: float, batch_size: int, rng: random.Random) -> int:
    """Samples of one batch to draw from the defect pool: ``share * batch_size`` in expectation, as its
    floor plus one more with probability its fraction. Rounding instead would force 3 of 4 for a share of
    0.67 (0.75). A whole ``share * batch_size`` needs no draw and takes none from ``rng``, so a stream
    without the sampler (share 0) is not perturbed by it."""
    whole, frac = divmod(share * batch_size, 1.0)
    return int(whole) + (frac > 0 and rng.random() < frac)


class DefectPool:
    """The last ``per_class`` samples seen that hold each defect class (a sample with k classes is in k lists)."""

    def __init__(self, per_class: int):
        self.per_class = per_class
        self.by_class: dict[int, deque] = {}

    def add(self, sample, classes: list[int]) -> None:
        for c in classes:
            self.by_class.setdefault(c, deque(maxlen=self.per_class)).append(sample)

    def __bool__(self) -> bool:
        return bool(self.by_class)

    def draw(self, rng: random.Random):
        """(class id, sample): the class uniformly among those held, then one of its samples; None if empty."""
        if not self.by_class:
            return None
        c = rng.choice(sorted(self.by_class))
        held = self.by_class[c]
        return c, held[rng.randrange(len(held))]

    def discard(self, sample) -> None:
        """Forget a sample (it turned out unreadable), so it is not drawn again."""
        for c in list(self.by_class):
            kept = deque((s for s in self.by_class[c] if s is not sample), maxlen=self.per_class)
            if kept:
                self.by_class[c] = kept
            else:
                del self.by_class[c]


def crop_window(mask: torch.Tensor, size: int, rng: random.Random, focus: int | None = None) -> tuple[int, int]:
    """Top-left (y, x) of a ``size`` window in the (H, W) ``mask``: uniform, or, with ``focus``, placed so
    that a random pixel of a random object (8-connected component) of class ``focus`` lies in the window's
    central half."""
    h, w = mask.shape
    if focus is not None:
        objects, n = ndimage.label(np.asarray(mask) == focus, EIGHT)  # torch tensor or numpy view alike
        if n:
            pick = rng.randint(1, n)  # objects, not pixels: see the module docstring
            ys, xs = np.nonzero(objects == pick)
            k = rng.randrange(len(ys))
            return _around(int(ys[k]), h, size, rng), _around(int(xs[k]), w, size, rng)
    return rng.randint(0, h - size), rng.randint(0, w - size)


def _around(p: int, extent: int, size: int, rng: random.Random) -> int:
    low, high = p - (3 * size) // 4 + 1, p - size // 4  # p within [start + size/4, start + 3 size/4)
    low, high = max(0, low), min(extent - size, high)
    return rng.randint(low, high) if low <= high else min(max(0, p - size // 2), extent - size)


def crop(image, mask, size: int, rng: random.Random, focus: int | None = None):
    """(image (C, H, W), mask (H, W)), torch tensors or numpy arrays, cut to ``size x size`` (see
    crop_window) as views; unchanged if size is 0."""
    if not size:
        return image, mask
    if size > mask.shape[0] or size > mask.shape[1]:
        raise ValueError(f"data.crop={size} is larger than the {tuple(mask.shape)} tiles")
    y, x = crop_window(mask, size, rng, focus)
    return image[:, y : y + size, x : x + size], mask[y : y + size, x : x + size]
