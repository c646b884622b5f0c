"""The synthetic dataset: real layout, all classes, crust, determinism, and defects a threshold cannot find."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import median_filter

from shardgen.classes import ClassMap
from shardgen.cvat import ImageAnnotation, parse_cvat
from shardgen.raster import rasterize
from shardgen.synth import render, write_synthetic

TINY = (160, 220)
SEED = 7
CMAP = ClassMap.load()


def _defect_mask(ann: ImageAnnotation) -> np.ndarray:
    """Binary mask of every labelled shape, reflections included (the 'merge' policy)."""
    return rasterize(ann, lambda s: 1) > 0


def _crust(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """Widths of the all-black border on (top, bottom, left, right)."""
    content = rgb.any(axis=2)
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    h, w = content.shape
    return int(rows[0]), int(h - 1 - rows[-1]), int(cols[0]), int(w - 1 - cols[-1])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "raw"
    return out, write_synthetic(out, 25, SEED, size_range=TINY)


def test_layout_is_images_and_cvat_xml_in_batches_of_20(tiny):
    out, summary = tiny
    pngs = sorted(p.name for p in (out / "images").iterdir())
    assert pngs == [f"stone_{i:05d}.png" for i in range(25)]
    xmls = sorted((out / "annotations").iterdir())
    assert [p.name for p in xmls] == ["batch_000.xml", "batch_001.xml"]
    anns = [a for p in xmls for a in parse_cvat(p)]
    assert [len(parse_cvat(p)) for p in xmls] == [20, 5]
    assert [a.name for a in anns] == pngs
    for ann in anns:
        with Image.open(out / "images" / ann.name) as im:
            assert im.mode == "RGB" and im.size == (ann.width, ann.height)
        assert ann.width != ann.height
        assert TINY[0] <= min(ann.width, ann.height) and max(ann.width, ann.height) <= TINY[1]
    assert summary["images"] == 25 and summary["xml_files"] == 2
    assert summary["shapes"] == sum(len(a.shapes) for a in anns)
    assert sum(summary["shapes_per_class"].values()) == summary["shapes"]


def test_xml_holds_exactly_what_render_drew(tiny):
    out, _ = tiny
    anns = parse_cvat(out / "annotations" / "batch_000.xml")
    for index in (0, 1):
        img = render(SEED, index, TINY)
        assert np.array_equal(np.asarray(Image.open(out / "images" / img.name)), img.rgb)
        written = [(s.kind, s.label, s.points) for s in anns[index].shapes]
        assert written == [(s.kind, s.label, s.points) for s in img.shapes]


def test_every_class_appears_within_three_images_with_reflections_and_label_variants(tiny):
    out, _ = tiny
    anns = parse_cvat(out / "annotations" / "batch_000.xml")
    infos = [[CMAP.lookup(s.label) for s in a.shapes] for a in anns]
    assert all(info is not None for row in infos for info in row)  # variants resolve too
    assert {i.name for row in infos[:3] for i in row if not i.is_reflection} == set(CMAP.names[1:])
    reflected = {i.name for row in infos for i in row if i.is_reflection}
    assert reflected and reflected.isdisjoint({"Nick", "Pit", "Burn_mark"})
    labels = {s.label for a in anns for s in a.shapes}
    canonical = set(CMAP.names[1:]) | {n + "_Reflection" for n in CMAP.names[1:]}
    assert labels - canonical, "some labels must use real-world spellings"
    kinds = {}
    for a in anns:
        for s in a.shapes:
            kinds.setdefault(CMAP.lookup(s.label).name, set()).add(s.kind)
    assert kinds["Pinpoint"] == {"points", "polygon"}
    assert kinds["Needle"] == kinds["Feather"] == kinds["Internal_graining"] == {"polyline"}
    for name in ("Crystal", "Cloud", "Twinning_wisp", "Nick", "Pit", "Burn_mark"):
        assert kinds[name] == {"polygon"}


def _check_crust(rgb: np.ndarray) -> tuple[int, int, int, int]:
    widths = _crust(rgb)
    assert min(widths) >= 1 and len(set(widths)) == 4  # a different width on each side
    top, bottom, left, right = widths
    h, w = rgb.shape[:2]
    # Inside the crust box nothing is pure black, so cropping the crust never eats content.
    assert rgb[top : h - bottom, left : w - right].any(axis=2).all()
    return widths


def test_crust_is_pure_black_and_uneven(tiny):
    out, _ = tiny
    for p in sorted((out / "images").iterdir())[:5]:
        _check_crust(np.asarray(Image.open(p)))


def test_one_scan_at_the_default_size(tmp_path):
    start = time.perf_counter()
    write_synthetic(tmp_path, 1, SEED)
    elapsed = time.perf_counter() - start
    rgb = np.asarray(Image.open(tmp_path / "images" / "stone_00000.png"))
    h, w = rgb.shape[:2]
    assert h != w and 1150 <= min(h, w) and max(h, w) <= 1450
    assert all(10 <= c <= 120 for c in _check_crust(rgb))
    # A scan is gray-looking: the channels agree up to the small colour balance and the brownish burn marks.
    assert np.abs(rgb[..., 0].astype(int) - rgb[..., 2]).mean() < 8
    assert elapsed < 20, f"one default-size scan took {elapsed:.1f} s; generation must stay vectorized"


def test_same_seed_same_bytes_for_any_worker_count(tiny, tmp_path):
    out, _ = tiny
    write_synthetic(tmp_path / "two", 25, SEED, size_range=TINY, workers=2)
    assert _files(tmp_path / "two") == _files(out)
    write_synthetic(tmp_path / "other", 3, SEED + 1, size_range=TINY)
    other = _files(tmp_path / "other")
    assert other["images/stone_00000.png"] != _files(out)["images/stone_00000.png"]


def test_annotations_cover_every_drawn_defect_and_dust_is_not_annotated():
    for index in range(4):
        img = render(SEED, index, TINY)
        h, w = img.rgb.shape[:2]
        mask = _defect_mask(ImageAnnotation(img.name, w, h, img.shapes, "x.xml", 0))
        drawn = (img.rgb != img.clean).any(axis=2)
        assert drawn.any() and not (drawn & ~mask).any()


def _best_threshold_iou(gray: np.ndarray, mask: np.ndarray) -> float:
    """Best IoU with ``mask`` of ``gray > t`` or ``gray < t`` over every threshold t."""
    every = np.bincount(gray.ravel(), minlength=256)
    defect = np.bincount(gray[mask].ravel(), minlength=256)
    best = 0.0
    for hit_all, hit_defect in (
        (np.cumsum(every[::-1])[::-1], np.cumsum(defect[::-1])[::-1]),  # gray >= t
        (np.cumsum(every), np.cumsum(defect)),  # gray <= t
    ):
        best = max(best, float((hit_defect / np.maximum(hit_all + mask.sum() - hit_defect, 1)).max()))
    return best


def test_no_intensity_threshold_finds_the_defects_yet_they_stand_out_locally():
    on_defect, off_defect = [], []
    for index in range(4):
        img = render(SEED, index, TINY)
        h, w = img.rgb.shape[:2]
        mask = _defect_mask(ImageAnnotation(img.name, w, h, img.shapes, "x.xml", 0))
        gray = np.rint(img.rgb.mean(axis=2)).astype(np.uint8)
        assert _best_threshold_iou(gray, mask) < 0.35
        # Against its own neighbourhood a defect pixel stands out far more than stone, facets or dust do.
        local = np.abs(gray.astype(np.float32) - median_filter(gray, size=15).astype(np.float32))
        content = img.rgb.any(axis=2)
        on_defect.append(local[mask])
        off_defect.append(local[content & ~mask])
    assert np.concatenate(on_defect).mean() > 2 * np.concatenate(off_defect).mean()


class _Noiseless:
    """A numpy Generator whose normal draws come out as zeros; the stream advances exactly as before, so the
    scene, the defects and their annotations are the same, only without sensor noise."""

    def __init__(self, generator):
        self.generator = generator

    def standard_normal(self, *args, **kwargs):
        return self.generator.standard_normal(*args, **kwargs) * 0

    def __getattr__(self, name):
        return getattr(self.generator, name)


VISIBLE = 15.0  # grey levels: three times the strongest sensor noise (sigma <= 5)


def test_every_labelled_shape_is_visible(monkeypatch):
    """Annotators label what they see: each shape, reflections included, changes its own pixels by at least
    VISIBLE grey levels (90th percentile over the shape's mask) against the defect-free scan, noise aside."""
    real = np.random.default_rng
    monkeypatch.setattr("shardgen.synth.np.random.default_rng", lambda seed: _Noiseless(real(seed)))
    cmap = ClassMap.load()
    seen = set()
    for index in range(6):
        img = render(SEED, index)  # full size: thin strokes and small dots as the demo draws them
        h, w = img.rgb.shape[:2]
        change = np.abs(img.rgb.astype(np.float32) - img.clean.astype(np.float32)).max(axis=2)
        for shape in img.shapes:
            region = rasterize(ImageAnnotation(img.name, w, h, (shape,), "x.xml", 0), lambda s: 1) == 1
            contrast = float(np.percentile(change[region], 90))
            info = cmap.lookup(shape.label)
            seen.add((info.name, info.is_reflection))
            assert contrast >= VISIBLE, f"{img.name}: {shape.label} changes its pixels by only {contrast:.1f}"
    assert len({name for name, _ in seen}) == 10 and any(refl for _, refl in seen)


def test_rerun_replaces_its_own_files_and_refuses_foreign_ones(tmp_path):
    write_synthetic(tmp_path, 21, SEED, size_range=TINY)
    write_synthetic(tmp_path, 2, SEED, size_range=TINY)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["stone_00000.png", "stone_00001.png"]
    assert [p.name for p in (tmp_path / "annotations").iterdir()] == ["batch_000.xml"]
    (tmp_path / "annotations" / "mine.xml").write_text("<annotations/>")
    with pytest.raises(ValueError, match="mine.xml"):
        write_synthetic(tmp_path, 2, SEED, size_range=TINY)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_images": 0}, "n_images"),
        ({"size_range": (200, 200)}, "size_range"),
        ({"size_range": (40, 60)}, "size_range"),
        ({"workers": 0}, "workers"),
        ({"seed": -1}, "seed"),
    ],
)
def test_rejects_bad_arguments(tmp_path, kwargs, message):
    args = {"n_images": 2, "seed": SEED, "size_range": TINY} | kwargs
    with pytest.raises(ValueError, match=message):
        write_synthetic(tmp_path, **args)
