"""Rasterizing the CVAT shapes of one image into a uint8 label mask at the image's own resolution.

Coordinate convention: CVAT coordinates are continuous and its canvas shows pixel (row i, column j) over
[j, j+1) x [i, i+1), so a vertex at (x, y) lies in pixel (floor y, floor x): x = 2.7 is column 2.
Coordinates go to PIL unchanged; PIL truncates them to exactly that pixel and draws between those pixels.
A polygon is filled *and* given PIL's 1 px outline, so the pixels along its boundary are painted, not
only those whose centres fall inside: the square 2,2..5,5 paints rows and columns 2..5 inclusive, and a box
xtl=0..xbr=4 paints columns 0..4. Thin defects (needles, feathers) are often drawn as polylines or points;
a polyline becomes a ``polyline_width`` px stroke with round ends, a point the disc of pixels within
``point_radius`` of the pixel containing it (radius 2: 13 pixels).

Shapes are painted in ascending ``z_order``, document order breaking ties, each over the previous ones, so
the result is what CVAT shows. Which value a shape paints (or whether it paints at all) is the caller's
label policy, passed in as ``value_of``. Everything outside the canvas is clipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .cvat import CvatError, ImageAnnotation, Shape

# PIL draws in 32-bit integers and silently paints nothing for coordinates near 2**31; CVAT coordinates lie
# within a few pixels of the image, so anything this far out is a corrupt file, not a shape to clip.
COORD_LIMIT = 1e6
# Ellipses become polygons whose chords deviate from the true curve by at most this many pixels.
ELLIPSE_CHORD_ERROR = 0.05

Point = tuple[float, float]


@dataclass
class RasterStats:
    """What rasterization left out: counts per reason, and one ``FILE:LINE: reason`` warning per shape."""

    skipped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.warnings.append(f"{where}: {reason}")


def decode_rle(counts: Sequence[int], width: int, height: int) -> np.ndarray:
    """CVAT mask RLE -> bool (height, width): alternating run lengths, background first, row-major."""
    runs = np.asarray(counts, dtype=np.int64)
    if runs.ndim != 1 or (runs < 0).any():
        raise ValueError(f"RLE counts must be non-negative integers, got {list(counts)[:8]}...")
    if runs.sum() != width * height:
        raise ValueError(f"RLE covers {runs.sum()} pixels, a {width}x{height} box has {width * height}")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(height, width)


def encode_rle(mask: np.ndarray) -> tuple[int, ...]:
    """bool (height, width) -> CVAT mask RLE, the inverse of ``decode_rle``: run lengths, background first."""
    flat = np.asarray(mask, dtype=bool).ravel()
    if flat.size == 0:
        raise ValueError("cannot encode an empty mask")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size])))
    # CVAT's runs alternate starting with background: a mask whose first pixel is set opens with a 0 run.
    return tuple(int(r) for r in (np.concatenate(([0], runs)) if flat[0] else runs))


def rasterize(
    ann: ImageAnnotation,
    value_of: Callable[[Shape], int | None],
    *,
    polyline_width: int = 3,
    point_radius: int = 2,
    stats: RasterStats | None = None,
) -> np.ndarray:
    """The (height, width) uint8 mask of ``ann``: 0 where no shape paints, else the topmost shape's value."""
    if polyline_width < 1 or point_radius < 0:
        raise ValueError(
            f"polyline_width must be >= 1 and point_radius >= 0, got {polyline_width}, {point_radius}"
        )
    stats = stats if stats is not None else RasterStats()
    canvas = Image.new("L", (ann.width, ann.height), 0)
    draw = ImageDraw.Draw(canvas)
    for shape in sorted(ann.shapes, key=lambda s: (s.z_order, s.order)):
        value = value_of(shape)
        if value is None:
            continue
        where = f"{ann.xml_file}:{shape.line}"
        if not 0 <= value <= 255:
            raise ValueError(
                f"{where}: label {shape.label!r} maps to {value}, outside the uint8 range 0..255"
            )
        reason = _unpaintable(shape)
        if reason:
            stats.skip(where, reason)
            continue
        if shape.kind == "mask":
            _paint_mask(canvas, shape, value)
            continue
        vertices = _vertices(shape)
        if any(abs(c) > COORD_LIMIT for xy in vertices for c in xy):
            raise CvatError(f"{where}: <{shape.kind}> has a coordinate beyond +-{COORD_LIMIT:g}")
        if shape.kind == "polyline":
            draw.line(vertices, fill=value, width=polyline_width, joint="curve")
            # PIL ends wide lines flat at the end points; round caps make a stroke reach past its end points.
            _paint_discs(draw, canvas.size, [vertices[0], vertices[-1]], polyline_width / 2, value)
        elif shape.kind == "points":
            _paint_discs(draw, canvas.size, vertices, point_radius, value)
        else:
            _paint_polygon(draw, vertices, value)
    return np.array(canvas)


