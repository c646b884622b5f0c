"""Tuning the decision on whole validation scans, exactly as evaluate will apply it.

A checkpoint's decision (per defect class: probability threshold, minimum component area, minimum peak; see
``trainer.decision``) is tuned here, on the validation split's full images: each scan is predicted by
evaluate's own ``Predictor`` (same normalization, same autocast on that device, same Gaussian blending of the
overlapping tiles into 1200 px), so an object crossing tile seams is one object, as evaluate counts it.

Every candidate (threshold, area, peak) of a class is scored by the one-to-one object matching of
``evaluate.metrics`` (found at IoU >= 0.1) summed over the split, and the class takes the candidate with the
best object F-beta (``train.decision_beta``; 2 counts a missed defect as four false alarms), then the fewest
kept objects (which only separates rules that find nothing), then the best pixel IoU, then the plainer rule
(lower peak, smaller area, threshold nearer 0.5). A value chosen at the edge of its first window opens the rest
of ``GRIDS`` on that side, and the new candidates are scored too. A class with fewer than ``MIN_OBJECTS``
validation objects cannot be tuned on them: it takes the median of the other classes' tuned values
(``Decision.borrowed`` names it; the report shows it); when no class has enough, one rule is tuned on all
classes' objects pooled and given to every class.

A multiclass model's ``defect`` decision (``train.class_decision: defect``) is tuned as the per-pixel one, on
each pixel's defect probability (1 - background's) in place of its likeliest class's own probability.

A multiclass model's ``objects`` decision (``train.class_decision: object``; see ``trainer.decision``) has one
threshold on the defect probability for all classes, and an area and a peak rule per class that apply to the
components that class won (by summed probability). At each threshold every class takes its best (area, peak)
as above; the threshold is the one whose classes together find the most objects with the right class (the
F-beta of the found, kept and truth objects summed over the classes tuned on their own), then keep the fewest.

The deciding class and probability of this rank's validation scans and their truth are kept in memory (6
bytes a pixel, ~9 MB per 1200 px scan; for the ``objects`` decision every defect class's probability in
float16 instead, 25 bytes a pixel with ten classes, ~36 MB) while the grid widens; under torchrun every rank
scores its own scans and the counts are all-reduced. Scans are scored on a pool of threads (two on a 2-core CPU;
numpy and scipy release the GIL for most of the work), and a rule keeping the same matchable components as
one already matched is not matched again: 24 demo scans in 21-23 s instead of 32-35 s, the same decisions.
"""

from __future__ import annotations

import itertools
import logging
import os
import statistics
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import ndimage

from shardgen import schema
from shardgen.classes import IGNORE_INDEX
from trainer import dist
from trainer.config import CLASS_DECISIONS as FORMS  # train.class_decision -> Decision.kind
from trainer.decision import PER_PIXEL, Decision, component_max, deciding, defect_probability, object_classes

from . import EvaluateError
from .blend import reassemble_mask
from .inference import Model, Predictor
from .metrics import FOUND_IOU, components, match, pair_iou
from .tiles import grid_of, image_loader

log = logging.getLogger("evaluate.tune")

MIN_OBJECTS = 5  # a class with fewer validation objects borrows the other classes' median values
# Candidate values per rule, in order, and the (first, last) indices of the window tried first; a chosen edge
# opens the rest of that side. Area 0 and peak 0 (no rule) are the plainest ends, so those windows start there.
# Thresholds stop at 0.1: below it a confident peak's component runs out over a thin line's blurred surroundings,
# still an object found at IoU 0.1 but many false pixels (bench/README.md).
GRIDS = {
    "threshold": ((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99), (1, 8)),
    "area": ((0, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512), (0, 5)),
    "peak": ((0.0, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999), (0, 3)),
}
STATS = ("kept", "found", "right", "wrong")  # per candidate: objects kept, truth objects found, their pixels


