"""Running a trained checkpoint: tiles in, full-image class maps out.

``load_model`` rebuilds the network from the checkpoint's own ``meta`` (architecture, channels, classes,
normalization), so nothing about the model has to be repeated on the command line. ``Predictor`` runs
tiles through it in fixed-size batches that may span images, turns logits into probabilities (softmax, or
sigmoid for a single binary output), optionally averaged over flipped and rotated copies of each tile
(test-time augmentation, ``TTA``), blends each image's tile probabilities with ``blend_tiles`` and decides
the class per pixel with a ``trainer.decision.Decision``: the thresholds, minimum component areas and peaks
tuned on whole validation scans and stored in the checkpoint (``decision_for``, ``evaluate.tune``), or plain
argmax (0.5 for binary models).
It is the same preprocessing as validation in training: ``GpuAugment.normalize`` in eval mode, bf16
autocast on CUDA, and on a CPU with native bf16 for a model trained in bf16 (``Model.amp``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shardgen.tiling import TileGrid
from trainer import checkpoint
from trainer.augment import AugmentConfig, GpuAugment, NormalizeConfig
from trainer.config import ConfigError, from_dict
from trainer.decision import Decision, probabilities
from trainer.models import build_model
from trainer.precision import autocast, cpu_bf16_native

from . import DECISIONS, TTA, EvaluateError
from .blend import blend_tiles

META_KEYS = ("model", "in_channels", "n_classes", "classes", "mode", "config")


@dataclass
class Model:
    net: nn.Module  # in eval mode, on ``device``
    normalize: GpuAugment  # eval mode: normalization only
    meta: dict  # the checkpoint's meta
    url: str  # where the checkpoint was read from
    device: torch.device

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def in_channels(self) -> int:
        return int(self.meta["in_channels"])

    @property
    def amp(self) -> str:
        """The precision evaluate runs it in (``trainer.precision.autocast``): bf16 on CUDA; on a CPU, bf16 where
        it was trained in bf16 and the CPU multiplies bf16 natively (1.4x the tiles per second
        of fp32 on a 2-core AVX512-BF16 EPYC, bench/README.md), else fp32. Tuning and evaluation share it.
        "Trained in bf16" is the checkpoint's recorded ``precision`` (a ``train.amp: bf16`` run on a CPU without
        native bf16 trained in fp32); a checkpoint from before it was recorded is read by its ``train.amp``."""
        trained = self.meta.get("precision")
        if trained is None:
            trained = "bf16" if (self.meta.get("config") or {}).get("train", {}).get("amp") == "bf16" else "fp32"
        native = self.device.type == "cpu" and isinstance(self.net, nn.Module) and cpu_bf16_native()
        return "bf16" if trained == "bf16" and native else "auto"

    @property
    def precision(self) -> str:
        """What its forward passes run in under ``autocast(device, amp)``: ``bf16`` or ``fp32`` (an exported
        model in ONNX Runtime: fp32). metrics.json records it: the same checkpoint predicts in bf16 on a CPU
        with native bf16 and in fp32 on one without, and its maps differ slightly."""
        if not isinstance(self.net, nn.Module):
            return "fp32"
        return "bf16" if self.amp == "bf16" or self.device.type == "cuda" else "fp32"


def load_model(url: str, device: torch.device) -> Model:
    """The checkpoint at ``url`` as an eval-mode network; a bad checkpoint raises ``CheckpointError``. A
    ``.onnx`` file (``evaluate export``) runs in ONNX Runtime instead, with the meta its metadata holds."""
    if str(url).lower().endswith(".onnx"):
        from .export import OnnxNet, onnx_meta

        meta = onnx_meta(url)
        norm = from_dict(NormalizeConfig, meta["config"]["normalize"], "exported normalize")
        normalize = GpuAugment(AugmentConfig(enabled=False), norm).to(device).eval()
        return Model(OnnxNet(url, device), normalize, meta, str(url), device)
    state = checkpoint.load(url, map_location="cpu")
    meta = state["meta"]
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise checkpoint.CheckpointError(f"{url}: checkpoint meta lacks {', '.join(missing)}")
    config = meta["config"]
    # The checkpoint holds every weight: a backbone initialisation file named at training time need not
    # exist where the model is evaluated.
    kwargs = {k: v for k, v in config["model"]["kwargs"].items() if k != "weights_path"}
    try:
        net = build_model(meta["model"], meta["in_channels"], meta["n_classes"], **kwargs)
        net.load_state_dict(state["model"])
        norm = from_dict(NormalizeConfig, config.get("normalize"), "checkpoint normalize")
    except (KeyError, TypeError, RuntimeError, ConfigError) as e:
        first = str(e).strip().splitlines()[0]
        raise checkpoint.CheckpointError(f"{url}: cannot rebuild the model: {first}") from None
    if not all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point()):
        raise checkpoint.CheckpointError(f"{url}: the model's weights are not finite (NaN or inf): it diverged")
    normalize = GpuAugment(AugmentConfig(enabled=False), norm).to(device).eval()
    return Model(net.to(device).eval(), normalize, meta, url, device)


def check_dataset(model: Model, manifest: dict) -> None:
    """The checkpoint must predict the dataset's classes from its kind of images."""
    classes, mode, url = list(manifest["classes"]), manifest["mode"], manifest.get("_url", "dataset")
    if len(model.class_names) != len(classes) or model.meta["mode"] != mode:
        raise EvaluateError(
            f"{model.url}: checkpoint has {len(model.class_names)} classes ({model.meta['mode']}) but "
            f"dataset {url} has {len(classes)} classes ({mode})"
        )
    if model.class_names != classes:
        raise EvaluateError(
            f"{model.url}: checkpoint classes {model.class_names} differ from {url}: {classes}"
        )
    grid = model.meta.get("grid")  # checkpoints since the grid was recorded; older ones are not checked
    if grid and any(grid[k] != manifest[k] for k in ("image_size", "tile", "stride")):
        raise EvaluateError(
            f"{model.url}: checkpoint trained on a grid of image size {grid['image_size']}, tile {grid['tile']}, "
            f"stride {grid['stride']} but {url} has {manifest['image_size']}, {manifest['tile']}, "
            f"{manifest['stride']}: its minimum areas would apply at another scale; build the shards with the "
            f"checkpoint's --image-size, --tile and --stride"
        )
    if model.in_channels != manifest["channels"]:
        raise EvaluateError(
            f"{model.url}: checkpoint takes {model.in_channels}-channel images but {url} has "
            f"{manifest['channels']}-channel tiles"
        )


