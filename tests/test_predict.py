"""``python -m evaluate predict``: scans preprocessed exactly like shardgen, masks at the scans' own size, and a
CVAT XML that shardgen build and datumaro (CVAT's reader) both turn back into the predicted masks; scores,
--min-score and --labels-from."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from datumaro_render import datumaro_render
from helpers import CLASS_OF, EXACT, GRID, NAMES, handmade_mask, image_iou, png16, shardgen_render, tiny_dataset
from lxml import etree
from PIL import Image
from scipy import ndimage

from evaluate.__main__ import main
from evaluate.blend import reassemble_mask
from evaluate.contours import EIGHT_CONNECTED, mask_shapes
from evaluate.inference import Predictor, decision_for, load_model
from evaluate.predict import load_scan, tiles_of
from evaluate.review import score_of
from evaluate.tiles import iter_images
from shardgen import schema, storage
from shardgen.__main__ import main as shardgen_main
from shardgen.crust import crop_resize_mask, geometry_from_meta, uncrop
from shardgen.cvat import ImageAnnotation, parse_cvat, write_cvat
from shardgen.tiling import TileGrid

TINY = ["--device", "cpu", "--image-size", "192", "--tile", "64", "--stride", "32"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_round_trip_through_shardgen_build_cli(tmp_path):
    """Exact shapes written for two scans build into shards whose masks are exactly the crop-resized masks."""
    images, annotations = tmp_path / "images", tmp_path / "annotations"
    images.mkdir()
    annotations.mkdir()
    rng = np.random.default_rng(1)
    masks, anns = {}, []
    for k, (top, left, bottom, right) in enumerate([(11, 7, 9, 5), (3, 12, 6, 2)]):
        scan = np.zeros((170, 150, 3), np.uint8)  # black crust around grey content
        content = (170 - top - bottom, 150 - left - right, 3)
        scan[top : 170 - bottom, left : 150 - right] = rng.integers(60, 200, content)
        name = f"scan_{k}.png"
        Image.fromarray(scan).save(images / name)
        masks[name] = mask = handmade_mask(top=top, left=left)
        shapes = mask_shapes(mask, NAMES, options=EXACT)
        anns.append(ImageAnnotation(name, 150, 170, tuple(shapes), "", 0))
    write_cvat(annotations / "pred.xml", anns, NAMES[1:], source="auto")
    out = tmp_path / "shards"
    argv = ["build", "--annotations", str(annotations), "--images", str(images), "--out", str(out),
            "--image-size", "128", "--tile", "64", "--stride", "32", "--split-ratios", "train=1,val=0,test=0",
            "--quiet"]  # fmt: skip
    assert shardgen_main(argv) == 0
    manifest = schema.read_manifest(str(out))
    grid = TileGrid(128, 64, 32)
    seen = 0
    for item in iter_images(manifest, "train"):
        truth = reassemble_mask(item.masks.numpy(), grid, item.image_id)
        geom = geometry_from_meta(item.meta)
        np.testing.assert_array_equal(truth, crop_resize_mask(masks[item.meta["source_image"]], geom))
        seen += 1
    assert seen == 2


# --------------------------------------------------------------------------------- predict on raw scans


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def run_predict(tiny, out, *extra) -> None:
    """Predict the tiny scans; argmax unless ``extra`` says otherwise: the 4-step model's raw masks are ragged and
    holed, what the XML must survive (its decision tuned on whole scans predicts next to nothing)."""
    argv = ["predict", "--checkpoint", str(tiny.ckpt), "--images", str(tiny.raw / "images"), "--out", str(out),
            *TINY, "--decision", "argmax", *extra]  # fmt: skip
    assert main(argv) == 0


@pytest.fixture(scope="module")
def predicted(tiny, tmp_path_factory):
    """Default options: simplified polygons, masks for components with holes, every shape kept."""
    out = tmp_path_factory.mktemp("pred")
    run_predict(tiny, out)
    return out


def predicted_masks(out) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "masks").glob("*.png"))}


def test_predict_outputs_at_original_size(predicted, tiny):
    scans = sorted((tiny.raw / "images").glob("*.png"))
    anns = {a.name: a for a in parse_cvat(predicted / "predictions.xml")}
    assert sorted(anns) == [p.name for p in scans]
    for path in scans:
        with Image.open(path) as im:
            size = im.size
        with (
            Image.open(predicted / "masks" / path.name) as m,
            Image.open(predicted / "overlays" / path.name) as o,
        ):
            assert (m.mode, m.size, o.mode, o.size) == ("L", size, "RGB", size)
        assert (anns[path.name].width, anns[path.name].height) == size


def test_predictions_xml_reads_back_as_the_masks(predicted, tmp_path):
    """shardgen build's rasterizer and datumaro (as CVAT imports it) both paint the predicted masks back, IoU
    >= 0.99 per image with default simplification; masks with holes, nested components and thin lines."""
    masks = predicted_masks(predicted)
    xml = predicted / "predictions.xml"
    kinds = Counter(s.kind for a in parse_cvat(xml) for s in a.shapes)
    assert kinds["polygon"] > 0 and kinds["mask"] > 0  # the 4-step model's masks are ragged and holed
    by_shardgen = shardgen_render(xml)
    by_datumaro = datumaro_render(xml, tmp_path, CLASS_OF)
    assert sorted(by_shardgen) == sorted(by_datumaro) == sorted(masks)
    for name, mask in masks.items():
        assert mask.any(), name
        assert image_iou(by_shardgen[name], mask) >= 0.99, name
        assert image_iou(by_datumaro[name], mask) >= 0.99, name


def test_shapes_carry_score_and_source(predicted):
    root = etree.parse(str(predicted / "predictions.xml")).getroot()
    shapes = [el for el in root.iterfind("image/*")]
    assert shapes and {el.tag for el in shapes} <= {"polygon", "mask"}
    for el in shapes:
        assert el.get("source") == "auto"
        ((name, value),) = [(a.get("name"), a.text) for a in el.iterfind("attribute")]
        assert name == "score" and value == str(int(value)) and 0 <= int(value) <= 100  # whole percent
    declared = root.find("meta/task/labels/label/attributes/attribute")
    assert (declared.findtext("name"), declared.findtext("input_type")) == ("score", "number")


def test_summary_counts_what_the_xml_holds(tiny, tmp_path, capsys):
    out = tmp_path / "p"
    run_predict(tiny, out)
    summary = json.loads(capsys.readouterr().out)
    anns = parse_cvat(out / "predictions.xml")
    shapes = [s for a in anns for s in a.shapes]
    assert summary["images"] == len(anns) and summary["shapes"] == len(shapes)
    per_class = Counter((s.label, s.kind) for s in shapes)
    assert {(label, kind): n for label, kinds in summary["per_class"].items() for kind, n in kinds.items()} == per_class
    assert sum(summary["score_bands"].values()) == len(shapes)
    assert list(summary["score_bands"]) == ["0.0-0.5", "0.5-0.6", "0.6-0.7", "0.7-0.8", "0.8-0.9", "0.9-1.0"]
    points = [len(s.points) for s in shapes if s.kind == "polygon"]
    assert summary["polygon_points"] == {"total": sum(points), "mean": round(sum(points) / len(points), 1),
                                         "max": max(points)}  # fmt: skip
    assert summary["xml_bytes"] == (out / "predictions.xml").stat().st_size
    least = summary["least_certain"]
    scores = sorted(score_of(s) for s in shapes)
    assert [x["score"] for x in least] == scores[: len(least)] and len(least) == min(10, len(shapes))
    assert summary["below_min_score"] == {}


def test_min_score_exact_shapes_and_task_labels(predicted, tiny, tmp_path, capsys):
    """--simplify 0 writes exact shapes; --min-score drops whole components; --labels-from uses the task's
    spelling of every class."""
    default = {a.name: a for a in parse_cvat(predicted / "predictions.xml")}
    scores = sorted(score_of(s) for a in default.values() for s in a.shapes)
    threshold = scores[len(scores) // 2]
    spelled = ["pinpoint", "CRYSTAL", "Needle", "feather", "internal graining", "Cloud", "Twinning wisp", "nick",
               "Pit", "Burn mark"]  # fmt: skip
    task = tmp_path / "task.xml"
    write_cvat(task, [], ["Pinpoint_Reflection", *spelled])
    out = tmp_path / "exact"
    argv = ["--simplify", "0", "--min-score", f"{threshold}", "--labels-from", str(task)]
    run_predict(tiny, out, *argv)
    summary = json.loads(capsys.readouterr().out)
    xml = out / "predictions.xml"
    root = etree.parse(str(xml)).getroot()
    assert [e.text for e in root.iterfind("meta/task/labels/label/name")] == ["Pinpoint_Reflection", *spelled]
    exact = {a.name: a for a in parse_cvat(xml)}
    class_name = dict(zip(spelled, NAMES[1:], strict=True))
    dropped = Counter()
    for name, ann in exact.items():
        assert {s.label for s in ann.shapes} <= set(spelled)
        kept = [s for s in default[name].shapes if score_of(s) >= threshold]
        dropped.update(spelled[NAMES.index(s.label) - 1] for s in default[name].shapes if s not in kept)
        written = sorted((class_name[s.label], s.kind, s.attributes) for s in ann.shapes)
        assert written == sorted((s.label, s.kind, s.attributes) for s in kept)
    assert summary["below_min_score"] == dict(dropped) and sum(dropped.values()) > 0
    # what is kept is exact: whole components, every pixel of the predicted class, under both readers
    spelled_of = {label: CLASS_OF[name] for label, name in class_name.items()}
    by_datumaro = datumaro_render(xml, tmp_path, spelled_of)
    masks = predicted_masks(out)
    for name, ann in exact.items():
        back = shardgen_render_with(ann, spelled_of)
        np.testing.assert_array_equal(by_datumaro[name], back, err_msg=name)
        mask = masks[name]
        assert (back[back > 0] == mask[back > 0]).all(), name
        whole = 0
        for c in np.unique(mask[mask > 0]):
            labels, n = ndimage.label(mask == c, EIGHT_CONNECTED)
            painted = np.bincount(labels[(back == c) & (labels > 0)], minlength=n + 1)[1:]
            sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            assert ((painted == 0) | (painted == sizes)).all(), name
            whole += int((painted == sizes).sum())
        assert whole == len(ann.shapes), name


def shardgen_render_with(ann: ImageAnnotation, class_of: dict[str, int]) -> np.ndarray:
    from shardgen.raster import rasterize

    return rasterize(ann, lambda s: class_of[s.label])


def test_labels_from_a_task_that_lacks_a_class(tiny, tmp_path, capsys):
    task = tmp_path / "task.xml"
    write_cvat(task, [], [n for n in NAMES[1:] if n != "Nick"])
    argv = ["predict", "--checkpoint", str(tiny.ckpt), "--images", str(tiny.raw / "images"),
            "--out", str(tmp_path / "o"), "--labels-from", str(task), *TINY]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{task}: the task has no label for class 'Nick'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "predictions.xml").exists()


def test_predict_preprocesses_like_shardgen(predicted, tiny):
    """Scan tiles equal the shards' tiles bit for bit, so predict's masks are evaluate's, uncropped."""
    manifest = schema.read_manifest(str(tiny.shards))
    model = load_model(str(tiny.ckpt), torch.device("cpu"))
    predictor = Predictor(model, GRID, batch_size=GRID.count, decision=decision_for(model, "argmax")[0])
    items = list(iter_images(manifest, "test"))
    assert len(items) == 3
    images = str(tiny.raw / "images")
    for pred, item in predictor.predict((item.images, item) for item in items):
        name = item.meta["source_image"]
        _, resized, geom = load_scan(images, str(tiny.raw / "images" / name), 1, GRID.image_size)
        assert torch.equal(tiles_of(resized, GRID), item.images)
        assert geom == geometry_from_meta(item.meta)
        np.testing.assert_array_equal(np.asarray(Image.open(predicted / "masks" / name)), uncrop(pred, geom))


