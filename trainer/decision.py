"""Turning probabilities into class maps: the decision rule, and tuning its values on validation.

A model's probabilities are calibrated by its loss, not by what an inspector scores, so the rule that turns
them into defects is chosen on the validation split, as the Severstal steel-defect winners did:

- binary: a pixel is a defect when its probability reaches ``thresholds[0]``;
- multiclass: a pixel takes the defect class with the highest probability, if that probability reaches
  the class's threshold, else background;
- then connected components (8-connected, per class) smaller than the class's ``min_area`` pixels, in the
  1200x1200 model space, or whose most confident pixel stays below the class's ``min_peak``, become
  background. The second rule is hysteresis thresholding (as Canny's edge detector keeps weak edge pixels
  connected to a strong one): a pinpoint of 14 px that the model is sure of survives, a speck of dust or a
  facet-edge fragment it half believes does not, which no single area or threshold can tell apart.

``ThresholdTuner`` accumulates, per defect class, a histogram of the deciding probability split by whether
the truth agrees, so every threshold's IoU follows from one pass and sums across ranks. ``AreaTuner`` then
scores every (minimum area, minimum peak) pair at the chosen thresholds. Without tuned values
``Decision.argmax`` is the plain rule (argmax, or 0.5 for binary).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage

from shardgen.classes import IGNORE_INDEX  # the one ignore value, also in the class map and the shards

BINS = 100  # threshold resolution: 0.01
AREAS = (0, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)  # candidate minimum component areas, px
PEAKS = (0.0, 0.9, 0.95, 0.98, 0.99)  # candidate minimum peak probabilities of a component (0: no such rule)
CANDIDATES = tuple((a, p) for p in PEAKS for a in AREAS)  # (min area, min peak), the plainest first
EIGHT = np.ones((3, 3), bool)  # 8-connectivity, as the object metrics use


def probabilities(logits: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """(B, K, H, W) logits -> float32 probabilities: softmax over classes, or the sigmoid of one (binary) logit.

    ``inplace``: overwrite float32 ``logits`` (a caller that has no further use for them), which saves
    allocating a second tensor of that size: 176 MB for a batch of 25 tiles of 400 px and 11 classes,
    whose fresh pages cost more than the softmax itself on a CPU.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        return logits.sigmoid_() if inplace else torch.sigmoid(logits)
    if not inplace:
        return logits.softmax(1)
    logits.sub_(logits.amax(1, keepdim=True)).exp_()  # softmax as torch computes it, in place
    return logits.div_(logits.sum(1, keepdim=True))


