"""Pixel, per-image and object metrics on hand-made masks with known answers."""

import itertools
import json

import numpy as np
import pytest
import torch
from monai.metrics import compute_panoptic_quality
from scipy import ndimage
from torchmetrics.classification import MulticlassJaccardIndex

from evaluate.metrics import (
    components,
    dice_summary,
    image_confusion,
    match,
    object_scores,
    object_summary,
    object_tally,
    pair_iou,
    per_image_dice,
)
from trainer.metrics import ConfusionMatrix, summarize

NAMES = ["background", "Pinpoint", "Crystal", "Needle", "Feather"]


def test_iou_matches_torchmetrics():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 64, 64), generator=g)  # class 4 never in truth
    target[:, :5] = 255
    pred = torch.randint(0, 5, (3, 64, 64), generator=g)
    pred[0, 10, 10] = 4  # ... but predicted: IoU 0
    cm = ConfusionMatrix(5, class_names=NAMES)
    for t, p in zip(target, pred, strict=True):
        cm.update(t, p)
    ours = cm.compute()["per_class"]
    ref = MulticlassJaccardIndex(num_classes=5, average="none", ignore_index=255)(pred, target)
    for c, name in enumerate(NAMES):
        assert ours[name]["iou"] == pytest.approx(ref[c].item(), abs=1e-6)
    assert ours["Feather"]["iou"] == 0 and ours["Feather"]["recall"] is None


def test_confusion_matrix_counts_and_ignore():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 2, 255]), torch.tensor([0, 1, 2, 2, 1]))
    assert cm.mat.dtype == torch.int64
    assert cm.mat.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    cm.reduce_from_all_processes()  # single process: unchanged
    assert int(cm.mat.sum()) == 4


def test_confusion_matrix_rejects_foreign_class_ids():
    """A multiclass mask fed to a binary run must fail, not land in the wrong cell."""
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match=r"out of range \[0, 2\).*target 7"):
        cm.update(torch.tensor([0, 7]), torch.tensor([0, 1]))


def test_absent_class_policy():
    # Pinpoint in both maps, Crystal in the truth only, Needle nowhere, Feather predicted only
    target = np.array([0, 1, 1, 2, 0, 0])
    pred = np.array([0, 1, 0, 0, 4, 0])
    s = summarize(image_confusion(pred[None], target[None], 5), NAMES)
    pc = s["per_class"]
    assert pc["Pinpoint"] == {"iou": 0.5, "dice": pytest.approx(2 / 3), "precision": 1.0, "recall": 0.5}
    assert pc["Crystal"] == {"iou": 0.0, "dice": 0.0, "precision": None, "recall": 0.0}
    assert pc["Needle"] == {"iou": None, "dice": None, "precision": None, "recall": None}
    assert pc["Feather"]["iou"] == 0.0 and pc["Feather"]["recall"] is None
    assert s["absent"] == ["Needle"]
    assert s["miou"] == pytest.approx((0.5 + 0 + 0) / 3)  # Needle excluded, Crystal and Feather count
    assert json.loads(json.dumps(s))["per_class"]["Needle"]["iou"] is None  # null in JSON


def test_binary_miou_is_defect_iou():
    mat = [[90, 5], [3, 2]]
    s = summarize(mat, ["background", "defect"])
    assert s["miou"] == pytest.approx(2 / 10)
    assert s["per_class"]["background"]["iou"] == pytest.approx(90 / 98)


def test_per_image_dice_leaves_out_pairs_empty_in_both():
    empty = np.zeros((8, 8), np.uint8)
    blob = empty.copy()
    blob[2:4, 2:4] = 1
    assert per_image_dice(empty, empty, 3) == [None, None]  # nothing to score: no Dice, not a free 1
    assert per_image_dice(empty, blob, 3) == [0.0, None]  # missed defect
    assert per_image_dice(blob, empty, 3) == [0.0, None]  # invented defect
    half = empty.copy()
    half[2:4, 2] = 1
    assert per_image_dice(half, blob, 3) == [pytest.approx(2 * 2 / 6), None]


def test_per_image_dice_ignores_255():
    target = np.zeros((4, 4), np.uint8)
    target[0] = 255
    pred = np.zeros((4, 4), np.uint8)
    pred[0] = 1  # predicted only on ignored pixels: nothing to score
    assert per_image_dice(pred, target, 2) == [None]


def test_dice_summary_means_over_the_scored_image_class_pairs():
    """Ten classes mostly absent would each add a 1 per image; left out, the mean is the defects' own."""
    s = dice_summary({"a": [1.0, 0.0, None], "b": [0.5, None, None]}, ["background", "Pinpoint", "Crystal", "Cloud"])
    assert s["mean_dice"] == pytest.approx(0.5)
    assert s["per_class"] == {"Pinpoint": 0.75, "Crystal": 0.0, "Cloud": None}
    assert dice_summary({"a": [None]}, ["background", "defect"])["mean_dice"] is None


def _square(m, y, x, v, size=3):
    m[y : y + size, x : x + size] = v


def _any(pred, target, n=2):
    tally, confusion = object_tally(pred, target, n)
    return object_scores(tally[0]), confusion


