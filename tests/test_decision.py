"""Decisions (trainer.decision): the rule, the per-tile threshold curve training scores itself with, and a
trained checkpoint's decision reaching evaluate's predictions and metrics.json. Tuning on whole scans:
test_tune.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import GRID, tiny_dataset
from PIL import Image
from scipy import ndimage

from evaluate.__main__ import main as evaluate_main
from evaluate.inference import Predictor, load_model
from evaluate.tiles import iter_images
from shardgen import schema
from trainer import checkpoint
from trainer.decision import BINS, Decision, ThresholdTuner, component_max, probabilities


def brute_force_iou(p: np.ndarray, truth: np.ndarray, t: float) -> float:
    pred = p >= t
    return (pred & truth).sum() / (pred | truth).sum()


def test_threshold_tuner_finds_the_best_binary_threshold():
    """Defects score U(0.55, 1), background U(0, 0.75) with 20x more pixels: the best cut is not 0.5."""
    g = np.random.default_rng(0)
    truth = g.random((8, 64, 64)) < 0.05
    p = np.where(truth, g.uniform(0.55, 1.0, truth.shape), g.uniform(0.0, 0.75, truth.shape))
    p = np.floor(p * BINS) / BINS + 0.005  # bin centres: the tuner's 0.01 grid is then exact
    target = torch.from_numpy(truth.astype(np.int64))
    target[0, :4] = 255  # ignored pixels count for nothing
    tuner = ThresholdTuner(1, "cpu")
    tuner.update(torch.from_numpy(p)[:, None].float(), target)
    (t,), (iou,) = tuner.best()
    keep = target.numpy() != 255
    grid = [b / BINS for b in range(1, BINS)]
    scores = [brute_force_iou(p[keep], truth[keep], c) for c in grid]
    assert t == pytest.approx(grid[int(np.argmax(scores))])
    assert iou == pytest.approx(max(scores))
    assert 0.7 < t < 0.76 and iou > brute_force_iou(p[keep], truth[keep], 0.5) + 0.2


def test_threshold_tuner_per_class_and_absent_classes():
    """Three classes: class 1 wants a high threshold, class 2 a low one, class 3 never occurs."""
    g = np.random.default_rng(1)
    target = torch.from_numpy(g.integers(0, 3, (4, 32, 32)))
    probs = torch.zeros((4, 4, 32, 32))
    probs[:, 0] = 0.2
    # Class 1 truth pixels score 0.8, its false alarms 0.6; class 2 truth scores 0.3, never falsely alarms.
    probs[:, 1] = torch.where(target == 1, 0.8, torch.where(target == 0, 0.6, 0.0))
    probs[:, 2] = torch.where(target == 2, 0.3, 0.0)
    tuner = ThresholdTuner(3, "cpu")
    tuner.update(probs, target)
    thresholds, ious = tuner.best()
    assert 0.6 < thresholds[0] <= 0.8 and ious[0] == pytest.approx(1.0)
    assert thresholds[1] <= 0.3 and ious[1] == pytest.approx(1.0)
    assert thresholds[2] == 0.5 and ious[2] is None
    decision = Decision("tuned", thresholds, [0, 0, 0])
    assert torch.equal(decision.classes(probs), target)


def test_a_decision_saved_before_min_peak_loads_with_no_peak_rule():
    old = {"decision": {"kind": "tuned", "thresholds": [0.6, 0.7], "min_area": [16, 0]}}
    d = Decision.from_meta(old)
    assert d.min_peak == [0.0, 0.0]
    assert Decision.from_meta({"decision": d.to_json()}) == d


def test_argmax_decision_is_the_plain_rule():
    probs = torch.softmax(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 1)
    assert torch.equal(Decision.argmax(3).classes(probs), probs.argmax(1))
    binary = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Decision.argmax(1).classes(binary), (binary[:, 0] >= 0.5).long())


def probs_of(classes: np.ndarray, p: np.ndarray, k: int = 4) -> torch.Tensor:
    """(K, H, W) probabilities: ``p`` on each pixel's class of ``classes`` (0: background), the rest spread."""
    out = np.zeros((k, *classes.shape), np.float32)
    out[:] = ((1 - p) / (k - 1))[None]
    np.put_along_axis(out, classes[None].astype(np.int64), p[None], 0)
    return torch.from_numpy(out)


