"""Pixel metrics from a confusion matrix: IoU, Dice, precision and recall per class, mIoU over defects.

``ConfusionMatrix`` follows torchvision's references/segmentation: one ``bincount`` per batch on the
tensors' own device, summed across DDP ranks once at the end. ``summarize`` turns the matrix into
per-class numbers with the project's absent-class policy:

* a class absent from both truth and prediction in the whole split (its row and column are zero) has no
  defined score: every value is ``None`` (``null`` in JSON) and it is left out of the means;
* a class present in the truth but never predicted scores IoU 0 (and counts in the means), and the other
  way round too; precision is ``None`` when nothing was predicted, recall is ``None`` when nothing was true.

``miou`` is the mean IoU over *defect* classes (ids >= 1), so for binary (background, defect) it is the
defect IoU; background's IoU is reported per class but never lifts the headline number.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shardgen.classes import IGNORE_INDEX
from trainer import dist


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def summarize(mat, class_names: Sequence[str]) -> dict:
    """Per-class iou/dice/precision/recall and means over defect classes from a [C, C] matrix.

    ``mat`` (tensor, array or nested list) has rows = truth, columns = prediction. Returns
    ``{"miou", "mdice", "pixel_accuracy", "per_class": {name: {iou, dice, precision, recall}}, "absent"}``.
    """
    m = torch.as_tensor(mat, dtype=torch.int64).cpu()
    n = len(class_names)
    if m.shape != (n, n):
        raise ValueError(
            f"confusion matrix has shape {tuple(m.shape)}, expected ({n}, {n}) for {n} class names"
        )
    tp = m.diag().tolist()
    true = m.sum(1).tolist()  # pixels of each class in the truth
    pred = m.sum(0).tolist()  # pixels predicted as each class
    per_class, absent = {}, []
    for c, name in enumerate(class_names):
        if true[c] == 0 and pred[c] == 0:
            absent.append(name)
            per_class[name] = {"iou": None, "dice": None, "precision": None, "recall": None}
            continue
        per_class[name] = {
            "iou": tp[c] / (true[c] + pred[c] - tp[c]),
            "dice": 2 * tp[c] / (true[c] + pred[c]),
            "precision": _ratio(tp[c], pred[c]),
            "recall": _ratio(tp[c], true[c]),
        }
    defects = [per_class[name] for name in class_names[1:] if name not in absent]
    total = int(m.sum())
    return {
        "miou": sum(d["iou"] for d in defects) / len(defects) if defects else None,
        "mdice": sum(d["dice"] for d in defects) / len(defects) if defects else None,
        "pixel_accuracy": _ratio(sum(tp), total),
        "per_class": per_class,
        "absent": absent,
    }


class ConfusionMatrix:
    """Accumulates a [num_classes, num_classes] int64 matrix (rows = truth, cols = prediction).

    ``device`` is where the matrix starts; ``update`` moves it to the device of the tensors it is given, so
    validation on GPU never copies masks to the host. Pass the training device when using DDP so a rank
    that saw no batch still all-reduces a tensor on the right device.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
        device: torch.device | str = "cpu",
    ):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = (
            list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        )
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        """Add a batch of integer class maps (any shape, both alike); ``ignore_index`` pixels are skipped."""
        if target.shape != pred.shape:
            raise ValueError(f"target shape {tuple(target.shape)} != prediction shape {tuple(pred.shape)}")
        n = self.num_classes
        if self.mat.device != target.device:
            self.mat = self.mat.to(target.device)
        keep = target != self.ignore_index
        t = target[keep].to(torch.int64)
        p = pred[keep].to(device=t.device, dtype=torch.int64)
        # One host sync per batch; a mask painted for another class map (e.g. multiclass ids fed to a
        # binary run) must fail loudly instead of being binned into the wrong cell.
        bad = (t < 0) | (t >= n) | (p < 0) | (p >= n)
        if bool(bad.any()):
            tb, pb = t[bad][:1].item(), p[bad][:1].item()
            raise ValueError(
                f"class id out of range [0, {n}) (ignore {self.ignore_index}): target {tb}, prediction {pb}"
            )
        self.mat += torch.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def reduce_from_all_processes(self) -> None:
        """Sum the matrix over DDP ranks in place (no-op in a single process)."""
        dist.all_reduce(self.mat)

    def compute(self) -> dict:
        """``summarize`` of the accumulated matrix."""
        return summarize(self.mat, self.class_names)
