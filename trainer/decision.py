"""Turning probabilities into class maps: the decision rule, stored with each checkpoint.

A model's probabilities are calibrated by its loss, not by what an inspector scores, so the rule that turns
them into defects is chosen on the validation split, as the Severstal steel-defect winners did:

- binary: a pixel is a defect when its probability reaches ``thresholds[0]``;
- multiclass, ``objects`` (``train.class_decision: object``): first *where*, then *what*. A pixel is
  a defect when its defect probability (1 - the background's) reaches ``thresholds[0]`` (the same value for
  every class); each connected component (8-connected) of that map takes the defect class with the largest
  probability summed over its pixels; then the area and peak rules below apply with that class's values
  (the peak read on the defect probability). One defect is one object of one class: a per-pixel class
  cannot paint a feather half Needle, and its two halves cannot count as two objects, or as a missed
  Feather and a false Needle;
- multiclass, ``tuned`` (per pixel, the default): a pixel takes the defect class with the
  highest probability, if that probability reaches the class's threshold, else background;
- multiclass, ``defect`` (``train.class_decision: defect``; per pixel, *where* before *what*): a pixel takes
  the defect class with the highest probability if its defect probability (1 - the background's) reaches that
  class's threshold. A needle the model is sure is a defect but splits between Needle (0.30) and Feather
  (0.40) is kept (as the likelier class), where the ``tuned`` rule drops it for reaching neither threshold;
- then connected components (8-connected, per class) smaller than the class's ``min_area`` pixels, in the
  1200x1200 model space, or whose most confident pixel stays below the class's ``min_peak``, become
  background. The second rule is hysteresis thresholding (as Canny's edge detector keeps weak edge pixels
  connected to a strong one): a pinpoint of 14 px that the model is sure of survives, a speck of dust or a
  facet-edge fragment it half believes does not, which no single area or threshold can tell apart;
- then, with ``grow_px`` (``train.decision_grow``; per-pixel decisions), each kept component grows into the
  pixels within ``grow_px`` of it whose deciding probability reaches 0.5 and whose likeliest defect class is
  its own, never joining two components and never starting a new one. The rules above are tuned to *find*
  defects (object F-beta), and a threshold that finds a pinpoint best paints less of it than the defect is;
  the growth gives back the outline without adding, dropping or joining defects (a defect painted in two
  classes grows each part in its own class, so its majority may change).

The values are tuned on whole validation scans by ``evaluate.tune``, through the very prediction code that
applies them. ``ThresholdTuner`` is the cheap per-tile pixel-IoU curve that training uses to score each
validation step (the best checkpoint is the one with the best tuned IoU). Without tuned values
``Decision.argmax`` is the plain rule (argmax, or 0.5 for binary). ``decide`` tunes a finished run's
checkpoints, each for its own weights, before they are written with their decisions.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage

from shardgen import schema, storage
from shardgen.classes import IGNORE_INDEX  # the one ignore value, also in the class map and the shards

from . import dist
from .augment import GpuAugment
from .config import AugmentConfig
from .state import TrainError

log = logging.getLogger("trainer")

BINS = 100  # threshold resolution of ThresholdTuner: 0.01
EIGHT = np.ones((3, 3), bool)  # 8-connectivity, as the object metrics use
PER_PIXEL = ("tuned", "defect")  # the decisions with a threshold, area and peak rule per class, per pixel


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
    # "tuned" (a rule per class, per pixel, on the class's probability), "defect" (the same on the defect
    # probability), "objects" (multiclass: a class per component) or "argmax"
    kind: str
    thresholds: list[float]  # per defect class (one for binary; "objects": all equal); argmax: unused
    min_area: list[int]  # per defect class; 0 keeps every component
    min_peak: list[float] | None = None  # per defect class; 0 (or None: all 0) keeps every component
    val_objects: list[int] | None = None  # per defect class: the validation objects it was tuned on
    borrowed: list[str] | None = None  # classes with too few of them, given the other classes' median values
    grow_px: int = 0  # per-pixel decisions: kept components grow up to this far (``grow``); 0: not at all

    def __post_init__(self) -> None:
        if self.min_peak is None:
            self.min_peak = [0.0] * len(self.thresholds)

    @property
    def by_defect(self) -> bool:
        """Whether its thresholds and peaks read the defect probability (1 - background's), not a class's own."""
        return self.kind in ("defect", "objects")

    @classmethod
    def argmax(cls, n_defect: int) -> Decision:
        return cls("argmax", [0.5] * n_defect, [0] * n_defect)

    @classmethod
    def from_meta(cls, meta: dict) -> Decision | None:
        """The checkpoint's decision; one saved before ``min_peak`` existed has none (all 0)."""
        d = meta.get("decision")
        if not d:
            return None
        return cls(d["kind"], list(d["thresholds"]), list(d["min_area"]), list(d.get("min_peak") or []) or None,
                   d.get("val_objects"), d.get("borrowed"), int(d.get("grow_px") or 0))  # fmt: skip

    def to_json(self) -> dict:
        return asdict(self)

    def classes(self, probs: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, K, H, W) -> class ids (B, H, W) int64, before the area filter."""
        if probs.shape[1] == 1:
            return (probs[:, 0] >= (self.thresholds[0] if self.kind in PER_PIXEL else 0.5)).long()
        if self.kind == "objects":
            raise ValueError("an 'objects' decision classes whole components: call the decision, not classes()")
        if self.kind not in PER_PIXEL:
            return probs.max(1).indices  # same ties as argmax(1), much faster on CPU over dim 1
        return self._threshold(*deciding(probs, self.by_defect))

    def _threshold(self, top: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The per-pixel rule on ``deciding``'s (class index, probability): the class where ``p`` reaches its
        threshold, else background."""
        t = torch.as_tensor(self.thresholds, device=p.device, dtype=p.dtype)[top]
        return torch.where(p >= t, top + 1, 0)

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
                    drop[1:] |= component_max(confidence, labels, n) < peak
                drop[0] = False
                out[drop[labels]] = 0
        return out

    def __call__(self, probs: torch.Tensor) -> np.ndarray:
        """(K, H, W) probabilities of one image -> (H, W) uint8 class ids, component filters included."""
        if self.kind == "objects":
            return self.by_object(probs)
        grows = self.grow_px > 0 and self.kind in PER_PIXEL
        top, confidence = None, None
        if self.kind in PER_PIXEL and (any(self.min_peak) or grows):
            # The deciding class and probability once, for the rule, the peak filter and the growth.
            top_t, p_t = deciding(probs[None], self.by_defect)
            pred = self._threshold(top_t, p_t)[0].to(torch.uint8).cpu().numpy()
            top, confidence = top_t[0].cpu().numpy(), p_t[0].cpu().numpy()
        else:
            pred = self.classes(probs[None])[0].to(torch.uint8).cpu().numpy()
            if any(self.min_peak):
                confidence = deciding(probs[None], self.by_defect)[1][0].cpu().numpy()
        pred = self.filter_components(pred, confidence)
        return grow(pred, top + 1, confidence, self.grow_px) if grows else pred

    def by_object(self, probs: torch.Tensor) -> np.ndarray:
        """The ``objects`` rule on (K, H, W) multiclass probabilities: defect components, then their classes."""
        defect = defect_probability(probs[None])[0].cpu().numpy()
        labels, n, cls = object_classes(probs[1:], defect, self.thresholds[0])
        if not n:
            return np.zeros(defect.shape, np.uint8)
        keep = np.bincount(labels.ravel(), minlength=n + 1)[1:] >= np.asarray(self.min_area)[cls - 1]
        if any(self.min_peak):
            keep &= component_max(defect, labels, n) >= np.asarray(self.min_peak)[cls - 1]
        lut = np.zeros(n + 1, np.uint8)
        lut[1:] = np.where(keep, cls, 0)
        return lut[labels]


def grow(pred: np.ndarray, top: np.ndarray, confidence: np.ndarray, px: int, at_least: float = 0.5) -> np.ndarray:
    """``pred`` (H, W) class ids with each component grown into the background pixels within ``px`` of it
    (Euclidean) whose ``confidence`` reaches ``at_least`` and whose likeliest defect class ``top`` (1..) is the
    class of its nearest kept pixel (by straight-line distance; a pixel nearer another component across a gap
    stays background). A grown pixel touching (8-connected) a pixel of another component stays background, and
    one not connected to its component through grown pixels too, so two defects never merge and the number of
    defects does not change (per class, a distance tie may join two pieces of one class inside one defect)."""
    kept = pred > 0
    if px <= 0 or not kept.any() or kept.all():
        return pred
    labels, _ = ndimage.label(kept, EIGHT)
    dist, (iy, ix) = ndimage.distance_transform_edt(~kept, return_indices=True)
    nearest = pred[iy, ix]
    grown = ~kept & (dist <= px) & (confidence >= at_least) & (top == nearest)
    owner = np.where(grown, labels[iy, ix], labels)  # each pixel's component; 0 = background
    # A grown pixel whose 3x3 neighbourhood holds another component's pixel would join the two: dropped.
    # (Dropping pixels creates no new contact, so one pass leaves no two components touching.)
    high = ndimage.maximum_filter(owner, size=3)
    low = ndimage.minimum_filter(np.where(owner > 0, owner, np.iinfo(owner.dtype).max), size=3)
    grown &= (high == owner) & (low == owner)
    out = pred.copy()
    out[grown] = nearest[grown]
    # Grown pixels cut off from their component (the path ran through pixels that did not qualify) would be
    # new objects: only the grown pixels connected to a kept one stay.
    joined, n = ndimage.label(out > 0, EIGHT)
    has_kept = np.zeros(n + 1, bool)
    has_kept[joined[kept]] = True
    out[grown & ~has_kept[joined]] = 0
    return out


def object_classes(class_probs, defect: np.ndarray, threshold: float) -> tuple[np.ndarray, int, np.ndarray]:
    """(labels (H, W) of the components of ``defect >= threshold``, their number n, (n,) class id 1.. of each:
    the defect class of largest probability summed over its pixels) for one image's (K - 1, H, W) defect-class
    probabilities (torch, or a numpy array such as the float16 copy evaluate.tune keeps: its sums may differ
    from the float32 ones in a near-tie)."""
    labels, n = ndimage.label(defect >= threshold, EIGHT)
    if not n:
        return labels, 0, np.zeros(0, np.int64)
    inside = labels > 0
    lab = labels[inside]
    if isinstance(class_probs, torch.Tensor):
        kept = class_probs[:, torch.from_numpy(inside).to(class_probs.device)].float().cpu().numpy()
    else:
        kept = class_probs[:, inside].astype(np.float32)  # (K - 1, pixels in components)
    sums = np.stack([np.bincount(lab, weights=row, minlength=n + 1)[1:] for row in kept])  # (K - 1, n)
    return labels, n, sums.argmax(0) + 1


def defect_probability(probs: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) probabilities -> (B, H, W) probability of any defect: 1 - background's (binary: its own)."""
    return probs[:, 0] if probs.shape[1] == 1 else 1 - probs[:, 0]


def component_max(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """(n,) the largest of ``values`` over each component 1..n of ``labels`` (0: none). The same numbers as
    ``scipy.ndimage.maximum``, which argsorts every pixel of the image: a few components on a 1200 px scan
    cost it a sort of the whole scan, this a pass over their own pixels."""
    inside = labels > 0
    out = np.full(n + 1, -np.inf, np.float64)
    np.maximum.at(out, labels[inside], values[inside])
    return out[1:]


def deciding(probs: torch.Tensor, by_defect: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(class index 0.. among defect classes, the probability a threshold compares) per pixel: the class's own
    probability, or with ``by_defect`` (the ``defect`` decision) the defect probability (1 - background's)."""
    if probs.shape[1] == 1:
        return torch.zeros_like(probs[:, 0], dtype=torch.long), probs[:, 0]
    top_p, top = probs[:, 1:].max(1)
    return top, (1 - probs[:, 0] if by_defect else top_p)


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
        cls, p = deciding(probs)
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


# ------------------------------------------------------------------------------------ the end of a run


def tuned_metrics(metrics: dict, tuner: ThresholdTuner, class_names: list[str]) -> dict:
    """``metrics`` plus the tuned thresholds, the IoU each reaches and their mean over scored classes."""
    thresholds, ious = tuner.best()
    scored = [v for v in ious if v is not None]
    return {**metrics, "thresholds": thresholds, "tuned_iou": dict(zip(class_names[1:], ious, strict=True)),
            "tuned_miou": sum(scored) / len(scored) if scored else None}  # fmt: skip


def decide(run, val, states: dict[str, dict]) -> dict[str, Decision]:
    """The decision of each checkpoint in ``states`` (name -> its contents), tuned for its own weights on the
    whole scans of the validation split, predicted exactly as evaluate predicts (``evaluate.tune``); weights
    of one step are tuned once. ``run``: the run's ``trainer.state.RunState``, ``val``: its validation split
    (``trainer.train.Validation``). Every rank takes part; bad scans on any rank stop all of them alike."""
    # evaluate builds on trainer; its prediction code is imported where it is used, at the end of a run.
    from evaluate import EvaluateError
    from evaluate.inference import Model
    from evaluate.tune import tune_model

    cfg = run.cfg
    normalize = GpuAugment(AugmentConfig(enabled=False), cfg.normalize).to(run.device).eval()
    out, done = {}, {}  # done: step -> decision
    for name, state in states.items():
        if state["step"] not in done:
            net = run.model if state["step"] == run.step else copy.deepcopy(run.model)
            net.load_state_dict(state["model"])
            model = Model(net.eval(), normalize, run.meta, storage.join(cfg.train.out_dir, f"{name}.pt"), run.device)
            try:
                done[state["step"]] = tune_model(model, val.manifest, val.split, cfg.train.decision_beta,
                                                 cfg.data.workers, form=cfg.train.class_decision,
                                                 grow_px=cfg.train.decision_grow)  # fmt: skip
            except EvaluateError as e:
                raise TrainError(f"tuning the decision of {name}.pt: {e}") from None
        out[name], reached = done[state["step"]]
        if dist.is_main():
            log_decision(name, state["step"], out[name], reached, val.manifest, val.split, run.names)
    return out


def log_decision(name, step, decision: Decision, reached: dict, manifest, split: str, names) -> None:
    log.info("decision of %s.pt (step %d) tuned on %d whole scans of %s: %s", name, step,
             schema.split_info(manifest, split)["images"], split,
             "; ".join(f"{n}: p >= {t:.2f}, >= {a} px, peak >= {k:.3f}"
                       for n, t, a, k in zip(names[1:], decision.thresholds, decision.min_area,
                                             decision.min_peak, strict=True)))  # fmt: skip
    if decision.kind == "objects":
        log.info("(p: the defect probability, 1 - P(background); each component takes the class of largest summed "
                 "probability, then that class's area and peak rules apply)")
    elif decision.kind == "defect":
        log.info("(p: the defect probability, 1 - P(background), compared with the threshold of each pixel's "
                 "likeliest defect class)")
    log.info("on validation: %s", "; ".join(
        f"{n}: {r['found']} of {r['objects']} objects found, {r['kept'] - r['found']} false, IoU {r['iou']:.3f}"
        for n, r in reached.items()))  # fmt: skip
    if decision.grow_px and decision.kind in PER_PIXEL:
        log.info("then each kept defect grows up to %d px into neighbouring pixels of p >= 0.5 and of its own "
                 "likeliest class, never joining another", decision.grow_px)  # fmt: skip
    if decision.borrowed:
        log.info("fewer than 5 validation objects, values from the other classes: %s", ", ".join(decision.borrowed))
