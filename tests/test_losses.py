"""Losses: right < wrong, 255 ignored everywhere, deep-supervision sum, class weights, gradients."""

import pytest
import torch
import torch.nn.functional as F

from trainer.config import load_config
from trainer.losses import LossConfig, build_loss, class_weights_from_histogram, object_weights

N = 4  # multiclass: background + 3 defect classes
HIST = [900_000, 5_000, 50_000, 300]


def make_target(n_classes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, max(n_classes, 2), (2, 16, 16), generator=g)
    t[:, :3, :3] = 255
    return t


def perfect_logits(target: torch.Tensor, n_channels: int, scale: float = 10.0) -> torch.Tensor:
    safe = torch.where(target == 255, 0, target)
    if n_channels == 1:
        return (safe[:, None].float() * 2 - 1) * scale
    return F.one_hot(safe, n_channels).permute(0, 3, 1, 2).float() * 2 * scale - scale


def build(n_channels: int, **kw):
    return build_loss(LossConfig(**kw), n_channels, HIST if n_channels == N else None)


@pytest.mark.parametrize("n_channels", [1, N])
def test_perfect_prediction_beats_wrong_and_random(n_channels):
    loss = build(n_channels)
    target = make_target(n_channels)
    right = perfect_logits(target, n_channels)
    wrong = perfect_logits((target + 1) % max(n_channels, 2) * (target != 255) + 255 * (target == 255),
                           n_channels)
    random = torch.randn_like(right)
    l_right, l_wrong, l_random = loss(right, target), loss(wrong, target), loss(random, target)
    assert l_right < 0.05 < l_random < l_wrong


@pytest.mark.parametrize("n_channels", [1, N])
def test_ignored_pixels_do_not_affect_loss(n_channels):
    loss = build(n_channels)
    target = make_target(n_channels)
    logits = torch.randn(2, n_channels, 16, 16)
    changed = logits.clone()
    changed[:, :, :3, :3] = torch.randn(2, n_channels, 3, 3) * 100
    assert torch.equal(loss(logits, target), loss(changed, target))
    # ... and ignoring them for real changes the value: those pixels would count if they were labelled.
    relabelled = target.clone()
    relabelled[:, :3, :3] = 1
    assert not torch.allclose(loss(changed, target), loss(changed, relabelled))


@pytest.mark.parametrize("n_channels", [1, N])
def test_all_ignored_batch_is_finite(n_channels):
    loss = build(n_channels)
    logits = torch.randn(2, n_channels, 8, 8, requires_grad=True)
    value = loss(logits, torch.full((2, 8, 8), 255))
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("n_channels", [1, N])
def test_deep_supervision_sums_the_outputs(n_channels):
    loss = build(n_channels)
    target = make_target(n_channels)
    outs = [torch.randn(2, n_channels, 16, 16) for _ in range(7)]  # fused + 6 side outputs, as U2-Net
    expected = sum(loss(o, target) for o in outs)
    assert torch.allclose(loss(outs, target), expected)
    assert torch.allclose(loss(tuple(outs), target), expected)


@pytest.mark.parametrize("n_channels", [1, N])
def test_gradient_flows_to_every_output(n_channels):
    loss = build(n_channels)
    target = make_target(n_channels)
    outs = [torch.randn(2, n_channels, 16, 16, requires_grad=True) for _ in range(3)]
    loss(outs, target).backward()
    for o in outs:
        assert torch.isfinite(o.grad).all() and o.grad.abs().sum() > 0
        assert (o.grad[:, :, :3, :3] == 0).all()  # ignored pixels get no gradient


def test_binary_pos_weight_scales_missed_defects():
    target = torch.ones(1, 8, 8, dtype=torch.long)  # all defect
    logits = torch.full((1, 1, 8, 8), -2.0)  # all predicted background: missed defects
    bce_only = dict(ce_weight=1.0, dice_weight=0.0)
    l1 = build(1, pos_weight=1.0, **bce_only)(logits, target)
    l50 = build(1, pos_weight=50.0, **bce_only)(logits, target)
    assert torch.allclose(l50, 50 * l1)
    assert torch.allclose(l1, F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)))
    # A false alarm on background is not scaled by pos_weight.
    bg = torch.zeros(1, 8, 8, dtype=torch.long)
    assert torch.allclose(build(1, pos_weight=50.0, **bce_only)(-logits, bg), l1)


