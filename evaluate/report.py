"""The evaluation report: one self-contained ``report.html`` (no server, no external CSS/JS/fonts).

The page is the jinja2 template ``templates/report.html``, rendered with autoescaping: this module only
prepares values (numbers, names, colours, the layout of the inline SVG plots) and never writes markup, so
every name that reaches the page is escaped by the template engine. Legend swatches are embedded PNG data
URIs; overlays are referenced as relative paths to PNG files next to the report (checked to exist), so the
output folder can be zipped or served as is. A missing value (``None``) prints as an em dash.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import jinja2
import numpy as np
from PIL import Image

from evaluate.overlay import PALETTE, legend_swatches

DASH = "—"
TABLE_COLUMNS = ("iou", "dice", "precision", "recall", "object_recall", "object_precision")
BAR_METRICS = (
    ("iou", "IoU", "#4363d8"),
    ("dice", "Dice", "#f58231"),
    ("object_recall", "Object recall", "#3cb44b"),
)
HIST_BINS = 10
TEMPLATES = Path(__file__).resolve().parent / "templates"


def _fmt(v) -> str:
    return DASH if v is None else f"{v:.3f}"


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


def _class_rows(metrics: Mapping, class_names: Sequence[str]) -> list[dict]:
    rows = []
    for c, name in enumerate(class_names):
        d = metrics.get("per_class", {}).get(name) or {}
        rows.append({"name": name, "color": _hex(PALETTE[c]) if c else None,
                     "scores": [d.get(k) for k in TABLE_COLUMNS]})  # fmt: skip
    return rows


def _confusion(mat, class_names: Sequence[str], cell: int = 40) -> dict:
    """Row-normalized heat map: each truth row shows where its pixels went."""
    m = np.asarray(mat, dtype=np.float64)
    n = len(class_names)
    if m.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {m.shape}, expected ({n}, {n})")
    totals = m.sum(1, keepdims=True)
    norm = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
    left, top = 140, 140
    rows = []
    for i in range(n):
        empty = totals[i, 0] == 0
        cells = [{"x": left + j * cell, "name": class_names[j], "pixels": int(m[i, j]),
                  "fill": "#e0e0e0" if empty else _hex(np.round(255 - norm[i, j] * np.array([247, 207, 148]))),
                  "ink": "#fff" if norm[i, j] > 0.55 else "#222",
                  "label": DASH if empty else f"{100 * norm[i, j]:.0f}"} for j in range(n)]  # fmt: skip
        rows.append({"name": class_names[i], "y": top + i * cell, "cells": cells})
    columns = [{"name": name, "x": left + j * cell + cell / 2} for j, name in enumerate(class_names)]
    return {"rows": rows, "columns": columns, "cell": cell, "left": left, "top": top,
            "width": left + n * cell + 10, "height": top + n * cell + 30}  # fmt: skip


def _bars(per_class: Mapping, class_names: Sequence[str], width: int = 360) -> dict:
    """Horizontal bars per class for each metric in ``BAR_METRICS``; a missing value is printed as —."""
    left, bar, gap = 150, 10, 8
    group = bar * len(BAR_METRICS) + gap
    groups = []
    for i, name in enumerate(class_names):
        y0, d = 24 + i * group, per_class.get(name) or {}
        bars = [{"y": y0 + k * bar, "value": d.get(key), "color": color, "length": (d.get(key) or 0) * width,
                 "label_x": left + (d.get(key) or 0) * width + 4}
                for k, (key, _, color) in enumerate(BAR_METRICS)]  # fmt: skip
        groups.append({"name": name, "y": y0 + group / 2, "bars": bars})
    metrics = [{"x": left + 130 * k, "label": label, "color": color} for k, (_, label, color) in enumerate(BAR_METRICS)]
    return {"left": left, "bar": bar, "metrics": metrics, "groups": groups, "width": left + width + 60,
            "height": 24 + len(class_names) * group}  # fmt: skip


def _histogram(values: Sequence[float], width: int = 400, height: int = 140) -> dict | None:
    """Histogram of per-image mean Dice over [0, 1]; None without images."""
    if not values:
        return None
    counts, _ = np.histogram(values, bins=HIST_BINS, range=(0, 1))
    top = max(int(counts.max()), 1)
    bw, base = width / HIST_BINS, height - 20
    bins = []
    for k, c in enumerate(counts.tolist()):
        h = (base - 10) * c / top
        bins.append({"x": k * bw, "y": base - h, "width": bw - 2, "height": h, "count": c,
                     "low": k / HIST_BINS, "high": (k + 1) / HIST_BINS})  # fmt: skip
    return {"bins": bins, "width": width, "height": height}


def _worst(out_dir: Path, worst: Sequence[Mapping]) -> list[dict]:
    figures = []
    for w in worst:
        rel = PurePosixPath(str(w["overlay_path_relative"]).replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or not (out_dir / rel).is_file():
            raise ValueError(
                f"{out_dir}: overlay {rel} for image {w['image_id']} is not a file inside the report folder"
            )
        figures.append({"name": str(w["image_id"]), "src": quote(str(rel)), "dice": w.get("dice")})
    return figures


def _decision(decision: Mapping | None, class_names: Sequence[str]) -> str:
    """How probabilities became classes: tuned thresholds and minimum areas per class, or argmax."""
    if not decision:
        return "argmax"
    if decision["kind"] != "tuned":
        fallback = " (the checkpoint has no tuned decision)" if decision.get("requested") == "tuned" else ""
        return f"argmax{' / 0.5' if len(decision['thresholds']) == 1 else ''}{fallback}"
    names = class_names[1:]
    peaks = decision.get("min_peak") or [0.0] * len(names)
    parts = [f"{n}: p ≥ {t:.2f}, ≥ {a} px" + (f", peak ≥ {k:.2f}" if k else "")
             for n, t, a, k in zip(names, decision["thresholds"], decision["min_area"], peaks, strict=True)]
    return "tuned on validation · " + "; ".join(parts)


def write_report(
    out_dir: str | Path, metrics: Mapping, worst: Sequence[Mapping], class_names: Sequence[str]
) -> Path:
    """Write ``out_dir/report.html`` and return its path.

    ``metrics``: ``miou``, ``per_class`` {name: {iou, dice, precision, recall, object_recall,
    object_precision}}, ``per_image_dice`` {image_id: [Dice per defect class]}, ``n_images``,
    ``confusion_matrix`` [C][C] (rows truth), ``checkpoint``, ``config``. ``worst``: dicts with
    ``image_id``, ``dice`` and ``overlay_path_relative`` (a PNG under ``out_dir``), worst first.
    """
    out_dir = Path(out_dir)
    if len(class_names) > len(PALETTE):
        raise ValueError(f"{len(class_names)} classes but the overlay palette has {len(PALETTE)} colours")
    per_image = metrics.get("per_image_dice") or {}
    image_means = [float(np.mean(v)) for v in per_image.values() if len(v)]
    all_dice = [float(x) for v in per_image.values() for x in v]
    page = _env.get_template("report.html").render(
        checkpoint=str(metrics.get("checkpoint")),
        n_images=str(metrics.get("n_images")),
        summary={"miou": metrics.get("miou"), "mean_dice": float(np.mean(all_dice)) if all_dice else None,
                 "object_recall": metrics.get("object_recall"),
                 "object_precision": metrics.get("object_precision")},  # fmt: skip
        decision=_decision(metrics.get("decision"), class_names),
        tta=str(metrics.get("tta", "none")),
        columns=TABLE_COLUMNS,
        classes=_class_rows(metrics, class_names),
        bars=_bars(metrics.get("per_class", {}), class_names),
        confusion=_confusion(metrics["confusion_matrix"], class_names),
        histogram=_histogram(image_means),
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
