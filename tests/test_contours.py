"""Class maps -> CVAT shapes: exact polygons and RLE masks that shardgen's rasterizer and datumaro (CVAT's
own reader) both turn back into the mask; simplified polygons within their stated IoU; scores."""

from __future__ import annotations

import numpy as np
import pytest
from datumaro_render import datumaro_import, datumaro_render
from helpers import CLASS_OF, EXACT, NAMES, handmade_mask, image_iou, shardgen_render
from scipy import ndimage

from evaluate.contours import (
    DEFAULT_MIN_IOU,
    EIGHT_CONNECTED,
    SCORE,
    ShapeOptions,
    douglas_peucker,
    fill_centres,
    fill_shardgen,
    has_holes,
    mask_shapes,
    outline,
)
from shardgen.cvat import ImageAnnotation, parse_cvat, write_cvat
from shardgen.raster import rasterize


def random_masks(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = {}
    for k in range(n):
        noise = ndimage.gaussian_filter(rng.random((48, 40)), rng.uniform(0.5, 3))
        classes = np.digitize(ndimage.gaussian_filter(rng.random((48, 40)), 4), [0.49, 0.51]) + 1
        keep = noise > np.quantile(noise, rng.uniform(0.4, 0.9))
        masks[f"r{k}.png"] = np.where(keep, classes, 0).astype(np.uint8)
    return masks


def components(mask: np.ndarray) -> int:
    return sum(ndimage.label(mask == c, EIGHT_CONNECTED)[1] for c in np.unique(mask) if c)


def write_xml(masks: dict[str, np.ndarray], path, options: ShapeOptions = EXACT, confidence=None) -> list:
    anns = []
    for name, mask in masks.items():
        conf = None if confidence is None else confidence[name]
        shapes = mask_shapes(mask, NAMES, conf, options)
        anns.append(ImageAnnotation(name, mask.shape[1], mask.shape[0], tuple(shapes), "", 0))
    write_cvat(path, anns, NAMES[1:], source="auto", attributes=[SCORE])
    return anns


def test_outline_follows_pixel_edges():
    assert outline(np.ones((1, 3), bool)) == [(2.75, 0), (2.75, 0.75), (0, 0.75), (0, 0)]
    assert outline(np.ones((1, 1), bool)) == [(0.75, 0), (0.75, 0.75), (0, 0.75), (0, 0)]
    # a diagonal contact: one vertex in each of its two pixels, both times the outline passes it
    assert outline(np.eye(2, dtype=bool)) == [
        (0.75, 0), (0.75, 0.75), (1, 1), (1.75, 1), (1.75, 1.75), (1, 1.75), (1, 1), (0.75, 0.75), (0, 0.75), (0, 0)
    ]  # fmt: skip
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False
    diamond = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], bool)  # 8-connected, encloses its centre
    assert has_holes(ring) and has_holes(diamond)
    assert not has_holes(np.ones((3, 3), bool)) and not has_holes(np.eye(3, dtype=bool))


def test_exact_shapes_rasterize_back_to_the_mask(tmp_path):
    """Unsimplified, every component comes back pixel for pixel through write_cvat -> parse_cvat ->
    shardgen's rasterizer: holes (as masks), nested components, 1-px lines and specks included."""
    masks = {"hand.png": handmade_mask(), **random_masks(40)}
    anns = write_xml(masks, tmp_path / "x.xml")
    back = shardgen_render(tmp_path / "x.xml")
    for ann in anns:
        mask = masks[ann.name]
        np.testing.assert_array_equal(back[ann.name], mask, err_msg=ann.name)
        assert len(ann.shapes) == components(mask), ann.name  # nothing dropped
    hand = {(s.label, s.kind) for s in anns[0].shapes}
    assert ("Crystal", "mask") in hand and ("Internal_graining", "mask") in hand and ("Pit", "mask") in hand
    assert ("Pinpoint", "polygon") in hand and ("Needle", "polygon") in hand and ("Crystal", "polygon") not in hand
    # every polygon is also exact under the pixel-centre rule of CVAT and pycocotools
    for s in anns[0].shapes:
        if s.kind == "polygon":
            own = np.zeros(masks["hand.png"].shape, bool)
            own[fill_centres(s.points, *own.shape)] = True
            assert (masks["hand.png"][own] == CLASS_OF[s.label]).all()
            assert own.sum() == fill_shardgen(s.points, *own.shape).sum()