@pytest.mark.parametrize("pos_weight", [1.0, 50.0])
def test_binary_loss_is_bce_plus_batch_dice(pos_weight):
    target = make_target(1)
    logits = torch.randn(2, 1, 16, 16)
    valid = (target != 255)[:, None].float()
    t = (target == 1)[:, None].float()
    bce = (F.binary_cross_entropy_with_logits(logits, t, pos_weight=torch.tensor([pos_weight]), reduction="none")
           * valid).sum() / valid.sum()
    p = torch.sigmoid(logits) * valid
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + (t * valid).sum() + 1)
    assert torch.allclose(build(1, pos_weight=pos_weight, object_window=0)(logits, target), 0.5 * bce + 0.5 * dice)
    # With object weighting (the default) each pixel's BCE is scaled by its weight; Dice is unchanged.
    w = object_weights(t * valid, 15, 20.0)
    weighted = (F.binary_cross_entropy_with_logits(logits, t, pos_weight=torch.tensor([pos_weight]),
                                                   reduction="none") * w * valid).sum() / valid.sum()
    assert torch.allclose(build(1, pos_weight=pos_weight)(logits, target), 0.5 * weighted + 0.5 * dice)


def test_defaults_are_calibrated_and_the_research_recipe_stays_reachable():
    cfg = LossConfig()
    assert (cfg.pos_weight, cfg.ce_weight, cfg.dice_weight, cfg.class_weighting) == (1.0, 0.5, 0.5, "inv_sqrt")
    assert (cfg.object_window, cfg.object_weight_max) == (15, 20.0)
    research = load_config("research.yaml").loss
    assert (research.pos_weight, research.class_weighting, research.class_weight_max) == (50.0, "median_freq", 10.0)
    assert research.object_window == 0


def test_dice_counts_only_the_classes_present_in_the_batch():
    """Painting a class the batch does not hold is left to the CE term: the Dice term does not change."""
    target = make_target(N)
    target[target == 3] = 0  # class 3 absent from the batch
    dice_only = build_loss(LossConfig(ce_weight=0.0, dice_weight=1.0, class_weighting="none"), N)
    logits = perfect_logits(target, N)
    before = float(dice_only(logits, target))
    logits[:, 3] = torch.where(target == 0, 20.0, logits[:, 3])  # background pixels now painted as class 3
    after = float(dice_only(logits, target))
    assert before < 1e-3 and after == pytest.approx(before, abs=1e-3)
    # An all-background batch has no Dice term at all (0, not the loss of "predict nothing").
    assert float(dice_only(perfect_logits(torch.zeros_like(target), N), torch.zeros_like(target))) == 0


def test_multiclass_ce_uses_class_weights_and_ignore_index():
    target = make_target(N)
    logits = torch.randn(2, N, 16, 16)
    weights = class_weights_from_histogram(HIST, "inv_sqrt", 0.1, 5.0)  # the defaults
    expected = F.cross_entropy(logits, target, weight=weights, ignore_index=255)
    got = build_loss(LossConfig(ce_weight=1.0, dice_weight=0.0, object_window=0), N, HIST)(logits, target)
    assert torch.allclose(got, expected)


def test_multiclass_dice_ignores_background():
    # Getting background wrong (as some defect) vs. right changes CE but only defect classes enter Dice;
    # a perfect prediction of defect classes with background logits scrambled keeps Dice at its floor.
    target = make_target(N)
    dice_only = build_loss(LossConfig(ce_weight=0.0, dice_weight=1.0, class_weighting="none"), N)
    logits = perfect_logits(target, N)
    assert dice_only(logits, target) < 1e-3
    logits[:, 0] = 0.0  # background channel no longer sure, defect channels still decide
    assert dice_only(logits, target) < 1e-3


