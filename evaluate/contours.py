"""Class maps -> CVAT shapes: one polygon or mask per connected component of each defect class.

A component is 8-connected, as in the object metrics. It becomes

* a **polygon** when it has no hole: its outline follows the pixel edges (the "crack" boundary, clockwise on
  screen, passing diagonal contacts so an 8-connected component stays one polygon) with every right and
  bottom edge pulled in by ``EDGE_INSET`` px. Pixel (row i, column j) covers [j, j+1) x [i, i+1) in CVAT
  coordinates, so the outline's left/top edges lie on the pixel's own edge and its right/bottom edges at
  j + 1 - EDGE_INSET. That one polygon is exact under both rasterization rules in use: pixel-centre
  inclusion (CVAT, datumaro and pycocotools: the centre j + 0.5 is inside for any inset below 0.5) and
  ``shardgen.raster``'s fill-plus-outline with coordinates truncated to their pixel (every vertex lies in a
  pixel of the component for any inset above 0). 0.25 is the middle of that interval. Even 1-pixel
  components and 1-pixel lines have an exact polygon, so nothing is dropped.
* a **mask** (CVAT RLE over the component's bounding box) when it has a hole (a background region that is
  4-connected only to itself), or for every component with ``masks="all"``. A polygon cannot carry a hole:
  CVAT would fill it. With ``masks="none"`` (for a consumer that takes polygons only, as CVAT's
  ``conv_mask_to_poly`` asks) such a component is written as the polygon of its outer outline, holes filled.

``simplify`` > 0 runs Douglas-Peucker on the exact outline; a simplified polygon is kept only if it still
rasterizes, under both rules, to at least ``min_iou`` IoU of its component, else the tolerance is halved
(down to ``MIN_TOLERANCE``, then the exact outline is written). Shapes are listed largest bounding box first,
so when simplified outlines overlap a neighbour the smaller shape is painted on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from shardgen.cvat import AttributeSpec, ImageAnnotation, Shape
from shardgen.raster import encode_rle, rasterize
from trainer.decision import EIGHT as EIGHT_CONNECTED  # the one 8-connectivity

EDGE_INSET = 0.25  # px the right/bottom edges are pulled in; any value in (0, 0.5) is exact for both rules
MASK_POLICIES = ("holes", "all", "none")
DEFAULT_SIMPLIFY = 1.0  # px: beyond 1 px the IoU floor stops most further removal (bench/README.md)
DEFAULT_MIN_IOU = 0.9  # a simplified polygon must keep this IoU with its component, else it is simplified less
MIN_TOLERANCE = 0.2  # px; below this Douglas-Peucker removes almost nothing: write the exact outline instead
# CVAT number attribute (min, max, step): integers, as CVAT's SDK validates them; the mean probability in percent.
SCORE = AttributeSpec("score", "number", ("0", "100", "1"), "0")

Point = tuple[float, float]
# Heading (dx, dy) on screen (y grows downwards) -> the pixels ahead-left, ahead-right and behind-right of
# the corner just reached, as (row, col) offsets from the corner (x, y); pixel (r, c) has top-left corner (c, r).
_AROUND = {
    (1, 0): ((-1, 0), (0, 0), (0, -1)),  # east: NE, SE, SW
    (0, 1): ((0, 0), (0, -1), (-1, -1)),  # south: SE, SW, NW
    (-1, 0): ((0, -1), (-1, -1), (-1, 0)),  # west: SW, NW, NE
    (0, -1): ((-1, -1), (-1, 0), (0, 0)),  # north: NW, NE, SE
}


@dataclass(frozen=True)
class ShapeOptions:
    simplify: float = DEFAULT_SIMPLIFY  # Douglas-Peucker tolerance in px; 0 writes exact outlines
    masks: str = "holes"  # holes: masks only for components with holes; all: every component as a mask;
    # none: polygons only, a component's holes filled
    min_iou: float = DEFAULT_MIN_IOU  # per simplified polygon, under both rasterization rules


def _vertex(r: int, c: int, x: int, y: int) -> Point:
    """Corner (x, y) of pixel (r, c), with the pixel's right and bottom edges pulled in by EDGE_INSET."""
    return (x if x == c else x - EDGE_INSET, y if y == r else y - EDGE_INSET)