@dataclass
class Decision:
    kind: str  # "tuned" or "argmax"
    thresholds: list[float]  # per defect class (one for binary); argmax: unused
    min_area: list[int]  # per defect class; 0 keeps every component
    min_peak: list[float] | None = None  # per defect class; 0 (or None: all 0) keeps every component

    def __post_init__(self) -> None:
        if self.min_peak is None:
            self.min_peak = [0.0] * len(self.thresholds)

    @classmethod
    def argmax(cls, n_defect: int) -> Decision:
        return cls("argmax", [0.5] * n_defect, [0] * n_defect)

    @classmethod
    def from_meta(cls, meta: dict) -> Decision | None:
        """The checkpoint's decision; one saved before ``min_peak`` existed has none (all 0)."""
        d = meta.get("decision")
        if not d:
            return None
        return cls(d["kind"], list(d["thresholds"]), list(d["min_area"]), list(d.get("min_peak") or []) or None)

    def to_json(self) -> dict:
        return asdict(self)

    def classes(self, probs: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, K, H, W) -> class ids (B, H, W) int64, before the area filter."""
        if probs.shape[1] == 1:
            return (probs[:, 0] >= (self.thresholds[0] if self.kind == "tuned" else 0.5)).long()
        if self.kind != "tuned":
            return probs.max(1).indices  # same ties as argmax(1), ~12x faster on CPU over dim 1 (torch 2.14)
        top_p, top = probs[:, 1:].max(1)
        t = torch.as_tensor(self.thresholds, device=probs.device, dtype=probs.dtype)[top]
        return torch.where(top_p >= t, top + 1, 0)

    def filter_components(self, pred: np.ndarray, confidence: np.ndarray | None = None) -> np.ndarray:
        """(H, W) class ids with the components below their class's ``min_area``, or whose highest
        ``confidence`` (the deciding probability, (H, W); needed when a ``min_peak`` is set) is below its
        ``min_peak``, set to background."""
        if not any(self.min_area) and not any(self.min_peak):
            return pred
        out = pred.copy()
        for c, (area, peak) in enumerate(zip(self.min_area, self.min_peak, strict=True), start=1):
            if area <= 1 and peak <= 0:
                continue
            labels, n = ndimage.label(pred == c, EIGHT)
            if n:
                drop = np.bincount(labels.ravel()) < area
                if peak > 0:
                    drop |= np.asarray(ndimage.maximum(confidence, labels, np.arange(n + 1))) < peak
                drop[0] = False
                out[drop[labels]] = 0
        return out

    def __call__(self, probs: torch.Tensor) -> np.ndarray:
        """(K, H, W) probabilities of one image -> (H, W) uint8 class ids, component filters included."""
        pred = self.classes(probs[None])[0].to(torch.uint8).cpu().numpy()
        confidence = _deciding(probs[None])[1][0].cpu().numpy() if any(self.min_peak) else None
        return self.filter_components(pred, confidence)


def _deciding(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class index 0.. among defect classes, its probability) per pixel, the values a threshold compares."""
    if probs.shape[1] == 1:
        return torch.zeros_like(probs[:, 0], dtype=torch.long), probs[:, 0]
    top_p, top = probs[:, 1:].max(1)
    return top, top_p