def decision_for(model: Model, requested: str) -> tuple[Decision, str | None]:
    """The decision to apply and, when ``tuned`` was asked for but the checkpoint has none, a warning."""
    if requested not in DECISIONS:
        raise EvaluateError(f"--decision must be one of {', '.join(DECISIONS)}, got {requested!r}")
    n_defect = max(1, len(model.class_names) - 1)
    tuned = Decision.from_meta(model.meta)
    if requested == "tuned" and tuned is not None:
        return tuned, None
    warning = None
    if requested == "tuned":
        warning = (f"{model.url}: checkpoint has no tuned decision (trained with train.tune_decision: false or "
                   f"by an older version); using argmax" + (" (threshold 0.5)" if n_defect == 1 else ""))
    return Decision.argmax(n_defect), warning


@dataclass
class _Pending:
    payload: Any
    outputs: list  # tile probabilities gathered so far, in tile order
    done: int = 0


class Predictor:
    """Class maps of whole images from their tiles, batching ``batch_size`` tiles across images."""

    def __init__(self, model: Model, grid: TileGrid, blend: str = "gaussian", batch_size: int = 25,
                 decision: Decision | None = None, tta: str = "none", views: tuple | None = None):  # fmt: skip
        if batch_size < 1:
            raise EvaluateError(f"--batch-size must be >= 1, got {batch_size}")
        if tta not in TTA:
            raise EvaluateError(f"--tta must be one of {', '.join(TTA)}, got {tta!r}")
        self.model, self.grid, self.blend, self.batch_size = model, grid, blend, batch_size
        self.decision = decision or Decision.argmax(max(1, len(model.class_names) - 1))
        self.views = views or TTA[tta]  # views: (quarter turns, flip) pairs instead of a named TTA
        self.amp = autocast(model.device, model.amp)  # bf16 on CUDA, and on a CPU for a model trained in it
        # NHWC: the same convolutions, faster (fp32 on a 2-core CPU: 1.7x the tiles per second of NCHW; the
        # trainer's train.channels_last). An exported model (ONNX Runtime) takes its input as it is.
        self.channels_last = isinstance(model.net, nn.Module)
        if self.channels_last:
            model.net.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def tile_probabilities(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, t, t) -> float32 (N, K, t, t): softmax over classes, or the sigmoid of one logit,
        averaged over the TTA views (each view's output turned back before averaging)."""
        x = self.model.normalize.normalize(tiles.to(self.model.device, non_blocking=True))
        total = None
        for k, flip in self.views:
            turned = k % 4 or flip  # the identity view skips rot90, which would copy the batch both ways
            view = x
            if turned:
                view = torch.rot90(x, k, (2, 3))
                view = view.flip(3) if flip else view
            if self.channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            with self.amp:
                probs = probabilities(self.model.net(view), inplace=True)  # the logits are ours alone
            if turned:
                probs = torch.rot90(probs.flip(3) if flip else probs, -k, (2, 3))
            total = probs if total is None else total.add_(probs)
        return total / len(self.views) if len(self.views) > 1 else total

    def classes(self, probs: torch.Tensor) -> np.ndarray:
        """Blended (K, S, S) probabilities -> (S, S) uint8 class ids, by the decision."""
        return self.decision(probs)

    def confidence(self, probs: torch.Tensor, classes: np.ndarray) -> np.ndarray:
        """(S, S) float32: the blended probability of each pixel's decided class (binary: p or 1 - p); under a
        decision that keeps defects by their defect probability (``defect``, ``objects``), a defect pixel's is
        that probability, 1 - P(background): what the decision compared with its threshold. A needle the model
        splits between Needle 0.35 and Feather 0.40, background 0.25, scores 0.75, not 0.40."""
        decided = torch.from_numpy(classes).to(probs.device).long()
        if probs.shape[0] == 1:
            conf = torch.where(decided.bool(), probs[0], 1 - probs[0])
        else:
            conf = probs.gather(0, decided[None])[0]
            if self.decision.by_defect:
                conf = torch.where(decided > 0, 1 - probs[0], conf)
        return conf.float().cpu().numpy()

    def predict(self, items: Iterable[tuple[torch.Tensor, Any]]) -> Iterator[tuple[np.ndarray, Any]]:
        """(tiles uint8 (count, C, t, t) in grid order, payload) -> (class map (S, S) uint8, payload)."""
        for probs, payload in self.probabilities(items):
            yield self.classes(probs), payload

    def predict_scored(
        self, items: Iterable[tuple[torch.Tensor, Any]]
    ) -> Iterator[tuple[np.ndarray, np.ndarray, Any]]:
        """Like ``predict``, with each pixel's confidence: (class map, confidence (S, S) float32, payload)."""
        for probs, payload in self.probabilities(items):
            classes = self.classes(probs)
            yield classes, self.confidence(probs, classes), payload

    def probabilities(self, items: Iterable[tuple[torch.Tensor, Any]]) -> Iterator[tuple[torch.Tensor, Any]]:
        """(tiles, payload) -> (blended probabilities (K, S, S), payload), in input order.

        Tiles wait until ``batch_size`` of them are queued, so a batch may hold the end of one image and the
        start of the next; an image is blended as soon as its last tile is predicted.
        """
        count = self.grid.count
        pending: deque[_Pending] = deque()
        queue: list[torch.Tensor] = []
        queued = 0
        for tiles, payload in items:
            if tiles.ndim != 4 or tiles.shape[0] != count:
                raise EvaluateError(
                    f"expected {count} tiles per image, got tensor of shape {tuple(tiles.shape)}"
                )
            pending.append(_Pending(payload, []))
            queue.append(tiles)
            queued += count
            while queued >= self.batch_size:
                batch = queue[0] if len(queue) == 1 else torch.cat(queue)  # one image per batch: no copy
                rest = batch[self.batch_size :]
                queue = [rest] if len(rest) else []
                queued -= self.batch_size
                self._distribute(pending, self.tile_probabilities(batch[: self.batch_size]))
            yield from self._finished(pending)
        if queued:
            self._distribute(pending, self.tile_probabilities(queue[0] if len(queue) == 1 else torch.cat(queue)))
        yield from self._finished(pending)

    def _distribute(self, pending: deque[_Pending], probs: torch.Tensor) -> None:
        """Hand a batch's outputs, in order, to the images still missing tiles."""
        count, used = self.grid.count, 0
        for p in pending:
            if used == len(probs):
                break
            take = min(count - p.done, len(probs) - used)
            if take:
                p.outputs.append(probs[used : used + take])
                p.done += take
                used += take

    def _finished(self, pending: deque[_Pending]) -> Iterator[tuple[torch.Tensor, Any]]:
        while pending and pending[0].done == self.grid.count:
            p = pending.popleft()
            tiles = p.outputs[0] if len(p.outputs) == 1 else torch.cat(p.outputs)  # no copy in the common case
            yield blend_tiles(tiles, self.grid, self.blend), p.payload
