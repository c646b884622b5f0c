"""Reading and writing "CVAT for images 1.1" XML (task and project exports).

``parse_cvat`` turns an export into one ``ImageAnnotation`` per ``<image>`` with its segmentation shapes
in document order; ``write_cvat`` writes the same structure back (the synthetic generator and
``evaluate predict`` use it). Every error is a ``CvatError`` whose message starts with ``FILE:LINE:``
so a bad annotation can be found.

Images are identified by their ``name`` only: project exports repeat image ids across subsets.
Non-segmentation elements (``<tag>``, ``<skeleton>`` with its nested ``<points>``, ``<cuboid>``) and shapes
marked ``outside="1"`` are skipped; pass a dict as ``skipped=`` to count them by reason.
Geometry is not judged here (a 2-point polygon parses); the rasterizer decides what it can paint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lxml import etree

SHAPE_KINDS = ("polygon", "polyline", "box", "ellipse", "points", "mask")
# Elements that CVAT writes inside <image> but that paint nothing in a segmentation mask.
NON_SEGMENTATION = {
    "tag": "tag (image-level label, not a shape)",
    "skeleton": "skeleton (not a segmentation shape)",
    "cuboid": "cuboid (not a segmentation shape)",
}
OUTSIDE = "shape marked outside"


class CvatError(ValueError):
    """Bad CVAT input; the message is always ``FILE:LINE: reason``."""


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPE_KINDS
    label: str  # label text as written in the XML (may be "")
    # polygon/polyline/points: vertices; box: ((xtl, ytl), (xbr, ybr)); ellipse: ((cx, cy), (rx, ry));
    # mask: ()
    points: tuple[tuple[float, float], ...]
    z_order: int  # 0 when absent
    order: int  # document order within the image, breaks z_order ties
    line: int  # source line of the element
    rotation: float = 0.0  # box/ellipse rotation in degrees, clockwise on screen
    rle: tuple[int, ...] = ()  # mask only: CVAT RLE run lengths, background run first
    mask_box: tuple[int, int, int, int] = (0, 0, 0, 0)  # mask only: left, top, width, height
    attributes: tuple[tuple[str, str], ...] = ()  # <attribute name="...">value</attribute> children, in order


@dataclass(frozen=True)
class AttributeSpec:
    """A label attribute declared in the export's meta, as CVAT writes it (``write_cvat(attributes=...)``)."""

    name: str
    input_type: str  # number | text | checkbox | select | radio
    values: tuple[str, ...] = ()  # number: (min, max, step); select/radio: the choices
    default: str = ""
    mutable: bool = False


@dataclass(frozen=True)
class ImageAnnotation:
    name: str  # image file name as written, may contain subdirectories ("train/x.png")
    width: int
    height: int
    shapes: tuple[Shape, ...]
    xml_file: str
    line: int
    subset: str | None = None  # project exports: <image subset="...">


def parse_cvat(path: str | os.PathLike, *, skipped: dict[str, int] | None = None) -> list[ImageAnnotation]:
    """All ``<image>`` elements of a CVAT for images 1.1 export, in document order.

    ``skipped``, when given, is incremented per reason for every element that paints nothing
    (tags, skeletons, cuboids, shapes marked outside, unknown elements).
    """
    where = os.fspath(path)
    # No entity expansion or network access: an annotation file must not be able to read other files.
    parser = etree.XMLParser(resolve_entities=False, no_network=True, remove_comments=True, remove_pis=True)
    with open(path, "rb") as f:
        try:
            root = etree.parse(f, parser).getroot()
        except etree.XMLSyntaxError as e:
            line = e.lineno if e.lineno is not None else 1
            raise CvatError(f"{where}:{line}: malformed XML: {e.msg}") from None
    if root.tag != "annotations":
        raise CvatError(f"{where}:{root.sourceline}: root element is <{root.tag}>, expected <annotations>")
    counts = skipped if skipped is not None else {}
    images = []
    for el in root:
        if el.tag == "version" and (el.text or "").strip() != "1.1":
            raise CvatError(f"{where}:{el.sourceline}: CVAT format version {el.text!r}, expected 1.1")
        if el.tag == "track":
            raise CvatError(
                f"{where}:{el.sourceline}: <track> found: this is a 'CVAT for video' export, "
                "export the task as 'CVAT for images 1.1'"
            )
        if el.tag == "image":
            images.append(_parse_image(el, where, counts))
    return images