class ScanTuner:
    """Per defect class and candidate (threshold, area, peak): ``STATS`` summed over scans, computed on demand
    from the scans given to ``add`` so that a widened grid scores only its new candidates."""

    def __init__(self, n_defect: int, device: torch.device | str = "cpu", kind: str = "tuned", threads: int = 0):
        self.kind = kind  # the Decision.kind scored: "tuned", "defect" (per-pixel rules) or "objects"
        self.n, self.device = n_defect, torch.device(device)  # device: where counts meet across ranks (NCCL: cuda)
        # (deciding class index, its probability, truth); objects: (defect classes' probabilities, defect
        # probability, truth)
        self.scans: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.stats: dict[tuple[int, float, int, float], np.ndarray] = {}  # (class, t, area, peak) -> STATS
        self.truth = np.zeros((n_defect, 2), np.int64)  # [class, pixels / objects]
        self.threads = threads or min(2, os.cpu_count() or 1)  # scans scored at once

    @property
    def objects(self) -> bool:  # the ``objects`` decision (trainer.decision) rather than per-pixel rules
        return self.kind == "objects"

    def add(self, probs: torch.Tensor, truth: np.ndarray) -> None:
        """One scan's blended (K, S, S) probabilities and its (S, S) truth (255 ignored)."""
        if self.objects:  # the classes depend on the threshold: every defect class's probability kept
            d = defect_probability(probs[None])[0].float().cpu().numpy()
            self.scans.append((probs[1:].to(torch.float16).cpu().numpy(), d, truth))
        else:
            top, p = deciding(probs[None], self.kind == "defect")
            self.scans.append((top[0].to(torch.uint8).cpu().numpy(), p[0].float().cpu().numpy(), truth))
        for k in range(self.n):
            _, area = components(truth == k + 1)
            self.truth[k] += (int(area.sum()), len(area))

    def score(self, candidates: Sequence[tuple[float, int, float]]) -> None:
        """Compute the stats of the candidates not yet scored, for every class."""
        todo = [c for c in candidates if (0, *c) not in self.stats]
        if not todo:
            return
        for c in todo:
            for k in range(self.n):
                self.stats[(k, *c)] = np.zeros(len(STATS), np.int64)
        by_threshold: dict[float, list[tuple[int, float]]] = {}
        for t, area, peak in todo:
            by_threshold.setdefault(t, []).append((area, peak))
        with ThreadPoolExecutor(self.threads) as pool:  # numpy and scipy release the GIL for most of it
            for rows in pool.map(lambda scan: self._scan_stats(scan, by_threshold), self.scans):
                for k, t, rules, stats in rows:
                    self._add(k, t, rules, stats)

    def _scan_stats(self, scan, by_threshold: dict[float, list[tuple[int, float]]]) -> list[tuple]:
        """One scan's (class index, threshold, rules, their STATS rows) for the rules of each threshold."""
        top, p, truth = scan
        scored = truth != IGNORE_INDEX
        out = []
        if self.objects:  # each pixel of a component: the component's class index; the rest unused
            truths = [components(truth == k + 1) for k in range(self.n)]  # the same at every threshold
            for t, rules in by_threshold.items():
                labels, _, cls = object_classes(top, p, t)
                top_t = np.concatenate([[0], cls - 1])[labels]
                for k in range(self.n):
                    out.append((k, t, rules, _class_stats(top_t, p, truth, scored, k, t, rules, truths[k])))
            return out
        lowest = min(by_threshold, default=1.0)
        for k in range(self.n):
            # Every threshold's selection of class k lies in the box of its pixels at the lowest threshold
            # and its truth: cut the scan to it once, not once per threshold (the same components, so the
            # same stats).
            boxes = ndimage.find_objects((((top == k) & (p >= lowest)) | (truth == k + 1)).astype(np.int8))
            if not boxes:
                continue
            sub = tuple(a[boxes[0]] for a in (top, p, truth, scored))
            truth_k = components(sub[2] == k + 1)  # the same at every threshold: labelled once
            for t, rules in by_threshold.items():
                out.append((k, t, rules, _class_stats(*sub, k, t, rules, truth_k)))
        return out

    def _add(self, k: int, t: float, rules, rows) -> None:
        for rule, row in zip(rules, rows, strict=True):
            self.stats[(k, t, *rule)] += row

    def table(self, candidates: Sequence[tuple[float, int, float]]) -> np.ndarray:
        """(n_defect, len(candidates), len(STATS)) int64, summed over every rank (a collective)."""
        self.score(candidates)
        local = np.stack([[self.stats[(k, *c)] for c in candidates] for k in range(self.n)])
        return self.reduce(local)

    def reduce(self, counts: np.ndarray) -> np.ndarray:
        """``counts`` summed over every rank (a collective)."""
        return dist.all_reduce(torch.from_numpy(counts).to(self.device)).cpu().numpy()


