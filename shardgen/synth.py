"""A synthetic, Sarine-like dataset in the real layout: ``DIR/images/*.png`` + ``DIR/annotations/*.xml``.

Each scan is a non-square RGB PNG (grey-looking) with pure-black crust borders of a different width on each
side, a faceted brilliant-cut stone (facet shading, facet lines, smooth gradients, fine noise), unlabelled
dust specks, and defects of all ten classes drawn with class-specific looks and annotated as CVAT shapes in
batches of ``IMAGES_PER_XML`` images per file. Some internal defects get a fainter mirrored copy labelled
``<Class>_Reflection``; a few labels use real-world spelling variants ("twinning wisp", "Burn mark").

Every defect is painted only inside what its annotation rasterizes to (strokes at most 2 px wide against the
rasterizer's 3 px, dots within its point radius), so masks built from the XML cover the drawn defects.
Each image draws from its own RNG seeded by (seed, index): output is byte-identical for any worker count.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from .classes import ClassMap
from .cvat import ImageAnnotation, Shape, write_cvat
from .synth_defects import BURN_TINT, PAINTERS, Part, Scene, blend, paint_mask, polarity

DEFAULT_SIZE_RANGE = (1150, 1450)  # scan sides in px, as the real scanner writes them
MIN_SIDE = 96  # below this the crust, stone and defects no longer fit
IMAGES_PER_XML = 20
CRUST_RANGE = (10, 120)  # crust width per side at the default sizes; smaller scans scale it down
CLASSES_PER_IMAGE = 4  # cycled over the class list, so any 3 consecutive images show all 10 classes
EXTRA_DEFECTS = (2, 7)  # random additional defects per image, [low, high)
REFLECT_PROB = 0.2  # besides the one reflection every image gets
# A reflection is the defect's mirror image, fainter but plainly visible: annotators label what they see.
REFLECT_STRENGTH = (0.6, 0.8)
VARIANT_PROB = 0.1  # besides the one spelling variant every image gets
DUST_PER_MPX = 25
# Surface and girdle defects have no reflection inside the stone.
NOT_REFLECTED = {"Nick", "Pit", "Burn_mark"}
IMAGE_NAME = "stone_{:05d}.png"
XML_NAME = "batch_{:03d}.xml"
OWN_FILE = re.compile(r"stone_\d{5,}\.png|batch_\d{3,}\.xml")


@dataclass
class SynthImage:
    name: str
    rgb: np.ndarray  # (H, W, 3) uint8, the scan
    clean: np.ndarray  # the same scan before defects were drawn: it differs from ``rgb`` only on defects
    shapes: tuple[Shape, ...]


def _scene(rng: np.random.Generator, size_range: tuple[int, int]) -> Scene:
    """A defect-free scan: crust, dark background, the faceted stone, fine noise and unlabelled dust."""
    lo, hi = size_range
    w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
    while w == h:  # real scans are never square
        h = int(rng.integers(lo, hi + 1))
    f = min(1.0, min(w, h) / DEFAULT_SIZE_RANGE[0])
    cmin = max(1, round(CRUST_RANGE[0] * f))
    cmax = max(cmin + 3, round(CRUST_RANGE[1] * f))
    top, bottom, left, right = (int(v) for v in rng.choice(np.arange(cmin, cmax + 1), 4, replace=False))
    content = (left, top, w - right, h - bottom)
    cw, ch = content[2] - left, content[3] - top
    gray = np.zeros((h, w), np.float32)
    # Dark-grey, never black, background: an all-zero content row would be cropped away as crust.
    ramp_y = np.linspace(-1, 1, ch, dtype=np.float32)[:, None] * rng.uniform(-6, 6)
    ramp_x = np.linspace(-1, 1, cw, dtype=np.float32)[None, :] * rng.uniform(-6, 6)
    gray[top : content[3], left : content[2]] = rng.uniform(24, 36) + ramp_y + ramp_x
    m = min(cw, ch)
    sc = Scene(
        rng=rng,
        gray=gray,
        content=content,
        cx=left + cw / 2 + rng.uniform(-0.02, 0.02) * m,
        cy=top + ch / 2 + rng.uniform(-0.02, 0.02) * m,
        radius=rng.uniform(0.40, 0.44) * m,
        sides=8 if rng.random() < 0.5 else 64,
        rot=rng.uniform(0, 2 * np.pi),
        sigma=rng.uniform(2.5, 5.0),
    )
    _draw_stone(sc)
    region = gray[top : content[3], left : content[2]]
    region += rng.standard_normal(region.shape, dtype=np.float32) * sc.sigma
    for _ in range(max(3, round(DUST_PER_MPX * w * h / 1e6 * rng.uniform(0.5, 1.5)))):
        c = np.array([rng.uniform(left + 2, content[2] - 2), rng.uniform(top + 2, content[3] - 2)])
        # Dust lies on the glass, out of focus: larger, softer and fainter than a pinpoint.
        speck = Part("points", c[None], rng.uniform(1.0, 3.0) * max(sc.s, 0.5))
        box, alpha = paint_mask(sc, [speck], blur=rng.uniform(0.8, 1.6), confine=False)
        blend(sc, box, alpha * rng.uniform(0.4, 0.8), polarity(rng, (190, 250), (5, 40)))
    return sc


def _draw_stone(sc: Scene) -> None:
    """Brilliant-cut facets seen from the top: table, 16 sectors x 2 rings, facet lines and the girdle."""
    rng = sc.rng
    big_r = sc.radius
    x0, y0 = max(int(sc.cx - big_r) - 4, sc.content[0]), max(int(sc.cy - big_r) - 4, sc.content[1])
    x1, y1 = min(int(sc.cx + big_r) + 5, sc.content[2]), min(int(sc.cy + big_r) + 5, sc.content[3])
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - sc.cx
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - sc.cy
    r = np.hypot(dx, dy)
    th = (np.arctan2(dy, dx) - sc.rot) % (2 * np.pi)
    step = 2 * np.pi / sc.sides
    r_edge = big_r * math.cos(step / 2) / np.cos(th % step - step / 2)
    table = rng.uniform(0.5, 0.6) * big_r
    r_tab = table * math.cos(np.pi / 8) / np.cos(th % (np.pi / 4) - np.pi / 8)
    u = (r - r_tab) / (r_edge - r_tab)
    zigzag = 0.3 + 0.4 * np.abs((th / (np.pi / 8)) % 2 - 1)  # star/kite boundary between the rings
    sector = (th // (np.pi / 8)).astype(np.int64) % 16
    zone = np.where(r <= r_tab, 0, 1 + 2 * sector + (u > zigzag))
    shade = rng.uniform(60, 210, 33).astype(np.float32)[zone] * (1 - 0.25 * (r / big_r) ** 2)
    tilt = rng.uniform(-15, 15, 2)
    shade += (tilt[0] * dx + tilt[1] * dy) / big_r
    lowfreq = Image.fromarray(rng.standard_normal((12, 12)).astype(np.float32) * 10, "F")
    shade += np.asarray(lowfreq.resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC))
    region = sc.gray[y0:y1, x0:x1]
    inside = r <= r_edge
    region[inside] = shade[inside]

    def polar(rad, ang):
        return np.stack([sc.cx + rad * np.cos(ang + sc.rot), sc.cy + rad * np.sin(ang + sc.rot)], 1)

    vert = np.arange(8) * np.pi / 4
    edge_at = np.array([sc.edge(a + sc.rot) for a in vert])
    ring = np.linspace(0, 2 * np.pi, 129)
    ring_r = table * math.cos(np.pi / 8) / np.cos(ring % (np.pi / 4) - np.pi / 8)
    ring_r = ring_r + (0.3 + 0.4 * np.abs((ring / (np.pi / 8)) % 2 - 1)) * (
        np.array([sc.edge(a + sc.rot) for a in ring]) - ring_r
    )
    odd = vert + np.pi / 8
    lines = [
        np.concatenate([polar(np.full(8, table), vert), polar(np.full(1, table), vert[:1])]),
        polar(ring_r, ring),
    ]
    lines += [polar(np.array([table, e]), np.array([a, a])) for a, e in zip(vert, edge_at, strict=True)]
    inner = np.array([ring_r[int(round(a / (2 * np.pi) * 128))] for a in odd])
    lines += [polar(np.array([i, sc.edge(a + sc.rot)]), np.array([a, a])) for a, i in zip(odd, inner, strict=True)]
    width = 1 + int(sc.s > 0.6)
    box, alpha = paint_mask(sc, [Part("polyline", p, width) for p in lines])
    blend(sc, box, alpha * rng.uniform(0.5, 0.8), polarity(rng, (190, 240), (40, 70)))
    outline = polar(np.full(sc.sides + 1, big_r), np.arange(sc.sides + 1) * step)
    box, alpha = paint_mask(sc, [Part("polyline", outline, max(1, round(3 * sc.s)))])
    blend(sc, box, alpha * 0.8, rng.uniform(170, 220))


def _to_rgb(sc: Scene, gains: np.ndarray) -> np.ndarray:
    rgb = sc.gray[..., None] * gains.astype(np.float32)
    for (x0, y0, x1, y1), alpha in sc.tints:
        rgb[y0:y1, x0:x1] *= 1 - alpha[..., None] * BURN_TINT
    out = np.zeros(rgb.shape, np.uint8)
    left, top, right, bottom = sc.content
    out[top:bottom, left:right] = np.clip(np.rint(rgb[top:bottom, left:right]), 1, 255)
    return out


def _variant(rng: np.random.Generator, label: str) -> str:
    """A real-world spelling of ``label`` that ClassMap.lookup still resolves."""
    words = label.replace("_", " ")
    options = [v for v in dict.fromkeys([words, words.lower(), label.upper(), words.capitalize()]) if v != label]
    return options[int(rng.integers(len(options)))]


def render(seed: int, index: int, size_range: tuple[int, int] = DEFAULT_SIZE_RANGE) -> SynthImage:
    """Scan ``index`` of the dataset with ``seed``; depends on nothing else, so images render in any order."""
    rng = np.random.default_rng([seed, index])
    sc = _scene(rng, size_range)
    gains = rng.uniform(0.98, 1.02, 3)
    clean = _to_rgb(sc, gains)
    names = ClassMap.load().names[1:]
    classes = [names[(CLASSES_PER_IMAGE * index + j) % len(names)] for j in range(CLASSES_PER_IMAGE)]
    classes += [names[int(i)] for i in rng.integers(0, len(names), int(rng.integers(*EXTRA_DEFECTS)))]
    rng.shuffle(classes)
    internal = [i for i, name in enumerate(classes) if name not in NOT_REFLECTED]
    forced = internal[int(rng.integers(len(internal)))]
    entries = []
    for i, name in enumerate(classes):
        parts, paint = PAINTERS[name](sc)
        paint(sc, parts, 1.0)
        entries.append((name, parts))
        if i == forced or (name not in NOT_REFLECTED and rng.random() < REFLECT_PROB):
            # Mirror across a whole-pixel column so whole-pixel points stay whole.
            mirrored = [Part(p.kind, p.pts * [-1, 1] + [2 * round(sc.cx), 0], p.width) for p in parts]
            paint(sc, mirrored, rng.uniform(*REFLECT_STRENGTH))
            entries.append((name + "_Reflection", mirrored))
    variant_at = int(rng.integers(len(entries)))
    shapes = []
    for i, (label, parts) in enumerate(entries):
        if i == variant_at or rng.random() < VARIANT_PROB:
            label = _variant(rng, label)
        for p in parts:
            pts = tuple((float(x), float(y)) for x, y in p.pts)
            shapes.append(Shape(p.kind, label, pts, 0, len(shapes), 0))
    return SynthImage(IMAGE_NAME.format(index), _to_rgb(sc, gains), clean, tuple(shapes))


def _write_image(job: tuple[str, int, int, tuple[int, int]]) -> ImageAnnotation:
    image_dir, seed, index, size_range = job
    img = render(seed, index, size_range)
    Image.fromarray(img.rgb).save(Path(image_dir) / img.name, compress_level=1)
    h, w = img.rgb.shape[:2]
    return ImageAnnotation(img.name, w, h, img.shapes, XML_NAME.format(index // IMAGES_PER_XML), 0)


def _prepare(directory: Path) -> None:
    """Create ``directory``; drop an earlier synthetic run's files; refuse to mix with other files."""
    directory.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in directory.iterdir() if not OWN_FILE.fullmatch(p.name))
    if foreign:
        raise ValueError(f"{directory}: holds {foreign[0]}, not written by the generator; use an empty directory")
    for p in directory.iterdir():
        p.unlink()


