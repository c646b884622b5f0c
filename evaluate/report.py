"""The evaluation report: one self-contained ``report.html`` (no server, no external CSS/JS/fonts).

The page is the jinja2 template ``templates/report.html``, rendered with autoescaping: this module only
prepares values (numbers, names, colours, the layout of the inline SVG plots) and never writes markup, so
every name that reaches the page is escaped by the template engine. Legend swatches are embedded PNG data
URIs; overlays are referenced as relative paths to PNG files next to the report (checked to exist), so the
output folder can be zipped or served as is. A missing value (``None``) prints as an em dash.

The SVG plots are laid out here without a browser to measure text, so label room is estimated from the
number of characters at ``CHAR_WIDTH`` (a generous average for a 12 px sans-serif face).
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import jinja2
import numpy as np
from PIL import Image

from evaluate.overlay import PALETTE, legend_swatches
from evaluate.tune import MIN_OBJECTS

DASH = "—"
PIXEL_COLUMNS = (
    ("iou", "IoU"),
    ("dice", "Dice"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("image_dice", "mean image Dice"),
)
OBJECT_COLUMNS = (
    ("object_recall", "recall"),
    ("object_precision", "precision"),
    ("object_f1", "F1"),
    ("object_f1_050", "F1 at IoU > 0.5"),
    ("pq", "PQ"),
    ("gt_objects", "truth objects"),
    ("pred_objects", "predicted objects"),
)
BAR_METRICS = (
    ("iou", "pixel IoU", "#4363d8"),
    ("object_f1", "object F1", "#3cb44b"),
    ("pq", "PQ", "#f58231"),
)
HIST_BINS = 10
CHAR_WIDTH = 7.2  # px per character of 12 px text, for label room in the SVG plots
TEMPLATES = Path(__file__).resolve().parent / "templates"


def _fmt(v) -> str:
    if v is None:
        return DASH
    return str(v) if isinstance(v, int | np.integer) else f"{v:.3f}"


_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,  # every value is text to be escaped; the template alone writes markup
    undefined=jinja2.StrictUndefined,  # a misspelt field is an error, not an empty cell
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["fmt"] = _fmt


def _png_data_uri(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def _text_width(text: str) -> float:
    return CHAR_WIDTH * len(text)


def _color(c: int) -> str | None:
    return _hex(PALETTE[c]) if c else None


def _summary(metrics: Mapping, multiclass: bool) -> list[tuple[str, float | None]]:
    """The headline figures: any defect (classes merged) first, then the class-aware ones in multiclass."""
    a = metrics["any_defect"]
    rows = [
        ("Defect pixel IoU (any defect vs background)", a["iou"]),
        ("Object recall: defects found (IoU ≥ 0.1)", a["object_recall"]),
        ("Object precision: predicted objects that are defects (IoU ≥ 0.1)", a["object_precision"]),
        ("Object F1 (IoU ≥ 0.1)", a["object_f1"]),
        ("Object F1 at IoU > 0.5", a["object_f1_050"]),
        ("Panoptic quality (PQ)", a["pq"]),
    ]
    if multiclass:
        rows += [
            ("mIoU (pixel, mean over defect classes)", metrics["miou"]),
            ("Mean object F1 over classes with truth objects", metrics["object_f1_mean"]),
            ("Found defects given the right class", metrics["right_class"]),
        ]
    return rows + [("Mean Dice (image × class pairs with a defect in truth or prediction)", metrics["mean_dice"])]


def _object_rows(metrics: Mapping, class_names: Sequence[str]) -> list[dict]:
    """One row per defect class, then the any-defect row (classes merged before labelling)."""
    rows = [{"name": name, "color": _color(c), "scores": [metrics["per_class"][name][k] for k, _ in OBJECT_COLUMNS]}
            for c, name in enumerate(class_names) if c]  # fmt: skip
    any_defect = metrics["any_defect"]
    return rows + [{"name": "any defect", "color": None, "scores": [any_defect[k] for k, _ in OBJECT_COLUMNS]}]


def _pixel_rows(metrics: Mapping, class_names: Sequence[str]) -> list[dict]:
    return [{"name": name, "color": _color(c), "scores": [metrics["per_class"][name].get(k) for k, _ in PIXEL_COLUMNS]}
            for c, name in enumerate(class_names)]  # fmt: skip


def _object_confusion(mat, class_names: Sequence[str]) -> dict | None:
    """The object-level class confusion in reading order: truth classes then "false alarm" down, predicted
    classes then "missed" across (metrics.json keeps both at index 0); None in binary."""
    if len(class_names) <= 2:
        return None
    m = np.asarray(mat, dtype=np.int64)
    n = len(class_names)
    if m.shape != (n, n):
        raise ValueError(f"object confusion has shape {m.shape}, expected ({n}, {n})")
    order = [*range(1, n), 0]
    rows = []
    for i in order:
        cells = []
        for j in order:
            kind = "none" if i == j == 0 else "right" if i == j else "wrong" if m[i, j] else "zero"
            cells.append({"count": int(m[i, j]), "kind": kind,
                          "title": f"truth {class_names[i] if i else 'none'} → predicted "
                                   f"{class_names[j] if j else 'none'}: {int(m[i, j])}"})  # fmt: skip
        rows.append({"name": class_names[i] if i else "false alarm", "color": _color(i), "cells": cells,
                     "total": int(m[i].sum())})  # fmt: skip
    columns = [{"parts": class_names[j].split("_"), "color": _color(j)} for j in order[:-1]]
    return {"rows": rows, "columns": columns + [{"parts": ["missed"], "color": None}]}


def _confusion(mat, class_names: Sequence[str], cell: int = 40) -> dict:
    """Row-normalized pixel heat map: each truth row shows where its pixels went. The column labels are
    rotated 45°, so they need room above the grid (their width x sin 45°) and to the right of the last
    column (their width x cos 45°), measured from the longest name rather than fixed."""
    m = np.asarray(mat, dtype=np.float64)
    n = len(class_names)
    if m.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {m.shape}, expected ({n}, {n})")
    totals = m.sum(1, keepdims=True)
    norm = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
    slant = math.sqrt(0.5)
    left = math.ceil(max(_text_width(name) for name in class_names)) + 12
    top = math.ceil(max(_text_width(name) for name in class_names) * slant) + 16
    rows = []
    for i in range(n):
        empty = totals[i, 0] == 0
        cells = [{"x": left + j * cell, "name": class_names[j], "pixels": int(m[i, j]),
                  "fill": "#e0e0e0" if empty else _hex(np.round(255 - norm[i, j] * np.array([247, 207, 148]))),
                  "ink": "#fff" if norm[i, j] > 0.55 else "#222",
                  "label": DASH if empty else f"{100 * norm[i, j]:.0f}"} for j in range(n)]  # fmt: skip
        rows.append({"name": class_names[i], "y": top + i * cell, "cells": cells})
    columns = [{"name": name, "x": left + j * cell + cell / 2} for j, name in enumerate(class_names)]
    right = max(left + n * cell, *(c["x"] + 4 + _text_width(c["name"]) * slant for c in columns))
    return {"rows": rows, "columns": columns, "cell": cell, "left": left, "top": top,
            "width": math.ceil(right) + 8, "height": top + n * cell + 4}  # fmt: skip


def _bars(per_class: Mapping, class_names: Sequence[str], width: int = 360) -> dict:
    """Horizontal bars per class for each metric in ``BAR_METRICS``; a missing value is printed as —."""
    left, bar, gap = math.ceil(max(_text_width(n) for n in class_names)) + 12, 10, 8
    group = bar * len(BAR_METRICS) + gap
    groups = []
    for i, name in enumerate(class_names):
        y0, d = 28 + i * group, per_class.get(name) or {}
        bars = [{"y": y0 + k * bar, "value": d.get(key), "color": color, "length": (d.get(key) or 0) * width,
                 "label_x": left + (d.get(key) or 0) * width + 4}
                for k, (key, _, color) in enumerate(BAR_METRICS)]  # fmt: skip
        groups.append({"name": name, "y": y0 + group / 2, "bars": bars})
    metrics, x = [], left
    for _, label, color in BAR_METRICS:
        metrics.append({"x": x, "label": label, "color": color})
        x += 14 + _text_width(label) + 16
    return {"left": left, "bar": bar, "metrics": metrics, "groups": groups, "width": left + width + 50,
            "height": 28 + len(class_names) * group}  # fmt: skip


def _nice_step(top: int, ticks: int = 5) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that marks ``top`` in at most ``ticks`` steps."""
    step = 1
    while True:
        for k in (1, 2, 5):
            if top <= k * step * ticks:
                return k * step
        step *= 10