def _class_stats(top, p, truth, scored, k: int, t: float, rules, truth_k) -> list[np.ndarray]:
    """STATS of class index ``k`` at threshold ``t`` on one scan, for each (area, peak) of ``rules``;
    ``truth_k``: ``components(truth == k + 1)``, the same at every threshold, so labelled once by the caller."""
    sel = (top == k) & (p >= t)
    region = sel | (truth == k + 1)
    if not region.any():
        return [np.zeros(len(STATS), np.int64) for _ in rules]
    box = ndimage.find_objects(region.astype(np.int8))[0]  # components never cross their bounding box
    sel, p, truth, scored = sel[box], p[box], truth[box], scored[box]
    # The box holds every truth pixel of class k, so its truth components are whole: the same labels and areas.
    t_lab, t_area = truth_k[0][box], truth_k[1]
    labels, s_area = components(sel, scored)
    n = len(s_area)
    size = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # the area rule counts every pixel, as the Decision does
    peak = component_max(p, labels, n)
    right = np.bincount(labels[truth == k + 1], minlength=n + 1)[1:]
    iou = pair_iou(t_lab, t_area, labels, s_area, scored)
    can_match = (iou >= FOUND_IOU).any(0)  # the components that can be found at all
    found_by: dict[bytes, int] = {}  # many rules keep the same matchable components: matched once
    out = []
    for area, min_peak in rules:
        keep = (size >= area) & (peak >= min_peak)
        key = (keep & can_match).tobytes()
        if (found := found_by.get(key)) is None:
            found = found_by[key] = len(match(iou[:, keep & can_match])[0])
        out.append(np.array([keep.sum(), found, right[keep].sum(), (s_area - right)[keep].sum()], np.int64))
    return out


def _window(name: str, lo: int, hi: int) -> list:
    return list(GRIDS[name][0][lo : hi + 1])


def class_keys(table_k: np.ndarray, candidates, truth_k: np.ndarray, beta: float) -> list[tuple]:
    """One class's sort key per candidate: object F-beta, then the fewest kept objects, then the best pixel
    IoU, then the plainest rule (larger is better)."""
    kept, found, right, wrong = table_k.T.astype(np.float64)
    f = f_beta(found, kept, truth_k[1], beta)
    iou = right / np.maximum(truth_k[0] + wrong, 1)
    # Equal F-beta means equal found and kept objects, except at 0: a class found by no rule then keeps
    # as few components as it can, rather than the rule whose thousands of specks touch a few true pixels.
    return [(f[i], -kept[i], round(iou[i], 6), -c[2], -c[1], -abs(c[0] - 0.5))
            for i, c in enumerate(candidates)]  # fmt: skip


def choose(table: np.ndarray, candidates, truth: np.ndarray, beta: float) -> list[int]:
    """Per class, the index of the candidate with the best ``class_keys``."""
    out = []
    for k in range(table.shape[0]):
        keys = class_keys(table[k], candidates, truth[k], beta)
        out.append(max(range(len(candidates)), key=keys.__getitem__))
    return out


