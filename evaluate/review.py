"""What ``evaluate predict`` tells a reviewer: the task's own label names, and a summary of the CVAT XML.

``task_labels`` maps the checkpoint's classes onto the labels of an existing CVAT task export
(``--labels-from``), so the predictions import into that task without renaming. ``summarize`` counts the
written shapes per class and kind and per score band, reports the polygons' points and the file's size,
and lists the least certain shapes, so an annotator can review those first.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from shardgen.classes import normalize_label
from shardgen.cvat import CvatError, ImageAnnotation, Shape, parse_labels

from . import EvaluateError

SCORE_BANDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # summary band edges: review the shapes of the lowest band first
LEAST_CERTAIN = 10  # shapes listed by name in the summary, lowest score first


def task_labels(class_names: list[str], xml: str) -> tuple[list[str], list[str | None]]:
    """(every label of the CVAT export ``xml``, the label it uses for each class id; None for background).

    A class matches the label spelled the same, else the one label equal to it up to case, spaces and
    underscores (shardgen's rule). A class the task lacks is an error naming it.
    """
    try:
        labels = parse_labels(xml)
    except CvatError as e:
        raise EvaluateError(str(e)) from None
    chosen: list[str | None] = [None]
    for name in class_names[1:]:
        matches = [label for label in labels if label == name] or [
            label for label in labels if normalize_label(label) == normalize_label(name)
        ]
        if len(matches) != 1:
            why = "has no label" if not matches else f"has several labels ({', '.join(matches)})"
            raise EvaluateError(f"{xml}: the task {why} for class {name!r}; its labels: {', '.join(labels)}")
        chosen.append(matches[0])
    return labels, chosen


def score_of(shape: Shape) -> float:
    """A shape's score as a probability (its attribute is whole percent)."""
    return int(dict(shape.attributes)["score"]) / 100


def band_of(score: float) -> str:
    edges = (0.0, *SCORE_BANDS, 1.0)
    k = sum(score >= e for e in SCORE_BANDS)
    return f"{edges[k]:.1f}-{edges[k + 1]:.1f}"


def summarize(annotations: list[ImageAnnotation], below: Counter, xml: Path) -> dict:
    """Shapes per class (polygon / mask), per score band, polygon points, the least certain shapes, XML size."""
    per_class: dict[str, Counter] = {}
    bands = Counter({band_of(e - 0.01): 0 for e in (*SCORE_BANDS, 1.0)})
    points, shapes = [], []
    for ann in annotations:
        for s in ann.shapes:
            per_class.setdefault(s.label, Counter())[s.kind] += 1
            bands[band_of(score_of(s))] += 1
            if s.kind == "polygon":
                points.append(len(s.points))
            shapes.append((score_of(s), ann.name, s))
    shapes.sort(key=lambda t: t[0])
    return {
        "shapes": len(shapes),
        "per_class": {label: dict(sorted(kinds.items())) for label, kinds in sorted(per_class.items())},
        "score_bands": dict(bands),
        "below_min_score": dict(below),
        "polygon_points": {"total": sum(points), "mean": round(sum(points) / max(len(points), 1), 1),
                           "max": max(points, default=0)},  # fmt: skip
        "least_certain": [{"image": name, "label": s.label, "score": score, "box": _box(s)}
                          for score, name, s in shapes[:LEAST_CERTAIN]],  # fmt: skip
        "xml": str(xml),
        "xml_bytes": xml.stat().st_size,
    }


def _box(shape: Shape) -> list[float]:
    """[left, top, right, bottom] of a shape in scan coordinates."""
    if shape.kind == "mask":
        left, top, width, height = shape.mask_box
        return [left, top, left + width, top + height]
    xs, ys = [p[0] for p in shape.points], [p[1] for p in shape.points]
    return [round(min(xs), 2), round(min(ys), 2), round(max(xs), 2), round(max(ys), 2)]