def test_object_decision_gives_each_defect_one_class_by_its_summed_probability():
    """One component painted half class 1 (surer) and two thirds class 2 (more pixels) is one object of class 2;
    a separate object keeps its own class; the defect threshold reads 1 - P(background)."""
    classes = np.zeros((12, 20), np.uint8)
    p = np.full(classes.shape, 0.9, np.float32)
    classes[2:6, 2:6], p[2:6, 2:6] = 1, 0.8  # 16 px, sure
    classes[2:6, 6:14], p[2:6, 6:14] = 2, 0.6  # 32 px touching it, less sure: 19.2 > 12.8 summed
    classes[8:11, 16:19], p[8:11, 16:19] = 3, 0.7
    probs = probs_of(classes, p)
    out = Decision("objects", [0.5] * 3, [0] * 3)(probs)
    assert set(np.unique(out[2:6, 2:14])) == {2}
    assert (out[8:11, 16:19] == 3).all() and out.sum() == 2 * 48 + 3 * 9
    # Per pixel the same probabilities split the defect into two objects of two classes.
    assert set(np.unique(Decision("tuned", [0.5] * 3, [0] * 3)(probs)[2:6, 2:14])) == {1, 2}
    # The area and peak rules apply to whole defects, with the values of the class each one took; the peak
    # is read on the defect probability.
    assert set(np.unique(Decision("objects", [0.5] * 3, [0, 0, 10])(probs))) == {0, 2}
    assert set(np.unique(Decision("objects", [0.5] * 3, [0, 50, 0])(probs))) == {0, 3}
    assert set(np.unique(Decision("objects", [0.5] * 3, [0] * 3, [0.0, 0.0, 0.92])(probs))) == {0, 2}  # 0.9
    assert set(np.unique(Decision("objects", [0.5] * 3, [0] * 3, [0.92, 0.95, 0.0])(probs))) == {0, 3}  # 0.93
    assert not Decision("objects", [0.95] * 3, [0] * 3)(probs).any()