def f_beta(found, kept, objects, beta: float):
    """Object F-beta from found, kept and truth object counts (arrays or numbers); nothing kept: precision 1."""
    found, kept = np.asarray(found, np.float64), np.asarray(kept, np.float64)
    precision = np.where(kept > 0, found / np.maximum(kept, 1), 1.0)
    recall = found / max(objects, 1)
    return np.round((1 + beta**2) * precision * recall / np.maximum(beta**2 * precision + recall, 1e-12), 6)


def together(table: np.ndarray, candidates, truth: np.ndarray, beta: float, own: list[int]) -> list[int]:
    """The classes' rules chosen together: starting from each class's own best, each class in turn takes the
    candidate that maximizes the object F-beta of the ``own`` classes counted together (found, kept and truth
    objects summed; ties: its own ``class_keys``), until no class changes. A class whose best own rule finds
    1 of 5 objects with 77 false alarms (F2 0.05, better than finding none) lowers the F-beta of all classes
    together, and gets the rule that keeps the fewest false alarms instead."""
    best = choose(table, candidates, truth, beta)
    objects = int(sum(truth[k, 1] for k in own))
    for _ in range(5):
        changed = False
        for k in own:
            kept = sum(int(table[j, best[j], 0]) for j in own if j != k) + table[k, :, 0]
            found = sum(int(table[j, best[j], 1]) for j in own if j != k) + table[k, :, 1]
            f = f_beta(found, kept, objects, beta)
            keys = class_keys(table[k], candidates, truth[k], beta)
            i = max(range(len(candidates)), key=lambda i: (f[i], keys[i]))
            changed |= i != best[k]
            best[k] = i
        if not changed:
            break
    return best


def shared_threshold(table: np.ndarray, candidates, truth: np.ndarray, beta: float, own: list[int]) -> list[int]:
    """The rules chosen ``together`` among the candidates of one threshold, for the threshold whose choices find
    the best F-beta over the ``own`` classes together, then keep the fewest objects, then lie nearest 0.5."""
    by_t: dict[float, list[int]] = {}
    for i, c in enumerate(candidates):
        by_t.setdefault(c[0], []).append(i)
    options = []
    objects = int(sum(truth[k, 1] for k in own))
    for t, index in by_t.items():
        picks = [index[j] for j in together(table[:, index], [candidates[i] for i in index], truth, beta, own)]
        kept = sum(int(table[k, picks[k], 0]) for k in own)
        found = sum(int(table[k, picks[k], 1]) for k in own)
        options.append(((float(f_beta(found, kept, objects, beta)), -kept, -abs(t - 0.5)), picks))
    return max(options, key=lambda o: o[0])[1]


