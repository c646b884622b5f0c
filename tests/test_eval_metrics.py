"""Pixel, per-image and object metrics on hand-made masks with known answers."""

import json

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from evaluate.metrics import dice_summary, image_confusion, object_counts, object_summary, per_image_dice
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
    cm.reset()
    assert int(cm.mat.sum()) == 0


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


def test_per_image_dice_empty_rules():
    empty = np.zeros((8, 8), np.uint8)
    blob = empty.copy()
    blob[2:4, 2:4] = 1
    assert per_image_dice(empty, empty, 3) == [1.0, 1.0]  # empty-empty scores 1
    assert per_image_dice(empty, blob, 3) == [0.0, 1.0]  # missed defect
    assert per_image_dice(blob, empty, 3) == [0.0, 1.0]  # invented defect
    half = empty.copy()
    half[2:4, 2] = 1
    assert per_image_dice(half, blob, 3) == [pytest.approx(2 * 2 / 6), 1.0]


def test_per_image_dice_ignores_255():
    target = np.zeros((4, 4), np.uint8)
    target[0] = 255
    pred = np.zeros((4, 4), np.uint8)
    pred[0] = 1  # predicted only on ignored pixels: nothing to score, so empty-empty
    assert per_image_dice(pred, target, 2) == [1.0]


def test_dice_summary_means_over_image_class_pairs():
    s = dice_summary({"a": [1.0, 0.0], "b": [0.5, 1.0]}, ["background", "Pinpoint", "Crystal"])
    assert s["mean_dice"] == pytest.approx(0.625)
    assert s["per_class"] == {"Pinpoint": 0.75, "Crystal": 0.5}


def _square(m, y, x, v, size=3):
    m[y : y + size, x : x + size] = v


def test_object_counts_three_blobs_two_found_one_false_positive():
    target = np.zeros((32, 32), np.uint8)
    pred = np.zeros((32, 32), np.uint8)
    for y, x in [(1, 1), (1, 20), (20, 1)]:
        _square(target, y, x, 1)
    _square(pred, 2, 2, 1)  # overlaps blob 1
    pred[3, 21] = 1  # one pixel inside blob 2 is enough
    _square(pred, 20, 20, 1)  # nothing there
    counts = object_counts(pred, target, 2)
    assert counts.tolist() == [[0, 0, 0, 0], [3, 2, 3, 2]]
    s = object_summary(counts, ["background", "defect"])["defect"]
    assert s["object_recall"] == pytest.approx(2 / 3) and s["object_precision"] == pytest.approx(2 / 3)


def test_one_prediction_covering_two_objects():
    target = np.zeros((16, 16), np.uint8)
    _square(target, 2, 2, 1)
    _square(target, 2, 8, 1)
    pred = np.zeros((16, 16), np.uint8)
    pred[2:5, 2:11] = 1
    assert object_counts(pred, target, 2)[1].tolist() == [2, 2, 1, 1]


def test_objects_are_eight_connected_and_class_specific():
    target = np.zeros((16, 16), np.uint8)
    target[2, 2] = target[3, 3] = 1  # diagonal neighbours: one object
    _square(target, 8, 8, 2)
    pred = np.zeros((16, 16), np.uint8)
    _square(pred, 8, 8, 1)  # right place, wrong class
    counts = object_counts(pred, target, 3)
    assert counts[1].tolist() == [1, 0, 1, 0]  # the diagonal pair is one object; not found
    assert counts[2].tolist() == [1, 0, 0, 0]


def test_prediction_on_ignore_only_is_not_a_false_positive():
    target = np.zeros((16, 16), np.uint8)
    target[:, :6] = 255
    pred = np.zeros((16, 16), np.uint8)
    _square(pred, 2, 1, 1)  # entirely on ignored pixels
    _square(pred, 10, 4, 1)  # straddles into scored pixels: a false positive
    assert object_counts(pred, target, 2)[1].tolist() == [0, 0, 1, 0]


def test_object_summary_none_without_objects():
    s = object_summary(np.zeros((3, 4), np.int64), ["background", "Pinpoint", "Crystal"])
    assert s["Pinpoint"]["object_recall"] is None and s["Pinpoint"]["object_precision"] is None
    assert "background" not in s
