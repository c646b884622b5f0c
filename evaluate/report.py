"""The evaluation report: one self-contained ``report.html`` (no server, no external CSS/JS/fonts).

Plots are inline SVG, legend swatches are embedded PNG data URIs, and overlays are referenced as relative
paths to PNG files next to the report (checked to exist), so the output folder can be zipped or served as is.
Every name that reaches the page is HTML-escaped; a missing value (``None``) prints as an em dash.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path, PurePosixPath
from urllib.parse import quote

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
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}.swatch{display:inline-block;width:1em;height:1em;
vertical-align:middle;border:1px solid #444;margin-right:.4em}.grid{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;width:380px}figure img{width:100%;image-rendering:pixelated;border:1px solid #999}
pre{background:#f4f4f4;padding:1em;overflow:auto}svg text{font-size:12px;font-family:system-ui,sans-serif}
dt{font-weight:bold;margin-top:.6em}
"""
DEFINITIONS = """
<dl>
<dt>Pixel metrics</dt><dd>IoU, Dice, precision and recall per class from the confusion matrix summed
over every scored pixel of the split (ignored pixels, value 255, are never scored). mIoU is the mean IoU
over defect classes only (background excluded); in binary mode it is the defect IoU.</dd>
<dt>Absent classes</dt><dd>A class that appears in neither the truth nor the prediction anywhere in the
split has no score (—) and is left out of the means. A class present in the truth but never predicted
scores IoU 0 and is included. Precision is — when nothing was predicted, recall is — when nothing was
true.</dd>
<dt>Per-image Dice</dt><dd>One Dice per (image, defect class); a class absent from both the image's truth
and its prediction scores 1 (the Severstal steel-defect metric). Mean Dice averages all (image, class)
pairs; images are ranked by their mean over classes.</dd>
<dt>Object metrics</dt><dd>A ground-truth defect is a connected component (8-connectivity) of one class in
the truth; it is found when any predicted pixel of the same class overlaps it. Object recall = found / all
truth components. Object precision = predicted components of a class touching a truth component of that
class / all predicted components; a predicted component lying entirely on ignored pixels is not
counted.</dd>
</dl>
"""


def _fmt(v) -> str:
    return DASH if v is None else f"{v:.3f}"


def _png_data_uri(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def _svg(width: float, height: float, parts: Sequence[str]) -> str:
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{"".join(parts)}</svg>'


def _summary_table(metrics: Mapping, class_names: Sequence[str]) -> str:
    head = "".join(f"<th>{escape(c.replace('_', ' '))}</th>" for c in TABLE_COLUMNS)
    rows = []
    for c, name in enumerate(class_names):
        d = metrics.get("per_class", {}).get(name) or {}
        swatch = f'<span class="swatch" style="background:{_hex(PALETTE[c])}"></span>' if c else ""
        cells = "".join(f"<td>{_fmt(d.get(k))}</td>" for k in TABLE_COLUMNS)
        rows.append(f"<tr><td>{swatch}{escape(name)}</td>{cells}</tr>")
    return f"<table><tr><th>class</th>{head}</tr>{''.join(rows)}</table>"


def _confusion_svg(mat, class_names: Sequence[str], cell: int = 40) -> str:
    """Row-normalized heat map: each truth row shows where its pixels went."""
    m = np.asarray(mat, dtype=np.float64)
    n = len(class_names)
    if m.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {m.shape}, expected ({n}, {n})")
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    left, top = 140, 140
    parts = []
    for i in range(n):
        y = top + i * cell
        parts.append(
            f'<text x="{left - 6}" y="{y + cell / 2 + 4}" text-anchor="end">{escape(class_names[i])}</text>'
        )
        for j in range(n):
            x = left + j * cell
            v = norm[i, j]
            fill = "#e0e0e0" if rows[i, 0] == 0 else _hex(np.round(255 - v * np.array([247, 207, 148])))
            ink = "#fff" if v > 0.55 else "#222"
            label = DASH if rows[i, 0] == 0 else f"{100 * v:.0f}"
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" stroke="#fff">'
                f"<title>truth {escape(class_names[i])} → predicted {escape(class_names[j])}: "
                f"{int(m[i, j])} px</title></rect>"
                f'<text x="{x + cell / 2}" y="{y + cell / 2 + 4}" text-anchor="middle" fill="{ink}">'
                f"{label}</text>"
            )
    for j, name in enumerate(class_names):
        x = left + j * cell + cell / 2
        parts.append(
            f'<text x="{x}" y="{top - 6}" transform="rotate(-45 {x} {top - 6})">{escape(name)}</text>'
        )
    w, h = left + n * cell + 10, top + n * cell + 30
    parts.append(f'<text x="{left}" y="{h - 8}">rows: truth, columns: prediction, % of each truth row</text>')
    return _svg(w, h, parts)


def _bars_svg(per_class: Mapping, class_names: Sequence[str], width: int = 360) -> str:
    """Horizontal bars per class for each metric in ``BAR_METRICS``; a missing value is printed as —."""
    left, bar, gap = 150, 10, 8
    group = bar * len(BAR_METRICS) + gap
    parts = []
    for k, (_, label, color) in enumerate(BAR_METRICS):
        parts.append(f'<rect x="{left + 130 * k}" y="4" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{left + 130 * k + 14}" y="13">{escape(label)}</text>')
    for i, name in enumerate(class_names):
        y0 = 24 + i * group
        parts.append(f'<text x="{left - 6}" y="{y0 + group / 2}" text-anchor="end">{escape(name)}</text>')
        d = per_class.get(name) or {}
        for k, (key, _, color) in enumerate(BAR_METRICS):
            y, v = y0 + k * bar, d.get(key)
            if v is not None:
                parts.append(
                    f'<rect x="{left}" y="{y}" width="{v * width:.1f}" height="{bar - 1}" fill="{color}"/>'
                )
            x = left + (v or 0) * width + 4
            parts.append(f'<text x="{x:.1f}" y="{y + bar - 1}" font-size="10">{_fmt(v)}</text>')
    h = 24 + len(class_names) * group
    return _svg(left + width + 60, h, parts)