def test_a_blob_painted_over_the_whole_image_finds_nothing():
    """Three defects and one prediction covering everything: any overlap would call all three found and the
    prediction right (recall 1, precision 1); one to one, its IoU with each is 9/1024."""
    target = np.zeros((32, 32), np.uint8)
    for y, x in [(1, 1), (1, 20), (20, 1)]:
        _square(target, y, x, 1)
    s, _ = _any(np.ones_like(target), target)
    assert (s["gt_objects"], s["pred_objects"], s["matched"]) == (3, 1, 0)
    assert s["object_recall"] == 0 and s["object_precision"] == 0 and s["object_f1"] == 0 and s["pq"] == 0


def test_a_line_broken_into_fragments_matches_once():
    """A 30 px needle predicted as 5 fragments of 4 px: the best fragment (IoU 4/30 >= 0.1) is the match, the
    other four are false alarms; at IoU > 0.5 nothing matches."""
    target = np.zeros((16, 40), np.uint8)
    target[8, 5:35] = 1
    pred = np.zeros_like(target)
    for x in range(5, 35, 6):
        pred[8, x : x + 4] = 1
    s, _ = _any(pred, target)
    assert (s["gt_objects"], s["pred_objects"], s["matched"], s["matched_050"]) == (1, 5, 1, 0)
    assert s["object_precision"] == pytest.approx(1 / 5) and s["object_f1"] == pytest.approx(2 / 6)
    assert s["object_f1_050"] == 0 and s["pq"] == 0


def test_ten_false_specks_joined_to_a_defect_by_a_thin_line_are_one_component():
    """What 8-connectivity means: specks joined to the defect become one component (one match, no false
    alarm), at a lower IoU; apart, they are ten false alarms."""
    target = np.zeros((16, 64), np.uint8)
    _square(target, 2, 2, 1, size=6)
    pred = target.copy()
    for k in range(10):
        pred[12, 5 + 5 * k] = 1
    s, _ = _any(pred, target)
    assert (s["pred_objects"], s["matched"]) == (11, 1) and s["object_precision"] == pytest.approx(1 / 11)
    pred[8:12, 5] = 1
    pred[12, 5:51] = 1
    s, _ = _any(pred, target)
    assert (s["pred_objects"], s["matched"]) == (1, 1) and s["object_recall_050"] == 0  # IoU 36/86


def test_two_defects_merged_into_one_blob_find_one():
    """One prediction covering two nearby defects matches one of them (the higher IoU); the other is missed."""
    target = np.zeros((16, 16), np.uint8)
    _square(target, 2, 2, 1)
    _square(target, 2, 7, 1, size=4)
    pred = np.zeros_like(target)
    pred[2:6, 2:11] = 1
    s, _ = _any(pred, target)
    assert (s["gt_objects"], s["pred_objects"], s["matched"]) == (2, 1, 1)
    assert s["object_recall"] == 0.5 and s["object_precision"] == 1.0


def test_the_assignment_maximizes_total_iou():
    """Truth A, B; predictions P, Q. A greedy matcher takes the best pair (A-P, 0.6) and strands B; the maximum
    total IoU pairs A-Q and B-P (0.4 + 0.3): two defects found instead of one. (The random maps below check
    the whole path from pixels against a brute-force search.)"""
    rows, cols = match(np.array([[0.6, 0.4], [0.3, 0.0]]))
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 1), (1, 0)]
    assert len(match(np.array([[0.6, 0.4], [0.3, 0.0]]), at=0.5)[0]) == 1  # only A-P reaches 0.5


def test_one_to_one_overlaps_are_matched_as_they_are():
    """Each truth overlapping exactly one prediction and each prediction one truth (no assignment to solve):
    those pairs, in truth order; a pair under IoU 0.1 is no match."""
    rows, cols = match(np.array([[0.0, 0.5, 0.0], [0.7, 0.0, 0.0], [0.0, 0.0, 0.05]]))
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 1), (1, 0)]


@pytest.mark.parametrize("seed", range(20))
def test_found_matches_equal_a_brute_force_maximum_total_iou(seed):
    """Small random maps of up to 4 truth and 5 predicted rectangles: the matches at IoU >= 0.1 are those of
    the best assignment over all permutations."""
    g = np.random.default_rng(seed)
    target, pred = np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)
    for m, k in ((target, 4), (pred, 5)):
        for _ in range(k):
            y, x = g.integers(0, 17, 2)
            h, w = g.integers(1, 6, 2)
            m[y : y + h, x : x + w] = 1
    scored = np.ones_like(target, bool)
    t_lab, t_area = components(target > 0)
    p_lab, p_area = components(pred > 0, scored)
    w = np.where((iou := pair_iou(t_lab, t_area, p_lab, p_area, scored)) >= 0.1, iou, 0.0)
    n = max(w.shape)  # at most 5: rectangles can only merge
    square = np.zeros((n, n))
    square[: w.shape[0], : w.shape[1]] = w
    best = max(itertools.permutations(range(n)), key=lambda p: sum(square[i, p[i]] for i in range(n)))
    expected = sum(square[i, best[i]] > 0 for i in range(n))
    assert object_tally(pred, target, 2)[0][0, 2] == expected


