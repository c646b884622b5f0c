"""Rasterization of CVAT shapes: exact pixel sets, paint order, clipping, RLE masks and skipped shapes."""

import re
from pathlib import Path

import numpy as np
import pytest

from shardgen.classes import ClassMap
from shardgen.cvat import CvatError, ImageAnnotation, Shape, parse_cvat
from shardgen.raster import RasterStats, decode_rle, encode_rle, rasterize

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cvat"


def image(*shapes: Shape, width=12, height=12) -> ImageAnnotation:
    return ImageAnnotation("a.png", width, height, shapes, "ann.xml", 1)


def shape(kind, points, z_order=0, order=0, label="Pit", line=7, **kw) -> Shape:
    return Shape(kind, label, tuple(points), z_order, order, line, **kw)


def one(s: Shape, **kw) -> np.ndarray:
    """The mask of ``s`` alone, painted with value 1."""
    return rasterize(image(s, **kw), lambda _: 1)


def pixels(mask: np.ndarray) -> set[tuple[int, int]]:
    """Painted (row, col) pairs."""
    return {(int(r), int(c)) for r, c in np.argwhere(mask)}


def block(rows, cols) -> set[tuple[int, int]]:
    return {(r, c) for r in rows for c in cols}


def disc(row, col) -> set[tuple[int, int]]:
    """Pixels within 2 of pixel (row, col), written out independently of the rasterizer."""
    return {(row + dy, col + dx) for dy, dx in block(range(-2, 3), range(-2, 3)) if dx * dx + dy * dy <= 4}


def test_decode_rle_docs_example():
    (docs,) = parse_cvat(FIXTURES / "cvat_docs_example.xml")
    mask_shape = docs.shapes[-1]
    _, _, width, height = mask_shape.mask_box
    mask = decode_rle(mask_shape.rle, width, height)
    assert mask.shape == (15, 13) and mask.dtype == bool
    assert mask.sum() == sum(mask_shape.rle[1::2])
    # the first run is background: row 0 is 3 off, 5 on, 5 off
    assert mask[0].tolist() == [False] * 3 + [True] * 5 + [False] * 5


def test_decode_rle_small():
    mask = decode_rle([1, 2, 3, 3], width=3, height=3)
    assert mask.astype(int).tolist() == [[0, 1, 1], [0, 0, 0], [1, 1, 1]]
    assert decode_rle([0, 4], 2, 2).all()  # a mask that starts with foreground has an empty first run
    with pytest.raises(ValueError, match="RLE covers 5 pixels, a 2x2 box has 4"):
        decode_rle([1, 4], 2, 2)


def test_polygon_is_filled_including_its_boundary():
    square = one(shape("polygon", [(2, 2), (5, 2), (5, 5), (2, 5)]))
    assert pixels(square) == block(range(2, 6), range(2, 6))
    # A slanted edge: for every column (row) it spans, the pixel nearest the edge is painted,
    # which PIL's fill alone leaves out for (row 1, col 2), (row 2, col 5) and (row 2, col 6).
    tri = [(1, 1), (8, 3), (3, 8)]
    mask = one(shape("polygon", tri))
    for (x0, y0), (x1, y1) in zip(tri, tri[1:] + tri[:1], strict=True):
        if abs(x1 - x0) >= abs(y1 - y0):
            for x in range(min(x0, x1), max(x0, x1) + 1):
                assert mask[round(y0 + (y1 - y0) * (x - x0) / (x1 - x0)), x]
        else:
            for y in range(min(y0, y1), max(y0, y1) + 1):
                assert mask[y, round(x0 + (x1 - x0) * (y - y0) / (y1 - y0))]
    assert pixels(mask) <= block(range(1, 9), range(1, 9))


def test_fractional_coordinates_lie_in_the_pixel_that_contains_them():
    square = one(shape("polygon", [(2.7, 2.2), (5.6, 2.2), (5.6, 5.9), (2.7, 5.9)]))
    assert pixels(square) == block(range(2, 6), range(2, 6))


