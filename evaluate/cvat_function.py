"""This project's model inside CVAT: an auto-annotation detection function for cvat-sdk (``cvat_sdk.auto_annotation``).

From the command line, on a task (cvat-cli; the checkpoint, or a model from ``evaluate export``, is a parameter):

    cvat-cli --server-host https://cvat.example.com --auth USER task auto-annotate TASK_ID \\
        --function-module evaluate.cvat_function -p checkpoint=str:runs/unet-1/best.pt \\
        [-p device=str:cpu] [-p masks=str:holes] [-p simplify=float:1] [--conf-threshold 0.5] \\
        [--conv-mask-to-poly] [--allow-unmatched-labels] [--clear-existing]

or from Python: ``cvat_sdk.auto_annotation.annotate_task(client, TASK_ID, create(checkpoint="best.pt"))``.

Each frame goes through ``evaluate predict``'s own code: the same crust crop (the frame as a lossless PNG,
read by ``shardgen.crust.open_scan``), tiling, Gaussian blending and the checkpoint's tuned decision, then one
shape per predicted component in the frame's own geometry, as predict writes them in its CVAT XML: a polygon,
or a mask for a component with holes (``masks``: ``holes``, ``all`` or ``none``). With CVAT's
``conv_mask_to_poly`` every shape is a polygon (a component's holes filled). Each shape has the attribute
``score``: its mean probability (under a ``defect`` or ``objects`` decision, its mean defect probability,
1 - P(background)), as an integer percentage (cvat-sdk's number attributes are integers); shapes
below the context's ``conf_threshold`` are left out. Labels are the checkpoint's class names (background
excluded), matched by name to the task's labels, typed by ``masks``: ``any`` for ``holes`` (polygons and
masks: the task's labels must be of type ``any``, CVAT's default), ``mask`` for ``all``, ``polygon`` for
``none`` (for a task whose labels are polygons); with ``all`` or ``none`` CVAT's driver refuses a mismatch
before the first frame, with ``holes`` only at the first frame that has a component with holes.

Written against cvat-sdk ``SDK_VERSION``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import cvat_sdk.auto_annotation as cvataa
import PIL.Image
from cvat_sdk import models
from cvat_sdk.attributes import number_attribute_values

from .contours import DEFAULT_MIN_IOU, DEFAULT_SIMPLIFY, MASK_POLICIES, ShapeOptions
from .inference import Predictor, load_model
from .predict import prepare_scan, resolve_grid, scan_shapes, tiles_of
from .review import score_of
from .run import decide, select_device

SDK_VERSION = "2.80.0"
SCORE_ID = 0  # the score attribute's id in every label spec
# The shapes each masks policy returns, as the label type CVAT's driver checks against the task's labels:
# "holes" returns polygons and masks, so only a task label of type "any" takes them.
LABEL_TYPES = {"holes": "any", "all": "mask", "none": "polygon"}


class DefectDetector:
    """A cvat-sdk detection function (``spec`` and ``detect``) for one checkpoint or exported model."""

    def __init__(self, checkpoint: str, device: str = "auto", masks: str = "holes",
                 simplify: float = DEFAULT_SIMPLIFY, decision: str = "tuned"):  # fmt: skip
        if masks not in MASK_POLICIES:
            raise ValueError(f"masks must be one of {', '.join(MASK_POLICIES)}, got {masks!r}")
        self.model = load_model(checkpoint, select_device(device))
        self.grid = resolve_grid(self.model.meta, None, None, None)
        decided = decide(self.model, decision, "gaussian", "none")
        self.predictor = Predictor(self.model, self.grid, "gaussian", 25, decided)
        self.names = self.model.class_names
        self.masks, self.simplify = masks, simplify
        score = cvataa.number_attribute_spec("score", SCORE_ID, number_attribute_values(0, 100))
        self.spec = cvataa.DetectionFunctionSpec(
            labels=[cvataa.label_spec(name, c, type=LABEL_TYPES[masks], attributes=[score])
                    for c, name in enumerate(self.names) if c]  # fmt: skip
        )

    def detect(
        self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image
    ) -> list[models.LabeledShapeRequest]:
        """The frame's defects as CVAT shapes (label ids are class ids 1..)."""
        png = io.BytesIO()
        image.save(png, format="PNG", compress_level=1)
        name = getattr(context, "frame_name", None) or "frame"
        _, resized, geom = prepare_scan(png.getvalue(), name, self.model.in_channels, self.grid.image_size)
        ((pred, confidence, _),) = self.predictor.predict_scored([(tiles_of(resized, self.grid), None)])
        masks = "none" if context.conv_mask_to_poly else self.masks
        _, shapes = scan_shapes(pred, confidence, geom, [None, *self.names[1:]],
                                ShapeOptions(self.simplify, masks, DEFAULT_MIN_IOU))  # fmt: skip
        threshold = context.conf_threshold or 0.0
        label_id = {name: c for c, name in enumerate(self.names) if c}
        return [_request(s, label_id[s.label]) for s in shapes if score_of(s) >= threshold]


def _request(shape, label_id: int) -> models.LabeledShapeRequest:
    """One of predict's shapes as cvat-sdk's request: polygon points flat, or a mask's RLE and its box."""
    score = [models.AttributeValRequest(spec_id=SCORE_ID, value=dict(shape.attributes)["score"])]
    if shape.kind == "mask":
        left, top, width, height = shape.mask_box
        points: Sequence[float] = [*shape.rle, left, top, left + width - 1, top + height - 1]
        return cvataa.mask(label_id, points, attributes=score)
    return cvataa.polygon(label_id, [v for point in shape.points for v in point], attributes=score)


def create(checkpoint: str, device: str = "auto", masks: str = "holes", simplify: float = DEFAULT_SIMPLIFY,
           decision: str = "tuned") -> DefectDetector:  # fmt: skip
    """The function cvat-cli builds from ``-p name=type:value`` parameters (``--function-module``)."""
    return DefectDetector(checkpoint, device, masks, simplify, decision)
