"""``python -m evaluate export``: a checkpoint as an ONNX model that carries everything prediction needs.

The graph maps normalized tiles (N, C, H, W) float32 to per-class probabilities (N, K, H, W): the softmax over
the classes, or the sigmoid of a binary model's one logit (U²-Net's fused output). Batch, height and width
are dynamic. The model's metadata (``metadata_props``, all JSON text, under ``diamond_defects.*``) holds the
rest: the format version, class names and mode, input channels and normalization, the tile grid and blending
it was trained and evaluated with, and the decision tuned on its validation scans (null: argmax), so the file
alone is enough to predict.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from trainer.decision import probabilities

from . import EvaluateError
from .blend import MIN_WEIGHT, gaussian_profile
from .inference import load_model

SIGMA_SCALE = 0.125  # blend_tiles' default, what evaluate and predict use

FORMAT_VERSION = 2  # 2: "blend" holds the importance map's profile
READABLE = (1, 2)  # version 1's "blend" is the word "gaussian"; nothing else read here changed
PREFIX = "diamond_defects."
DEFAULT_OPSET = 17


class Probabilities(nn.Module):
    """The network with its probabilities as the output (the fused output for deep supervision)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        out = self.net(tiles)
        return probabilities(out[0] if isinstance(out, (tuple, list)) else out)


def metadata(meta: dict, checkpoint: str) -> dict[str, str]:
    """The ONNX metadata of a checkpoint's ``meta``: JSON text per key."""
    config = meta["config"]
    grid = meta.get("grid") or {"image_size": 1200, "tile": 400, "stride": 200}
    values = {
        "format_version": FORMAT_VERSION,
        "model": meta["model"],
        "classes": list(meta["classes"]),
        "mode": meta["mode"],
        "in_channels": int(meta["in_channels"]),
        "normalize": {"mean": config["normalize"]["mean"], "std": config["normalize"]["std"]},
        "input": "float32 tiles (N, C, H, W): uint8 pixels / 255, then (x - mean) / std per channel",
        "output": "float32 probabilities (N, K, H, W): softmax over the classes (binary: sigmoid of one)",
        "grid": grid,
        "blend": blend_metadata(int(grid["tile"])),
        "decision": meta.get("decision"),
        "checkpoint": checkpoint,
    }
    return {PREFIX + k: json.dumps(v) for k, v in values.items()}


def blend_metadata(tile: int) -> dict:
    """How tiles are blended, with the weights themselves: the gaussian importance map is the outer product of
    ``profile`` with itself, floored at max(its minimum, ``min_weight``), as ``evaluate.blend.importance_map``
    makes it (float32 values, exact in JSON)."""
    profile = gaussian_profile(tile, SIGMA_SCALE)
    return {"mode": "gaussian", "sigma_scale": SIGMA_SCALE, "min_weight": MIN_WEIGHT,
            "profile": [float(v) for v in profile]}


def read_metadata(path: str | Path) -> dict:
    """The ``diamond_defects.*`` metadata of an exported model, decoded; a file of another format version or
    without it is an EvaluateError."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if PREFIX + "format_version" not in props:
        raise EvaluateError(f"{path}: not a model exported by evaluate export (no {PREFIX}* metadata)")
    values = {k.removeprefix(PREFIX): json.loads(v) for k, v in props.items() if k.startswith(PREFIX)}
    if values["format_version"] not in READABLE:
        raise EvaluateError(f"{path}: export format version {values['format_version']}, this code reads "
                            f"versions {', '.join(map(str, READABLE))}")  # fmt: skip
    return values


def export(checkpoint: str, out: str | Path, opset: int = DEFAULT_OPSET) -> dict:
    """Write the checkpoint as ONNX to ``out``; returns a summary (path, bytes, opset, classes, grid)."""
    try:
        import onnx
    except ImportError:
        raise EvaluateError("evaluate export needs onnx: pip install onnx onnxruntime") from None
    model = load_model(checkpoint, torch.device("cpu"))
    meta = model.meta
    tile = int((meta.get("grid") or {}).get("tile", 400))
    example = torch.zeros(1, model.in_channels, tile, tile)
    graph = io.BytesIO()
    dynamic = {0: "batch", 2: "height", 3: "width"}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes it keeps dynamic, and the legacy exporter
            torch.onnx.export(Probabilities(model.net).eval(), (example,), graph, input_names=["tiles"],
                              output_names=["probabilities"], dynamic_axes={"tiles": dynamic, "probabilities": dynamic},
                              opset_version=opset, dynamo=False)  # fmt: skip
    except Exception as e:  # the exporter fails in many ways on an operator it cannot express
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvaluateError(f"{checkpoint}: model {meta['model']!r} cannot be exported to ONNX: {first}") from None
    proto = onnx.load_from_string(graph.getvalue())
    for key, value in metadata(meta, str(checkpoint)).items():
        proto.metadata_props.add(key=key, value=value)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    return {"onnx": str(out), "bytes": out.stat().st_size, "opset": opset, "model": meta["model"],
            "classes": list(meta["classes"]), "grid": meta.get("grid"), "decision": meta.get("decision") is not None}


class OnnxNet:
    """An exported model in ONNX Runtime, called like the network it replaces: it returns what
    ``trainer.decision.probabilities`` turns back into its probabilities (their logs, or a binary model's
    logit), so prediction, blending, TTA and decision run unchanged."""

    def __init__(self, path: str | Path, device: torch.device):
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider",) if device.type == "cuda" and p in available]
        self.session = ort.InferenceSession(str(path), providers=[*providers, "CPUExecutionProvider"])
        self.device = device

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        (probs,) = self.session.run(None, {"tiles": tiles.float().cpu().numpy()})
        p = torch.from_numpy(probs).to(self.device)
        if p.shape[1] == 1:
            return torch.logit(p)
        return torch.log(p)

    def eval(self) -> OnnxNet:
        return self


def onnx_meta(path: str | Path) -> dict:
    """A checkpoint's ``meta`` rebuilt from an exported model's metadata (what evaluate and predict read)."""
    m = read_metadata(path)
    n_classes = 1 if m["mode"] == "binary" else len(m["classes"])
    meta = {"model": m["model"], "in_channels": m["in_channels"], "n_classes": n_classes, "classes": m["classes"],
            "mode": m["mode"], "grid": m["grid"],
            "config": {"normalize": m["normalize"], "exported_from": m["checkpoint"]}}  # fmt: skip
    if m["decision"] is not None:
        meta["decision"] = m["decision"]
    return meta
