"""Full-image metrics beyond the pixel confusion matrix: per-image Dice and object-level recall/precision.

Inputs are (H, W) integer numpy class maps (prediction, truth) where truth may hold ``ignore_index``;
ignored pixels are scored by nobody.

Per-image Dice is the Severstal steel-defect metric: one Dice per (image, defect class), and an image where
a class is absent from both truth and prediction scores 1 for it -- predicting nothing where there is nothing
is right. Its mean over all (image, class) pairs is the headline ``mean_dice``.

Object metrics count defects, not pixels. A ground-truth object is a connected component (8-connectivity)
of one class in the truth; it is *found* when any predicted pixel of the same class overlaps it. A predicted
object is a component of one class in the prediction; it is *matched* when it overlaps a ground-truth
object of its class. A predicted object lying entirely on ignored pixels is not counted at all: there is no
truth there to call it wrong (one that reaches into scored pixels counts, and is labelled as a whole so an
ignore region does not split it into several). Counts add over images; ratios are taken once per split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from shardgen.classes import IGNORE_INDEX
from trainer.decision import EIGHT as EIGHT_CONNECTED  # the one 8-connectivity

OBJECT_COLUMNS = ("gt_total", "gt_found", "pred_total", "pred_matched")


def _check(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int) -> None:
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"prediction {pred.shape} and truth {target.shape} must be the same (H, W) shape")
    t = target[target != ignore_index]
    if (t.size and (t.min() < 0 or t.max() >= num_classes)) or (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(
            f"class id out of range [0, {num_classes}) (ignore {ignore_index}) in prediction or truth"
        )


def image_confusion(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """[C, C] int64 pixel counts for one image, rows = truth, cols = prediction, ignored pixels skipped."""
    pred, target = np.asarray(pred), np.asarray(target)
    _check(pred, target, num_classes, ignore_index)
    keep = target != ignore_index
    idx = target[keep].astype(np.int64) * num_classes + pred[keep]
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_image_dice(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> list[float]:
    """Dice of each defect class (ids 1..C-1) on one image; 1.0 where the class is in neither map."""
    m = image_confusion(pred, target, num_classes, ignore_index)
    tp, size = np.diag(m), m.sum(0) + m.sum(1)
    return [float(2 * tp[c] / size[c]) if size[c] else 1.0 for c in range(1, num_classes)]


def dice_summary(per_image: Mapping[str, Sequence[float]], class_names: Sequence[str]) -> dict:
    """``{"mean_dice", "per_class": {name: mean Dice over images}}`` from ``{image_id: per_image_dice}``."""
    if not per_image:
        return {"mean_dice": None, "per_class": {name: None for name in class_names[1:]}}
    d = np.asarray(list(per_image.values()), dtype=np.float64)
    if d.shape[1] != len(class_names) - 1:
        raise ValueError(
            f"per-image Dice has {d.shape[1]} classes, expected {len(class_names) - 1} defect classes"
        )
    return {
        "mean_dice": float(d.mean()),
        "per_class": dict(zip(class_names[1:], d.mean(0).tolist(), strict=True)),
    }


def object_counts(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(num_classes, 4) int64 rows of [gt_total, gt_found, pred_total, pred_matched]; row 0 stays zero."""
    pred, target = np.asarray(pred), np.asarray(target)
    _check(pred, target, num_classes, ignore_index)
    out = np.zeros((num_classes, len(OBJECT_COLUMNS)), dtype=np.int64)
    scored = target != ignore_index
    present = np.union1d(np.unique(pred), np.unique(target[scored]))
    for c in present[(present >= 1) & (present < num_classes)].tolist():
        gt_lab, n_gt = ndimage.label(target == c, structure=EIGHT_CONNECTED)
        pr_lab, _ = ndimage.label(pred == c, structure=EIGHT_CONNECTED)
        hit = (gt_lab > 0) & (pr_lab > 0)
        out[c] = (
            n_gt,
            np.unique(gt_lab[hit]).size,
            np.unique(pr_lab[scored & (pr_lab > 0)]).size,
            np.unique(pr_lab[hit]).size,
        )
    return out


def object_summary(counts: np.ndarray, class_names: Sequence[str]) -> dict:
    """``{name: {object_recall, object_precision, gt_total, gt_found, pred_total, pred_matched}}`` for defect
    classes from counts summed over the split; a ratio with no objects to count is ``None``."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (len(class_names), len(OBJECT_COLUMNS)):
        raise ValueError(f"object counts have shape {counts.shape}, expected ({len(class_names)}, 4)")
    out = {}
    for name, row in zip(class_names[1:], counts[1:].tolist(), strict=True):
        gt_total, gt_found, pred_total, pred_matched = row
        out[name] = {
            "object_recall": gt_found / gt_total if gt_total else None,
            "object_precision": pred_matched / pred_total if pred_total else None,
            **dict(zip(OBJECT_COLUMNS, row, strict=True)),
        }
    return out