def test_defect_decision_keeps_a_defect_whose_probability_two_classes_share():
    """A line the model is sure is a defect (background 0.25) but splits between two classes (0.35 / 0.40)
    reaches neither class's threshold of 0.5 per pixel; the ``defect`` decision reads 1 - P(background)
    against the likelier class's threshold and keeps it, named by that class. Its peak rule reads the defect
    probability too; a pixel sure of its background stays background."""
    probs = torch.zeros(4, 6, 10)
    probs[0] = 1.0
    probs[:, 2, 1:9] = torch.tensor([0.25, 0.35, 0.40, 0.0])[:, None]  # the line: class 2 likeliest
    probs[:, 4, 1:3] = torch.tensor([0.6, 0.1, 0.1, 0.2])[:, None]  # a faint speck: defect probability 0.4
    assert not Decision("tuned", [0.5] * 3, [0] * 3)(probs).any()
    out = Decision("defect", [0.5] * 3, [0] * 3)(probs)
    assert (out[2, 1:9] == 2).all() and out.sum() == 2 * 8
    assert Decision("defect", [0.5, 0.8, 0.5], [0] * 3)(probs).sum() == 0  # class 2's own threshold
    assert (Decision("defect", [0.3] * 3, [0] * 3)(probs)[4, 1:3] == 3).all()
    assert not Decision("defect", [0.5] * 3, [0] * 3, [0.0, 0.8, 0.0])(probs).any()  # peak: 0.75 < 0.8
    assert Decision("defect", [0.5] * 3, [0] * 3, [0.0, 0.7, 0.0])(probs).sum() == 16
    assert Decision("defect", [0.5] * 3, [9, 9, 9])(probs).sum() == 0  # 8 px < 9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def test_tuned_decision_round_trips_checkpoint_evaluate_metrics(tiny, tmp_path, capsys):
    """Training stores the decision in the checkpoint; evaluate applies it by default and says so."""
    state = checkpoint.load(str(tiny.ckpt))
    saved = state["meta"]["decision"]
    assert saved["kind"] == "tuned"
    assert len(saved["thresholds"]) == len(saved["min_area"]) == len(saved["min_peak"]) == 10
    best = checkpoint.load(str(tiny.ckpt.parent / "best.pt"))
    assert best["meta"]["decision"] == saved  # the last step was the best: both carry the final decision

    out = tmp_path / "tuned"
    argv = ["--checkpoint", str(tiny.ckpt), "--data", str(tiny.shards), "--split", "test", "--out", str(out),
            "--device", "cpu", "--workers", "0"]  # fmt: skip
    assert evaluate_main(argv) == 0
    assert "decision: tuned" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decision"] == {"requested": "tuned", **saved}
    assert "tuned on validation" in (out / "report.html").read_text()

    # The predictions are the stored decision applied to the blended probabilities.
    model = load_model(str(tiny.ckpt), torch.device("cpu"))
    predictor = Predictor(model, GRID, decision=Decision.from_meta(model.meta))
    items = iter_images(schema.read_manifest(str(tiny.shards)), "test")
    for pred, item in predictor.predict((i.images, i) for i in items):
        written = np.asarray(Image.open(out / "predictions" / f"{item.image_id}.png"))
        assert np.array_equal(pred, written)


def test_checkpoint_without_decision_falls_back_to_argmax_with_a_warning(tiny, tmp_path, capsys):
    state = checkpoint.load(str(tiny.ckpt))
    del state["meta"]["decision"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(old), "--data", str(tiny.shards), "--split", "test", "--out", str(out),
            "--device", "cpu", "--workers", "0"]  # fmt: skip
    assert evaluate_main(argv) == 0
    err = capsys.readouterr().err
    assert f"evaluate: warning: {old}: checkpoint has no tuned decision" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decision"]["kind"] == "argmax" and metrics["decision"]["requested"] == "tuned"


# ---------------------------------------------------------------------------------- test-time augmentation


def _model(net: torch.nn.Module, classes: list[str]):
    from evaluate.inference import Model
    from trainer.augment import AugmentConfig, GpuAugment, NormalizeConfig

    norm = GpuAugment(AugmentConfig(enabled=False), NormalizeConfig()).eval()
    return Model(net.eval(), norm, {"classes": classes}, "x.pt", torch.device("cpu"))


def test_tta_of_a_symmetric_model_equals_no_tta():
    """A pointwise (1x1) network commutes with every flip and rotation: all views agree exactly."""
    torch.manual_seed(0)
    model = _model(torch.nn.Conv2d(1, 3, 1), ["background", "a", "b"])
    tiles = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    none = Predictor(model, GRID, tta="none").tile_probabilities(tiles)
    for mode in ("flips", "d4"):
        assert torch.allclose(Predictor(model, GRID, tta=mode).tile_probabilities(tiles), none, atol=1e-6)