def parse_labels(path: str | os.PathLike) -> list[str]:
    """The label names an export's ``<meta>`` declares (task, project or job), in order, spelled as written.

    Skeleton parts (labels with a ``<parent>``) are not labels a shape can carry and are left out.
    """
    where = os.fspath(path)
    parser = etree.XMLParser(resolve_entities=False, no_network=True, remove_comments=True, remove_pis=True)
    try:
        with open(path, "rb") as f:
            root = etree.parse(f, parser).getroot()
    except OSError as e:
        raise CvatError(f"{where}:0: cannot read: {e.strerror or e}") from None
    except etree.XMLSyntaxError as e:
        raise CvatError(f"{where}:{e.lineno or 1}: malformed XML: {e.msg}") from None
    names: list[str] = []
    for label in root.iterfind("meta/*/labels/label"):
        name = (label.findtext("name") or "").strip()
        if name and label.find("parent") is None and name not in names:
            names.append(name)
    if not names:
        raise CvatError(f"{where}:{root.sourceline}: no <meta> labels found (is this a CVAT for images 1.1 export?)")
    return names


def _parse_image(el, where: str, skipped: dict[str, int]) -> ImageAnnotation:
    name = el.get("name")
    if not name:
        raise CvatError(f"{where}:{el.sourceline}: <image> has no name")
    width = _int_attr(el, "width", where)
    height = _int_attr(el, "height", where)
    if width <= 0 or height <= 0:
        raise CvatError(f"{where}:{el.sourceline}: image {name!r} has size {width}x{height}")
    shapes = []
    for child in el:
        if not isinstance(child.tag, str):  # an unexpanded entity reference
            continue
        if child.tag in SHAPE_KINDS:
            if child.get("outside") == "1":
                _count(skipped, OUTSIDE)
                continue
            shapes.append(_parse_shape(child, len(shapes), where))
        else:
            _count(skipped, NON_SEGMENTATION.get(child.tag, f"unknown element <{child.tag}>"))
    return ImageAnnotation(name, width, height, tuple(shapes), where, el.sourceline, el.get("subset"))


def _parse_shape(el, order: int, where: str) -> Shape:
    kind = el.tag
    label = el.get("label")
    if label is None:
        raise CvatError(f"{where}:{el.sourceline}: <{kind}> has no label attribute")
    z_order = _int_attr(el, "z_order", where, default=0)
    rotation = _float_attr(el, "rotation", where, default=0.0)
    attrs = tuple((a.get("name") or "", a.text or "") for a in el if a.tag == "attribute")
    if kind in ("polygon", "polyline", "points"):
        points = _parse_points(el, where)
        return Shape(kind, label, points, z_order, order, el.sourceline, attributes=attrs)
    if kind == "box":
        xtl, ytl, xbr, ybr = (_float_attr(el, a, where) for a in ("xtl", "ytl", "xbr", "ybr"))
        return Shape(kind, label, ((xtl, ytl), (xbr, ybr)), z_order, order, el.sourceline, rotation, attributes=attrs)
    if kind == "ellipse":
        cx, cy, rx, ry = (_float_attr(el, a, where) for a in ("cx", "cy", "rx", "ry"))
        return Shape(kind, label, ((cx, cy), (rx, ry)), z_order, order, el.sourceline, rotation, attributes=attrs)
    # mask
    box = tuple(_int_attr(el, a, where) for a in ("left", "top", "width", "height"))
    if box[2] <= 0 or box[3] <= 0:
        raise CvatError(f"{where}:{el.sourceline}: mask box has size {box[2]}x{box[3]}")
    rle = _parse_rle(el, where)
    if sum(rle) != box[2] * box[3]:
        raise CvatError(
            f"{where}:{el.sourceline}: mask RLE covers {sum(rle)} pixels, its box {box[2]}x{box[3]} has "
            f"{box[2] * box[3]}"
        )
    return Shape(kind, label, (), z_order, order, el.sourceline, rle=rle, mask_box=box, attributes=attrs)


def _parse_points(el, where: str) -> tuple[tuple[float, float], ...]:
    text = el.get("points")
    if text is None:
        raise CvatError(f"{where}:{el.sourceline}: <{el.tag}> has no points attribute")
    if not text.strip():
        return ()
    points = []
    for pair in text.split(";"):
        xy = pair.split(",")
        try:
            x, y = (float(v) for v in xy)
        except ValueError:
            raise CvatError(
                f"{where}:{el.sourceline}: bad point {pair.strip()!r} in points={text!r}"
            ) from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise CvatError(f"{where}:{el.sourceline}: non-finite point {pair.strip()!r}")
        points.append((x, y))
    return tuple(points)


def _parse_rle(el, where: str) -> tuple[int, ...]:
    text = el.get("rle")
    if text is None:
        raise CvatError(f"{where}:{el.sourceline}: <mask> has no rle attribute")
    try:
        rle = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CvatError(
            f"{where}:{el.sourceline}: mask rle is not a list of integers: {text[:60]!r}"
        ) from None
    if any(v < 0 for v in rle):
        raise CvatError(f"{where}:{el.sourceline}: mask rle has a negative run length")
    return rle