def test_box_is_inclusive_and_rotates_about_its_centre():
    assert pixels(one(shape("box", [(0, 2), (4, 4)]))) == block(range(2, 5), range(0, 5))
    # 2 rows x 6 columns around (5, 5), turned a quarter: 6 rows x 2 columns (plus the pixel boundary)
    turned = one(shape("box", [(2, 4), (8, 6)], rotation=90))
    assert pixels(turned) == block(range(2, 9), range(4, 7))


def test_ellipse_with_rotation():
    # spans x 6.5..10.5 and y 2.5..14.5 once turned a quarter
    upright = one(shape("ellipse", [(8.5, 8.5), (2, 6)]), width=16, height=16)
    turned = one(shape("ellipse", [(8.5, 8.5), (6, 2)], rotation=90), width=16, height=16)
    for mask in (upright, turned):
        rows, cols = np.nonzero(mask)
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 14, 6, 10)
    assert abs(int(turned.sum()) - int(upright.sum())) <= 2
    assert turned[8, 7:10].all() and not turned[3, 6] and not turned[13, 10]


def test_polyline_is_a_3px_stroke_with_round_ends():
    mask = one(shape("polyline", [(2.5, 5.5), (8.5, 5.5)]))
    assert pixels(mask) == block(range(4, 7), range(1, 10))
    vertical = one(shape("polyline", [(5.2, 1.2), (5.2, 7.9)]))
    assert pixels(vertical) == block(range(0, 9), range(4, 7))
    thin = rasterize(image(shape("polyline", [(2, 5), (8, 5)])), lambda _: 1, polyline_width=1)
    assert pixels(thin) == block([5], range(2, 9))


def test_point_is_a_disc_of_radius_2():
    mask = one(shape("points", [(5.5, 5.4), (0.2, 11.9)]))
    assert len(disc(5, 5)) == 13
    corner = {(11, 0), (10, 0), (9, 0), (11, 1), (10, 1), (11, 2)}  # clipped at the bottom-left corner
    assert pixels(mask) == disc(5, 5) | corner


def test_higher_z_order_wins_regardless_of_document_order():
    left = [(1, 1), (6, 1), (6, 6), (1, 6)]
    right = [(4, 4), (9, 4), (9, 9), (4, 9)]
    top_first = image(shape("polygon", left, z_order=1, order=0), shape("polygon", right, z_order=0, order=1))
    mask = rasterize(top_first, lambda s: 1 + s.order)
    assert mask[5, 5] == 1 and mask[8, 8] == 2 and mask[2, 2] == 1
    top_last = image(shape("polygon", left, z_order=0, order=0), shape("polygon", right, z_order=1, order=1))
    assert rasterize(top_last, lambda s: 1 + s.order)[5, 5] == 2


def test_equal_z_order_later_in_the_document_wins():
    a = shape("polygon", [(1, 1), (6, 1), (6, 6), (1, 6)], order=0)
    b = shape("polygon", [(4, 4), (9, 4), (9, 9), (4, 9)], order=1)
    # the shapes tuple is handed over in reverse: paint order comes from ``order``, not position
    mask = rasterize(image(b, a), lambda s: 1 + s.order)
    assert mask[5, 5] == 2 and mask[2, 2] == 1


def test_out_of_image_coordinates_are_clipped():
    corner = one(shape("polygon", [(-10, -10), (3, -10), (3, 3), (-10, 3)]), width=8, height=8)
    assert pixels(corner) == block(range(0, 4), range(0, 4))
    box = one(shape("box", [(6, 6), (20, 20)]), width=8, height=8)
    assert pixels(box) == block(range(6, 8), range(6, 8))
    line = one(shape("polyline", [(-20, 3.5), (30, 3.5)]), width=8, height=8)
    assert pixels(line) == block(range(2, 5), range(0, 8))
    # a mask box hanging off the left and bottom edges: no wrap-around to the other side
    mask = one(shape("mask", [], rle=(0, 16), mask_box=(-2, 6, 4, 4)), width=8, height=8)
    assert pixels(mask) == block(range(6, 8), range(0, 2))
    outside = one(shape("mask", [], rle=(0, 4), mask_box=(100, -50, 2, 2)), width=8, height=8)
    assert not outside.any()