def outline(component: np.ndarray) -> list[Point]:
    """The exact polygon (x, y) of one 8-connected component's outer boundary, clockwise, not closed.

    The walk keeps the component on its right along the pixel edges, turning left whenever the pixel
    ahead-left is set (which also crosses diagonal contacts) and right when nothing is ahead. A vertex is
    written at each turn, inside the pixel that owns the corner; a diagonal contact gets one vertex in each
    of its two pixels.
    """
    comp = np.asarray(component, dtype=bool)
    if comp.ndim != 2 or not comp.any():
        raise ValueError(f"need a non-empty 2-D component mask, got shape {comp.shape}")
    m = np.pad(comp, 1)  # a background frame: no bounds checks; pixel (r, c) is m[r + 1, c + 1]
    r0, c0 = (int(v) - 1 for v in np.argwhere(m)[0])
    x, y, heading = c0, r0, (1, 0)  # along the top edge of the first pixel in row-major order
    start = (x, y, heading)
    points: list[Point] = []
    # Every boundary edge is walked once: 4 edges per pixel bound the walk.
    for _ in range(4 * int(comp.sum()) + 4):
        x, y = x + heading[0], y + heading[1]
        dx, dy = heading
        (lr, lc), (rr, rc), (br, bc) = ((y + a, x + b) for a, b in _AROUND[heading])
        if m[lr + 1, lc + 1]:  # turn left: a concave corner, or a diagonal contact
            if m[rr + 1, rc + 1]:
                points.append(_vertex(rr, rc, x, y))
            else:
                points += [_vertex(br, bc, x, y), _vertex(lr, lc, x, y)]
            heading = (dy, -dx)
        elif not m[rr + 1, rc + 1]:  # turn right: a convex corner of the pixel behind-right
            points.append(_vertex(br, bc, x, y))
            heading = (-dy, dx)
        if (x, y, heading) == start:
            return points
    raise RuntimeError("outline did not close")  # unreachable for a finite component


