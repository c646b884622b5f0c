"""evaluate.cvat_function: the model as a cvat-sdk auto-annotation function, checked with cvat-sdk's own classes."""

from __future__ import annotations

import logging

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image
import pytest
from cvat_sdk import models
from cvat_sdk.auto_annotation.driver import _AnnotationMapper
from cvat_sdk.masks import decode_mask
from helpers import cvat_cli_parser, decided_checkpoint, tiny_dataset
from scipy import ndimage

from evaluate.__main__ import main as evaluate_main
from evaluate.contours import SCORE, fill_centres
from evaluate.cvat_function import LABEL_TYPES, SCORE_ID, create
from evaluate.review import score_of
from shardgen.cvat import ImageAnnotation, parse_cvat
from shardgen.raster import rasterize

EIGHT = np.ones((3, 3), bool)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory):
    return decided_checkpoint(tiny, tmp_path_factory)


@pytest.fixture(scope="module")
def predicted(tiny, ckpt, tmp_path_factory):
    """predict's exact outlines (``--simplify 0``) of the tiny scans: its masks and its XML."""
    out = tmp_path_factory.mktemp("predict")
    assert evaluate_main(["predict", "--checkpoint", str(ckpt), "--images", str(tiny.raw / "images"), "--out",
                          str(out), "--device", "cpu", "--simplify", "0"]) == 0  # fmt: skip
    return out


class Context(cvataa.DetectionFunctionContext):
    def __init__(self, name: str, conf_threshold: float | None, conv_mask_to_poly: bool):
        self._name, self._conf, self._poly = name, conf_threshold, conv_mask_to_poly

    frame_name = property(lambda self: self._name)
    conf_threshold = property(lambda self: self._conf)
    conv_mask_to_poly = property(lambda self: self._poly)


def _region(shape: models.LabeledShapeRequest, height: int, width: int) -> np.ndarray:
    if shape.type.value == "mask":
        return decode_mask(shape.points, image_width=width, image_height=height)
    return fill_centres(list(zip(shape.points[::2], shape.points[1::2], strict=True)), height, width)


def _score(shape: models.LabeledShapeRequest) -> int:
    (attr,) = shape.attributes
    assert attr.spec_id == SCORE_ID
    return int(attr.value)


def _mapper(function, conv_mask_to_poly: bool, task_type: str = "any") -> _AnnotationMapper:
    """CVAT's own driver for a task with the checkpoint's labels (of ``task_type``) under other ids, and the
    score attribute predict's XML declares."""
    task_labels = [models.Label(id=100 + label.id, name=label.name, type=task_type, sublabels=[], attributes=[
        models.Attribute(id=500 + label.id, name=SCORE.name, mutable=False, input_type=SCORE.input_type,
                         values=list(SCORE.values), default_value="0")]) for label in function.spec.labels]  # fmt: skip
    return _AnnotationMapper(logging.getLogger("test"), function.spec.labels, task_labels,
                             allow_unmatched_labels=False, conv_mask_to_poly=conv_mask_to_poly)  # fmt: skip


def _check_with_cvat(function, shapes: list, conv_mask_to_poly: bool) -> None:
    """What CVAT's own driver checks before uploading: label and attribute ids, attribute values, shape types;
    then each shape carries the task's ids."""
    mapper = _mapper(function, conv_mask_to_poly)
    copies = [models.LabeledShapeRequest._from_openapi_data(**s.to_dict()) for s in shapes]
    _, accepted = mapper.validate_and_remap(copies, 3)
    assert len(accepted) == len(shapes)
    for ours, theirs in zip(shapes, accepted, strict=True):
        assert theirs.source == "auto" and theirs.frame == 3 and theirs.label_id == 100 + ours.label_id
        assert [a.spec_id for a in theirs.attributes] == [500 + ours.label_id]


def test_the_spec_is_the_checkpoints_classes_with_a_score(tiny):
    function = create(checkpoint=str(tiny.ckpt), device="cpu")
    spec = function.spec
    assert isinstance(spec, cvataa.DetectionFunctionSpec)
    names = function.model.class_names
    assert [(label.id, label.name) for label in spec.labels] == list(enumerate(names))[1:]
    for label in spec.labels:
        (score,) = label.attributes
        assert (score.id, score.name, score.input_type.value, score.values) == (SCORE_ID, "score", "number",
                                                                                ["0", "100", "1"])  # fmt: skip
    for masks, kind in LABEL_TYPES.items():
        labels = create(checkpoint=str(tiny.ckpt), device="cpu", masks=masks).spec.labels
        assert {label.type for label in labels} == {kind}
    # A task whose labels are polygons: CVAT's driver refuses masks-only before the first frame, unless it
    # converts them; masks=none's polygons it takes.
    masks_only = create(checkpoint=str(tiny.ckpt), device="cpu", masks="all")
    with pytest.raises(cvataa.BadFunctionError, match="'mask' in the function"):
        _mapper(masks_only, False, "polygon")
    _mapper(masks_only, True, "polygon")
    _mapper(create(checkpoint=str(tiny.ckpt), device="cpu", masks="none"), False, "polygon")
    with pytest.raises(ValueError, match="masks must be one of"):
        create(checkpoint=str(tiny.ckpt), device="cpu", masks="some")


