"""Predict one crust crop with an exported model, using numpy, Pillow, scipy and onnxruntime only.

    python examples/onnx_predict.py model.onnx crop.png classes.png

crop.png: a scan's crust crop at the model's grid size (`python -m evaluate predict --save-crops` writes
crops/); classes.png: the uint8 class id of every pixel (0: background), predict's map of that crop before
it goes back onto the scan. All but the network comes from the metadata (docs/evaluate-and-predict.md).
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image
from scipy import ndimage

EIGHT = np.ones((3, 3), bool)  # components are 8-connected


def predict(model_path: str, crop: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    raw = session.get_modelmeta().custom_metadata_map
    meta = {k.removeprefix("diamond_defects."): json.loads(v) for k, v in raw.items()}
    assert meta["format_version"] == 2, "this example reads export format version 2"
    size, t, stride = (meta["grid"][k] for k in ("image_size", "tile", "stride"))
    assert crop.shape[:2] == (size, size), f"the crop must be {size} px square"
    # Normalize as training did: uint8 / 255, then (x - mean) / std per channel.
    image = crop.reshape(size, size, -1).transpose(2, 0, 1).astype(np.float32)
    mean, std = (np.float32(meta["normalize"][k]).reshape(-1, 1, 1) for k in ("mean", "std"))
    image = image * (1 / (255 * std)) - mean / std
    # Tiles in row-major grid order, all in one batch.
    starts = range(0, size - t + 1, stride)
    corners = [(y, x) for y in starts for x in starts]
    (probs,) = session.run(None, {"tiles": np.stack([image[:, y:y + t, x:x + t] for y, x in corners])})
    # Blend: each tile's probabilities weighted by the stored importance map, divided by the summed weights.
    profile = np.float32(meta["blend"]["profile"])
    w = np.outer(profile, profile)
    w = np.maximum(w, max(w.min(), np.float32(meta["blend"]["min_weight"])))
    total, weight = np.zeros((probs.shape[1], size, size), np.float32), np.zeros((size, size), np.float32)
    for (y, x), p in zip(corners, probs, strict=True):
        total[:, y:y + t, x:x + t] += p * w
        weight[y:y + t, x:x + t] += w
    return decide(total / weight, meta["decision"])


def decide(p: np.ndarray, d: dict | None) -> np.ndarray:
    """(K, S, S) probabilities -> (S, S) class ids by the stored decision (null: argmax, or 0.5 if binary)."""
    min_peak = (d.get("min_peak") or [0.0] * len(d["thresholds"])) if d else []  # none: an older decision
    if p.shape[0] == 1:  # binary: the probability of a defect
        classes, conf = (p[0] >= (d["thresholds"][0] if d else 0.5)).astype(np.uint8), p[0]
    elif d is None:
        return p.argmax(0).astype(np.uint8)
    elif d["kind"] == "objects":  # where (1 - background), then one class per component: its largest sum
        defect = 1 - p[0]
        labels, n = ndimage.label(defect >= d["thresholds"][0], EIGHT)
        inside = labels > 0
        sums = np.stack([np.bincount(labels[inside], q[inside], n + 1)[1:] for q in p[1:]])
        cls = sums.argmax(0) + 1 if n else np.zeros(0, int)
        area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        peak = np.float64(ndimage.maximum(defect, labels, np.arange(1, n + 1)) if n else [])
        keep = (area >= np.take(d["min_area"], cls - 1)) & (peak >= np.take(min_peak, cls - 1))
        return np.concatenate([[0], np.where(keep, cls, 0)]).astype(np.uint8)[labels]
    else:  # "tuned": the likeliest defect class where it reaches that class's threshold ("defect": 1 - background)
        top, conf = p[1:].argmax(0), (1 - p[0] if d["kind"] == "defect" else p[1:].max(0))
        classes = np.where(conf >= np.float32(d["thresholds"])[top], top + 1, 0).astype(np.uint8)
    for c, (area, peak) in enumerate(zip(d["min_area"], min_peak, strict=True) if d else [], start=1):
        labels, n = ndimage.label(classes == c, EIGHT)  # drop components too small or never sure enough
        if n and (area > 1 or peak > 0):
            small = np.bincount(labels.ravel())[1:] < area
            weak = np.float64(ndimage.maximum(conf, labels, np.arange(1, n + 1))) < peak
            classes[np.concatenate([[False], small | weak])[labels]] = 0
    return classes


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    model, crop, out = sys.argv[1:]
    Image.fromarray(predict(model, np.asarray(Image.open(crop)))).save(out)
