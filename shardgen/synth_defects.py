"""The defect painters of the synthetic dataset: each draws one class's look into a ``Scene`` and returns the
CVAT shapes (``Part``) that annotate exactly what it drew. Used by ``shardgen.synth``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.ndimage import binary_erosion

REFERENCE_RADIUS = 450.0  # defect sizes below are in px for a stone of this radius
BURN_TINT = np.array([0.0, 0.1, 0.25], np.float32)  # per-channel darkening of a burn mark: brownish
NOT_REFLECTED = {"Nick", "Pit", "Burn_mark"}


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


def paint_mask(
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


def blend(scene: Scene, box, alpha: np.ndarray, target) -> None:
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


def polarity(rng, bright: tuple[float, float], dark: tuple[float, float]) -> float:
    return rng.uniform(*bright) if rng.random() < 0.5 else rng.uniform(*dark)


def contrasting(sc: Scene, parts: list[Part], bright: tuple[float, float], dark: tuple[float, float]) -> float:
    """A grey level from ``dark`` on a bright neighbourhood and from ``bright`` on a dark one, so a line
    defect never vanishes into the facet it crosses (a coin flip decides near mid-grey)."""
    x0, y0 = np.floor(np.concatenate([p.pts for p in parts]).min(0)).astype(int).clip(0)
    x1, y1 = np.ceil(np.concatenate([p.pts for p in parts]).max(0)).astype(int) + 1
    local = float(sc.gray[y0:y1, x0:x1].mean())
    coin = sc.rng.random()
    if local > 150 or (local > 100 and coin < 0.5):
        return sc.rng.uniform(*dark)
    return sc.rng.uniform(*bright)


# Defect painters: each returns its parts and a painter(scene, parts, strength) used for the original and,
# with strength < 1, for a mirrored reflection.
def _pinpoint(sc: Scene):
    rng = sc.rng
    c = np.floor(sc.point(3))  # a whole-pixel point: the pixel holding it is the same under any rounding
    part = Part("points", c[None], 1) if rng.random() < 0.6 else Part("polygon", _blob(rng, c, 1.8, 6, 0.2))
    value = contrasting(sc, [Part("points", np.array([c - 2, c + 3]))], (190, 250), (15, 60))
    return [part], lambda sc, parts, k: blend(sc, *paint_mask(sc, parts), value)


def _crystal(sc: Scene):
    rng = sc.rng
    size = max(3.0, rng.uniform(8, 28) * sc.s)
    parts = [Part("polygon", _blob(rng, sc.point(size), size, int(rng.integers(5, 8)), 0.45, rng.uniform(0.5, 1)))]
    fill, rim = rng.uniform(25, 80), rng.uniform(190, 240)

    def paint(sc, parts, k):
        box, m = paint_mask(sc, parts)
        edge = m - binary_erosion(m > 0.5)  # the bright rim lies on the polygon's own boundary pixels
        blend(sc, box, k * rng.uniform(0.7, 0.9) * (m - edge), fill)
        blend(sc, box, k * 0.9 * edge, rim)

    return parts, paint


def _needle(sc: Scene):
    rng = sc.rng
    length = max(6.0, rng.uniform(20, 110) * sc.s)
    start = sc.point(length)
    parts = [Part("polyline", _curve(rng, start, length, rng.uniform(-0.05, 0.05) * length, 3), 1 + (sc.s > 0.6))]
    value, alpha = contrasting(sc, parts, (170, 250), (20, 70)), rng.uniform(0.7, 0.95)
    return parts, lambda sc, parts, k: blend(sc, *_scaled(paint_mask(sc, parts), k * alpha), value)


def _feather(sc: Scene):
    rng = sc.rng
    length = max(8.0, rng.uniform(30, 110) * sc.s)
    width = 2 if sc.s > 0.3 else 1
    main = _curve(rng, sc.point(1.6 * length), length, rng.uniform(-0.3, 0.3) * length, 8)
    parts = [Part("polyline", main, width)]
    for _ in range(int(rng.integers(1, 4))):
        root = main[int(rng.integers(2, 7))]
        parts.append(Part("polyline", _curve(rng, root, 0.45 * length, rng.uniform(-0.2, 0.2) * length, 5), width))
    value, alpha = contrasting(sc, parts, (200, 245), (15, 50)), rng.uniform(0.65, 0.9)
    return parts, lambda sc, parts, k: blend(sc, *_scaled(paint_mask(sc, parts), k * alpha), value)


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
    delta = polarity(rng, (25, 40), (-40, -25))

    def paint(sc, parts, k):
        box, m = paint_mask(sc, parts)
        x0, y0, x1, y1 = box
        blend(sc, box, m, sc.gray[y0:y1, x0:x1] + k * delta)

    return parts, paint


def _cloud(sc: Scene):
    rng = sc.rng
    size = max(4.0, rng.uniform(20, 70) * sc.s)
    parts = [Part("polygon", _blob(rng, sc.point(size), size, int(rng.integers(12, 19)), 0.35, rng.uniform(0.5, 1)))]
    delta, alpha = polarity(rng, (60, 95), (-75, -50)), rng.uniform(0.7, 0.9)

    def paint(sc, parts, k):
        # The haze reaches the outline an annotator draws around it: a soft edge, not a faint core.
        box, m = paint_mask(sc, parts, blur=size / 5)
        x0, y0, x1, y1 = box
        grain = rng.random(m.shape, dtype=np.float32)  # a cloud is a haze of sub-pixel pinpoints
        blend(sc, box, np.sqrt(m) * k * alpha * (0.4 + 0.6 * grain**2), sc.gray[y0:y1, x0:x1] + delta)

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
    delta = polarity(rng, (25, 45), (-45, -25))

    def paint(sc, parts, k):
        box, m = paint_mask(sc, parts, blur=half / 2)
        x0, y0, x1, y1 = box
        blend(sc, box, m, sc.gray[y0:y1, x0:x1] + k * delta)

    return parts, paint


def _nick(sc: Scene):
    rng = sc.rng
    a = sc.rng.uniform(0, 2 * np.pi)
    rim, depth = sc.edge(a), max(2.0, rng.uniform(4, 12) * sc.s)
    half = max(2.0, rng.uniform(3, 9) * sc.s) / rim
    pts = [(rim + 2, a - half), (rim - depth * 0.6, a - half / 3), (rim - depth, a), (rim + 2, a + half)]
    parts = [Part("polygon", np.array([(sc.cx + r * math.cos(t), sc.cy + r * math.sin(t)) for r, t in pts]))]
    value = rng.uniform(10, 50)
    return parts, lambda sc, parts, k: blend(sc, *_scaled(paint_mask(sc, parts), 0.9), value)


def _pit(sc: Scene):
    rng = sc.rng
    a = sc.rng.uniform(0, 2 * np.pi)
    size = max(1.5, rng.uniform(3, 8) * sc.s)
    r = sc.edge(a) - size - rng.uniform(2, 12) * sc.s - 2
    parts = [Part("polygon", _blob(rng, np.array([sc.cx + r * math.cos(a), sc.cy + r * math.sin(a)]), size, 7, 0.3))]
    fill, rim = rng.uniform(20, 60), rng.uniform(170, 230)

    def paint(sc, parts, k):
        box, m = paint_mask(sc, parts)
        edge = m - binary_erosion(m > 0.5)
        blend(sc, box, 0.9 * (m - edge), fill)
        blend(sc, box, 0.6 * edge, rim)

    return parts, paint


def _burn(sc: Scene):
    rng = sc.rng
    size = max(5.0, rng.uniform(25, 90) * sc.s)
    parts = [Part("polygon", _blob(rng, sc.point(size), size, int(rng.integers(10, 16)), 0.4, rng.uniform(0.4, 1)))]
    strength = rng.uniform(0.55, 0.8)

    def paint(sc, parts, k):
        box, m = paint_mask(sc, parts, blur=size / 4)
        x0, y0, x1, y1 = box
        region = sc.gray[y0:y1, x0:x1]
        # Scorched: at least 35 grey levels darker, so a burn on a dark facet still shows.
        blend(sc, box, m * strength, np.maximum(region - np.maximum(0.45 * region, 35), 5))
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
