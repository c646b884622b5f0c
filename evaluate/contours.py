"""Class maps -> CVAT polygons: one polygon per connected component of each defect class.

A component is 8-connected, as in the object metrics. Its outer boundary is traced with Moore-neighbour
tracing (clockwise on screen, stopping when the first move repeats), and the polygon runs through the
*centres* of the boundary pixels: pixel (row i, column j) covers [j, j+1) x [i, i+1) in CVAT coordinates, so
its vertex is (j + 0.5, i + 0.5). ``shardgen.raster`` fills a polygon *and* paints its 1 px outline, so such
a polygon rasterizes back to exactly the component's pixels with its holes filled (checked on random masks
in tests/test_predict.py). Interior points of straight runs (0, 45 or 90 degrees) are dropped; the
rasterizer draws the same pixels between the run's end points.

Limits, by design of CVAT polygons: holes are not represented (a ring comes back as a disc), and a
component of 1 or 2 pixels has no polygon of 3 points; such components are counted as dropped. Polygons
are listed largest bounding box first, so a component lying in another's hole is painted after it and
stays visible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from shardgen.cvat import Shape

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
MIN_POLYGON_POINTS = 3  # CVAT's minimum for a polygon
# Neighbour offsets (di, dj) in clockwise order on screen (rows grow downwards): E, SE, S, SW, W, NW, N, NE.
DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))
_DIRECTION_INDEX = {d: k for k, d in enumerate(DIRECTIONS)}
WEST = 4


def trace_boundary(component: np.ndarray) -> list[tuple[int, int]]:
    """(row, col) of the outer boundary pixels of one 8-connected component, clockwise, not closed.

    The start is the component's first pixel in row-major order; a pixel the boundary passes twice (a
    one-pixel neck or spur) appears twice. A single pixel gives a list of one.
    """
    comp = np.asarray(component, dtype=bool)
    if comp.ndim != 2 or not comp.any():
        raise ValueError(f"need a non-empty 2-D component mask, got shape {comp.shape}")
    m = np.zeros((comp.shape[0] + 2, comp.shape[1] + 2), dtype=bool)  # a background frame: no bounds checks
    m[1:-1, 1:-1] = comp
    start = tuple(int(v) for v in np.argwhere(m)[0])
    current, back = start, WEST  # the start's west neighbour is background: it is the row's first pixel
    points, first_move = [start], None
    # Each boundary pixel is entered at most once per side it touches: 8 visits per pixel bound the walk.
    for _ in range(8 * int(comp.sum()) + 8):
        for k in range(1, 9):
            d = (back + k) % 8
            nxt = (current[0] + DIRECTIONS[d][0], current[1] + DIRECTIONS[d][1])
            if m[nxt]:
                break
        else:
            return [(start[0] - 1, start[1] - 1)]  # an isolated pixel
        if first_move is None:
            first_move = (current, nxt)
        elif (current, nxt) == first_move:  # the walk would now repeat itself
            points.pop()  # the start, reached again
            return [(i - 1, j - 1) for i, j in points]
        # The neighbour examined just before ``nxt`` was background and is adjacent to ``nxt``: the next
        # search around ``nxt`` starts from it.
        bi, bj = DIRECTIONS[(d + 7) % 8]
        back = _DIRECTION_INDEX[(current[0] + bi - nxt[0], current[1] + bj - nxt[1])]
        current = nxt
        points.append(current)
    raise RuntimeError("boundary trace did not close")  # unreachable for a finite component


def drop_straight_runs(points: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The closed pixel path without the points inside straight runs (same step in and out)."""
    n = len(points)
    if n < 3:
        return list(points)
    keep = []
    for k in range(n):
        (pi, pj), (ci, cj), (ni, nj) = points[k - 1], points[k], points[(k + 1) % n]
        if (ci - pi, cj - pj) != (ni - ci, nj - cj):
            keep.append(points[k])
    return keep


def component_polygon(component: np.ndarray) -> list[tuple[int, int]]:
    """Boundary pixels (row, col) of the polygon for one component; fewer than 3 when it has none.

    A straight line of pixels has only 2 corners; its full trace (out along the line and back) is kept.
    """
    traced = trace_boundary(component)
    simple = drop_straight_runs(traced)
    return simple if len(simple) >= MIN_POLYGON_POINTS else traced


def mask_polygons(mask: np.ndarray, class_names: Sequence[str]) -> tuple[list[Shape], dict[str, int]]:
    """CVAT polygons for every defect component of an (H, W) class map, and dropped components per class.

    ``class_names[c]`` labels class id c (ids 1.. are defects; 0 and anything beyond the list are not
    drawn). Coordinates are pixel centres in the mask's own pixel grid.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"class map must be (H, W), got shape {mask.shape}")
    found, dropped = [], {}
    for c in np.unique(mask).tolist():
        if not 1 <= c < len(class_names):
            continue
        labels, _ = ndimage.label(mask == c, structure=EIGHT_CONNECTED)
        for k, box in enumerate(ndimage.find_objects(labels), start=1):
            pixels = component_polygon(labels[box] == k)
            if len(pixels) < MIN_POLYGON_POINTS:
                dropped[class_names[c]] = dropped.get(class_names[c], 0) + 1
                continue
            top, left = box[0].start, box[1].start
            area = (box[0].stop - top) * (box[1].stop - left)
            points = tuple((left + j + 0.5, top + i + 0.5) for i, j in pixels)
            found.append((-area, top, left, c, points))
    found.sort(key=lambda f: f[:4])  # largest box first; ties in a fixed order
    shapes = [
        Shape("polygon", class_names[c], points, z_order=0, order=order, line=0)
        for order, (_, _, _, c, points) in enumerate(found)
    ]
    return shapes, dropped