def test_all_masks_option(tmp_path):
    mask = handmade_mask()
    anns = write_xml({"m.png": mask}, tmp_path / "m.xml", ShapeOptions(simplify=0, masks="all"))
    assert {s.kind for s in anns[0].shapes} == {"mask"}
    np.testing.assert_array_equal(shardgen_render(tmp_path / "m.xml")["m.png"], mask)


def test_datumaro_reads_the_masks_back(tmp_path):
    """CVAT's own reader: exact shapes render exactly. Simplified, the handmade mask keeps IoU >= 0.99; random
    specks, all boundary, keep at least the per-polygon floor."""
    masks = {"hand.png": handmade_mask(), **random_masks(12, seed=5)}
    write_xml(masks, tmp_path / "exact.xml")
    for name, back in datumaro_render(tmp_path / "exact.xml", tmp_path, CLASS_OF).items():
        np.testing.assert_array_equal(back, masks[name], err_msg=name)
    write_xml(masks, tmp_path / "simple.xml", ShapeOptions())
    rendered = datumaro_render(tmp_path / "simple.xml", tmp_path, CLASS_OF)
    assert sorted(rendered) == sorted(masks)
    assert image_iou(rendered["hand.png"], masks["hand.png"]) >= 0.99
    for name, back in rendered.items():
        assert image_iou(back, masks[name]) >= DEFAULT_MIN_IOU, name


def test_simplify_within_tolerance_and_iou():
    yy, xx = np.mgrid[:120, :140]
    blob = (((yy - 60) / 50) ** 2 + ((xx - 70) / 62) ** 2 <= 1) & ~((yy > 55) & (xx > 100) & (yy < 64))
    exact = outline(blob)
    for tol in (0.5, 1.0, 2.0):
        ring = douglas_peucker(exact, tol)
        assert set(ring) <= set(exact)
        # every dropped vertex lies within tol of the simplified outline
        a, b = np.asarray(ring), np.roll(np.asarray(ring), -1, axis=0)
        for p in np.asarray(exact):
            t = np.clip(((p - a) * (b - a)).sum(1) / ((b - a) ** 2).sum(1), 0, 1)
            assert np.hypot(*(p - a - t[:, None] * (b - a)).T).min() <= tol + 1e-9
    (shape,) = mask_shapes(blob.astype(np.uint8), NAMES)
    assert len(shape.points) * 4 < len(exact)
    for fill in (fill_centres, fill_shardgen):
        painted = fill(shape.points, *blob.shape)
        assert (painted & blob).sum() / (painted | blob).sum() >= DEFAULT_MIN_IOU
    (shape,) = mask_shapes(blob.astype(np.uint8), NAMES, options=EXACT)
    assert list(shape.points) == exact


@pytest.mark.parametrize("simplify", [0.0, 1.0, 3.0])
def test_every_simplified_polygon_keeps_the_stated_iou(simplify):
    masks = {"hand.png": handmade_mask(), **random_masks(10, seed=7)}
    for name, mask in masks.items():
        for s in mask_shapes(mask, NAMES, options=ShapeOptions(simplify=simplify)):
            if s.kind != "polygon":
                continue
            comp = np.zeros(mask.shape, bool)
            comp[fill_shardgen(s.points, *mask.shape) & (mask == CLASS_OF[s.label])] = True
            labels, _ = ndimage.label(mask == CLASS_OF[s.label], EIGHT_CONNECTED)
            target = labels == np.bincount(labels[comp], minlength=2)[1:].argmax() + 1
            for fill in (fill_centres, fill_shardgen):
                painted = fill(s.points, *mask.shape)
                iou = (painted & target).sum() / (painted | target).sum()
                assert iou >= (1.0 if simplify == 0 else DEFAULT_MIN_IOU), (name, s.label)


def test_scores_are_mean_probabilities(tmp_path):
    mask = handmade_mask()
    rng = np.random.default_rng(2)
    confidence = rng.uniform(0.3, 1.0, mask.shape).astype(np.float32)
    anns = write_xml({"s.png": mask}, tmp_path / "s.xml", EXACT, {"s.png": confidence})
    (back,) = parse_cvat(tmp_path / "s.xml")
    assert [s.attributes for s in back.shapes] == [s.attributes for s in anns[0].shapes]
    for s in back.shapes:
        own = rasterize(ImageAnnotation("", mask.shape[1], mask.shape[0], (s,), "", 0), lambda _: 1).astype(bool)
        assert dict(s.attributes) == {"score": str(round(float(confidence[own].mean()) * 100))}
    (item,) = datumaro_import(tmp_path / "s.xml", tmp_path)
    scores = [ann.attributes["score"] for ann in item.annotations]
    assert scores == [float(dict(s.attributes)["score"]) for s in back.shapes]