def douglas_peucker(ring: Sequence[Point], tolerance: float) -> list[Point]:
    """The closed ring with every vertex dropped that lies within ``tolerance`` px of the simplified edge."""
    pts = np.asarray(ring, dtype=np.float64)
    n = len(pts)
    if n <= 4 or tolerance <= 0:
        return [tuple(p) for p in pts]
    # A closed ring is split at vertex 0 and the vertex farthest from it; each half is simplified as a chain.
    far = int(np.argmax(((pts - pts[0]) ** 2).sum(1)))
    keep = np.zeros(n + 1, dtype=bool)
    keep[[0, far, n]] = True
    closed = np.vstack([pts, pts[:1]])
    stack = [(0, far), (far, n)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        inner = closed[a + 1 : b]
        d = _segment_distance(inner, closed[a], closed[b])
        k = int(np.argmax(d))
        if d[k] > tolerance:
            keep[a + 1 + k] = True
            stack += [(a, a + 1 + k), (a + 1 + k, b)]
    return [tuple(p) for p in closed[:n][keep[:n]]]


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    length2 = float(ab @ ab)
    t = np.zeros(len(p)) if length2 == 0 else np.clip(((p - a) @ ab) / length2, 0, 1)
    return np.hypot(*(p - a - t[:, None] * ab).T)


def fill_centres(points: Sequence[Point], height: int, width: int) -> np.ndarray:
    """bool (height, width): pixels whose centre (j + 0.5, i + 0.5) lies inside the polygon (even-odd rule).

    The rule CVAT's own tools and datumaro (pycocotools) apply when they turn a polygon into pixels.
    """
    pts = np.asarray(points, dtype=np.float64)
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    out = np.zeros((height, width), dtype=bool)
    centres = np.arange(width) + 0.5
    for i in range(height):
        yc = i + 0.5
        crossing = (y0 <= yc) != (y1 <= yc)
        if not crossing.any():
            continue
        xs = np.sort(x0[crossing] + (yc - y0[crossing]) * (x1[crossing] - x0[crossing]) / (y1[crossing] - y0[crossing]))
        inside = np.searchsorted(xs, centres, side="right") % 2 == 1
        out[i] = inside
    return out


def fill_shardgen(points: Sequence[Point], height: int, width: int) -> np.ndarray:
    """bool (height, width): the pixels ``shardgen build`` paints for the polygon."""
    ann = ImageAnnotation("", width, height, (Shape("polygon", "", tuple(points), 0, 0, 0),), "", 0)
    return rasterize(ann, lambda _: 1).astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def simplified_outline(component: np.ndarray, exact: list[Point], tolerance: float, min_iou: float) -> list[Point]:
    """The most simplified outline, at ``tolerance`` px or less, that keeps ``min_iou`` under both rules."""
    h, w = component.shape
    while tolerance >= MIN_TOLERANCE:
        ring = douglas_peucker(exact, tolerance)
        if len(ring) < len(exact) and len(set(ring)) >= 3:
            worst = min(_iou(fill(ring, h, w), component) for fill in (fill_centres, fill_shardgen))
            if worst >= min_iou:
                return ring
        elif len(ring) == len(exact):
            return exact  # nothing to remove at this tolerance, nor at any smaller one
        tolerance /= 2
    return exact


def has_holes(component: np.ndarray) -> bool:
    """Whether background pixels are enclosed by the component (4-connected background, 8-connected fg)."""
    padded = np.pad(component, 1)
    return bool((ndimage.binary_fill_holes(padded) != padded).any())


def mask_shapes(
    mask: np.ndarray,
    labels: Sequence[str | None],
    confidence: np.ndarray | None = None,
    options: ShapeOptions = ShapeOptions(),
) -> list[Shape]:
    """CVAT shapes for every defect component of an (H, W) class map.

    ``labels[c]`` is the label written for class id c (ids 1..; 0, None and ids beyond the list are not
    drawn). ``confidence`` (H, W), when given, is the probability of each pixel's predicted class; a shape
    carries its mean over the component as the attribute ``score``, in whole percent (0-100: CVAT's number
    attributes are integers).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"class map must be (H, W), got shape {mask.shape}")
    if options.masks not in MASK_POLICIES:
        raise ValueError(f"masks must be one of {MASK_POLICIES}, got {options.masks!r}")
    found = []
    for c in np.unique(mask).tolist():
        if not 1 <= c < len(labels) or labels[c] is None:
            continue
        components, _ = ndimage.label(mask == c, structure=EIGHT_CONNECTED)
        for k, box in enumerate(ndimage.find_objects(components), start=1):
            comp = components[box] == k
            top, left = box[0].start, box[1].start
            attrs = ()
            if confidence is not None:
                attrs = (("score", str(round(float(confidence[box][comp].mean()) * 100))),)
            holes = options.masks != "all" and has_holes(comp)
            if options.masks == "none" and holes:
                comp = ndimage.binary_fill_holes(comp)  # the outer outline: a polygon cannot carry its holes
            if options.masks == "all" or (holes and options.masks == "holes"):
                height, width = comp.shape
                shape = dict(kind="mask", points=(), rle=encode_rle(comp), mask_box=(left, top, width, height))
            else:
                exact = outline(comp)
                ring = exact
                if options.simplify > 0:
                    ring = simplified_outline(comp, exact, options.simplify, options.min_iou)
                shape = dict(kind="polygon", points=tuple((left + x, top + y) for x, y in ring))
            found.append((-comp.size, top, left, c, labels[c], attrs, shape))
    found.sort(key=lambda f: f[:4])  # largest box first; ties in a fixed order
    return [
        Shape(label=label, z_order=0, order=order, line=0, attributes=attrs, **shape)
        for order, (*_, label, attrs, shape) in enumerate(found)
    ]
