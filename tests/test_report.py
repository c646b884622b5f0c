"""The HTML report renders from a hand-made metrics dict, every image resolves, names are escaped."""

import base64
import io
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from evaluate.overlay import PALETTE, legend_swatches, overlay
from evaluate.report import write_report

NAMES = ["background", "Pinpoint", "<script>alert(1)</script>", "Needle"]


class _Srcs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags = [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        for k, v in attrs:
            assert not (k in ("src", "href") and v.startswith(("http:", "https:", "//"))), f"external {k}={v}"


def _metrics():
    row = {"iou": 0.5, "dice": 0.667, "precision": 0.75, "recall": 0.6, "object_recall": 2 / 3}
    return {
        "miou": 0.25,
        "per_class": {
            "background": {**row, "object_recall": None, "object_precision": None},
            "Pinpoint": {**row, "object_precision": 0.5},
            NAMES[2]: {"iou": 0.0, "dice": 0.0, "precision": None, "recall": 0.0},
            "Needle": {
                k: None for k in ("iou", "dice", "precision", "recall", "object_recall", "object_precision")
            },
        },
        "per_image_dice": {"scan 1&2.png": [0.2, 0.0, 1.0], "scan_3.png": [1.0, 1.0, 1.0]},
        "n_images": 2,
        "confusion_matrix": [[90, 5, 1, 0], [3, 2, 0, 0], [4, 0, 0, 0], [0, 0, 0, 0]],
        "checkpoint": "runs/x/best.pt",
        "config": {"model": "u2netp", "blend": "gaussian"},
    }


def _write_overlays(out: Path, ids):
    worst = []
    for k, image_id in enumerate(ids):
        rel = f"overlays/{image_id}.png"
        (out / "overlays").mkdir(parents=True, exist_ok=True)
        pred = np.zeros((16, 16), np.uint8)
        pred[4:8, 4:8] = 1
        Image.fromarray(overlay(np.full((16, 16), 100, np.uint8), pred, np.zeros_like(pred))).save(out / rel)
        worst.append({"image_id": image_id, "dice": 0.4 + k / 10, "overlay_path_relative": rel})
    return worst


def test_report_renders_and_every_image_resolves(tmp_path):
    worst = _write_overlays(tmp_path, ["scan 1&2.png", "scan_3.png"])
    path = write_report(tmp_path, _metrics(), worst, NAMES)
    assert path == tmp_path / "report.html"
    page = path.read_text(encoding="utf-8")
    parser = _Srcs()
    parser.feed(page)
    assert "script" not in parser.tags and "link" not in parser.tags  # self-contained, name escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "scan 1&amp;2.png" in page
    assert len(parser.imgs) == len(worst) + len(legend_swatches())
    for src in parser.imgs:
        if src.startswith("data:image/png;base64,"):
            Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
        else:
            assert (tmp_path / unquote(src)).is_file(), src
    assert page.count("<svg") == 3  # bars, confusion matrix, Dice histogram
    assert "0.250" in page and "—" in page  # mIoU and a null


def test_null_scores_print_as_dash(tmp_path):
    page = write_report(tmp_path, _metrics(), [], NAMES).read_text(encoding="utf-8")
    needle_row = page.split("Needle</td>", 1)[1].split("</tr>", 1)[0]
    assert needle_row.count("<td>—</td>") == 6


def test_missing_overlay_is_an_error(tmp_path):
    worst = [{"image_id": "scan_9.png", "dice": 0.1, "overlay_path_relative": "overlays/scan_9.png"}]
    with pytest.raises(ValueError, match="scan_9.png"):
        write_report(tmp_path, _metrics(), worst, NAMES)


def test_overlay_markings():
    image = np.full((32, 32), 100, np.uint8)
    target = np.zeros((32, 32), np.uint8)
    target[4:12, 4:12] = 1  # missed entirely
    target[:, 28:] = 255
    pred = np.zeros((32, 32), np.uint8)
    pred[20:28, 4:12] = 2  # invented
    pred[:, 28:] = 1  # on ignored pixels: no error marking
    rgb = overlay(image, pred, target)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    colors = {tuple(c) for c in rgb.reshape(-1, 3)}
    assert (255, 0, 255) in colors and (0, 255, 255) in colors  # FP and FN hatches
    assert tuple(rgb[4, 8]) == tuple(PALETTE[1])  # truth outline in the class colour
    assert not {(255, 0, 255), (0, 255, 255)} & {tuple(c) for c in rgb[:, 28:].reshape(-1, 3)}
    assert tuple(rgb[0, 0]) == (100, 100, 100)  # untouched background


def test_overlay_rejects_size_mismatch():
    with pytest.raises(ValueError, match="differ in size"):
        overlay(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))