def test_a_prediction_on_ignored_pixels_only_is_dropped():
    target = np.zeros((16, 16), np.uint8)
    target[:, :6] = 255
    pred = np.zeros((16, 16), np.uint8)
    _square(pred, 2, 1, 1)  # entirely on ignored pixels: no truth there to call it wrong
    _square(pred, 10, 4, 1)  # straddles into scored pixels: a false alarm, scored on its 3 scored pixels
    s, _ = _any(pred, target)
    assert (s["gt_objects"], s["pred_objects"], s["matched"]) == (0, 1, 0)
    assert s["object_precision"] == 0 and s["object_recall"] is None


def test_objects_are_eight_connected_and_classes_are_matched_apart():
    target = np.zeros((16, 16), np.uint8)
    target[2, 2] = target[3, 3] = 1  # diagonal neighbours: one object
    _square(target, 8, 8, 2)
    pred = np.zeros((16, 16), np.uint8)
    _square(pred, 8, 8, 1)  # right place, wrong class
    tally, confusion = object_tally(pred, target, 3)
    assert tally[1, :3].tolist() == [1, 1, 0] and tally[2, :3].tolist() == [1, 0, 0]
    assert tally[0, :3].tolist() == [2, 1, 1]  # any defect: the Crystal was found, as a Pinpoint
    # rows: truth class (0: no truth), columns: predicted class (0: missed)
    assert confusion.tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0]]


def test_class_confusion_and_right_class_share():
    """Three defects: a Pinpoint found right, a Crystal found as a Pinpoint, a Needle missed, and one false
    Crystal: the object confusion table and right_class = 1 of 2 matches."""
    target = np.zeros((32, 32), np.uint8)
    _square(target, 1, 1, 1)
    _square(target, 1, 10, 2)
    _square(target, 1, 20, 3)
    pred = np.zeros_like(target)
    _square(pred, 1, 1, 1)
    _square(pred, 1, 10, 1)
    pred[2, 11] = 2  # a minority of the component: its majority class is Pinpoint
    _square(pred, 20, 20, 2)
    names = ["background", "Pinpoint", "Crystal", "Needle"]
    s = object_summary(*object_tally(pred, target, 4), names)
    assert s["object_confusion"] == [[0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]
    assert s["right_class"] == 0.5
    assert s["any_defect"]["matched"] == 2 and s["any_defect"]["pred_objects"] == 3
    assert s["per_class"]["Pinpoint"]["object_precision"] == 0.5 and s["per_class"]["Needle"]["object_recall"] == 0
    # Per class, the Crystal's one predicted pixel (IoU 1/9 >= 0.1) finds it: Pinpoint 2/3, Crystal 2/3, Needle 0.
    assert s["object_f1_mean"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_binary_has_no_class_confusion_share():
    target = np.zeros((8, 8), np.uint8)
    _square(target, 1, 1, 1)
    s = object_summary(*object_tally(target, target, 2), ["background", "defect"])
    assert s["right_class"] is None and s["any_defect"] == s["per_class"]["defect"]
    assert s["any_defect"]["pq"] == 1.0


def test_object_scores_none_without_objects():
    s = object_summary(*object_tally(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), 3),
                       ["background", "Pinpoint", "Crystal"])  # fmt: skip
    for key in ("object_recall", "object_precision", "object_f1", "pq", "sq"):
        assert s["any_defect"][key] is None and s["per_class"]["Crystal"][key] is None
    assert s["object_f1_mean"] is None and s["right_class"] is None


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_quality_agrees_with_monai(seed):
    """Random blobby label maps: our tally equals MONAI's TP/FP/FN/IoU sum at IoU > 0.5 on the components."""
    g = np.random.default_rng(seed)
    target = (ndimage.gaussian_filter(g.random((96, 96)), 2.5) > 0.52).astype(np.uint8)
    pred = (ndimage.gaussian_filter(g.random((96, 96)), 2.5) > 0.52).astype(np.uint8)
    pred[target.astype(bool) & (g.random((96, 96)) < 0.7)] = 1  # correlated with the truth
    tally, _ = object_tally(pred, target, 2)
    eight = np.ones((3, 3), bool)
    gt_lab, pr_lab = ndimage.label(target, eight)[0], ndimage.label(pred, eight)[0]
    tp, fp, fn, iou_sum = compute_panoptic_quality(torch.from_numpy(pr_lab), torch.from_numpy(gt_lab),
                                                   output_confusion_matrix=True).tolist()  # fmt: skip
    assert tp > 0 and fp + fn > 0  # a case that exercises both sides
    assert tally[0, :4].tolist() == [tp + fn, tp + fp, tally[0, 2], tp]
    assert tally[0, 4] == pytest.approx(iou_sum, abs=1e-4)
    pq = compute_panoptic_quality(torch.from_numpy(pr_lab), torch.from_numpy(gt_lab), smooth_numerator=0.0).item()
    assert object_scores(tally[0])["pq"] == pytest.approx(pq, abs=1e-5)