def _histogram_svg(values: Sequence[float], width: int = 400, height: int = 140) -> str:
    """Histogram of per-image mean Dice over [0, 1]."""
    counts, _ = np.histogram(values, bins=HIST_BINS, range=(0, 1))
    top = max(int(counts.max()), 1)
    bw, base = width / HIST_BINS, height - 20
    parts = []
    for k, c in enumerate(counts.tolist()):
        h = (base - 10) * c / top
        parts.append(
            f'<rect x="{k * bw:.1f}" y="{base - h:.1f}" width="{bw - 2:.1f}" height="{h:.1f}" fill="#4363d8">'
            f"<title>{k / HIST_BINS:.1f}–{(k + 1) / HIST_BINS:.1f}: {c} images</title></rect>"
        )
    parts.append(f'<text x="0" y="{height - 4}">0</text><text x="{width - 8}" y="{height - 4}">1</text>')
    return _svg(width, height, parts)


def _worst_grid(out_dir: Path, worst: Sequence[Mapping]) -> str:
    figs = []
    for w in worst:
        rel = PurePosixPath(str(w["overlay_path_relative"]).replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or not (out_dir / rel).is_file():
            raise ValueError(
                f"{out_dir}: overlay {rel} for image {w['image_id']} is not a file inside the report folder"
            )
        name, src = escape(str(w["image_id"])), escape(quote(str(rel)))
        figs.append(
            f'<figure><a href="{src}"><img src="{src}" alt="{name}"></a>'
            f"<figcaption>{name}: mean Dice {_fmt(w.get('dice'))}</figcaption></figure>"
        )
    return f'<div class="grid">{"".join(figs)}</div>' if figs else "<p>No images.</p>"


def _legend(class_names: Sequence[str]) -> str:
    classes = " ".join(
        f'<span><span class="swatch" style="background:{_hex(PALETTE[c])}"></span>{escape(name)}</span>'
        for c, name in enumerate(class_names)
        if c
    )
    rows = "".join(
        f'<tr><td><img src="{_png_data_uri(rgb)}" width="32" height="32" alt="{escape(label)}"> '
        f"{escape(label)}</td><td>{escape(text)}</td></tr>"
        for label, text, rgb in legend_swatches()
    )
    return f"<p>{classes}</p><table>{rows}</table>"


def _decision(decision: Mapping | None, class_names: Sequence[str]) -> str:
    """How probabilities became classes: tuned thresholds and minimum areas per class, or argmax."""
    if not decision:
        return "argmax"
    if decision["kind"] != "tuned":
        fallback = " (the checkpoint has no tuned decision)" if decision.get("requested") == "tuned" else ""
        return escape(f"argmax{' / 0.5' if len(decision['thresholds']) == 1 else ''}{fallback}")
    names = class_names[1:]
    parts = [f"{n}: p ≥ {t:.2f}, ≥ {a} px" for n, t, a in zip(names, decision["thresholds"], decision["min_area"],
                                                               strict=True)]
    return "tuned on validation · " + escape("; ".join(parts))


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
    mean_dice = float(np.mean(all_dice)) if all_dice else None
    config = json.dumps(metrics.get("config"), indent=2, sort_keys=True, default=str)
    body = [
        "<h1>Defect segmentation: evaluation report</h1>",
        f"<p>Checkpoint: <code>{escape(str(metrics.get('checkpoint')))}</code> · "
        f"images: {escape(str(metrics.get('n_images')))}</p>",
        "<h2>Summary</h2>",
        f"<table><tr><th>mIoU (defect classes)</th><td>{_fmt(metrics.get('miou'))}</td></tr>"
        f"<tr><th>Mean Dice (per image × class)</th><td>{_fmt(mean_dice)}</td></tr>"
        f"<tr><th>Object recall (all defects)</th><td>{_fmt(metrics.get('object_recall'))}</td></tr>"
        f"<tr><th>Object precision (all defects)</th><td>{_fmt(metrics.get('object_precision'))}</td></tr>"
        f"<tr><th>Decision</th><td>{_decision(metrics.get('decision'), class_names)}</td></tr>"
        f"<tr><th>Test-time augmentation</th><td>{escape(str(metrics.get('tta', 'none')))}</td></tr></table>",
        _summary_table(metrics, class_names),
        "<h2>Per-class scores</h2>",
        _bars_svg(metrics.get("per_class", {}), class_names),
        "<h2>Confusion matrix</h2>",
        _confusion_svg(metrics["confusion_matrix"], class_names),
        "<h2>Per-image mean Dice</h2>",
        _histogram_svg(image_means) if image_means else "<p>No images.</p>",
        f"<h2>Worst {len(worst)} images by Dice</h2>",
        _legend(class_names),
        _worst_grid(out_dir, worst),
        "<h2>Definitions</h2>",
        DEFINITIONS,
        f"<h2>Configuration</h2><details><summary>config</summary><pre>{escape(config)}</pre></details>",
    ]
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Evaluation report</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