def test_coordinates_far_outside_are_an_error():
    with pytest.raises(CvatError, match=r"^ann\.xml:7: <polygon> has a coordinate beyond"):
        one(shape("polygon", [(0, 0), (5e9, 0), (0, 5)]))


def test_mask_is_painted_at_its_box():
    mask = one(shape("mask", [], rle=(1, 2, 3, 3), mask_box=(4, 5, 3, 3)))
    assert pixels(mask) == {(5, 5), (5, 6), (7, 4), (7, 5), (7, 6)}


def test_short_shapes_are_skipped_counted_and_warned():
    shapes = (
        shape("polygon", [(1, 1), (5, 5)], line=11, order=0),
        shape("polyline", [(1, 1)], line=12, order=1),
        shape("points", [(9, 9)], line=13, order=2),
        shape("polygon", [(1, 1)], line=14, order=3),
    )
    stats = RasterStats()
    mask = rasterize(image(*shapes), lambda _: 3, stats=stats)
    assert pixels(mask) == disc(9, 9)
    assert stats.skipped == {"polygon with fewer than 3 points": 2, "polyline with fewer than 2 points": 1}
    assert stats.warnings == [
        "ann.xml:11: polygon with fewer than 3 points",
        "ann.xml:12: polyline with fewer than 2 points",
        "ann.xml:14: polygon with fewer than 3 points",
    ]


def test_value_of_decides_what_paints():
    square = [(2, 2), (5, 2), (5, 5), (2, 5)]
    ann = image(shape("polygon", square, label="Cloud"), shape("points", [(9, 9)], label="x", order=1))
    mask = rasterize(ann, lambda s: 255 if s.label == "Cloud" else None)
    assert set(np.unique(mask)) == {0, 255} and pixels(mask) == block(range(2, 6), range(2, 6))
    with pytest.raises(ValueError, match=re.escape("ann.xml:7: label 'Cloud' maps to 256")):
        rasterize(ann, lambda s: 256)


def test_real_export_with_foreign_labels():
    (docs,) = parse_cvat(FIXTURES / "cvat_docs_example.xml")
    cmap = ClassMap.load()

    def defect_value(s: Shape) -> int | None:
        info = cmap.lookup(s.label)
        return None if info is None else info.class_id

    assert not rasterize(docs, defect_value).any()  # car, wheel, plate... are no diamond defects

    mask = rasterize(docs, lambda s: {"plate": 1, "traffic_line": 2}.get(s.label))
    assert mask.shape == (1200, 1600) and mask.dtype == np.uint8
    plate = mask == 1
    rows, cols = np.nonzero(plate)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (870, 928, 797, 965)
    assert plate[871:928, 798:965].all()
    line = mask == 2
    assert line[0, 461] and line[1199, 126] and line[0, 1212] and line[1199, 1568]

    masks_only = rasterize(docs, lambda s: 1 if s.kind == "mask" else None)
    _, _, width, height = docs.shapes[-1].mask_box
    assert masks_only.sum() == sum(docs.shapes[-1].rle[1::2])
    assert masks_only[888 : 888 + height, 707 : 707 + width].sum() == masks_only.sum()


def test_rle_round_trip():
    rng = np.random.default_rng(3)
    for shape in [(1, 1), (1, 5), (7, 3), (20, 31)]:
        for p in (0.0, 0.3, 1.0):
            m = rng.random(shape) < p
            rle = encode_rle(m)
            assert sum(rle) == m.size and all(r > 0 for r in rle[1:])
            np.testing.assert_array_equal(decode_rle(rle, shape[1], shape[0]), m)