def _unpaintable(shape: Shape) -> str | None:
    """Why a shape has no area to paint, or None."""
    minimum = {"polygon": 3, "polyline": 2, "points": 1}.get(shape.kind, 0)
    if len(shape.points) < minimum:
        return f"{shape.kind} with fewer than {minimum} points"
    return None


def _vertices(shape: Shape) -> list[Point]:
    """Polygon/polyline/points: their points; box and ellipse: the outline polygon, rotation applied."""
    if shape.kind == "box":
        (xtl, ytl), (xbr, ybr) = shape.points
        corners = [(xtl, ytl), (xbr, ytl), (xbr, ybr), (xtl, ybr)]
        return _rotate(corners, ((xtl + xbr) / 2, (ytl + ybr) / 2), shape.rotation)
    if shape.kind == "ellipse":
        (cx, cy), (rx, ry) = shape.points
        rx, ry = abs(rx), abs(ry)
        # A chord spanning angle a deviates from a circle of radius r by r * (1 - cos(a / 2)) ~ r a^2 / 8.
        n = max(16, math.ceil(2 * math.pi / math.sqrt(8 * ELLIPSE_CHORD_ERROR / max(rx, ry, 1.0))))
        outline = [
            (cx + rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n))
            for k in range(n)
        ]
        return _rotate(outline, (cx, cy), shape.rotation)
    return list(shape.points)


def _rotate(points: list[Point], centre: Point, degrees: float) -> list[Point]:
    """Rotate about ``centre`` by CVAT's ``rotation``: degrees, clockwise on screen (y points down)."""
    if not degrees:
        return points
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    cx, cy = centre
    return [(cx + (x - cx) * cos - (y - cy) * sin, cy + (x - cx) * sin + (y - cy) * cos) for x, y in points]


def _paint_polygon(draw: ImageDraw.ImageDraw, vertices: list[Point], value: int) -> None:
    draw.polygon(vertices, fill=value)
    # PIL's fill alone leaves out some pixels on slanted edges; the outline puts the whole boundary in.
    draw.line([*vertices, vertices[0]], fill=value, width=1)


def _paint_discs(
    draw: ImageDraw.ImageDraw, size: tuple[int, int], centres: list[Point], radius: float, value: int
) -> None:
    """Around the pixel containing each centre, every pixel within ``radius`` (radius 2: 13 pixels)."""
    width, height = size
    reach = math.floor(radius)
    offsets = [
        (dx, dy)
        for dy in range(-reach, reach + 1)
        for dx in range(-reach, reach + 1)
        if dx * dx + dy * dy <= radius * radius
    ]
    pixels = []
    for x, y in centres:
        px, py = math.floor(x), math.floor(y)
        pixels.extend((px + dx, py + dy) for dx, dy in offsets)
    pixels = [(x, y) for x, y in pixels if 0 <= x < width and 0 <= y < height]
    if pixels:
        draw.point(pixels, fill=value)


def _paint_mask(canvas: Image.Image, shape: Shape, value: int) -> None:
    left, top, width, height = shape.mask_box
    mask = decode_rle(shape.rle, width, height)
    # Clip the box to the canvas here rather than trusting PIL with arbitrarily large offsets.
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + width, canvas.width), min(top + height, canvas.height)
    if x0 >= x1 or y0 >= y1:
        return
    part = mask[y0 - top : y1 - top, x0 - left : x1 - left]
    canvas.paste(value, (x0, y0, x1, y1), Image.fromarray(part.astype(np.uint8) * 255))