def test_class_weights_from_histogram():
    for method in ("median_freq", "inv_sqrt"):
        w = class_weights_from_histogram(HIST, method, 0.1, 10.0)
        assert w.shape == (4,) and torch.isfinite(w).all()
        assert w[3] > w[1] > w[2] > w[0]  # rarer classes weigh more
        assert ((w >= 0.1) & (w <= 10.0)).all()
    # median frequency: the median class weighs 1; unclipped values follow median/freq.
    w = class_weights_from_histogram([100, 300, 900], "median_freq", 0.01, 100.0)
    assert torch.allclose(w, torch.tensor([3.0, 1.0, 1 / 3]))
    # a class with no pixels gets the largest weight
    w = class_weights_from_histogram([1000, 10, 0], "median_freq", 0.1, 10.0)
    assert w[2] == w.max() == w[1]
    assert torch.equal(class_weights_from_histogram(HIST, "none"), torch.ones(4))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="needs the per-class pixel histogram"):
        build_loss(LossConfig(), N)
    with pytest.raises(ValueError, match="3 entries but the model has 4"):
        build_loss(LossConfig(), N, HIST[:3])
    with pytest.raises(ValueError, match="class_weighting must be one of"):
        LossConfig(class_weighting="inverse")
    with pytest.raises(ValueError, match="every class has 0 pixels"):
        class_weights_from_histogram([0, 0, 0])
    with pytest.raises(ValueError, match=">= 0"):
        class_weights_from_histogram([10, -1])
    loss = build(N)
    with pytest.raises(ValueError, match="outside 0..3"):
        loss(torch.randn(1, N, 4, 4), torch.full((1, 4, 4), 7))
    with pytest.raises(ValueError, match="output 1 has shape"):
        loss([torch.randn(1, N, 4, 4), torch.randn(1, N, 2, 2)], torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..1"):
        build(1)(torch.randn(1, 1, 4, 4), torch.full((1, 4, 4), 2))


def test_object_weights_count_thin_and_small_defects_like_large_ones():
    m = torch.zeros(1, 1, 64, 64)
    m[0, 0, 10:13, 5:40] = 1  # a 3 px line
    m[0, 0, 50, 58] = 1  # an isolated pixel
    m[0, 0, 25:60, 20:45] = 1  # a large blob
    w = object_weights(m, 15, 20.0)
    assert w[0, 0, 11, 20].item() == pytest.approx(5.0)  # 15 / 3: the window's 45 of 225 pixels are defect
    assert w[0, 0, 50, 58].item() == 20.0  # 1/195 of its window (cut by the border), capped
    assert w[0, 0, 40, 30].item() == 1.0  # deep inside the blob
    assert w[0, 0, 0, 63].item() == 1.0  # background keeps its weight


@pytest.mark.parametrize("n_channels", [1, N])
def test_object_window_makes_a_missed_line_cost_more_than_as_many_missed_blob_pixels(n_channels):
    target = torch.zeros(1, 32, 32, dtype=torch.long)
    target[0, 4, 2:26] = 1  # a 1 px line of 24 pixels
    target[0, 12:30, 6:30] = 1  # a 18 x 24 blob
    missed_line, missed_blob = target.clone(), target.clone()
    missed_line[0, 4] = 0
    missed_blob[0, 20, 6:30] = 0  # as many pixels, in one row of the blob
    for logits_of in (missed_line, missed_blob):
        assert (target != logits_of).sum() == 24
    bce_only = {"ce_weight": 1.0, "dice_weight": 0.0, "class_weighting": "none"}
    plain, weighted = build(n_channels, object_window=0, **bce_only), build(n_channels, **bce_only)
    line_plain, blob_plain = (plain(perfect_logits(p, n_channels), target) for p in (missed_line, missed_blob))
    line, blob = (weighted(perfect_logits(p, n_channels), target) for p in (missed_line, missed_blob))
    assert line_plain.item() == pytest.approx(blob_plain.item())
    assert line.item() > 5 * blob.item()
    assert weighted(perfect_logits(target, n_channels), target) < 1e-3


def test_object_window_must_be_odd():
    with pytest.raises(ValueError, match="object_window must be 0 or odd"):
        LossConfig(object_window=16)
    with pytest.raises(ValueError, match="object_weight_max"):
        LossConfig(object_weight_max=0.5)


def test_where_what_is_the_binary_loss_on_the_defect_logit_plus_a_class_term_on_defects():
    """form=where_what: with the right class everywhere the loss is the binary loss of the defect logit
    logsumexp(z_1..K) - z_0 (object weights included); a wrong defect class costs only the class term,
    whose background pixels cost nothing."""
    target = make_target(N, seed=3)
    logits = torch.randn(2, N, 16, 16, generator=torch.Generator().manual_seed(1))
    cfg = LossConfig(form="where_what")
    loss = build_loss(cfg, N)
    safe = torch.where(target == 255, 0, target)
    sure = logits.clone()
    sure[:, 1:] -= 30 * (F.one_hot(safe, N).permute(0, 3, 1, 2)[:, 1:] == 0) * (safe > 0)[:, None]  # right class
    where = torch.logsumexp(sure[:, 1:], 1, keepdim=True) - sure[:, :1]
    binary = build_loss(cfg, 1)(where, torch.where(target == 255, 255, (target > 0).to(target.dtype)))
    assert torch.allclose(loss(sure, target), binary, atol=1e-5)
    swapped = sure.clone()
    swapped[:, 1:] = sure[:, 1:].roll(1, 1)  # same defect logit, another class
    assert torch.allclose(torch.logsumexp(swapped[:, 1:], 1), torch.logsumexp(sure[:, 1:], 1))
    assert loss(swapped, target) > binary + 1.0
    background = target == 0
    flipped = sure.clone()
    flipped[:, 1:] = torch.where(background[:, None], sure[:, 1:].roll(1, 1), sure[:, 1:])
    assert torch.allclose(loss(flipped, target), loss(sure, target), atol=1e-5)
    # pos_weight weighs the defect pixels of the where term, as in the binary loss.
    assert build_loss(LossConfig(form="where_what", pos_weight=50.0), N)(logits, target) > loss(logits, target)