class ThresholdTuner:
    """Per defect class: how many pixels decided for that class at each probability bin are right or wrong,
    and how many truth pixels it has. Threshold ``b / BINS`` keeps bins ``b..``."""

    def __init__(self, n_defect: int, device):
        self.n = n_defect
        self.hist = torch.zeros((n_defect, 2, BINS), dtype=torch.int64, device=device)  # [class, wrong/right]
        self.truth = torch.zeros(n_defect, dtype=torch.int64, device=device)

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """probs (B, K, H, W) in [0, 1]; target (B, H, W) class ids with 255 ignored."""
        valid = target != IGNORE_INDEX
        cls, p = _deciding(probs)
        right = (target == cls + 1) & valid
        b = (p * BINS).long().clamp_(0, BINS - 1)
        index = (cls * 2 + right.long()) * BINS + b
        self.hist += torch.bincount(index[valid], minlength=self.n * 2 * BINS).view(self.n, 2, BINS)
        t = target[valid]
        self.truth += torch.bincount(t[(t > 0)] - 1, minlength=self.n)[: self.n]

    def reduce(self, all_reduce) -> None:
        all_reduce(self.hist)
        all_reduce(self.truth)

    def best(self) -> tuple[list[float], list[float | None]]:
        """(threshold, its IoU) per class; a class with no truth pixels keeps 0.5 and IoU None."""
        wrong, right = self.hist[:, 0].cpu().double(), self.hist[:, 1].cpu().double()
        # tp[b] / fp[b]: pixels kept at threshold b / BINS (bins b and above).
        tp = right.flip(1).cumsum(1).flip(1)
        fp = wrong.flip(1).cumsum(1).flip(1)
        truth = self.truth.cpu().double()[:, None]
        iou = tp / (truth + fp).clamp_min(1)  # tp + fp + fn = fp + truth
        thresholds, ious = [], []
        for c in range(self.n):
            if truth[c, 0] == 0:
                thresholds.append(0.5)
                ious.append(None)
                continue
            # Among equal IoUs prefer the threshold closest to 0.5: ties are flat stretches of the curve.
            b = max(range(1, BINS), key=lambda k: (round(float(iou[c, k]), 6), -abs(k - BINS // 2)))
            thresholds.append(b / BINS)
            ious.append(float(iou[c, b]))
        return thresholds, ious


class AreaTuner:
    """At fixed thresholds, per defect class and candidate (minimum area, minimum peak) pair (``CANDIDATES``):
    the right and wrong pixels of the components that survive, how many survive and touch the truth, and how
    many truth components a survivor touches. Components are counted per tile, as the object metrics count
    them per image.

    The pair is chosen by the object F-beta (``beta`` 2 weighs recall four times as much as precision; 1 is
    F1), not pixel IoU: dropping small or unsure components hardly moves pixel IoU, which is ruled by the
    large defects, but it decides whether a pinpoint is reported and whether facet-edge specks are; an
    inspector counts defects found and false alarms."""

    def __init__(self, decision: Decision, n_defect: int, beta: float = 2.0):
        self.decision, self.n, self.beta = decision, n_defect, beta
        k = len(CANDIDATES)
        self.kept = np.zeros((n_defect, k, 2), np.int64)  # [class, candidate, wrong/right] pixels
        self.objects = np.zeros((n_defect, k, 3), np.int64)  # [class, candidate, kept/matched/found]
        self.truth = np.zeros((n_defect, 2), np.int64)  # [class, pixels/components]

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        pred = self.decision.classes(probs).cpu().numpy()
        confidence = _deciding(probs)[1].float().cpu().numpy()
        target = target.cpu().numpy()
        areas, peaks = (np.asarray(v)[:, None] for v in zip(*CANDIDATES, strict=True))
        for p, conf, t in zip(pred, confidence, target, strict=True):
            valid = t != IGNORE_INDEX
            for c in range(1, self.n + 1):
                truth, n_truth = ndimage.label((t == c) & valid, EIGHT)
                self.truth[c - 1] += (int((truth > 0).sum()), n_truth)
                labels, count = ndimage.label(p == c, EIGHT)
                if not count:
                    continue
                index = np.arange(1, count + 1)
                size = np.bincount(labels.ravel(), minlength=count + 1)[1:]
                peak = np.asarray(ndimage.maximum(conf, labels, index))
                scored = np.bincount(labels[valid].ravel(), minlength=count + 1)[1:]
                right = np.bincount(labels.ravel(), weights=(truth > 0).ravel(), minlength=count + 1)[1:]
                keep = (size >= areas) & (peak >= peaks) & (scored > 0)  # (candidates, components)
                self.kept[c - 1, :, 0] += (keep * (scored - right)).sum(1).astype(np.int64)
                self.kept[c - 1, :, 1] += (keep * right).sum(1).astype(np.int64)
                self.objects[c - 1, :, 0] += keep.sum(1)
                self.objects[c - 1, :, 1] += (keep & (right > 0)).sum(1)
                if n_truth:  # a truth component is found by a candidate that keeps a component touching it
                    both = (truth > 0) & (labels > 0)
                    pairs = np.unique(truth[both] * (count + 1) + labels[both])  # (truth id, component id)
                    found = np.zeros((len(CANDIDATES), n_truth + 1), bool)
                    for tid, lid in zip(pairs // (count + 1), pairs % (count + 1), strict=True):
                        found[:, tid] |= keep[:, lid - 1]
                    self.objects[c - 1, :, 2] += found.sum(1)

    def reduce(self, all_reduce) -> None:
        for name in ("kept", "objects", "truth"):
            setattr(self, name, all_reduce(torch.from_numpy(getattr(self, name))).numpy())

    def best(self) -> tuple[list[tuple[int, float]], list[float | None]]:
        """((min area, min peak), the pixel IoU it leaves) per class: the largest object F-beta; on ties the
        plainer rule (the lower peak, then the smaller area)."""
        out, ious = [], []
        for c in range(self.n):
            pixels, components = self.truth[c]
            if components == 0:
                out.append((0, 0.0))
                ious.append(None)
                continue
            kept, matched, found = self.objects[c].T.astype(np.float64)
            precision = np.where(kept > 0, matched / np.maximum(kept, 1), 1.0)
            recall = found / components
            b2 = self.beta**2
            f = (1 + b2) * precision * recall / np.maximum(b2 * precision + recall, 1e-12)
            k = int(np.argmax(np.round(f, 6)))
            out.append(CANDIDATES[k])
            wrong, right = self.kept[c, k]
            ious.append(float(right / max(pixels + wrong, 1)))
        return out, ious
