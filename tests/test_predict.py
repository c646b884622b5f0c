"""Masks -> CVAT polygons -> shardgen's rasterizer gives the masks back (holes filled, 1-2 px specks dropped),
also through ``shardgen build``; ``python -m evaluate predict`` preprocesses scans exactly like shardgen and
writes masks at the scans' own size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scanwriters import png16
from scipy import ndimage
from test_evaluate import GRID, tiny_dataset

from evaluate.__main__ import main
from evaluate.blend import reassemble_mask
from evaluate.contours import component_polygon, mask_polygons, trace_boundary
from evaluate.inference import Predictor, decision_for, load_model
from evaluate.predict import load_scan, tiles_of
from evaluate.tiles import iter_images
from shardgen import schema, storage
from shardgen.__main__ import main as shardgen_main
from shardgen.classes import ClassMap
from shardgen.crust import crop_resize_mask, geometry_from_meta, uncrop
from shardgen.cvat import ImageAnnotation, parse_cvat, write_cvat
from shardgen.raster import rasterize
from shardgen.tiling import TileGrid

CMAP = ClassMap.load()
NAMES = CMAP.names


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def representable(mask: np.ndarray) -> np.ndarray:
    """What polygons carry: each component of 3+ pixels, holes filled, larger boxes painted first."""
    comps = []
    for c in range(1, len(NAMES)):
        labels, _ = ndimage.label(mask == c, structure=np.ones((3, 3)))
        for k, box in enumerate(ndimage.find_objects(labels), start=1):
            if (labels[box] == k).sum() >= 3:
                area = (box[0].stop - box[0].start) * (box[1].stop - box[1].start)
                # Holes lie inside the box; the padding makes the box's edge count as outside.
                filled = ndimage.binary_fill_holes(np.pad(labels[box] == k, 1))[1:-1, 1:-1]
                comps.append((-area, box[0].start, box[1].start, c, box, filled))
    out = np.zeros_like(mask)
    for *_, c, box, filled in sorted(comps, key=lambda t: t[:4]):
        out[box][filled] = c
    return out


def raster_back(ann: ImageAnnotation) -> np.ndarray:
    return rasterize(ann, lambda s: CMAP.paint_value(CMAP.lookup(s.label)))


def xml_round_trip(masks: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
    """{name: mask} -> polygons -> write_cvat -> parse_cvat -> rasterize -> {name: mask}."""
    anns = []
    for name, mask in masks.items():
        shapes, _ = mask_polygons(mask, NAMES)
        anns.append(ImageAnnotation(name, mask.shape[1], mask.shape[0], tuple(shapes), "", 0))
    write_cvat(path, anns, NAMES[1:], source="auto")
    return {ann.name: raster_back(ann) for ann in parse_cvat(path)}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def handmade_mask(h: int = 170, w: int = 150, top: int = 11, left: int = 7) -> np.ndarray:
    """Blobs, a hole holding another class, touching classes, 1-px lines, a Y, a staircase, specks."""
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), np.uint8)
    r2 = (yy - 60) ** 2 + (xx - 60) ** 2
    m[r2 <= 25**2] = 2  # Crystal disc ...
    m[r2 <= 5**2] = 0  # ... with a small hole ...
    m[r2 <= 2**2] = 1  # ... holding a Pinpoint
    m[50:70, 86:96] = 8  # Nick touching the crystal
    for k in range(30):
        m[100 + k, 10 + k] = 3  # Needle: a 1-px diagonal line
    m[140, 20:70] = 3  # and a horizontal one
    m[110:130, 80] = 4  # Feather: a Y of 1-px strokes
    for k in range(10):
        m[110 - k, 80 - k] = m[110 - k, 80 + k] = 4
    m[top : top + 12, left : left + 15] = 6  # Cloud in the content's top-left corner
    for k in range(12):
        m[150 - k, 100 + k] = m[150 - k, 101 + k] = 10  # Burn_mark: a 2-px staircase
    m[150:160, 120:130] = 9  # Pit block, plus a 1-px and a 2-px speck that polygons cannot carry
    m[145, 135] = 9
    m[155, 140:142] = 9
    return m


def test_trace_is_clockwise_from_the_first_pixel():
    square = np.zeros((4, 4), bool)
    square[1:3, 1:3] = True
    assert trace_boundary(square) == [(1, 1), (1, 2), (2, 2), (2, 1)]
    assert trace_boundary(np.eye(1, dtype=bool)) == [(0, 0)]
    line = np.ones((1, 3), bool)
    assert trace_boundary(line) == [(0, 0), (0, 1), (0, 2), (0, 1)]
    assert component_polygon(line) == [(0, 0), (0, 1), (0, 2), (0, 1)]  # kept whole: 2 corners are too few
    block = np.ones((3, 5), bool)
    assert component_polygon(block) == [(0, 0), (0, 4), (2, 4), (2, 0)]  # straight runs dropped


def test_random_masks_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    masks = {}
    for k in range(40):
        noise = ndimage.gaussian_filter(rng.random((48, 40)), rng.uniform(0.5, 3))
        classes = np.digitize(ndimage.gaussian_filter(rng.random((48, 40)), 4), [0.49, 0.51]) + 1
        masks[f"r{k}.png"] = np.where(noise > np.quantile(noise, rng.uniform(0.4, 0.9)), classes, 0).astype(
            np.uint8
        )
    back = xml_round_trip(masks, tmp_path / "r.xml")
    for name, mask in masks.items():
        np.testing.assert_array_equal(back[name], representable(mask), err_msg=name)


def test_handmade_mask_round_trip(tmp_path):
    mask = handmade_mask()
    shapes, dropped = mask_polygons(mask, NAMES)
    assert dropped == {"Pit": 2}
    assert all(len(s.points) >= 3 and s.kind == "polygon" for s in shapes)
    back = xml_round_trip({"scan.png": mask}, tmp_path / "h.xml")["scan.png"]
    np.testing.assert_array_equal(back, representable(mask))
    present = [c for c in np.unique(mask).tolist() if c]
    assert present == [1, 2, 3, 4, 6, 8, 9, 10]
    for c in present:
        assert iou(back == c, mask == c) >= 0.95, NAMES[c]


def test_round_trip_through_shardgen_build_cli(tmp_path):
    """Polygons written for two scans build into shards whose masks are the crop-resized masks."""
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
        shapes, _ = mask_polygons(mask, NAMES)
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
        mask = masks[item.meta["source_image"]]
        np.testing.assert_array_equal(truth, crop_resize_mask(representable(mask), geom))
        resized = crop_resize_mask(mask, geom)
        for c in np.unique(resized).tolist():
            if c:
                assert iou(truth == c, resized == c) >= 0.95, NAMES[c]
        seen += 1
    assert seen == 2


# --------------------------------------------------------------------------------- predict on raw scans


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def predicted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred")
    argv = ["predict", "--checkpoint", str(tiny.ckpt), "--images", str(tiny.raw / "images"),
            "--out", str(out),
            "--device", "cpu", "--image-size", "192", "--tile", "64", "--stride", "32"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_predict_outputs_at_original_size_and_xml_round_trips(predicted, tiny):
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
            mask = np.asarray(m)
        ann = anns[path.name]
        assert (ann.width, ann.height) == size
        assert {s.label for s in ann.shapes} <= set(NAMES[1:])
        np.testing.assert_array_equal(raster_back(ann), representable(mask), err_msg=path.name)


def test_predict_preprocesses_like_shardgen(predicted, tiny):
    """Scan tiles equal the shards' tiles bit for bit, so predict's masks are evaluate's, uncropped."""
    manifest = schema.read_manifest(str(tiny.shards))
    model = load_model(str(tiny.ckpt), torch.device("cpu"))
    predictor = Predictor(model, GRID, batch_size=GRID.count, decision=decision_for(model, "tuned")[0])
    items = list(iter_images(manifest, "test"))
    assert len(items) == 3
    images = str(tiny.raw / "images")
    for pred, item in predictor.predict((item.images, item) for item in items):
        name = item.meta["source_image"]
        _, resized, geom = load_scan(images, str(tiny.raw / "images" / name), name, 1, GRID.image_size)
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
    assert summary["images"] == 1 and sum(summary["polygons"].values()) == len(ann.shapes)


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


def predict_argv(tiny, images, out, *extra) -> list[str]:
    return ["predict", "--checkpoint", str(tiny.ckpt), "--images", str(images), "--out", str(out), "--device", "cpu",
            "--image-size", "192", "--tile", "64", "--stride", "32", *extra]  # fmt: skip


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
