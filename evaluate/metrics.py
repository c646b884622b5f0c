"""Full-image metrics beyond the pixel confusion matrix: per-image Dice and one-to-one object scores.

Inputs are (H, W) integer numpy class maps (prediction, truth) where truth may hold ``ignore_index``;
ignored pixels are scored by nobody.

Per-image Dice is the Severstal steel-defect metric, one Dice per (image, defect class); a pair where the
class is in neither the truth nor the prediction has no Dice (None) and is left out of every mean: with ten
classes, most of them absent from most scans, counting such pairs as 1 would make any model look good.

Object scores count defects, not pixels, and cannot be gamed by painting. An object is an 8-connected
component: of one class (per-class scores) or of any defect class merged before labelling (``any_defect``).
Truth and predicted components are matched **one to one** (as panoptic quality, Kirillov et al. 2019, and
StarDist's ``matching`` do; StarDist maximizes the number of matches first, this the total IoU):

- *found* (``object_recall``, ``object_precision``, ``object_f1``): the pairs with IoU >= 0.1 that maximize
  the total IoU (Hungarian algorithm). A thin defect is found even when the painted line is a few pixels off,
  but a blob painted over the whole stone matches one defect at most, and ten specks on one defect count as
  one match and nine false alarms;
- ``*_050``: pairs with IoU > 0.5, which are unique without any assignment;
- ``pq`` = ``sq`` x ``rq``: the mean IoU of the pairs above 0.5 times their F1.

IoU is taken over scored pixels. A predicted component lying entirely on ignored pixels is dropped: there is
no truth there to call it wrong (one that reaches into scored pixels counts, labelled as a whole so an ignore
region does not split it). In multiclass the any-defect matches are also tallied by class, each component
named by its majority class: the object confusion (truth class x predicted class, with "missed" and "false
alarm") and ``right_class``, the share of matched objects found with the right class. Counts add over
images; ratios are taken once per split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from shardgen.classes import IGNORE_INDEX
from trainer.decision import EIGHT as EIGHT_CONNECTED  # the one 8-connectivity

FOUND_IOU = 0.1  # a matched pair at this IoU or more: the defect is found
STRICT_IOU = 0.5  # a matched pair above this IoU: panoptic quality's true positive
# Object counts summed over a split: truth objects, predicted objects, matches at FOUND_IOU, matches above
# STRICT_IOU and the sum of their IoUs.
OBJECT_COLUMNS = ("gt_objects", "pred_objects", "matched", "matched_050", "iou_sum_050")


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


def per_image_dice(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> list[float | None]:
    """Dice of each defect class (ids 1..C-1) on one image; None where the class is in neither map."""
    m = image_confusion(pred, target, num_classes, ignore_index)
    tp, size = np.diag(m), m.sum(0) + m.sum(1)
    return [float(2 * tp[c] / size[c]) if size[c] else None for c in range(1, num_classes)]


def mean_of(values) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def dice_summary(per_image: Mapping[str, Sequence[float | None]], class_names: Sequence[str]) -> dict:
    """``{"mean_dice", "per_class": {name: mean Dice over images}}`` from ``{image_id: per_image_dice}``; pairs
    where truth and prediction are both empty (None) are left out of every mean."""
    rows = list(per_image.values())
    if rows and any(len(r) != len(class_names) - 1 for r in rows):
        raise ValueError(f"per-image Dice has {len(rows[0])} classes, expected {len(class_names) - 1} defect classes")
    return {
        "mean_dice": mean_of(v for r in rows for v in r),
        "per_class": {name: mean_of(r[c] for r in rows) for c, name in enumerate(class_names[1:])},
    }


# ------------------------------------------------------------------------------------------------ objects


def components(mask: np.ndarray, scored: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels (H, W) int32 with 0 = none, scored area of each component 1..n): 8-connected components of a
    boolean map. With ``scored``, a component with no scored pixel is erased (it lies on ignored pixels)."""
    labels, n = ndimage.label(mask, EIGHT_CONNECTED)
    if scored is None or not n:
        return labels, np.bincount(labels.ravel(), minlength=n + 1)[1:]
    area = np.bincount(labels[scored], minlength=n + 1)[1:]
    if (area == 0).any():  # renumber the survivors 1..m, in order
        keep = np.concatenate(([0], np.cumsum(area > 0) * (area > 0))).astype(labels.dtype)
        labels, area = keep[labels], area[area > 0]
    return labels, area


def pair_iou(truth: np.ndarray, t_area: np.ndarray, pred: np.ndarray, p_area: np.ndarray,
             scored: np.ndarray) -> np.ndarray:  # fmt: skip
    """(n_truth, n_pred) IoU of every truth component with every predicted one, over scored pixels."""
    n_t, n_p = len(t_area), len(p_area)
    both = scored & (truth > 0) & (pred > 0)
    inter = np.bincount((truth[both].astype(np.int64) - 1) * n_p + pred[both] - 1, minlength=n_t * n_p)
    inter = inter.reshape(n_t, n_p).astype(np.float64)
    return inter / np.maximum(t_area[:, None] + p_area[None, :] - inter, 1)


