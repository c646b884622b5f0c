"""Decisions tuned on whole validation scans (evaluate.tune): constructed cases with known best rules, the
grid widening past a chosen edge, classes with too few objects, blended scans (a seam-crossing object is one
object), and best.pt / last.pt each carrying the decision of their own weights."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import GRID, tiny_dataset
from scipy import ndimage

from evaluate.__main__ import main as evaluate_main
from evaluate.blend import reassemble_mask
from evaluate.inference import Predictor, load_model
from evaluate.tiles import iter_images
from evaluate.tune import GRIDS, MIN_OBJECTS, ScanTuner, choose, together, tune, tune_model
from shardgen import schema
from trainer import checkpoint
from trainer import train as train_module
from trainer.config import load_config
from trainer.decision import EIGHT, Decision, decide, deciding
from trainer.dist import param_digest
from trainer.train import train


def tuned(probs: torch.Tensor, target: torch.Tensor, beta: float = 2.0, names=None):
    """Tune on each (K, H, W) of ``probs`` as one scan with its (H, W) truth."""
    tuner = ScanTuner(max(1, probs.shape[1] - 1))
    for p, t in zip(probs, target, strict=True):
        tuner.add(p, t.numpy().astype(np.uint8))
    names = names or ["background"] + [f"c{k}" for k in range(tuner.n)]
    return tune(tuner, beta, names)


def paint_specks(probs: torch.Tensor, p: float, size: int = 2) -> None:
    """Three false ``size`` x ``size`` specks of probability ``p`` in every (1, 40, 40) scan of ``probs``."""
    for y, x in ((20, 20), (30, 5), (2, 30)):
        probs[:, 0, y : y + size, x : x + size] = p


def applies_exactly(decision: Decision, probs: torch.Tensor, target: torch.Tensor) -> bool:
    return all(np.array_equal(decision(p), t.numpy().astype(np.uint8)) for p, t in zip(probs, target, strict=True))


def test_area_rule_drops_specks_and_keeps_defects():
    """Each scan: one true 6x6 defect and three false 2x2 specks, all sure: the smallest minimum area above 4."""
    target = torch.zeros((3, 40, 40), dtype=torch.long)
    probs = torch.zeros((3, 1, 40, 40))
    target[:, 5:11, 5:11] = 1
    probs[:, 0, 5:11, 5:11] = 0.9
    paint_specks(probs, 0.9)
    decision, reached = tuned(probs, target)
    assert decision.min_area == [min(a for a in GRIDS["area"][0] if a > 4)] and decision.min_peak == [0.0]
    assert reached["c0"] == {"objects": 3, "found": 3, "kept": 3, "iou": 1.0}
    assert applies_exactly(decision, probs, target)


def test_small_true_defects_are_kept():
    """A 2x2 pinpoint and a 6x6 defect: any minimum area above 4 px would lose the pinpoint."""
    target = torch.zeros((2, 40, 40), dtype=torch.long)
    target[:, 5:11, 5:11] = 1
    target[:, 30:32, 30:32] = 1
    probs = (target[:, None] == 1).float() * 0.9
    decision, _ = tuned(probs, target)
    assert decision.min_area[0] <= 4 and decision.min_peak == [0.0]
    assert applies_exactly(decision, probs, target)


def test_pixels_under_a_tenth_defect_probability_are_never_painted():
    """Two thin lines: one the model gives 25% (a rule at 0.2 finds it, the edge of the first window, so lower
    thresholds are tried too), one it is sure of at a single pixel and gives 3% along the rest of it and its
    blurred surroundings. A 2% rule gated by the sure peak would find the second line at IoU 0.17 by painting
    120 px around its 20; the tuned rules never go below 10%."""
    target = torch.zeros((3, 40, 40), dtype=torch.long)
    probs = torch.zeros((3, 1, 40, 40))
    target[:, 32, 10:30] = 1
    probs[:, 0, 32, 10:30] = 0.25
    target[:, 20, 10:30] = 1
    probs[:, 0, 18:23, 8:32] = 0.03
    probs[:, 0, 20, 20] = 0.99
    decision, _ = tuned(probs, target)
    assert min(decision.thresholds) >= 0.1
    for p in probs:
        painted = decision(p) > 0
        assert painted[32, 10:30].all() and (p[0].numpy()[painted] >= 0.1).all()


def test_peak_rule_keeps_a_whole_sure_pinpoint_and_drops_unsure_specks():
    """A 4x4 pinpoint whose core the model is sure of (0.99) and whose rim it half believes (0.7), and three
    false 4x4 specks at 0.7. No area separates them; a threshold above 0.7 drops the specks but cuts the
    pinpoint to its core; keeping components with a sure peak keeps the whole pinpoint: same objects, better
    IoU, so the peak rule wins."""
    target = torch.zeros((3, 40, 40), dtype=torch.long)
    target[:, 5:11, 5:11] = 1
    target[:, 29:33, 29:33] = 1
    probs = (target[:, None] == 1).float() * 0.99
    probs[:, 0, 29:33, 29:33] = 0.7
    probs[:, 0, 30:32, 30:32] = 0.99
    paint_specks(probs, 0.7, size=4)
    decision, reached = tuned(probs, target)
    assert decision.thresholds[0] <= 0.7 and decision.min_peak == [0.9] and decision.min_area == [0]
    assert reached["c0"]["iou"] == 1.0
    assert applies_exactly(decision, probs, target)
    # The same rule in a multiclass model: the peak is the class's own probability.
    probs3 = torch.cat([1 - probs, probs, torch.zeros_like(probs)], 1)
    rule = Decision("tuned", [decision.thresholds[0], 0.5], [0, 0], [0.9, 0.0])
    assert applies_exactly(rule, probs3, target)


@pytest.mark.parametrize("beta, keeps_pinpoint", [(1.0, False), (2.0, True)])
def test_beta_trades_false_alarms_for_found_defects(beta, keeps_pinpoint):
    """A 6x6 defect, a true 2x2 pinpoint and three false 2x2 specks, all at 0.7. Keeping every component
    finds both defects among 5 (precision 0.4, recall 1: F1 0.57, F2 0.77); an area filter keeps the one it
    is sure of (precision 1, recall 0.5: F1 0.67, F2 0.56). F1 drops the pinpoint, F2 (the default) keeps it."""
    target = torch.zeros((1, 40, 40), dtype=torch.long)
    target[:, 5:11, 5:11] = 1
    target[:, 30:32, 30:32] = 1
    probs = (target[:, None] == 1).float() * 0.7
    paint_specks(probs, 0.7)
    decision, _ = tuned(probs, target, beta)
    assert (decision.min_area[0] <= 4) == keeps_pinpoint and decision.min_peak == [0.0]


def test_fragments_count_as_false_alarms_not_as_matches():
    """A line predicted as 8 separate fragments matches the truth once; the other 7 are false alarms, so the
    tuner prefers the lower threshold that paints the line whole (one-to-one matching, not any overlap)."""
    target = torch.zeros((1, 40, 40), dtype=torch.long)
    target[:, 20, 2:38] = 1
    probs = torch.zeros((1, 1, 40, 40))
    probs[:, 0, 20, 2:38] = 0.6
    probs[:, 0, 20, 2:38:5] = 0.95  # sure beads on an unsure thread
    probs[:, 0, 20, 3:38:5] = 0.95
    decision, reached = tuned(probs, target)
    assert decision.thresholds[0] <= 0.6 and reached["c0"] == {"objects": 1, "found": 1, "kept": 1, "iou": 1.0}


def test_a_class_no_rule_finds_keeps_nothing_rather_than_specks():
    """The model misses the defect and paints specks at 0.6, one of them grazing the defect: every rule finds
    nothing (F 0); the rule that keeps specks has a sliver of pixel IoU, the one that keeps nothing has none.
    An inspector wants no false alarms from a class the model cannot find."""
    target = torch.zeros((2, 40, 40), dtype=torch.long)
    target[:, 5:11, 5:11] = 1
    probs = torch.zeros((2, 1, 40, 40))
    paint_specks(probs, 0.6)
    probs[:, 0, 10:12, 10:12] = 0.6  # a 2x2 speck on the defect's corner: 1 true pixel of 39
    decision, reached = tuned(probs, target)
    assert reached["c0"]["kept"] == 0 and decision.thresholds[0] > 0.6


def test_a_choice_at_the_edge_of_the_grid_widens_it():
    """The defect scores 0.995, false specks of its size 0.6, 0.85 and 0.985: the first windows' top values
    (threshold 0.9, peak 0.98) are their best, so the grids widen and a threshold of 0.99 (a plainer rule than
    the same peak) drops the last speck."""
    target = torch.zeros((2, 40, 40), dtype=torch.long)
    target[:, 5:11, 5:11] = 1
    probs = (target[:, None] == 1).float() * 0.995
    for (y, x), p in zip(((20, 20), (30, 5), (2, 30)), (0.6, 0.85, 0.985), strict=True):
        probs[:, 0, y : y + 6, x : x + 6] = p
    for name, top in (("threshold", 0.9), ("peak", 0.98)):
        values, (_, hi) = GRIDS[name]
        assert values[hi] == top
    decision, reached = tuned(probs, target)
    assert decision.thresholds == [0.99] and decision.min_peak == [0.0] and decision.min_area == [0]
    assert reached["c0"]["kept"] == 2 and applies_exactly(decision, probs, target)


def test_with_no_class_tuneable_alone_one_rule_is_tuned_on_all_pooled():
    """Two classes with 3 true 6x6 objects each and 3 false 2x2 specks each: neither has 5 objects, so both get
    the one rule tuned on all 6 objects and 6 specks (drop the specks), named as borrowed."""
    target = torch.zeros((3, 40, 40), dtype=torch.long)
    probs = torch.zeros((3, 3, 40, 40))
    probs[:, 0] = 1.0
    for c, y in ((1, 4), (2, 24)):
        target[:, y : y + 6, 4:10] = c
        for x0, x1 in ((4, 10), (20, 22)):
            probs[:, :, y : y + (6 if x1 - x0 == 6 else 2), x0:x1] = 0
            probs[:, c, y : y + (6 if x1 - x0 == 6 else 2), x0:x1] = 1.0
    decision, _ = tuned(probs, target, names=["background", "a", "b"])
    assert decision.val_objects == [3, 3] and decision.borrowed == ["a", "b"]
    assert decision.min_area == [8, 8] and decision.thresholds[0] == decision.thresholds[1]
    assert applies_exactly(decision, probs, target)


def test_a_class_with_too_few_objects_takes_the_median_of_the_others():
    """Classes 1-3 have 6 objects each and want areas 8 / 8 / 16 (specks of 4 / 4 / 9 px); class 4 has 2 objects
    and no false alarms (its own choice would be no area rule); it borrows the median, 8, and is named."""
    target = torch.zeros((6, 40, 40), dtype=torch.long)
    probs = torch.zeros((6, 5, 40, 40))
    probs[:, 0] = 1.0
    speck = {1: 2, 2: 2, 3: 3}
    for c in (1, 2, 3):
        y = 4 + 12 * (c - 1)
        target[:, y : y + 6, 4:10] = c
        probs[:, :, y : y + 6, 4:10] = 0
        probs[:, c, y : y + 6, 4:10] = 1.0
        s = speck[c]
        probs[:, :, y : y + s, 20 : 20 + s] = 0
        probs[:, c, y : y + s, 20 : 20 + s] = 1.0
    target[:2, 30:32, 30:32] = 4
    probs[:2, :, 30:32, 30:32] = 0
    probs[:2, 4, 30:32, 30:32] = 1.0
    decision, reached = tuned(probs, target, names=["background", "a", "b", "c", "d"])
    assert decision.val_objects == [6, 6, 6, 2] and 2 < MIN_OBJECTS <= 6
    assert decision.min_area == [8, 8, 16, 8] and decision.borrowed == ["d"]
    assert set(reached) == {"a", "b", "c"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def test_the_decision_is_tuned_on_blended_whole_scans(tiny, monkeypatch):
    """tune_model scores evaluate's blended 192 px scans, not 64 px tiles: an object crossing tile seams is
    one object (the tiles of the val split hold more object pieces than its scans hold objects)."""
    manifest = schema.read_manifest(str(tiny.shards))
    model = load_model(str(tiny.ckpt), torch.device("cpu"))
    seen = []
    monkeypatch.setattr(ScanTuner, "add", lambda self, probs, truth, add=ScanTuner.add: (
        seen.append((probs.clone(), truth)), add(self, probs, truth))[1])  # fmt: skip
    decision, _ = tune_model(model, manifest, "val", beta=2.0, workers=0)
    items = list(iter_images(manifest, "val"))
    assert len(seen) == len(items) > 0
    blended = list(Predictor(model, GRID).probabilities((i.images, i) for i in items))
    whole = tile_pieces = 0
    for (probs, truth), (expected, item) in zip(seen, blended, strict=True):
        assert torch.equal(deciding(probs[None])[1], deciding(expected[None])[1])
        assert np.array_equal(truth, reassemble_mask(item.masks.numpy(), GRID, item.image_id))
        for c in range(1, 11):
            whole += ndimage.label(truth == c, EIGHT)[1]
            tile_pieces += sum(ndimage.label(m == c, EIGHT)[1] for m in item.masks.numpy())
    assert sum(decision.val_objects) == whole < tile_pieces


def test_best_and_last_each_carry_the_decision_of_their_own_weights(tiny):
    """best.pt from other weights than last.pt: decide tunes each for its own weights, from memory."""
    cfg = load_config(str(tiny.root / "train.yaml"), ["data.workers=0"])
    manifest = schema.read_manifest(str(tiny.shards))
    last = checkpoint.load(str(tiny.ckpt))
    torch.manual_seed(1)
    best = {**last, "step": 2, "model": {k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v
                                          for k, v in last["model"].items()}}  # fmt: skip
    model = load_model(str(tiny.ckpt), torch.device("cpu"))
    run = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), model=model.net, meta=last["meta"], step=last["step"],
                          names=list(manifest["classes"]))  # fmt: skip
    decisions = decide(run, SimpleNamespace(manifest=manifest, split="val"), {"best": best, "last": last})
    for name, state in (("best", best), ("last", last)):
        net = load_model(str(tiny.ckpt), torch.device("cpu"))
        net.net.load_state_dict(state["model"])
        own, _ = tune_model(net, manifest, "val", cfg.train.decision_beta, workers=0)
        assert decisions[name] == own
    assert param_digest(run.model) == param_digest(load_model(str(tiny.ckpt), torch.device("cpu")).net)


def test_a_run_writes_its_last_checkpoints_once_with_their_decisions(tiny, tmp_path, monkeypatch):
    """The decision is tuned in memory and written with the checkpoint: nothing is read back from storage,
    and last.pt is written once, at the end (best.pt, kept from step 2, again with its decision)."""
    cfg = load_config(str(tiny.root / "train.yaml"), [f"train.out_dir={tmp_path}", "train.steps=4",
                                                       "train.val_every=2", "train.ckpt_every=2"])  # fmt: skip
    written = []
    save = checkpoint.save

    def recording(out, name, state, **kw):
        written.append((name, state["step"], "decision" in state["meta"]))
        return save(out, name, state, **kw)

    monkeypatch.setattr(checkpoint, "save", recording)

    def no_reading(*args, **kwargs):
        raise AssertionError("a checkpoint was read back")

    monkeypatch.setattr(checkpoint, "load", no_reading)
    train(cfg)
    monkeypatch.undo()
    assert written[:2] == [("best", 2, False), ("last", 2, False)]  # mid-run, to resume from
    assert written[-1] == ("last", 4, True) and written[-2][0::2] == ("best", True)
    assert ("last", 4, False) not in written and ("best", 4, False) not in written
    best = checkpoint.load(str(tmp_path / "best.pt"))
    assert "decision" in best["meta"] and Decision.from_meta(best["meta"]) is not None
    assert json.loads((tmp_path / "latest.json").read_text())["checkpoint"] == "last.pt"


def test_a_checkpoint_saved_during_training_carries_no_decision(tiny, tmp_path, monkeypatch):
    """Tuning on (the default), the end-of-run tuning skipped: what training saved has no decision."""
    monkeypatch.setattr(train_module, "decide", lambda *args: {})
    cfg = load_config(str(tiny.root / "train.yaml"), [f"train.out_dir={tmp_path}", "train.steps=2",
                                                       "train.val_every=2"])  # fmt: skip
    assert cfg.train.tune_decision
    train(cfg)
    for name in ("best", "last"):
        assert "decision" not in checkpoint.load(str(tmp_path / f"{name}.pt"))["meta"]


def test_a_checkpoint_written_before_the_scaler_went_resumes_and_evaluates(tiny, tmp_path):
    """Checkpoints of earlier versions hold a (no-op) GradScaler state: they still resume, and evaluate."""
    run = tmp_path / "run"
    shutil.copytree(tiny.ckpt.parent, run)
    for name in ("best", "last"):
        old = checkpoint.load(str(run / f"{name}.pt"))
        torch.save({**old, "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict()}, run / f"{name}.pt")
    cfg = load_config(str(tiny.root / "train.yaml"), [f"train.out_dir={run}", "train.steps=6"])
    summary = train(cfg)
    assert summary["steps"] == 6 and "scaler" not in checkpoint.load(str(run / "last.pt"))
    rc = evaluate_main(["--checkpoint", str(run / "best.pt"), "--data", str(tiny.shards), "--out",
                        str(tmp_path / "eval"), "--workers", "0"])  # fmt: skip
    assert rc == 0 and (tmp_path / "eval" / "metrics.json").is_file()


def test_a_multiclass_model_gets_the_objects_decision(tiny):
    """tune_model(form="object") gives a multiclass model the ``objects`` decision: one threshold shared by
    every class, an area and a peak rule per class; by default a rule per class, per pixel."""
    manifest = schema.read_manifest(str(tiny.shards))
    model = load_model(str(tiny.ckpt), torch.device("cpu"))
    objects, _ = tune_model(model, manifest, "val", beta=2.0, workers=0, form="object")
    per_class, _ = tune_model(model, manifest, "val", beta=2.0, workers=0)
    defect, _ = tune_model(model, manifest, "val", beta=2.0, workers=0, form="defect", grow_px=8)
    assert defect.grow_px == 8 and per_class.grow_px == 0  # train.decision_grow, stored as given
    assert objects.kind == "objects" and len(set(objects.thresholds)) == 1
    assert len(objects.min_area) == len(objects.min_peak) == 10
    assert per_class.kind == "tuned" and len(per_class.thresholds) == 10
    assert defect.kind == "defect" and len(defect.thresholds) == 10
    assert objects.val_objects == per_class.val_objects == defect.val_objects
    with pytest.raises(ValueError, match="decision form must be one of pixel, defect, object, got 'class'"):
        tune_model(model, manifest, "val", beta=2.0, workers=0, form="class")
    with pytest.raises(ValueError, match="the .object. decision does not grow"):  # not stored, never done
        tune_model(model, manifest, "val", beta=2.0, workers=0, form="object", grow_px=8)


def test_defect_tuning_finds_a_defect_two_classes_share():
    """Each scan: a class-2 needle the model is sure is a defect (background 0.2) whose probability leans to
    class 2 only barely (0.45 against class 1's 0.35), and two larger blobs it doubts are defects at all
    (background 0.55) but would call class 2 (0.45). On class 2's own probability the needle and the blobs are
    alike (0.45): no threshold, area or peak keeps one without the other. On the defect probability (0.8 against
    0.45) the needle is found in every scan, as class 2, and nothing else is kept."""
    probs = torch.zeros(6, 4, 40, 40)
    probs[:, 0] = 1.0
    target = torch.zeros(6, 40, 40, dtype=torch.uint8)
    target[:, 10:12, 5:35] = 2  # 60 px
    probs[:, :, 10:12, 5:35] = torch.tensor([0.2, 0.35, 0.45, 0.0])[None, :, None, None]
    for y, x in ((20, 5), (25, 25)):  # 64 px each
        probs[:, :, y : y + 8, x : x + 8] = torch.tensor([0.55, 0.0, 0.45, 0.0])[None, :, None, None]
    tuner = ScanTuner(3, kind="defect")
    for p, t in zip(probs, target, strict=True):
        tuner.add(p, t.numpy())
    decision, reached = tune(tuner, 2.0, ["background", "c1", "c2", "c3"])
    assert decision.kind == "defect" and 0.45 < decision.thresholds[1] <= 0.8
    assert reached["c2"]["found"] == reached["c2"]["kept"] == 6 and reached["c2"]["iou"] == 1.0
    assert applies_exactly(decision, probs, target)
    per_pixel, _ = tuned(probs, target)
    assert not applies_exactly(per_pixel, probs, target)


def test_objects_tuning_finds_a_defect_split_between_classes_as_one_of_its_class():
    """Each scan: a class-2 defect whose pixels lean to class 1 on its left and class 2 (more of them) on its
    right, a class-3 defect and class-3 specks. Tuned for objects, the split defect is one class-2 object in
    every scan and class 3's area rule drops the specks; per pixel it is two objects of two classes."""
    probs = torch.zeros(6, 4, 40, 40)
    probs[:, 0] = 1.0
    target = torch.zeros(6, 40, 40, dtype=torch.uint8)
    target[:, 10:20, 10:22] = 2
    probs[:, 0, 10:20, 10:22], probs[:, 1, 10:20, 10:15], probs[:, 2, 10:20, 15:22] = 0.1, 0.9, 0.9
    target[:, 26:32, 28:34] = 3
    probs[:, 0, 26:32, 28:34], probs[:, 3, 26:32, 28:34] = 0.05, 0.95
    for y, x in ((2, 30), (30, 2), (2, 2)):
        probs[:, 0, y : y + 2, x : x + 2], probs[:, 3, y : y + 2, x : x + 2] = 0.05, 0.95
    tuner = ScanTuner(3, kind="objects")
    for p, t in zip(probs, target, strict=True):
        tuner.add(p, t.numpy())
    decision, reached = tune(tuner, 2.0, ["background", "c1", "c2", "c3"])
    assert decision.kind == "objects"
    assert reached["c2"]["found"] == reached["c2"]["kept"] == reached["c3"]["kept"] == 6
    assert 4 < decision.min_area[2] <= 36
    assert applies_exactly(decision, probs, target)
    per_pixel, _ = tuned(probs, target)
    assert not applies_exactly(per_pixel, probs, target)


def test_classes_are_tuned_together_so_a_class_of_false_alarms_keeps_none():
    """Class 1's best rule on its own finds 1 of its 5 objects among 77 kept (F2 0.05 > 0); with class 0
    finding 9 of 10 with 10 kept, that rule halves the F2 of all objects together, so tuned together class 1
    keeps nothing. A class whose rule is worth its false alarms keeps it."""
    candidates = [(0.5, 0, 0.0), (0.9, 512, 0.999)]
    truth = np.array([[100, 10], [50, 5]])
    spray = np.array([[[10, 9, 90, 10], [0, 0, 0, 0]], [[77, 1, 10, 500], [0, 0, 0, 0]]])
    assert choose(spray, candidates, truth, 2.0) == [0, 0]
    assert together(spray, candidates, truth, 2.0, [0, 1]) == [0, 1]
    useful = spray.copy()
    useful[1, 0] = [6, 4, 40, 10]
    assert together(useful, candidates, truth, 2.0, [0, 1]) == [0, 0]


@pytest.mark.parametrize("kind", ["defect", "objects"])
def test_scans_scored_on_two_threads_give_the_one_thread_counts(kind):
    """ScanTuner scores scans on a thread pool: the counts of every candidate are those of one thread."""
    g = torch.Generator().manual_seed(0)
    scans = []
    for _ in range(6):
        probs = torch.rand(4, 48, 48, generator=g).softmax(0)
        truth = torch.randint(0, 4, (48, 48), generator=g).numpy().astype(np.uint8)
        truth[:5] = 255
        scans.append((probs, truth))
    counts = []
    for threads in (1, 2):
        tuner = ScanTuner(3, kind=kind, threads=threads)
        for probs, truth in scans:
            tuner.add(probs, truth)
        candidates = [(t, a, p) for t in (0.3, 0.6) for a in (0, 8) for p in (0.0, 0.9)]
        counts.append(tuner.table(candidates))
    assert counts[0].sum() > 0
    np.testing.assert_array_equal(counts[0], counts[1])