@pytest.mark.s3
def test_predict_reads_scans_from_s3(tiny, s3_env, tmp_path, capsys):
    scan = sorted((tiny.raw / "images").glob("*.png"))[0]
    storage.write_bytes_atomic(storage.join(s3_env, "scans", scan.name), scan.read_bytes())
    argv = ["predict", "--checkpoint", str(tiny.ckpt), "--images", storage.join(s3_env, "scans"), "--out",
            str(tmp_path), "--device", "cpu", "--image-size", "192", "--tile", "64",
            "--stride", "32"]  # fmt: skip
    assert main(argv) == 0
    (ann,) = parse_cvat(tmp_path / "predictions.xml")
    assert ann.name == scan.name and (tmp_path / "masks" / scan.name).is_file()
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 1 and summary["shapes"] == len(ann.shapes)


def test_predict_errors(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["predict", "--checkpoint", str(tiny.ckpt), "--images", str(empty), "--out", str(tmp_path / "o"),
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    assert "no scans found (*.png, *.jpg, *.jpeg, *.tif, *.tiff, *.bmp)" in capsys.readouterr().err
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(empty / "black.png")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "black.png" in err and "entirely black" in err
    for flag, value, reason in [("--simplify", "-1", "--simplify must be >= 0"),
                                ("--min-score", "1.5", "--min-score must be within 0..1")]:  # fmt: skip
        assert main([*argv, flag, value]) == 2
        assert reason in capsys.readouterr().err


def predict_argv(tiny, images, out, *extra) -> list[str]:
    return ["predict", "--checkpoint", str(tiny.ckpt), "--images", str(images), "--out", str(out), "--device", "cpu",
            "--image-size", "192", "--tile", "64", "--stride", "32", "--decision", "argmax", *extra]  # fmt: skip


def test_predict_reads_every_scan_format(predicted, tiny, tmp_path, capsys):
    """A folder of mixed formats: one mask per scan; lossless copies of a PNG scan predict its very mask."""
    scans = sorted((tiny.raw / "images").glob("*.png"))[:6]
    rgb = {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in scans}
    stems = list(rgb)
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(rgb[stems[0]]).save(folder / f"{stems[0]}.png")
    (folder / f"{stems[1]}.PNG").write_bytes(png16(rgb[stems[1]].astype(np.uint16) * 257))  # 48-bit, upper case
    Image.fromarray(rgb[stems[2]]).save(folder / f"{stems[2]}.tif", compression="tiff_lzw")
    Image.fromarray(rgb[stems[3]]).save(folder / f"{stems[3]}.bmp")
    grey = np.asarray(Image.fromarray(rgb[stems[4]]).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / f"{stems[4]}.tiff")  # 16-bit grey
    Image.fromarray(rgb[stems[5]]).save(folder / f"{stems[5]}.jpg", quality=95)
    (folder / "notes.txt").write_text("not a scan")
    out = tmp_path / "out"
    assert main(predict_argv(tiny, folder, out)) == 0
    summary = json.loads(capsys.readouterr().out)
    names = sorted(p.name for p in folder.iterdir() if p.suffix != ".txt")
    assert summary["images"] == 6 and sorted(a.name for a in parse_cvat(out / "predictions.xml")) == names
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{s}.png" for s in sorted(stems)]
    for stem in stems:
        with Image.open(out / "masks" / f"{stem}.png") as m:
            mask = np.asarray(m)
        assert mask.shape == rgb[stem].shape[:2]
        if stem != stems[5]:  # lossless: exactly the mask predicted from the PNG
            np.testing.assert_array_equal(mask, np.asarray(Image.open(predicted / "masks" / f"{stem}.png")), stem)


def test_predict_refuses_ambiguous_names_and_oversized_scans(tiny, tmp_path, capsys):
    scan = sorted((tiny.raw / "images").glob("*.png"))[0]
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / scan.name).write_bytes(scan.read_bytes())
    Image.open(scan).save(folder / f"{scan.stem}.tif")
    assert main(predict_argv(tiny, folder, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert f"{scan.name} and {scan.stem}.tif would both write masks/{scan.stem}.png" in err
    (folder / f"{scan.stem}.tif").unlink()
    w, h = Image.open(scan).size
    assert main(predict_argv(tiny, folder, tmp_path / "o", "--max-pixels", str(w * h - 1))) == 2
    err = capsys.readouterr().err
    assert f"{scan.name}: scan is {w}x{h} = {w * h:,} pixels, more than the limit of {w * h - 1:,}" in err
    assert len(err.strip().splitlines()) == 1 and not list((tmp_path / "o").glob("masks/*"))