def _histogram(means: Sequence[float], width: int = 460, height: int = 220) -> dict | None:
    """Histogram of per-image mean Dice over [0, 1] with labelled axes and each bar's count; None without
    values. The y axis goes up to a round number of images at or above the tallest bar."""
    if not means:
        return None
    counts, _ = np.histogram(means, bins=HIST_BINS, range=(0, 1))
    step = _nice_step(max(int(counts.max()), 1))
    y_max = step * math.ceil(max(int(counts.max()), 1) / step)
    left, right, top, bottom = 52, 12, 22, 44  # room for y ticks + title, x ticks + title, counts on top
    plot_w, plot_h = width - left - right, height - top - bottom
    base = top + plot_h
    bw = plot_w / HIST_BINS
    bins = []
    for k, c in enumerate(counts.tolist()):
        h = plot_h * c / y_max
        bins.append({"x": left + k * bw + 1, "y": base - h, "width": bw - 2, "height": h, "count": c,
                     "mid": left + (k + 0.5) * bw, "low": k / HIST_BINS, "high": (k + 1) / HIST_BINS})  # fmt: skip
    x_ticks = [{"x": left + k * plot_w / HIST_BINS, "label": f"{k / HIST_BINS:g}"} for k in range(HIST_BINS + 1)]
    y_ticks = [{"y": base - plot_h * v / y_max, "label": str(v)} for v in range(0, y_max + 1, step)]
    return {"bins": bins, "width": width, "height": height, "left": left, "right": width - right, "top": top,
            "base": base, "x_ticks": x_ticks, "y_ticks": y_ticks, "mid_x": left + plot_w / 2,
            "mid_y": top + plot_h / 2}  # fmt: skip


