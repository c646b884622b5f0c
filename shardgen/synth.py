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
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.ndimage import binary_erosion

from .classes import ClassMap
from .cvat import ImageAnnotation, Shape, write_cvat

DEFAULT_SIZE_RANGE = (1150, 1450)  # scan sides in px, as the real scanner writes them
MIN_SIDE = 96  # below this the crust, stone and defects no longer fit
IMAGES_PER_XML = 20
CRUST_RANGE = (10, 120)  # crust width per side at the default sizes; smaller scans scale it down
REFERENCE_RADIUS = 450.0  # defect sizes below are in px for a stone of this radius
CLASSES_PER_IMAGE = 4  # cycled over the class list, so any 3 consecutive images show all 10 classes
EXTRA_DEFECTS = (2, 7)  # random additional defects per image, [low, high)
REFLECT_PROB = 0.2  # besides the one reflection every image gets
VARIANT_PROB = 0.1  # besides the one spelling variant every image gets
DUST_PER_MPX = 25
BURN_TINT = np.array([0.0, 0.1, 0.25], np.float32)  # per-channel darkening of a burn mark: brownish
# Surface and girdle defects have no reflection inside the stone.
NOT_REFLECTED = {"Nick", "Pit", "Burn_mark"}
IMAGE_NAME = "stone_{:05d}.png"
XML_NAME = "batch_{:03d}.xml"
OWN_FILE = re.compile(r"stone_\d{5,}\.png|batch_\d{3,}\.xml")


@dataclass
class Part:
    """One annotated shape of a defect: the geometry that is both drawn and written to the XML."""

    kind: str  # polygon | polyline | points
    pts: np.ndarray  # (N, 2) x, y, rounded to the XML's 2 decimals so drawing and annotation agree
    width: float = 1  # polyline stroke width (<= 2) or points disc radius (<= 1)

    def __post_init__(self):
        self.pts = np.round(np.asarray(self.pts, np.float64), 2)


@dataclass
class Scene:
    rng: np.random.Generator
    gray: np.ndarray  # (H, W) float32 working image
    content: tuple[int, int, int, int]  # left, top, right, bottom inside the crust
    cx: float
    cy: float
    radius: float  # stone circumradius
    sides: int  # 8: octagon, 64: round
    rot: float
    sigma: float  # fine noise level
    tints: list = field(default_factory=list)  # (box, alpha) of burn marks, tinted when converting to RGB

    @property
    def s(self) -> float:
        return self.radius / REFERENCE_RADIUS

    def edge(self, theta: float) -> float:
        """Distance from the centre to the stone outline at angle ``theta``."""
        step = 2 * math.pi / self.sides
        return self.radius * math.cos(step / 2) / math.cos((theta - self.rot) % step - step / 2)

    def point(self, half_extent: float) -> np.ndarray:
        """A uniform random point inside the stone such that a defect of ``half_extent`` stays inside."""
        r_max = max(self.radius * math.cos(math.pi / self.sides) * 0.9 - half_extent, 1.0)
        r, a = r_max * math.sqrt(self.rng.random()), self.rng.uniform(0, 2 * math.pi)
        return np.array([self.cx + r * math.cos(a), self.cy + r * math.sin(a)])


@dataclass
class SynthImage:
    name: str
    rgb: np.ndarray  # (H, W, 3) uint8, the scan
    clean: np.ndarray  # the same scan before defects were drawn: it differs from ``rgb`` only on defects
    shapes: tuple[Shape, ...]