def write_synthetic(
    out_dir: str | Path,
    n_images: int,
    seed: int,
    *,
    size_range: tuple[int, int] = DEFAULT_SIZE_RANGE,
    workers: int = 1,
) -> dict:
    """Write ``n_images`` scans to ``out_dir/images`` and their CVAT XML to ``out_dir/annotations``."""
    lo, hi = size_range
    for name, value in (("n_images", n_images), ("workers", workers)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not MIN_SIDE <= lo < hi:
        raise ValueError(f"size_range {size_range}: need {MIN_SIDE} <= low < high (scans are not square)")
    out = Path(out_dir)
    image_dir, ann_dir = out / "images", out / "annotations"
    _prepare(image_dir)
    _prepare(ann_dir)
    jobs = [(str(image_dir), seed, i, (lo, hi)) for i in range(n_images)]
    if workers > 1:
        with Pool(workers) as pool:
            anns = pool.map(_write_image, jobs, chunksize=1)
    else:
        anns = [_write_image(job) for job in jobs]
    cmap = ClassMap.load()
    names = cmap.names[1:]
    canonical = names + [n + cmap.reflection_suffix for n in names if n not in NOT_REFLECTED]
    for b in range(0, n_images, IMAGES_PER_XML):
        batch = anns[b : b + IMAGES_PER_XML]
        used = dict.fromkeys(s.label for a in batch for s in a.shapes if s.label not in canonical)
        write_cvat(ann_dir / batch[0].xml_file, batch, canonical + list(used))
    counts = {n: 0 for n in names}
    reflections = 0
    for s in (s for a in anns for s in a.shapes):
        info = cmap.lookup(s.label)
        counts[info.name] += 1
        reflections += info.is_reflection
    return {
        "out_dir": str(out),
        "images": n_images,
        "xml_files": math.ceil(n_images / IMAGES_PER_XML),
        "shapes": sum(len(a.shapes) for a in anns),
        "shapes_per_class": counts,
        "reflection_shapes": reflections,
    }