def test_tta_averages_the_views_turned_back():
    """A 3x3 network with a lopsided kernel: flips TTA is the mean of the four flipped, unflipped outputs."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    model = _model(net, ["background", "defect"])
    tiles = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    x = model.normalize.normalize(tiles)
    with torch.no_grad():
        expect = sum(torch.softmax(net(x.flip(v)), 1).flip(v) for v in [(), (3,), (2,), (2, 3)]) / 4
        d4 = sum(torch.softmax(net(torch.rot90(x, k, (2, 3)).flip(f)), 1).flip(f).rot90(-k, (2, 3))
                 for k in range(4) for f in [(), (3,)]) / 8  # fmt: skip
    assert torch.allclose(Predictor(model, GRID, tta="flips").tile_probabilities(tiles), expect, atol=1e-6)
    assert torch.allclose(Predictor(model, GRID, tta="d4").tile_probabilities(tiles), d4, atol=1e-6)
    assert not torch.allclose(Predictor(model, GRID, tta="none").tile_probabilities(tiles), expect, atol=1e-3)


def test_scored_predictions_decide_like_predict_and_score_the_tta_probabilities():
    """predict's shape scores: ``predict_scored`` decides as ``predict`` does (tuned thresholds, area filter,
    TTA) and gives each pixel the blended, view-averaged probability of the class it was decided to be; under
    a decision that keeps defects by their defect probability, a defect pixel's score is that probability."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cases = [(["background", "a", "b"], 3, Decision("tuned", [0.4, 0.6], [0, 8])),
             (["background", "defect"], 1, Decision("tuned", [0.45], [4])),
             (["background", "a", "b"], 3, Decision("defect", [0.7, 0.75], [0, 8]))]  # fmt: skip
    for classes, outputs, decision in cases:
        model = _model(torch.nn.Conv2d(1, outputs, 3, padding=1), classes)
        items = [(torch.randint(0, 256, (GRID.count, 1, GRID.tile, GRID.tile), dtype=torch.uint8, generator=g), k)
                 for k in range(2)]  # fmt: skip
        predictor = Predictor(model, GRID, batch_size=7, decision=decision, tta="flips")
        probs = [p for p, _ in predictor.probabilities(items)]
        plain = [c for c, _ in predictor.predict(items)]
        scored = list(predictor.predict_scored(items))
        assert [k for *_, k in scored] == [0, 1]
        for p, c, (decided, confidence, _) in zip(probs, plain, scored, strict=True):
            np.testing.assert_array_equal(decided, c)
            np.testing.assert_array_equal(decided, decision(p))
            assert 0 < (decided > 0).mean() < 1
            p = p.numpy()
            if outputs == 1:
                expect = np.where(decided > 0, p[0], 1 - p[0])
            else:
                expect = np.take_along_axis(p, decided[None].astype(np.int64), 0)[0]
                if decision.kind == "defect":
                    own = expect.copy()
                    expect = np.where(decided > 0, 1 - p[0], expect)
                    assert (expect - own)[decided > 0].min() > 0.05  # the other defect class's share counts
            np.testing.assert_allclose(confidence, expect, atol=1e-6)


def test_in_place_probabilities_equal_the_out_of_place_ones():
    logits = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(0)) * 20
    expected = torch.softmax(logits, 1)
    got = probabilities(logits.clone(), inplace=True)
    assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(got.sum(1), torch.ones(2, 8, 8))
    binary = logits[:, :1]
    assert torch.equal(probabilities(binary.clone(), inplace=True), torch.sigmoid(binary))


def test_argmax_decision_breaks_ties_like_argmax():
    probs = torch.zeros(1, 4, 8, 8)
    probs[:, 1:3] = 0.5  # classes 1 and 2 tie everywhere: argmax keeps the first
    assert torch.equal(Decision.argmax(3).classes(probs), probs.argmax(1)) and bool((probs.argmax(1) == 1).all())


def test_component_max_equals_scipy_maximum():
    g = np.random.default_rng(0)
    values = g.random((64, 64)).astype(np.float32)
    labels, n = ndimage.label(g.random((64, 64)) > 0.6, np.ones((3, 3), bool))
    assert n > 10
    expected = np.asarray(ndimage.maximum(values, labels, np.arange(1, n + 1)))
    assert np.array_equal(component_max(values, labels, n), expected)
    assert component_max(values, np.zeros_like(labels), 0).shape == (0,)


