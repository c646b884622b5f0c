"""Error overlays: a scan with its prediction, ground truth and pixel errors drawn in one RGB image; and the
scan twice, side by side, with the truth filled in on the left and the prediction on the right.

Markings:

* prediction: filled in its class colour at ``FILL_ALPHA``;
* ground truth: its class colour as a ``CONTOUR_WIDTH``-px outline along the inside of each region;
* false positive (a defect class predicted where the truth says otherwise): magenta ``/`` hatching;
* false negative (a defect in the truth that the prediction calls something else): cyan ``\\`` hatching;
  a defect predicted as the wrong defect class is both, so it shows as a magenta/cyan cross-hatch;
* ignored truth (255): darkened with gray, and never marked as an error.

``side_by_side`` fills each class map in its class colour at ``FILL_ALPHA`` (ignored truth darkened on the
left), with a ``SEPARATOR_WIDTH``-px white band between the halves, so both are at the scan's own scale.

Magenta and cyan are kept out of ``PALETTE`` so errors never read as a class. ``legend_swatches`` draws each
marking with ``overlay`` itself, so the report's legend cannot drift from the pictures.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from shardgen.classes import IGNORE_INDEX

# Background (unused for drawing) then ten defect colours from Trubetskoy's distinct-colour list.
PALETTE = np.array(
    [
        (0, 0, 0),
        (230, 25, 75),  # red
        (60, 180, 75),  # green
        (255, 225, 25),  # yellow
        (67, 99, 216),  # blue
        (245, 130, 49),  # orange
        (145, 30, 180),  # purple
        (191, 239, 69),  # lime
        (70, 153, 144),  # teal
        (154, 99, 36),  # brown
        (250, 190, 212),  # pink
    ],
    dtype=np.uint8,
)
IGNORE_COLOR = (64, 64, 64)  # dark gray: ignored truth is darkened
FP_COLOR = (255, 0, 255)  # magenta
FN_COLOR = (0, 255, 255)  # cyan
FILL_ALPHA = 0.4
IGNORE_ALPHA = 0.6
CONTOUR_WIDTH = 2
HATCH_PERIOD = 8  # pixels between hatch lines
HATCH_WIDTH = 2  # pixels per hatch line
SEPARATOR_WIDTH = 4  # white columns between the truth and prediction halves of ``side_by_side``
SEPARATOR_COLOR = (255, 255, 255)

LEGEND_BACKDROP = 160  # gray level of the blank scan behind legend swatches


def legend_swatches(size: int = 32) -> list[tuple[str, str, np.ndarray]]:
    """(label, description, RGB swatch) per marking, each swatch drawn by ``overlay`` itself."""
    blank = np.zeros((size, size), np.uint8)
    square = blank.copy()
    square[size // 4 : size - size // 4, size // 4 : size - size // 4] = 1
    full = np.ones_like(blank)
    half_ignored = blank.copy()
    half_ignored[:, : size // 2] = IGNORE_INDEX
    cases = [
        ("Correct", "prediction fill (class colour) inside the truth outline", square, square),
        ("False positive", "magenta / hatching: defect predicted where the truth disagrees", full, blank),
        ("False negative", "cyan \\ hatching: a true defect predicted as something else", blank, square),
        ("Wrong class", "magenta and cyan cross-hatch: predicted as another defect class", full, 2 * full),
        ("Ignored", "darkened (left half): unlabelled truth, never scored", blank, half_ignored),
    ]
    backdrop = np.full((size, size), LEGEND_BACKDROP, np.uint8)
    return [(label, text, overlay(backdrop, pred, target)) for label, text, pred, target in cases]


def _blend(rgb: np.ndarray, where: np.ndarray, color, alpha: float) -> None:
    rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(color, np.float32)


def _scan_and_maps(image, maps: dict, palette) -> tuple[np.ndarray, np.ndarray]:
    """The checked scan as (H, W, 3) float32 and the palette as uint8; ``maps``: {what it is: (H, W) class map}."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image must be (H, W) or (H, W, 3) uint8, got {image.shape} {image.dtype}")
    hw = image.shape[:2]
    if any(np.shape(m) != hw for m in maps.values()):
        sizes = ", ".join(f"{name} {np.shape(m)}" for name, m in maps.items())
        raise ValueError(f"image {hw}, {sizes} differ in size")
    palette = np.asarray(palette, np.uint8)
    for name, m in maps.items():
        if (m[m != IGNORE_INDEX] >= len(palette)).any():
            raise ValueError(f"{name} has class ids beyond the {len(palette)}-colour palette")
    rgb = (np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image).astype(np.float32)
    return rgb, palette


def _fill(rgb: np.ndarray, classes: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Blend each defect class (ids > 0, ignore excluded) into ``rgb`` in place; returns the class ids."""
    c = np.where(classes == IGNORE_INDEX, 0, classes).astype(np.intp)
    rgb[c > 0] = (1 - FILL_ALPHA) * rgb[c > 0] + FILL_ALPHA * palette[c[c > 0]]
    return c


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return rgb.round().clip(0, 255).astype(np.uint8)


def overlay(
    image: np.ndarray, pred: np.ndarray, target: np.ndarray | None = None, palette: np.ndarray = PALETTE
) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 scan + (H, W) class maps -> (H, W, 3) uint8 overlay (see module doc)."""
    pred = np.asarray(pred)
    maps = {"prediction": pred} if target is None else {"prediction": pred, "truth": np.asarray(target)}
    rgb, palette = _scan_and_maps(image, maps, palette)
    p = _fill(rgb, pred, palette)
    if target is None:
        return _to_uint8(rgb)

    target = np.asarray(target)
    hw = target.shape
    ignored = target == IGNORE_INDEX
    _blend(rgb, ignored, IGNORE_COLOR, IGNORE_ALPHA)

    t = np.where(ignored, 0, target).astype(np.intp)
    yy, xx = np.indices(hw)
    fp = (p > 0) & (p != t) & ~ignored
    fn = (t > 0) & (p != t)
    rgb[fp & ((xx + yy) % HATCH_PERIOD < HATCH_WIDTH)] = FP_COLOR
    rgb[fn & ((xx - yy) % HATCH_PERIOD < HATCH_WIDTH)] = FN_COLOR

    # Inner band of every truth region: pixels within CONTOUR_WIDTH of another label or the image edge.
    size = 2 * CONTOUR_WIDTH + 1
    edge = (ndimage.maximum_filter(t, size, mode="constant") != t) | (
        ndimage.minimum_filter(t, size, mode="constant") != t
    )
    edge &= t > 0
    rgb[edge] = palette[t[edge]]
    return _to_uint8(rgb)


def side_by_side(image: np.ndarray, pred: np.ndarray, target: np.ndarray, palette: np.ndarray = PALETTE) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 scan + (H, W) class maps -> (H, 2 W + SEPARATOR_WIDTH, 3) uint8: the truth
    filled in (ignored pixels darkened) on the left, the prediction filled in on the right."""
    target = np.asarray(target)
    truth, palette = _scan_and_maps(image, {"prediction": np.asarray(pred), "truth": target}, palette)
    guess = truth.copy()
    _fill(truth, target, palette)
    _blend(truth, target == IGNORE_INDEX, IGNORE_COLOR, IGNORE_ALPHA)
    _fill(guess, np.asarray(pred), palette)
    band = np.full((truth.shape[0], SEPARATOR_WIDTH, 3), SEPARATOR_COLOR, np.uint8)
    return np.concatenate([_to_uint8(truth), band, _to_uint8(guess)], axis=1)