def _float_attr(el, name: str, where: str, default: float | None = None) -> float:
    text = el.get(name)
    if text is None:
        if default is None:
            raise CvatError(f"{where}:{el.sourceline}: <{el.tag}> has no {name} attribute")
        return default
    try:
        value = float(text)
    except ValueError:
        raise CvatError(f"{where}:{el.sourceline}: <{el.tag}> {name}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise CvatError(f"{where}:{el.sourceline}: <{el.tag}> {name}={text!r} is not finite")
    return value


def _int_attr(el, name: str, where: str, default: int | None = None) -> int:
    text = el.get(name)
    if text is None and default is not None:
        return default
    value = _float_attr(el, name, where)
    # CVAT writes integers, but tools re-exporting the XML sometimes write "707.0".
    if not value.is_integer():
        raise CvatError(f"{where}:{el.sourceline}: <{el.tag}> {name}={text!r} is not an integer")
    return int(value)


def _count(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


def write_cvat(
    path: str | os.PathLike,
    images: Iterable[ImageAnnotation],
    labels: Sequence[str],
    *,
    source: str = "manual",
    attributes: Sequence[AttributeSpec] = (),
) -> None:
    """Write ``images`` as a CVAT for images 1.1 task export that ``parse_cvat`` and CVAT itself read back.

    Coordinates are written with 2 decimals, as CVAT does. ``source`` is CVAT's provenance attribute
    ("manual" for hand-made annotations, "auto" for model predictions). ``attributes`` are declared on every
    label in the meta; a shape's own ``attributes`` are written as its ``<attribute>`` children.
    """
    root = etree.Element("annotations")
    etree.SubElement(root, "version").text = "1.1"
    task = etree.SubElement(etree.SubElement(root, "meta"), "task")
    etree.SubElement(task, "mode").text = "annotation"
    label_list = etree.SubElement(task, "labels")
    for name in labels:
        label = etree.SubElement(label_list, "label")
        etree.SubElement(label, "name").text = name
        specs = etree.SubElement(label, "attributes")
        for spec in attributes:
            attr = etree.SubElement(specs, "attribute")
            etree.SubElement(attr, "name").text = spec.name
            etree.SubElement(attr, "mutable").text = str(spec.mutable)
            etree.SubElement(attr, "input_type").text = spec.input_type
            etree.SubElement(attr, "default_value").text = spec.default
            etree.SubElement(attr, "values").text = "\n".join(spec.values)
    for image_id, image in enumerate(images):
        attrs = {
            "id": str(image_id),
            "name": image.name,
            "width": str(image.width),
            "height": str(image.height),
        }
        subset = getattr(image, "subset", None)
        if subset is not None:
            attrs["subset"] = subset
        el = etree.SubElement(root, "image", attrs)
        for shape in image.shapes:
            shape_el = etree.SubElement(el, shape.kind, _shape_attrs(shape, source))
            for name, value in getattr(shape, "attributes", ()):
                etree.SubElement(shape_el, "attribute", {"name": name}).text = value
    etree.ElementTree(root).write(os.fspath(path), xml_declaration=True, encoding="utf-8", pretty_print=True)


def _shape_attrs(shape: Shape, source: str) -> dict[str, str]:
    attrs = {"label": shape.label, "occluded": "0", "source": source}
    if shape.kind in ("polygon", "polyline", "points"):
        attrs["points"] = ";".join(f"{x:.2f},{y:.2f}" for x, y in shape.points)
    elif shape.kind == "box":
        (xtl, ytl), (xbr, ybr) = shape.points
        attrs.update(xtl=f"{xtl:.2f}", ytl=f"{ytl:.2f}", xbr=f"{xbr:.2f}", ybr=f"{ybr:.2f}")
    elif shape.kind == "ellipse":
        (cx, cy), (rx, ry) = shape.points
        attrs.update(cx=f"{cx:.2f}", cy=f"{cy:.2f}", rx=f"{rx:.2f}", ry=f"{ry:.2f}")
    elif shape.kind == "mask":
        left, top, width, height = shape.mask_box
        attrs.update(rle=", ".join(map(str, shape.rle)), left=str(left), top=str(top))
        attrs.update(width=str(width), height=str(height))
    else:
        raise ValueError(f"cannot write shape kind {shape.kind!r}; expected one of {SHAPE_KINDS}")
    rotation = getattr(shape, "rotation", 0.0)
    if shape.kind in ("box", "ellipse") and rotation:
        attrs["rotation"] = f"{rotation:.2f}"
    attrs["z_order"] = str(shape.z_order)
    return attrs