def match(iou: np.ndarray, at: float = FOUND_IOU) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching at IoU >= ``at``: (truth index, prediction index) of the pairs that maximize the
    total IoU among pairs reaching ``at`` (the Hungarian algorithm on the components that overlap at all)."""
    w = np.where(iou >= at, iou, 0.0)
    rows, cols = np.flatnonzero(w.any(1)), np.flatnonzero(w.any(0))
    if not len(rows):
        return rows, cols
    w = w[np.ix_(rows, cols)]
    if np.count_nonzero(w) == len(rows) == len(cols):  # each overlaps exactly one: those pairs, no assignment
        r, c = np.nonzero(w)
        return rows[r], cols[c]
    r, c = linear_sum_assignment(w, maximize=True)
    ok = w[r, c] > 0
    return rows[r[ok]], cols[c[ok]]


def tally_pairs(iou: np.ndarray) -> np.ndarray:
    """One row of ``OBJECT_COLUMNS`` from the IoU matrix of one image's truth and predicted components."""
    n_t, n_p = iou.shape
    found = len(match(iou)[0])
    strict = iou[iou > STRICT_IOU]  # unique: two disjoint components cannot both overlap a third by more than half
    return np.array([n_t, n_p, found, strict.size, strict.sum()], np.float64)


def object_tally(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """One image's object counts: ((C, 5) float64 rows of ``OBJECT_COLUMNS``, row 0 = any defect and row c =
    class c; (C, C) int64 object confusion: rows the truth class of an any-defect object (0: no truth object,
    a false alarm), columns its matched prediction's class (0: not found, a miss))."""
    pred, target = np.asarray(pred), np.asarray(target)
    _check(pred, target, num_classes, ignore_index)
    scored = target != ignore_index
    truth_defect = scored & (target > 0)
    tally = np.zeros((num_classes, len(OBJECT_COLUMNS)), np.float64)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    # Any defect: classes merged before labelling, then each object named by its majority class.
    t_lab, t_area = components(truth_defect)
    p_lab, p_area = components(pred > 0, scored)
    iou = pair_iou(t_lab, t_area, p_lab, p_area, scored)
    tally[0] = tally_pairs(iou)
    t_cls = _majority(t_lab, len(t_area), target, num_classes, scored)
    p_cls = _majority(p_lab, len(p_area), pred, num_classes, scored)
    ti, pi = match(iou)
    np.add.at(confusion, (t_cls[ti], p_cls[pi]), 1)
    np.add.at(confusion, (t_cls[np.setdiff1d(np.arange(len(t_area)), ti)], 0), 1)  # missed
    np.add.at(confusion, (0, p_cls[np.setdiff1d(np.arange(len(p_area)), pi)]), 1)  # false alarms
    if num_classes > 2:
        present = np.union1d(np.unique(pred), np.unique(target[scored]))
        for c in present[(present >= 1) & (present < num_classes)].tolist():
            t_lab, t_area = components(target == c)
            p_lab, p_area = components(pred == c, scored)
            tally[c] = tally_pairs(pair_iou(t_lab, t_area, p_lab, p_area, scored))
    else:
        tally[1] = tally[0]
    return tally, confusion


def _majority(labels: np.ndarray, n: int, classes: np.ndarray, num_classes: int, scored: np.ndarray) -> np.ndarray:
    """The most frequent class id (>= 1) over the scored pixels of each component 1..n; ties go to the lower id."""
    inside = (labels > 0) & scored
    votes = np.bincount((labels[inside].astype(np.int64) - 1) * num_classes + classes[inside],
                        minlength=n * num_classes).reshape(n, num_classes)  # fmt: skip
    votes[:, 0] = -1  # a component is a defect: background pixels (ignored or not) never name it
    return votes.argmax(1)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def object_scores(row: Sequence[float]) -> dict:
    """A row of ``OBJECT_COLUMNS`` summed over a split -> the object scores, with None where undefined."""
    gt, predicted, found, strict, iou_sum = (float(v) for v in row)
    return {
        "object_recall": _ratio(found, gt),
        "object_precision": _ratio(found, predicted),
        "object_f1": _ratio(2 * found, gt + predicted),
        "object_recall_050": _ratio(strict, gt),
        "object_precision_050": _ratio(strict, predicted),
        "object_f1_050": _ratio(2 * strict, gt + predicted),
        # PQ = SQ x RQ = (sum of matched IoUs / TP) x (TP / (TP + FP/2 + FN/2))
        "pq": _ratio(2 * iou_sum, gt + predicted),
        "sq": _ratio(iou_sum, strict),
        "rq": _ratio(2 * strict, gt + predicted),
        "gt_objects": int(gt),
        "pred_objects": int(predicted),
        "matched": int(found),
        "matched_050": int(strict),
    }


def object_summary(tally: np.ndarray, confusion: np.ndarray, class_names: Sequence[str]) -> dict:
    """The split's object scores from summed ``object_tally`` results: ``any_defect``, ``per_class`` (defect
    classes), ``object_f1_mean`` (over classes with truth objects), ``right_class`` (share of any-defect matches
    whose classes agree; None in binary), ``object_confusion``."""
    tally, confusion = np.asarray(tally, np.float64), np.asarray(confusion, np.int64)
    n = len(class_names)
    if tally.shape != (n, len(OBJECT_COLUMNS)) or confusion.shape != (n, n):
        raise ValueError(f"object tallies have shapes {tally.shape} and {confusion.shape}, expected "
                         f"({n}, {len(OBJECT_COLUMNS)}) and ({n}, {n})")  # fmt: skip
    per_class = {name: object_scores(tally[c]) for c, name in enumerate(class_names) if c}
    matched = confusion[1:, 1:]
    return {
        "any_defect": object_scores(tally[0]),
        "per_class": per_class,
        "object_f1_mean": mean_of(s["object_f1"] for s in per_class.values() if s["gt_objects"]),
        "right_class": _ratio(np.trace(matched), matched.sum()) if n > 2 else None,
        "object_confusion": confusion.tolist(),
    }