def tune(tuner: ScanTuner, beta: float, class_names: Sequence[str], grow_px: int = 0) -> tuple[Decision, dict]:
    """The decision for the scans ``tuner`` holds (every rank's), and per class what it reaches on them; the
    classes' rules are chosen ``together``. ``grow_px`` is stored with it as given (``Decision.grow_px``): the
    growth changes outlines, not which components are kept, so the rules are tuned without it."""
    truth = tuner.reduce(tuner.truth.copy())
    own = [k for k in range(tuner.n) if truth[k, 1] >= MIN_OBJECTS]
    pooled = not own  # no class has enough objects: one rule for all, tuned on all their objects together
    windows = {name: list(w) for name, (_, w) in GRIDS.items()}
    while True:
        grids = [_window(name, *windows[name]) for name in ("threshold", "area", "peak")]
        candidates = list(itertools.product(*grids))
        table = tuner.table(candidates)
        if pooled:
            best = choose(table.sum(0, keepdims=True), candidates, truth.sum(0, keepdims=True), beta) * tuner.n
        elif tuner.objects:
            best = shared_threshold(table, candidates, truth, beta, own)
        else:
            best = together(table, candidates, truth, beta, own)
        widened = False
        for d, name in enumerate(("threshold", "area", "peak")):
            values, (lo, hi) = GRIDS[name][0], windows[name]
            chosen = {candidates[best[k]][d] for k in (own or range(tuner.n))}
            # The whole rest of that side at once: one step past an edge may show a plateau before the peak.
            if values[hi] in chosen and hi + 1 < len(values):
                windows[name][1] = len(values) - 1
                widened = True
            if values[lo] in chosen and lo > 0:
                windows[name][0] = 0
                widened = True
        if not widened:
            break
    values = [candidates[i] for i in best]
    borrowed = [k for k in range(tuner.n) if k not in own] if tuner.n > 1 else []
    if own:
        median = [statistics.median(values[j][d] for j in own) for d in range(3)]
        for k in borrowed:  # too few objects to tune on: the median of the classes that had enough
            values[k] = (median[0], int(median[1]), median[2])
    names = list(class_names[1:])
    if dist.is_main():
        if pooled:
            log.warning("no class has %d validation objects (%d in all): one decision tuned on all of them",
                        MIN_OBJECTS, int(truth[:, 1].sum()))  # fmt: skip
        for d, name in enumerate(("threshold", "area", "peak")):
            ends = {GRIDS[name][0][-1]} | ({GRIDS[name][0][0]} if name == "threshold" else set())
            if at := sorted({v[d] for v in values} & ends):
                log.warning("the tuned %s reached the end of its grid (%s): the scans ask for a rule beyond it",
                            name, ", ".join(map(str, at)))  # fmt: skip
    decision = Decision(tuner.kind, [float(v[0]) for v in values],
                        [int(v[1]) for v in values], [float(v[2]) for v in values],
                        val_objects=[int(v) for v in truth[:, 1]],
                        borrowed=[names[k] for k in borrowed], grow_px=grow_px)  # fmt: skip
    reached = {}
    for k in own or range(tuner.n):
        kept, found, right, wrong = table[k, best[k]].tolist()
        reached[names[k]] = {"objects": int(truth[k, 1]), "found": found, "kept": kept,
                             "iou": right / max(truth[k, 0] + wrong, 1)}  # fmt: skip
    return decision, reached


def tune_model(model: Model, manifest: dict, split: str, beta: float, workers: int = 2, batch_size: int = 25,
               blend: str = "gaussian", form: str = "pixel", grow_px: int = 0) -> tuple[Decision, dict]:  # fmt: skip
    """Predict this rank's scans of ``split`` as evaluate does and tune the decision on all ranks' scans.
    A multiclass model gets the decision ``form`` names (``train.class_decision``: ``pixel``, a rule per class on
    its own probability; ``defect``, on the defect probability; ``object``); a binary model the ``tuned`` one.
    ``grow_px``: ``train.decision_grow``, stored with the decision."""
    if form not in FORMS:
        raise ValueError(f"decision form must be one of {', '.join(FORMS)}, got {form!r}")
    if not schema.split_info(manifest, split)["images"]:
        raise EvaluateError(f"{manifest['_url']}: split {split!r} has no images to tune the decision on")
    grid, names = grid_of(manifest), list(manifest["classes"])
    kind = FORMS[form] if len(names) > 2 else "tuned"
    if grow_px and kind not in PER_PIXEL:
        raise ValueError(f"grow_px {grow_px}: the {form!r} decision does not grow (only per-pixel ones do)")
    tuner = ScanTuner(max(1, len(names) - 1), model.device, kind)
    predictor = Predictor(model, grid, blend, batch_size)
    failure = None
    try:
        images = image_loader(manifest, split, dist.rank(), dist.world_size(), workers)
        for probs, item in predictor.probabilities((item.images, item) for item in images):
            tuner.add(probs, reassemble_mask(item.masks.numpy(), grid, item.image_id))
    except (EvaluateError, ValueError, OSError) as e:  # bad shards on this rank: every rank stops, none waits
        failure = str(e)
    if (failure := dist.any_rank(failure)) is not None:
        raise EvaluateError(failure)
    return tune(tuner, beta, names, grow_px)
