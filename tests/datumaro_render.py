"""Reading a CVAT XML the way CVAT's own tooling does: datumaro imports it, pycocotools paints the polygons."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
from lxml import etree


def datumaro_import(xml: Path, workdir: Path):
    """``Dataset.import_from(dir, "cvat")`` on a copy of ``xml``; datumaro wants the images beside it, so
    empty placeholder files are made for them (their sizes come from the XML)."""
    from datumaro.components.dataset import Dataset

    root = workdir / "datumaro_import"
    shutil.rmtree(root, ignore_errors=True)
    (root / "images").mkdir(parents=True)
    shutil.copy(xml, root / "default.xml")
    for name in etree.parse(str(xml)).getroot().xpath("image/@name"):
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / name).touch()
    return Dataset.import_from(str(root), "cvat")


def datumaro_render(xml: Path, workdir: Path, class_of: dict[str, int]) -> dict[str, np.ndarray]:
    """{image name: uint8 class map} painted from datumaro's annotations: polygons turned into masks by
    datumaro's ``polygons_to_masks`` (pycocotools), masks as decoded from CVAT RLE, in z_order (document
    order breaking ties). ``class_of`` maps label names to class ids."""
    from datumaro.components.annotation import AnnotationType

    dataset = datumaro_import(xml, workdir)
    dataset.transform("polygons_to_masks")
    labels = dataset.categories()[AnnotationType.label]
    names = {int(el.get("id")): el.get("name") for el in _images(xml)}
    out = {}
    with warnings.catch_warnings():  # pycocotools 2.0.11 warns about numpy 2's copy keyword on every decode
        warnings.simplefilter("ignore", DeprecationWarning)
        for item in dataset:
            h, w = item.media.size
            canvas = np.zeros((h, w), np.uint8)
            for ann in sorted(item.annotations, key=lambda a: a.z_order):
                assert ann.type == AnnotationType.mask, ann.type
                canvas[np.asarray(ann.image).astype(bool)] = class_of[labels.items[ann.label].name]
            out[names[item.attributes["frame"]]] = canvas
    return out


def _images(xml: Path):
    return etree.parse(str(xml)).getroot().iterfind("image")
