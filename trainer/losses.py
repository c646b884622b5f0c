"""Segmentation losses: (B)CE + soft Dice, 255 ignored everywhere, summed over deep-supervision outputs.

- one output channel (binary): ``ce_weight * BCEWithLogits(pos_weight) + dice_weight * Dice(sigmoid)``;
  the research recipe is 0.5 / 0.5 with pos_weight 50 (configs/research.yaml), the default pos_weight 1:
  defect-aware sampling balances the classes, and a large pos_weight paints a halo around every defect.
- two or more channels (multiclass): ``ce_weight * CrossEntropy(class weights) + dice_weight *
  Dice(softmax)``, the Dice averaged over the defect classes present in the batch (background is left to
  the cross-entropy); class weights are the gentle inverse square root of the frequency by default.
- multiclass with ``form: where_what``: the same softmax read as *where* (defect vs background: the defect
  logit ``logsumexp(z_1..K) - z_0`` gets exactly the binary loss above, object weights included) times *what*
  (which defect class: a cross-entropy over the defect logits alone, on defect pixels only, with the same
  object weights). The probabilities are the usual softmax, so evaluation reads them unchanged; the loss no
  longer trades "is it a defect" against "which one": a feather mistaken for a needle costs nothing of the
  defect map, and the background's share of the cross-entropy no longer depends on class weights.
- a list/tuple of outputs (U2-Net: fused map + 6 side maps) gets the loss of each, summed, as the official
  U2-Net ``muti_bce_loss_fusion`` does.
Dice is computed over the whole batch (not per tile), so tiles without defects do not each count as a
perfect or a failed Dice on their own, and only over classes the batch holds (nnU-Net's batch Dice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shardgen.classes import IGNORE_INDEX  # the one ignore value, also in the class map and the shards

CLASS_WEIGHTINGS = ("median_freq", "inv_sqrt", "none")
LOSS_FORMS = ("joint", "where_what")


@dataclass
class LossConfig:
    ce_weight: float = 0.5  # weight of the BCE (binary) / cross-entropy (multiclass) term; research: 0.5
    dice_weight: float = 0.5  # weight of the soft Dice term; research: 0.5
    # Binary only: BCE weight of defect pixels. The research code's 50 buys recall with a halo of false
    # positives around every defect; defect-aware sampling (data.defect_share) balances the classes instead.
    pos_weight: float = 1.0
    class_weighting: str = "inv_sqrt"  # multiclass CE weights: median_freq (research) | inv_sqrt | none
    class_weight_min: float = 0.1  # clip of the CE class weights (median-frequency class = 1.0) ...
    class_weight_max: float = 5.0  # ... so a near-empty class cannot dominate the loss
    dice_smooth: float = 1.0  # added to Dice numerator and denominator: absent class, no prediction -> 0
    # Thin and small defects: a defect pixel's (B)CE is weighted by 1 / (the defect share of the window of this
    # odd side around it), capped at object_weight_max, so a needle, a feather stroke or a pinpoint weighs
    # about as much per object as a cloud does; without it the model learns that thin lines are facet edges
    # and misses needles (bench/quality_bench.py's no-objects arm measures it). 0 turns it off (every pixel
    # weighs 1, as in the research code).
    object_window: int = 15
    object_weight_max: float = 20.0  # the weight of an isolated pixel, at most
    # Multiclass: "joint" (the research code's: one weighted cross-entropy + Dice over all classes) or
    # "where_what" (a binary loss on the defect probability plus a class cross-entropy on defect pixels).
    form: str = "joint"

    def __post_init__(self) -> None:
        if self.form not in LOSS_FORMS:
            raise ValueError(f"loss config: form must be one of {LOSS_FORMS}, got {self.form!r}")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(f"loss config: class_weighting must be one of {CLASS_WEIGHTINGS}, "
                             f"got {self.class_weighting!r}")
        for name in ("ce_weight", "dice_weight", "dice_smooth"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss config: {name} must be >= 0, got {getattr(self, name)}")
        if self.pos_weight <= 0:
            raise ValueError(f"loss config: pos_weight must be > 0, got {self.pos_weight}")
        if self.object_window < 0 or (self.object_window and self.object_window % 2 == 0):
            raise ValueError(f"loss config: object_window must be 0 or odd, got {self.object_window}")
        if self.object_weight_max < 1:
            raise ValueError(f"loss config: object_weight_max must be >= 1, got {self.object_weight_max}")
        if not 0 < self.class_weight_min <= self.class_weight_max:
            raise ValueError(f"loss config: need 0 < class_weight_min <= class_weight_max, got "
                             f"{self.class_weight_min} and {self.class_weight_max}")


def class_weights_from_histogram(counts: Sequence[int], method: str = "median_freq", min_weight: float = 0.1,
                                 max_weight: float = 10.0) -> torch.Tensor:
    """CE class weights from per-class pixel counts (index = class id, 255 not included).

    ``median_freq``: ``median(freq) / freq_c`` (Eigen & Fergus); ``inv_sqrt``: its square root
    ``sqrt(median(freq) / freq_c)``, the gentler choice; ``none``: all ones. The median runs over classes
    that have pixels, so the typical class weighs 1, then weights are clipped to [min_weight, max_weight].
    A class with no pixels gets the largest weight: it cannot occur in the batches the histogram describes,
    and if it shows up elsewhere (e.g. validation) it is as rare as it gets.
    """
    c = torch.as_tensor(list(counts), dtype=torch.float64)
    if c.ndim != 1 or c.numel() < 2:
        raise ValueError(f"class histogram: need one pixel count per class (>= 2 classes), "
                         f"got {list(counts)}")
    if (c < 0).any() or not torch.isfinite(c).all():
        raise ValueError(f"class histogram: counts must be finite and >= 0, got {list(counts)}")
    present = c > 0
    if not present.any():
        raise ValueError("class histogram: every class has 0 pixels")
    if method == "none":
        return torch.ones(c.numel(), dtype=torch.float32)
    freq = c / c.sum()
    # The true median (mean of the middle two for an even count); Tensor.median() takes the lower one.
    ratio = freq[present].quantile(0.5) / freq[present]
    if method == "median_freq":
        w_present = ratio
    elif method == "inv_sqrt":
        w_present = ratio.sqrt()
    else:
        raise ValueError(f"class histogram: method must be one of {CLASS_WEIGHTINGS}, got {method!r}")
    w_present = w_present.clamp(min_weight, max_weight)
    w = torch.full_like(c, float(w_present.max()))
    w[present] = w_present
    return w.to(torch.float32)


def _soft_dice_loss(
    probs: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor, smooth: float
) -> torch.Tensor:
    """Mean of ``1 - (2|P*T| + s) / (|P| + |T| + s)`` over the channels present in the batch's truth (0 when
    none is); sums run over valid pixels of the whole batch (batch Dice).

    A class absent from the batch has no overlap to reward, only predictions to punish, which the (B)CE term
    already does: counting it would pull every rare class towards "never predict". probs/onehot: (B, K, H, W);
    valid: (B, 1, H, W) float.
    """
    p = probs * valid
    t = onehot * valid
    inter = (p * t).sum(dim=(0, 2, 3))
    truth = t.sum(dim=(0, 2, 3))
    loss = 1.0 - (2.0 * inter + smooth) / (p.sum(dim=(0, 2, 3)) + truth + smooth)
    present = (truth > 0).to(loss.dtype)
    return (loss * present).sum() / present.sum().clamp_min(1.0)


def object_weights(defect: torch.Tensor, window: int, cap: float) -> torch.Tensor:
    """Per-pixel (B)CE weights (B, 1, H, W) from the defect mask (B, 1, H, W) float: 1 on background, and on
    a defect pixel 1 / (share of defect pixels in the ``window`` around it, cut by the border), at most
    ``cap``. A 3 px line in a 15 px window weighs 5, an isolated 3x3 dot 25 (capped at 20), the inside of a
    large blob 1."""
    # The window's mean as a row mean then a column mean (the valid part of a window cut by the border is a
    # rectangle, so the two passes divide by the same count): 2 x window reads per pixel instead of window^2.
    pad = window // 2
    share = F.avg_pool2d(defect, (window, 1), stride=1, padding=(pad, 0), count_include_pad=False)
    share = F.avg_pool2d(share, (1, window), stride=1, padding=(0, pad), count_include_pad=False)
    return torch.where(defect > 0, share.clamp_min(1.0 / cap).reciprocal(), torch.ones_like(share))


class _DeepSupervisedLoss(nn.Module):
    """forward(outputs, target): ``outputs`` is logits (B, C, H, W) or a list/tuple of them; losses add up."""

    n_channels: int

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.ce_weight, self.dice_weight, self.smooth = cfg.ce_weight, cfg.dice_weight, cfg.dice_smooth
        self.window, self.cap = cfg.object_window, cfg.object_weight_max

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        if not outs:
            raise ValueError("loss: got an empty list of outputs")
        self._check_target(target, outs)
        # The (B)CE's pixel weights depend on the target only: once for all deep-supervision outputs.
        weights = None
        if self.window:
            defect = ((target > 0) & (target != IGNORE_INDEX))[:, None].float()
            weights = object_weights(defect, self.window, self.cap)
        return torch.stack([self.single(o.float(), target, weights) for o in outs]).sum()

    def single(self, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """The loss of one output; ``weights``: the (B, 1, H, W) (B)CE pixel weights, or None (all 1)."""
        raise NotImplementedError

    def _check_target(self, target: torch.Tensor, outs: list[torch.Tensor]) -> None:
        if target.ndim != 3 or target.is_floating_point():
            raise ValueError(f"loss: target must be integer (B, H, W) class ids, got {target.dtype} "
                             f"{tuple(target.shape)}")
        for i, o in enumerate(outs):
            if o.ndim != 4 or o.shape[1] != self.n_channels or o.shape[0] != target.shape[0] \
                    or o.shape[-2:] != target.shape[-2:]:
                b, h, w = target.shape
                raise ValueError(f"loss: output {i} has shape {tuple(o.shape)}, expected "
                                 f"({b}, {self.n_channels}, {h}, {w})")
        # One host sync per step; an out-of-range id would otherwise be a CUDA device-side assert (CE) or a
        # silently wrong BCE target.
        top = max(self.n_channels, 2) - 1
        if bool(((target < 0) | ((target > top) & (target != IGNORE_INDEX))).any()):
            raise ValueError(f"loss: target holds ids outside 0..{top} and {IGNORE_INDEX} (ignore)")


class BinaryDiceBCELoss(_DeepSupervisedLoss):
    """One logit channel; target 0 (background), 1 (defect), 255 (ignore)."""

    n_channels = 1

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("pos_weight", torch.tensor([cfg.pos_weight]), persistent=False)

    def single(self, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        valid = (target != IGNORE_INDEX)[:, None].to(logits.dtype)
        t = (target == 1)[:, None].to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, t, pos_weight=self.pos_weight, reduction="none")
        if weights is not None:
            bce = bce * weights
        # Mean over valid pixels; an all-ignore batch gives 0, not NaN.
        bce = (bce * valid).sum() / valid.sum().clamp_min(1.0)
        dice = _soft_dice_loss(torch.sigmoid(logits), t, valid, self.smooth)
        return self.ce_weight * bce + self.dice_weight * dice


class MulticlassDiceCELoss(_DeepSupervisedLoss):
    """N >= 2 logit channels; target 0..N-1 and 255 (ignore). Dice over defect classes 1..N-1."""

    def __init__(self, cfg: LossConfig, class_weights: torch.Tensor) -> None:
        super().__init__(cfg)
        self.n_channels = class_weights.numel()
        self.register_buffer("class_weights", class_weights.to(torch.float32), persistent=False)

    def single(self, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        valid = target != IGNORE_INDEX
        safe = torch.where(valid, target, 0)[:, None]
        # F.cross_entropy(weight=..., ignore_index=...) written out on one log-softmax that the Dice's
        # probabilities reuse: a weighted mean over valid pixels, but 0 rather than NaN when every pixel is
        # ignored. (The full-resolution loss is a quarter of a CPU step; one pass fewer counts.)
        logp = logits.log_softmax(dim=1)
        w = self.class_weights[safe] * valid[:, None]
        ce = -logp.gather(1, safe) * w
        if weights is not None:
            ce = ce * weights
        ce = ce.sum() / w.sum().clamp_min(1e-6)
        onehot = torch.zeros_like(logp).scatter_(1, safe, 1.0)
        dice = _soft_dice_loss(logp[:, 1:].exp(), onehot[:, 1:], valid[:, None].to(logits.dtype), self.smooth)
        return self.ce_weight * ce + self.dice_weight * dice


class WhereWhatLoss(_DeepSupervisedLoss):
    """N >= 2 logit channels read as *where* (binary Dice + BCE on the defect logit) and *what* (cross-entropy
    over the defect classes on defect pixels); target 0..N-1 and 255 (ignore)."""

    def __init__(self, cfg: LossConfig, n_classes: int) -> None:
        super().__init__(cfg)
        self.n_channels = n_classes
        self.register_buffer("pos_weight", torch.tensor([cfg.pos_weight]), persistent=False)

    def single(self, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        valid = (target != IGNORE_INDEX)[:, None].to(logits.dtype)
        defect = ((target > 0) & (target != IGNORE_INDEX))[:, None]
        t = defect.to(logits.dtype)
        where = torch.logsumexp(logits[:, 1:], 1, keepdim=True) - logits[:, :1]  # log P(defect) / P(background)
        bce = F.binary_cross_entropy_with_logits(where, t, pos_weight=self.pos_weight, reduction="none")
        w = weights if weights is not None else torch.ones_like(t)
        bce = (bce * w * valid).sum() / valid.sum().clamp_min(1.0)
        dice = _soft_dice_loss(torch.sigmoid(where), t, valid, self.smooth)
        # What: the class among defect classes, on defect pixels only, object-weighted like the BCE.
        what_target = torch.where(defect[:, 0], target - 1, IGNORE_INDEX)
        what = F.cross_entropy(logits[:, 1:], what_target, ignore_index=IGNORE_INDEX, reduction="none")
        dw = (w * t)[:, 0]
        what = (what * dw).sum() / dw.sum().clamp_min(1.0)
        return self.ce_weight * (bce + what) + self.dice_weight * dice


def build_loss(cfg: LossConfig, n_classes: int, class_hist: Sequence[int] | None = None) -> nn.Module:
    """The training loss for a model with ``n_classes`` output channels.

    ``n_classes == 1``: binary (sigmoid) loss, ``class_hist`` unused. ``n_classes >= 2``: multiclass loss;
    ``class_hist`` (pixel count per class id 0..n_classes-1, from the train manifest) is required unless
    ``cfg.class_weighting == "none"``.
    """
    if n_classes == 1:
        return BinaryDiceBCELoss(cfg)
    if n_classes < 1:
        raise ValueError(f"loss: n_classes must be >= 1, got {n_classes}")
    if cfg.form == "where_what":
        return WhereWhatLoss(cfg, n_classes)
    if cfg.class_weighting == "none":
        weights = torch.ones(n_classes)
    elif class_hist is None:
        raise ValueError(f"loss: class_weighting={cfg.class_weighting!r} needs the per-class pixel histogram "
                         f"of the train split (or set class_weighting: none)")
    elif len(class_hist) != n_classes:
        raise ValueError(f"loss: class histogram has {len(class_hist)} entries but the model has {n_classes} "
                         f"classes")
    else:
        weights = class_weights_from_histogram(class_hist, cfg.class_weighting, cfg.class_weight_min,
                                               cfg.class_weight_max)
    return MulticlassDiceCELoss(cfg, weights)