def _mask(
    scene: Scene, parts: list[Part], blur: float = 0.0, confine: bool = True
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Alpha in [0, 1] of ``parts`` on their box (clipped to the image); ``confine`` keeps blur inside."""
    allpts = np.concatenate([p.pts for p in parts])
    h, w = scene.gray.shape
    x0, y0 = (np.floor(allpts.min(0)) - 3).astype(int).clip(0)
    x1, y1 = np.minimum(np.ceil(allpts.max(0)).astype(int) + 4, (w, h))
    im = Image.new("L", (int(x1 - x0), int(y1 - y0)), 0)
    draw = ImageDraw.Draw(im)
    for p in parts:
        xy = [(float(x - x0), float(y - y0)) for x, y in p.pts]
        if p.kind == "polygon":
            draw.polygon(xy, fill=255)
        elif p.kind == "polyline":
            draw.line(xy, fill=255, width=int(p.width))
        else:  # the pixels within ``width`` of the pixel holding the point, as the rasterizer's discs
            reach = int(p.width)
            disc = [(a, b) for a in range(-reach, reach + 1) for b in range(-reach, reach + 1)]
            disc = [(a, b) for a, b in disc if a * a + b * b <= p.width**2]
            draw.point([(math.floor(x) + a, math.floor(y) + b) for x, y in xy for a, b in disc], fill=255)
    hard = np.asarray(im, np.float32) / 255
    if blur > 0:
        soft = np.asarray(im.filter(ImageFilter.GaussianBlur(blur)), np.float32) / 255
        hard = (hard if confine else 1) * soft / max(float(soft.max()), 1e-6)
    return (int(x0), int(y0), int(x1), int(y1)), hard


def _blend(scene: Scene, box, alpha: np.ndarray, target) -> None:
    """Move the pixels under ``alpha`` toward ``target``, with fresh noise so defects keep the grain."""
    x0, y0, x1, y1 = box
    region = scene.gray[y0:y1, x0:x1]
    noise = scene.rng.standard_normal(region.shape, dtype=np.float32) * scene.sigma
    region += alpha * (target + noise - region)


def _blob(rng, centre, radius: float, n: int, jitter: float, aspect: float = 1.0) -> np.ndarray:
    angles = np.sort(rng.uniform(0, 2 * np.pi, n)) if jitter > 0.3 else np.linspace(0, 2 * np.pi, n, False)
    r = radius * rng.uniform(1 - jitter, 1, n)
    turn = rng.uniform(0, np.pi)
    x, y = r * np.cos(angles), aspect * r * np.sin(angles)
    return centre + np.stack([x * np.cos(turn) - y * np.sin(turn), x * np.sin(turn) + y * np.cos(turn)], 1)


def _curve(rng, start, length: float, bend: float, n: int) -> np.ndarray:
    """A quadratic Bezier of roughly ``length`` from ``start`` in a random direction, bending by ``bend``."""
    a = rng.uniform(0, 2 * np.pi)
    d = np.array([math.cos(a), math.sin(a)])
    end, mid = start + length * d, start + 0.5 * length * d + bend * np.array([-d[1], d[0]])
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * start + 2 * t * (1 - t) * mid + t**2 * end


def _polarity(rng, bright: tuple[float, float], dark: tuple[float, float]) -> float:
    return rng.uniform(*bright) if rng.random() < 0.5 else rng.uniform(*dark)


# Defect painters: each returns its parts and a painter(scene, parts, strength) used for the original and,
# with strength < 1, for a mirrored reflection.
def _pinpoint(sc: Scene):
    rng = sc.rng
    c = np.floor(sc.point(3))  # a whole-pixel point: the pixel holding it is the same under any rounding
    part = Part("points", c[None], 1) if rng.random() < 0.6 else Part("polygon", _blob(rng, c, 1.8, 6, 0.2))
    value = _polarity(rng, (190, 250), (15, 60))
    return [part], lambda sc, parts, k: _blend(sc, *_mask(sc, parts), value)


def _crystal(sc: Scene):
    rng = sc.rng
    size = max(3.0, rng.uniform(8, 28) * sc.s)
    parts = [Part("polygon", _blob(rng, sc.point(size), size, int(rng.integers(5, 8)), 0.45, rng.uniform(0.5, 1)))]
    fill, rim = rng.uniform(25, 80), rng.uniform(190, 240)

    def paint(sc, parts, k):
        box, m = _mask(sc, parts)
        edge = m - binary_erosion(m > 0.5)  # the bright rim lies on the polygon's own boundary pixels
        _blend(sc, box, k * rng.uniform(0.7, 0.9) * (m - edge), fill)
        _blend(sc, box, k * 0.9 * edge, rim)

    return parts, paint


def _needle(sc: Scene):
    rng = sc.rng
    length = max(6.0, rng.uniform(20, 110) * sc.s)
    start = sc.point(length)
    parts = [Part("polyline", _curve(rng, start, length, rng.uniform(-0.05, 0.05) * length, 3), 1 + (sc.s > 0.6))]
    value, alpha = _polarity(rng, (170, 250), (20, 70)), rng.uniform(0.7, 0.95)
    return parts, lambda sc, parts, k: _blend(sc, *_scaled(_mask(sc, parts), k * alpha), value)


def _feather(sc: Scene):
    rng = sc.rng
    length = max(8.0, rng.uniform(30, 110) * sc.s)
    width = 2 if sc.s > 0.3 else 1
    main = _curve(rng, sc.point(1.6 * length), length, rng.uniform(-0.3, 0.3) * length, 8)
    parts = [Part("polyline", main, width)]
    for _ in range(int(rng.integers(1, 4))):
        root = main[int(rng.integers(2, 7))]
        parts.append(Part("polyline", _curve(rng, root, 0.45 * length, rng.uniform(-0.2, 0.2) * length, 5), width))
    value, alpha = rng.uniform(200, 245), rng.uniform(0.55, 0.85)
    return parts, lambda sc, parts, k: _blend(sc, *_scaled(_mask(sc, parts), k * alpha), value)


def _graining(sc: Scene):
    rng = sc.rng
    length = max(10.0, rng.uniform(60, 250) * sc.s)
    gap, a = max(3.0, rng.uniform(4, 10) * sc.s), rng.uniform(0, np.pi)
    d, normal = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    c, n = sc.point(0.5 * length + 4 * gap), int(rng.integers(2, 5))
    parts = [
        Part(
            "polyline",
            np.stack(
                [
                    c + (i - n / 2) * gap * normal - 0.5 * length * d,
                    c + (i - n / 2) * gap * normal + 0.5 * length * d,
                ]
            ),
            1,
        )
        for i in range(n)
    ]
    delta = _polarity(rng, (12, 22), (-22, -12))

    def paint(sc, parts, k):
        box, m = _mask(sc, parts)
        x0, y0, x1, y1 = box
        _blend(sc, box, m, sc.gray[y0:y1, x0:x1] + k * delta)

    return parts, paint


def _cloud(sc: Scene):
    rng = sc.rng
    size = max(4.0, rng.uniform(20, 70) * sc.s)
    parts = [Part("polygon", _blob(rng, sc.point(size), size, int(rng.integers(12, 19)), 0.35, rng.uniform(0.5, 1)))]
    delta, alpha = _polarity(rng, (50, 90), (-70, -40)), rng.uniform(0.5, 0.85)

    def paint(sc, parts, k):
        box, m = _mask(sc, parts, blur=size / 2.5)
        x0, y0, x1, y1 = box
        grain = rng.random(m.shape, dtype=np.float32)  # a cloud is a haze of sub-pixel pinpoints
        _blend(sc, box, m**2 * k * alpha * (0.4 + 0.6 * grain**2), sc.gray[y0:y1, x0:x1] + delta)

    return parts, paint


def _wisp(sc: Scene):
    rng = sc.rng
    length = max(12.0, rng.uniform(50, 200) * sc.s)
    half = max(1.0, rng.uniform(1.5, 4) * sc.s)
    amp, waves, a = rng.uniform(3, 12) * sc.s, rng.uniform(1, 3), rng.uniform(0, np.pi)
    t = np.linspace(-0.5, 0.5, 24)
    centre = np.stack([t * length, amp * np.sin(2 * np.pi * waves * t)], 1)
    width = half * (1 - 0.6 * np.abs(2 * t))[:, None]  # the ribbon tapers toward its ends
    ribbon = np.concatenate([centre + width * [0, 1], (centre - width * [0, 1])[::-1]])
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    parts = [Part("polygon", sc.point(0.5 * length + amp) + ribbon @ rot.T)]
    delta = _polarity(rng, (18, 35), (-35, -18))

    def paint(sc, parts, k):
        box, m = _mask(sc, parts, blur=half / 2)
        x0, y0, x1, y1 = box
        _blend(sc, box, m, sc.gray[y0:y1, x0:x1] + k * delta)

    return parts, paint


def _nick(sc: Scene):
    rng = sc.rng
    a = sc.rng.uniform(0, 2 * np.pi)
    rim, depth = sc.edge(a), max(2.0, rng.uniform(4, 12) * sc.s)
    half = max(2.0, rng.uniform(3, 9) * sc.s) / rim
    pts = [(rim + 2, a - half), (rim - depth * 0.6, a - half / 3), (rim - depth, a), (rim + 2, a + half)]
    parts = [Part("polygon", np.array([(sc.cx + r * math.cos(t), sc.cy + r * math.sin(t)) for r, t in pts]))]
    value = rng.uniform(10, 50)
    return parts, lambda sc, parts, k: _blend(sc, *_scaled(_mask(sc, parts), 0.9), value)


def _pit(sc: Scene):
    rng = sc.rng
    a = sc.rng.uniform(0, 2 * np.pi)
    size = max(1.5, rng.uniform(3, 8) * sc.s)
    r = sc.edge(a) - size - rng.uniform(2, 12) * sc.s - 2
    parts = [Part("polygon", _blob(rng, np.array([sc.cx + r * math.cos(a), sc.cy + r * math.sin(a)]), size, 7, 0.3))]
    fill, rim = rng.uniform(20, 60), rng.uniform(170, 230)

    def paint(sc, parts, k):
        box, m = _mask(sc, parts)
        edge = m - binary_erosion(m > 0.5)
        _blend(sc, box, 0.9 * (m - edge), fill)
        _blend(sc, box, 0.6 * edge, rim)

    return parts, paint


def _burn(sc: Scene):
    rng = sc.rng
    size = max(5.0, rng.uniform(25, 90) * sc.s)
    parts = [Part("polygon", _blob(rng, sc.point(size), size, int(rng.integers(10, 16)), 0.4, rng.uniform(0.4, 1)))]
    strength = rng.uniform(0.4, 0.7)

    def paint(sc, parts, k):
        box, m = _mask(sc, parts, blur=size / 4)
        x0, y0, x1, y1 = box
        _blend(sc, box, m * strength, 0.72 * sc.gray[y0:y1, x0:x1] + 10)
        sc.tints.append((box, m * strength))

    return parts, paint


def _scaled(box_mask, k: float):
    box, m = box_mask
    return box, m * k


PAINTERS = {
    "Pinpoint": _pinpoint,
    "Crystal": _crystal,
    "Needle": _needle,
    "Feather": _feather,
    "Internal_graining": _graining,
    "Cloud": _cloud,
    "Twinning_wisp": _wisp,
    "Nick": _nick,
    "Pit": _pit,
    "Burn_mark": _burn,
}


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
        box, alpha = _mask(sc, [speck], blur=rng.uniform(0.8, 1.6), confine=False)
        _blend(sc, box, alpha * rng.uniform(0.4, 0.8), _polarity(rng, (190, 250), (5, 40)))
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
    box, alpha = _mask(sc, [Part("polyline", p, width) for p in lines])
    _blend(sc, box, alpha * rng.uniform(0.5, 0.8), _polarity(rng, (190, 240), (40, 70)))
    outline = polar(np.full(sc.sides + 1, big_r), np.arange(sc.sides + 1) * step)
    box, alpha = _mask(sc, [Part("polyline", outline, max(1, round(3 * sc.s)))])
    _blend(sc, box, alpha * 0.8, rng.uniform(170, 220))


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
            paint(sc, mirrored, rng.uniform(0.35, 0.55))
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