def test_a_binary_decision_of_either_per_pixel_kind_reads_its_threshold():
    binary = torch.tensor([[[[0.3, 0.6, 0.8]]]])
    for kind in ("tuned", "defect"):
        assert Decision(kind, [0.7], [0]).classes(binary).tolist() == [[[0, 0, 1]]]
    assert Decision.argmax(1).classes(binary).tolist() == [[[0, 1, 1]]]


def test_growth_gives_back_an_outline_without_joining_or_adding_defects():
    """A needle kept by a strict threshold (its core at 0.95) grows into the pixels around it that are more likely
    defect than not and of its class, up to ``grow_px``; not into a neighbour of another likeliest class, not
    past ``grow_px``, not across the gap to a second defect, and a qualifying pixel cut off from every kept
    defect stays background: the object count and the classes do not change."""
    classes = np.zeros((20, 40), np.uint8)
    p = np.full(classes.shape, 0.9, np.float32)  # background sure of itself
    classes[4:7, 2:20], p[4:7, 2:20] = 1, 0.6  # the needle's outline: class 1, defect probability 0.6
    classes[2:4, 2:20], p[2:4, 2:20] = 1, 0.6  # a wider halo above it: 2 and 3 px from its core
    p[5, 2:20] = 0.95  # its core: what the threshold keeps
    classes[7, 2:20], p[7, 2:20] = 2, 0.6  # a row below it whose likeliest class is another
    classes[4:7, 20:23], p[4:7, 20:23] = 1, 0.6  # a bridge to a second defect...
    classes[4:7, 23:30], p[4:7, 23:30] = 1, 0.95  # ... which is kept too
    classes[12, 10:14], p[12, 10:14] = 1, 0.6  # a faint patch nowhere near a kept pixel of its own
    classes[10, 2:20], p[10, 2:20] = 1, 0.6  # a faint line 5 px from the core, cut off from it by background
    probs = probs_of(classes, p)
    plain = Decision("tuned", [0.9, 0.9, 0.9], [0] * 3)
    kept = plain(probs)
    assert kept.sum() == 18 + 3 * 7  # the needle's core and the second defect
    for px in (1, 2, 8):
        out = Decision("tuned", [0.9] * 3, [0] * 3, grow_px=px)(probs)
        assert set(np.unique(out)) == {0, 1}  # no pixel of class 2 painted, no class changed
        assert ndimage.label(out > 0, np.ones((3, 3)))[1] == 2  # still two defects: the bridge does not join them
        assert (out[4:7, 2:19] == 1).all()  # the outline given back (within 1 px of the core)
        assert not out[7].any()  # 1-2 px from the core, but its likeliest class is another
        assert (out[3, 2:19] == 1).all() == (px >= 2) and (out[2, 2:19] == 1).all() == (px >= 3)
        assert not out[10:13].any()  # cut-off pixels stay background
        assert (out[kept > 0] == kept[kept > 0]).all()  # every kept pixel stays as it was
    # The bridge between the two defects stays background near its middle (not past grow_px from the needle's
    # core; the halo rows above check the limit itself).
    one = Decision("tuned", [0.9] * 3, [0] * 3, grow_px=1)(probs)
    assert not one[4:7, 21].any()
    # The defect decision grows on the defect probability; the old decision (no grow_px) loads without growth.
    assert (Decision("defect", [0.9] * 3, [0] * 3, grow_px=2)(probs) == Decision("tuned", [0.9] * 3, [0] * 3,
                                                                                grow_px=2)(probs)).all()
    saved = Decision("tuned", [0.9] * 3, [0] * 3, grow_px=4)
    assert Decision.from_meta({"decision": saved.to_json()}) == saved
    assert Decision.from_meta({"decision": {"kind": "tuned", "thresholds": [0.5], "min_area": [0]}}).grow_px == 0
