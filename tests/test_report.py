"""The HTML report renders from a hand-made metrics dict (metrics.json's schema), every link resolves inside the
report folder, names are escaped, and the tables, plots and side-by-side images say what they should."""

import base64
import io
import math
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image, ImageFont

from evaluate.overlay import (
    IGNORE_COLOR,
    PALETTE,
    SEPARATOR_COLOR,
    SEPARATOR_WIDTH,
    legend_swatches,
    overlay,
    side_by_side,
)
from evaluate.report import _confusion, write_report

NAMES = ["background", "Pinpoint", "<script>alert(1)</script>", "Needle"]
BINARY = ["background", "defect"]
OBJECT_KEYS = ("object_recall", "object_precision", "object_f1", "object_recall_050", "object_precision_050",
               "object_f1_050", "pq", "sq", "rq", "gt_objects", "pred_objects", "matched", "matched_050")  # fmt: skip


class _Page(HTMLParser):
    """Every img src and a href, (href, src) of each linked img, the tags seen, the rows of each table (by class)
    and the SVG texts (by class)."""

    def __init__(self):
        super().__init__()
        self.links, self.linked_imgs, self.tags, self.tables, self.texts = [], [], set(), {}, {}
        self._table, self._row, self._text, self._href, self._in_cell = None, None, None, None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.links.append(a["src"])
            if self._href:
                self.linked_imgs.append((unquote(self._href), unquote(a["src"])))
        if tag == "a":
            self.links.append(a["href"])
            self._href = a["href"]
        for k, v in attrs:
            assert not (k in ("src", "href") and v.startswith(("http:", "https:", "//"))), f"external {k}={v}"
        if tag == "table":
            self._table = self.tables.setdefault(a.get("class"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._row.append("")
            self._in_cell = True
        elif tag == "text":
            self._text = self.texts.setdefault(a.get("class"), [])
            self._text.append("")

    def handle_endtag(self, tag):
        if tag == "a":
            self._href = None
        elif tag in ("td", "th"):
            self._in_cell = False
        elif tag == "table":
            self._table = self._row = None
        elif tag == "text":
            self._text = None

    def handle_data(self, data):
        if self._in_cell:
            self._row[-1] += data
        if self._text is not None:
            self._text[-1] += data


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def _objects(gt: int, pred: int, found: int) -> dict:
    return {k: None for k in OBJECT_KEYS} | {
        "object_recall": found / gt if gt else None,
        "object_precision": found / pred if pred else None,
        "object_f1": 2 * found / (gt + pred) if gt + pred else None,
        "object_f1_050": found / (gt + pred) if gt + pred else None,
        "pq": 0.4 * found / (gt + pred) if gt + pred else None,
        "gt_objects": gt,
        "pred_objects": pred,
        "matched": found,
    }


def _metrics(names=NAMES):
    n = len(names)
    pixel = {"iou": 0.5, "dice": 0.667, "precision": 0.75, "recall": 0.6, "image_dice": 0.61}
    per_class = {name: {**pixel, **_objects(3 + c, 4, 2)} for c, name in enumerate(names)}
    per_class["background"] = {**pixel, "image_dice": None, **dict.fromkeys(OBJECT_KEYS)}
    if n > 2:
        per_class[names[2]] = {**pixel, "iou": 0.0, "precision": None, **_objects(0, 0, 0)}
        per_class["Needle"] = {**dict.fromkeys(pixel), **_objects(0, 2, 0)}
    confusion = np.arange(n * n).reshape(n, n) + 1
    confusion[0, 0] = 0
    return {
        "miou": 0.25,
        "any_defect": {"iou": 0.456, **_objects(7, 9, 5)},
        "object_f1_mean": 0.4 if n > 2 else None,
        "right_class": 0.8 if n > 2 else None,
        "object_confusion": confusion.tolist(),
        "mdice": 0.5,
        "mean_dice": 0.55,
        "per_class": per_class,
        "per_image_dice": {"scan 1&2.png": [0.2, None, 1.0][: n - 1], "scan_3.png": [None, None, None][: n - 1]},
        "n_images": 2,
        "confusion_matrix": (np.eye(n, dtype=int) * 90 + 1).tolist(),
        "checkpoint": "runs/x/best.pt",
        "decision": {"kind": "tuned", "thresholds": [0.5] * (n - 1), "min_area": [4] * (n - 1),
                     "min_peak": [0.9] * (n - 1), "requested": "tuned", "val_objects": [12, 3, 2][: n - 1],
                     "borrowed": names[2:] if n > 2 else []},  # fmt: skip
        "tta": "none",
        "config": {"model": "u2netp", "blend": "gaussian"},
    }


def _scan_and_maps(size=16):
    scan = np.full((size, size), 100, np.uint8)
    truth = np.zeros((size, size), np.uint8)
    truth[2:6, 2:6] = 1
    pred = np.zeros((size, size), np.uint8)
    pred[10:14, 10:14] = 1
    return scan, pred, truth


def _write_images(out: Path, ids, dice=None):
    worst = []
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    (out / "side_by_side").mkdir(parents=True, exist_ok=True)
    scan, pred, truth = _scan_and_maps()
    for k, image_id in enumerate(ids):
        Image.fromarray(overlay(scan, pred, truth)).save(out / "overlays" / f"{image_id}.png")
        Image.fromarray(side_by_side(scan, pred, truth)).save(out / "side_by_side" / f"{image_id}.png")
        worst.append({"image_id": image_id, "dice": 0.4 + k / 10 if dice is None else dice[k],
                      "overlay_path_relative": f"overlays/{image_id}.png",
                      "side_by_side_path_relative": f"side_by_side/{image_id}.png"})  # fmt: skip
    return worst


def test_report_renders_and_every_link_resolves_inside_the_folder(tmp_path):
    worst = _write_images(tmp_path, ["scan 1&2.png", "scan_3.png"])
    path = write_report(tmp_path, _metrics(), worst, NAMES)
    assert path == tmp_path / "report.html"
    page = path.read_text(encoding="utf-8")
    parsed = _parse(page)
    assert "script" not in parsed.tags and "link" not in parsed.tags  # self-contained, name escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "scan 1&amp;2.png" in page
    files = [s for s in parsed.links if not s.startswith("data:")]
    assert len(parsed.links) - len(files) == len(legend_swatches())
    for src in parsed.links:
        if src.startswith("data:image/png;base64,"):
            Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
            continue
        target = (tmp_path / unquote(src)).resolve()
        assert target.is_file() and target.is_relative_to(tmp_path.resolve()), src
    # Each thumbnail is the error overlay, linked to the side-by-side image at full resolution.
    assert parsed.linked_imgs == [(w["side_by_side_path_relative"], w["overlay_path_relative"]) for w in worst]
    assert page.count("<svg") == 3  # bars, pixel confusion matrix, Dice histogram
    assert "0.456" in page and "—" in page  # any-defect pixel IoU and a null


def test_summary_is_the_any_defect_figures_and_the_class_aware_ones_in_multiclass(tmp_path):
    multi = _parse(write_report(tmp_path / "m", _metrics(), [], NAMES).read_text(encoding="utf-8"))
    binary = _parse(write_report(tmp_path / "b", _metrics(BINARY), [], BINARY).read_text(encoding="utf-8"))
    m, b = dict(multi.tables["summary"]), dict(binary.tables["summary"])  # {label: value}
    any_defect = _metrics()["any_defect"]
    for key, label in (("iou", "Defect pixel IoU"), ("object_recall", "Object recall"),
                       ("object_precision", "Object precision"), ("object_f1", "Object F1 (IoU ≥ 0.1)"),
                       ("object_f1_050", "Object F1 at IoU > 0.5"), ("pq", "(PQ)")):  # fmt: skip
        (value,) = [v for k, v in m.items() if label in k]
        assert value == f"{any_defect[key]:.3f}", label
    assert [k for k in m if k not in b] == [
        "mIoU (pixel, mean over defect classes)",
        "Mean object F1 over classes with truth objects",
        "Found defects given the right class",
    ]
    assert m["Found defects given the right class"] == "0.800"


def test_object_table_has_one_row_per_defect_class_then_any_defect(tmp_path):
    for names in (NAMES, BINARY):
        metrics = _metrics(names)
        page = write_report(tmp_path / str(len(names)), metrics, [], names).read_text(encoding="utf-8")
        header, *rows = _parse(page).tables["objects"]
        assert header[1:] == ["recall", "precision", "F1", "F1 at IoU > 0.5", "PQ", "truth objects",
                              "predicted objects"]  # fmt: skip
        assert [r[0] for r in rows] == [*names[1:], "any defect"]
        assert rows[-1][1:] == ["0.714", "0.556", "0.625", "0.312", "0.125", "7", "9"]
    pinpoint = rows[0]
    assert pinpoint[-2:] == ["4", "4"]  # counts print as integers


def test_null_scores_print_as_dash(tmp_path):
    tables = _parse(write_report(tmp_path, _metrics(), [], NAMES).read_text(encoding="utf-8")).tables
    needle = [r for r in tables["pixels"] if r[0] == "Needle"][0]
    assert needle[1:] == ["—"] * 5
    needle_objects = [r for r in tables["objects"] if r[0] == "Needle"][0]
    assert needle_objects[1:] == ["—", "0.000", "0.000", "0.000", "0.000", "0", "2"]


def test_class_confusion_table_for_multiclass_only(tmp_path):
    metrics = _metrics()
    page = write_report(tmp_path / "m", metrics, [], NAMES).read_text(encoding="utf-8")
    header, *rows = _parse(page).tables["confusion"]
    assert header[1:] == ["Pinpoint", "<script>alert(1)</script>", "Needle", "missed", "total"]
    assert [r[0] for r in rows] == [*NAMES[1:], "false alarm"]
    m = np.asarray(metrics["object_confusion"])
    order = [1, 2, 3, 0]  # metrics.json keeps "false alarm" and "missed" at index 0; the table puts them last
    for i, row in zip(order, rows, strict=True):
        expected = ["" if i == j == 0 else str(m[i, j]) for j in order]
        assert row[1:] == [*expected, str(m[i].sum())]
    binary = write_report(tmp_path / "b", _metrics(BINARY), [], BINARY).read_text(encoding="utf-8")
    assert "confusion" not in _parse(binary).tables and "false alarm" not in binary


def test_decision_names_the_classes_that_borrowed_their_values(tmp_path):
    page = write_report(tmp_path, _metrics(), [], NAMES).read_text(encoding="utf-8")
    assert "took their values from the other classes" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;, Needle had fewer than 5 validation objects" in page
    rows = {r[0]: r for r in _parse(page).tables["decision"][1:]}
    assert rows["Pinpoint"][-2:] == ["12", "own"] and rows["Needle"][-1].startswith("borrowed")
    assert "its most likely defect class when that probability reaches" in page


def test_decision_says_what_probability_its_thresholds_read(tmp_path):
    """A ``defect`` decision is shown with its table and says its thresholds read the defect probability."""
    metrics = _metrics()
    metrics["decision"]["kind"] = "defect"
    page = write_report(tmp_path, metrics, [], NAMES).read_text(encoding="utf-8")
    assert "when its defect probability (1 − P(background)) reaches that class&#39;s threshold" in page
    assert len(_parse(page).tables["decision"]) == len(NAMES)  # header + a row per defect class
    assert "grows" not in page
    metrics["decision"]["grow_px"] = 8  # train.decision_grow: the report says what it does
    page = write_report(tmp_path / "grown", metrics, [], NAMES).read_text(encoding="utf-8")
    assert "each kept defect grows by up to 8 px into the neighbouring pixels" in page


def test_histogram_prints_each_bar_count_and_leaves_out_undefined_means(tmp_path):
    metrics = _metrics()
    metrics["per_image_dice"] = {
        "a": [0.05, None, None], "b": [0.02, 0.08, None], "c": [0.0, None, 0.1],  # means in [0, 0.1)
        "d": [0.5, 0.6, None],  # 0.55
        "e": [1.0, 1.0, 1.0],  # 1: the last bin holds its right edge
        "f": [None, None, None],  # no defect anywhere: no mean
    }  # fmt: skip
    page = write_report(tmp_path, metrics, [], NAMES).read_text(encoding="utf-8")
    parsed = _parse(page)
    assert parsed.texts["count"] == ["3", "1", "1"]  # the non-empty bars, left to right
    texts = sum(parsed.texts.values(), [])
    assert "mean Dice per image" in texts and "number of images" in texts
    assert {"0", "0.5", "1"} <= set(texts)
    assert "1 image with no defect in truth or prediction (no Dice to average) is left out" in page


def test_no_dice_at_all_and_a_worst_image_without_dice(tmp_path):
    metrics = _metrics()
    metrics["per_image_dice"] = {"a": [None, None, None]}
    worst = _write_images(tmp_path, ["a"], dice=[None])
    page = write_report(tmp_path, metrics, worst, NAMES).read_text(encoding="utf-8")
    assert page.count("<svg") == 2  # no histogram
    assert "No image has a defect in its truth or prediction" in page
    assert "a: mean Dice —" in page


@pytest.mark.parametrize("key", ["overlay_path_relative", "side_by_side_path_relative"])
def test_missing_image_is_an_error(tmp_path, key):
    worst = _write_images(tmp_path, ["scan_9.png"])
    (tmp_path / worst[0][key]).unlink()
    with pytest.raises(ValueError, match="scan_9.png"):
        write_report(tmp_path, _metrics(), worst, NAMES)


def _font():
    try:
        return ImageFont.truetype("DejaVuSans.ttf", 12)  # what Debian's browsers draw 12 px sans-serif in
    except OSError:
        return ImageFont.load_default(12)


@pytest.mark.parametrize("names", [NAMES[:2], ["background", "Internal_graining", "Twinning_wisp", "Burn_mark"]])
def test_confusion_matrix_makes_room_for_its_labels_and_no_more(names):
    """The 45° column labels fit above the grid and inside the SVG's width, with no tall empty band above."""
    font, slant = _font(), math.sqrt(0.5)
    layout = _confusion(np.ones((len(names), len(names))), names)
    widths = [font.getlength(n) for n in names]
    assert max(widths) * slant + 6 <= layout["top"] <= max(widths) * slant + 40
    assert all(c["x"] + w * slant <= layout["width"] for c, w in zip(layout["columns"], widths, strict=True))
    assert layout["left"] >= max(widths) + 6  # row labels, right-aligned 6 px left of the grid


def test_side_by_side_is_truth_left_prediction_right_at_full_scale():
    scan, pred, truth = _scan_and_maps(size=20)
    truth[0, :] = 255  # ignored: darkened on the truth side only
    rgb = side_by_side(scan, pred, truth)
    h, w = scan.shape
    assert rgb.shape == (h, 2 * w + SEPARATOR_WIDTH, 3) and rgb.dtype == np.uint8
    left, band, right = rgb[:, :w], rgb[:, w : w + SEPARATOR_WIDTH], rgb[:, w + SEPARATOR_WIDTH :]
    assert (band == SEPARATOR_COLOR).all()
    filled = tuple(np.round(0.6 * 100 + 0.4 * PALETTE[1].astype(float)).astype(int))
    plain, dark = (100, 100, 100), tuple(np.round(0.4 * 100 + 0.6 * np.array(IGNORE_COLOR)).astype(int))
    assert tuple(left[3, 3]) == filled and tuple(left[12, 12]) == plain  # truth at 2:6, not the prediction
    assert tuple(right[12, 12]) == filled and tuple(right[3, 3]) == plain  # prediction at 10:14, not the truth
    assert tuple(left[0, 10]) == dark and tuple(right[0, 10]) == plain


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
    with pytest.raises(ValueError, match="differ in size"):
        side_by_side(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), np.zeros((9, 8), np.uint8))