def _inside(out_dir: Path, path, what: str, image_id) -> str:
    """``path`` as a quoted relative link, checked to name a file inside ``out_dir``."""
    rel = PurePosixPath(str(path).replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not (out_dir / rel).is_file():
        raise ValueError(f"{out_dir}: {what} {rel} for image {image_id} is not a file inside the report folder")
    return quote(str(rel))


def _worst(out_dir: Path, worst: Sequence[Mapping]) -> list[dict]:
    return [{"name": str(w["image_id"]), "dice": w["dice"],
             "src": _inside(out_dir, w["overlay_path_relative"], "overlay", w["image_id"]),
             "full": _inside(out_dir, w["side_by_side_path_relative"], "side-by-side image", w["image_id"])}
            for w in worst]  # fmt: skip


def _decision(decision: Mapping | None, class_names: Sequence[str]) -> dict:
    """How probabilities became classes: a line, and for a tuned decision a row per defect class with its
    threshold, minimum area and peak, its validation objects and whether it borrowed the others' median."""
    if not decision:
        return {"line": "argmax", "rows": []}
    if decision["kind"] not in ("tuned", "defect", "objects"):
        fallback = " (the checkpoint has no tuned decision)" if decision.get("requested") == "tuned" else ""
        return {"line": f"argmax{' / 0.5' if len(decision['thresholds']) == 1 else ''}{fallback}", "rows": []}
    names = class_names[1:]
    peaks = decision.get("min_peak") or [0.0] * len(names)
    counts = decision.get("val_objects") or [None] * len(names)
    borrowed = list(decision.get("borrowed") or [])
    rows = [{"name": n, "color": _color(c), "threshold": t, "min_area": a, "min_peak": k, "val_objects": v,
             "borrowed": n in borrowed}
            for c, (n, t, a, k, v) in enumerate(zip(names, decision["thresholds"], decision["min_area"], peaks,
                                                    counts, strict=True), start=1)]  # fmt: skip
    line = "tuned on validation scans"
    if decision["kind"] == "objects":
        explain = ("A pixel is a defect when its defect probability (1 − P(background)) reaches the threshold, the "
                   "same for every class; each connected defect takes the class with the largest probability "
                   "summed over its pixels, and is dropped when it is smaller than that class's minimum area or "
                   "its highest defect probability stays below the class's minimum peak.")
    elif decision["kind"] == "defect":
        explain = ("A pixel takes its most likely defect class when its defect probability (1 − P(background)) "
                   "reaches that class's threshold; a component smaller than the minimum area, or whose highest "
                   "defect probability stays below the minimum peak, is dropped.")
    else:
        explain = ("A pixel takes its most likely defect class when that probability reaches the class's "
                   "threshold; a component smaller than the minimum area, or whose highest probability stays "
                   "below the minimum peak, is dropped.")
    if decision.get("grow_px") and decision["kind"] != "objects":
        reads = "defect probability" if decision["kind"] == "defect" else "probability of that class"
        explain += (f" Then each kept defect grows by up to {decision['grow_px']} px into the neighbouring pixels "
                    f"whose most likely class is its own, with a {reads} of at least 0.5, never joining another "
                    f"defect: the rules are tuned to find defects, the growth gives back their outlines.")
    if borrowed:
        line += (f"; {', '.join(borrowed)} had fewer than {MIN_OBJECTS} validation objects and took their values "
                 f"from the other classes (their median, or one rule for all classes pooled when none had enough)")
    return {"line": line, "rows": rows, "explain": explain}


def trained_on_warning(metrics: Mapping) -> str:
    """The line a report and a headline carry when the scored scans include some the checkpoint trained on."""
    seen = metrics.get("trained_on")
    if not seen:
        return ""
    return (f"{seen['scans']} of the {seen['of']} scored scans are among the checkpoint's training scans: these "
            f"figures do not measure held-out quality")


def write_report(
    out_dir: str | Path, metrics: Mapping, worst: Sequence[Mapping], class_names: Sequence[str]
) -> Path:
    """Write ``out_dir/report.html`` and return its path.

    ``metrics``: metrics.json's content (``any_defect``, ``per_class``, ``object_confusion``,
    ``per_image_dice`` with None for an empty pair, ``confusion_matrix``, ``decision``, ...). ``worst``: dicts
    with ``image_id``, ``dice`` (the image's mean, or None), ``overlay_path_relative`` (the error overlay
    shown) and ``side_by_side_path_relative`` (truth beside prediction, opened on a click), both PNGs under
    ``out_dir``, worst first.
    """
    out_dir = Path(out_dir)
    if len(class_names) > len(PALETTE):
        raise ValueError(f"{len(class_names)} classes but the overlay palette has {len(PALETTE)} colours")
    multiclass = len(class_names) > 2
    per_image = metrics.get("per_image_dice") or {}
    kept = {i: [x for x in v if x is not None] for i, v in per_image.items()}
    image_means = [float(np.mean(v)) for v in kept.values() if v]
    page = _env.get_template("report.html").render(
        checkpoint=str(metrics.get("checkpoint")),
        n_images=str(metrics.get("n_images")),
        summary=_summary(metrics, multiclass),
        decision=_decision(metrics.get("decision"), class_names),
        tta=str(metrics.get("tta", "none")),
        trained_on=trained_on_warning(metrics),
        object_columns=[label for _, label in OBJECT_COLUMNS],
        objects=_object_rows(metrics, class_names),
        object_confusion=_object_confusion(metrics["object_confusion"], class_names),
        pixel_columns=[label for _, label in PIXEL_COLUMNS],
        pixels=_pixel_rows(metrics, class_names),
        bars=_bars(metrics["per_class"], class_names),
        confusion=_confusion(metrics["confusion_matrix"], class_names),
        histogram=_histogram(image_means),
        n_undefined=len(per_image) - len(image_means),
        worst=_worst(out_dir, worst),
        legend_classes=[{"name": n, "color": _hex(PALETTE[c])} for c, n in enumerate(class_names) if c],
        legend_swatches=[{"label": label, "text": text, "uri": _png_data_uri(rgb)}
                         for label, text, rgb in legend_swatches()],  # fmt: skip
        config=json.dumps(metrics.get("config"), indent=2, sort_keys=True, default=str),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