@pytest.mark.parametrize("masks, conv_mask_to_poly, conf", [("holes", False, None), ("all", False, 0.0),
                                                             ("holes", True, None), ("holes", True, 0.16),
                                                             ("holes", False, 0.16)])  # fmt: skip
def test_detect_returns_predicts_shapes(tiny, ckpt, predicted, masks, conv_mask_to_poly, conf):
    function = create(checkpoint=str(ckpt), device="cpu", masks=masks, simplify=0.0)
    class_of = {name: c for c, name in enumerate(function.model.class_names)}
    xml = {a.name: a for a in parse_cvat(predicted / "predictions.xml")}
    ids = {label.id for label in function.spec.labels}
    total = 0
    for path in sorted((tiny.raw / "images").glob("*.png")):
        image = PIL.Image.open(path)
        shapes = function.detect(Context(path.name, conf, conv_mask_to_poly), image)
        _check_with_cvat(function, shapes, conv_mask_to_poly)
        h, w = image.height, image.width
        assert all(s.label_id in ids and s.frame == 0 for s in shapes)
        kinds = {s.type.value for s in shapes}
        assert kinds <= ({"polygon"} if conv_mask_to_poly else {"mask"} if masks == "all" else {"polygon", "mask"})
        assert all(_score(s) >= 100 * (conf or 0) for s in shapes)
        # predict's shapes at or above the threshold, one per component, painted alike once decoded
        kept = [s for s in xml[path.name].shapes if score_of(s) >= (conf or 0)]
        assert len(shapes) == len(kept)
        assert [s.label_id for s in shapes] == [class_of[s.label] for s in kept]
        total += len(shapes)
        ours = np.zeros((h, w), np.uint8)
        for s in shapes:  # predict's order: largest box first, smaller ones painted on top
            ours[_region(s, h, w)] = s.label_id
        expected = np.zeros((h, w), np.uint8)
        for s in kept:
            alone = ImageAnnotation(path.name, w, h, (s,), "", 0)
            region = rasterize(alone, lambda _: 1).astype(bool)
            expected[ndimage.binary_fill_holes(region) if conv_mask_to_poly else region] = class_of[s.label]
        if not conf and not conv_mask_to_poly:  # all of predict's shapes: its masks
            assert np.array_equal(expected, np.asarray(PIL.Image.open(predicted / "masks" / path.name)))
        for c in range(1, len(class_of)):
            union = ((ours == c) | (expected == c)).sum()
            assert not union or ((ours == c) & (expected == c)).sum() / union >= 0.999, (path.name, c)
    assert total >= 8, total


def test_polygons_only_fill_a_components_holes(tiny):
    """``conv_mask_to_poly``: a ring comes back as the polygon of its outer outline."""
    function = create(checkpoint=str(tiny.ckpt), device="cpu")
    ring = np.zeros((50, 60), np.uint8)
    ring[10:30, 10:40] = 1
    ring[15:25, 20:30] = 0
    from evaluate.contours import ShapeOptions
    from evaluate.cvat_function import _request
    from evaluate.predict import mask_shapes

    names = [None, *function.model.class_names[1:]]
    (as_mask,) = mask_shapes(ring, names, np.ones(ring.shape, np.float32), ShapeOptions(0, "holes"))
    (as_polygon,) = mask_shapes(ring, names, np.ones(ring.shape, np.float32), ShapeOptions(0, "none"))
    assert as_mask.kind == "mask" and as_polygon.kind == "polygon"
    mask_region = _region(_request(as_mask, 1), 50, 60)
    polygon_region = _region(_request(as_polygon, 1), 50, 60)
    assert np.array_equal(mask_region, ring == 1)
    assert np.array_equal(polygon_region, ndimage.binary_fill_holes(ring == 1))


def test_cvat_cli_loads_the_function_from_its_parameters(ckpt):
    """``cvat-cli task auto-annotate --function-module evaluate.cvat_function -p ...`` as cvat-cli parses and loads
    it: the parameters reach ``create``."""
    from cvat_cli._internal.common import FunctionLoader

    ns = cvat_cli_parser().parse_args(["--server-host", "https://cvat.example.com", "--auth", "user:x", "task",
                                       "auto-annotate", "42", "--function-module", "evaluate.cvat_function", "-p",
                                       f"checkpoint=str:{ckpt}", "-p", "device=str:cpu", "-p", "simplify=float:0",
                                       "-p", "masks=str:all", "--conv-mask-to-poly"])  # fmt: skip
    function = FunctionLoader(ns.function_module, ns.function_file, ns.function_parameters).load()
    assert function.model.url == str(ckpt) and function.masks == "all" and function.simplify == 0.0
    assert function.model.device.type == "cpu" and len(function.spec.labels) == 10
