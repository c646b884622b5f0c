"""Benchmark: the network's forward in ONNX Runtime (fp32, CPU provider) against eager PyTorch fp32, side by side.

    python bench/export_bench.py                     # demo model and research U-Net, 400 px tiles, batch 4
    python bench/export_bench.py --tile 256 --batch 8 --repeats 10
    python bench/export_bench.py --checkpoint demo_out/run/best.pt --scans 6   # + whole scans (after make demo)

Both models get random weights (speed does not depend on them) and are exported the way ``evaluate export``
exports a checkpoint (``evaluate.export.Probabilities``: the probabilities are the output, dynamic batch and
size, opset 17). Both runtimes use the same number of threads (every usable core) and see the same tiles;
each path is timed over ``--repeats`` batches after two warm-up batches, best of 3 rounds, round-robin, so
load on a shared machine falls on both. Goal (issue 25): ONNX Runtime >= 1.3x PyTorch on the research U-Net.

Whole scans (with a trained ``--checkpoint``; ``make demo``'s by default, skipped when it is missing):
``evaluate predict`` on ``--scans`` synthetic scans of a seed nothing else uses (crust crop, tiling, blending,
decision, outlines, overlays and XML included), scans per second, best of 3 rounds, for the checkpoint in
eager PyTorch fp32 and its export in ONNX Runtime fp32, and, reported apart from the fp32 goal, two
reduced-precision variants: PyTorch with CPU bf16 autocast (where the CPU has native bf16) and the export
quantized to int8 by ONNX Runtime (static, QDQ, per-channel weights, calibrated on crops of other scans). A
variant counts only when its class maps agree with fp32's: per-class IoU >= 0.99 pooled over the scans and
the same number of objects (8-connected components) per class.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from evaluate.export import Probabilities  # noqa: E402
from trainer.models import build_model  # noqa: E402

GOAL = 1.3
IOU_FLOOR = 0.99  # a reduced-precision variant counts only at this per-class IoU against fp32
SCAN_SEED = 23  # whole-scan timing scans; calibration crops come from SCAN_SEED + 1
MODELS = {  # name: (architecture, kwargs)
    "demo U-Net (stem 2, 1.1 M)": ("unet", {"channels": [12, 24, 48, 96, 192], "stem": 2}),
    "research U-Net (3.2 M)": ("unet", {}),
}


def onnx_session(net: torch.nn.Module, tile: int, threads: int) -> ort.InferenceSession:
    graph = io.BytesIO()
    dynamic = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Probabilities(net).eval(), (torch.zeros(1, 1, tile, tile),), graph, input_names=["tiles"],
                          output_names=["probabilities"], dynamic_axes={"tiles": dynamic, "probabilities": dynamic},
                          opset_version=17, dynamo=False)  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(graph.getvalue(), options, providers=["CPUExecutionProvider"])


def rate(run, batch: int, repeats: int) -> float:
    for _ in range(2):
        run()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    return repeats * batch / (time.perf_counter() - t0)


def forward(args, threads: int) -> None:
    """The network alone: tiles/s of each model in eager PyTorch and in ONNX Runtime, fp32."""
    print(f"export: {args.batch} tiles of {args.tile} px per forward, fp32, {threads} threads each, best of 3\n")
    x = torch.randn(args.batch, 1, args.tile, args.tile, generator=torch.Generator().manual_seed(0))
    rows, ratios = [], []
    for label, (name, kwargs) in MODELS.items():
        torch.manual_seed(0)
        net = build_model(name, 1, 11, **kwargs).eval()
        session = onnx_session(net, args.tile, threads)
        wrapped = Probabilities(net).eval()
        feed = {"tiles": x.numpy()}

        def eager(wrapped=wrapped):
            with torch.no_grad():
                wrapped(x)

        def onnx(session=session, feed=feed):
            session.run(None, feed)

        best = {"PyTorch eager": 0.0, "ONNX Runtime": 0.0}
        for _ in range(3):
            best["PyTorch eager"] = max(best["PyTorch eager"], rate(eager, args.batch, args.repeats))
            best["ONNX Runtime"] = max(best["ONNX Runtime"], rate(onnx, args.batch, args.repeats))
        with torch.no_grad():
            diff = float(np.abs(session.run(None, feed)[0] - wrapped(x).numpy()).max())
        for path, value in best.items():
            rows.append([f"{label}: {path}", value, value / best["PyTorch eager"]])
        ratios.append((label, best["ONNX Runtime"] / best["PyTorch eager"], diff))
    common.print_table(["path", "tiles/s", "vs eager"], rows)
    for label, ratio, diff in ratios:
        print(f"{label}: largest probability difference {diff:.1e}")
        if label.startswith("research"):
            print(common.ratio_line(f"{label}: ONNX Runtime / PyTorch eager", ratio, GOAL))
        else:
            print(f"{label}: ONNX Runtime / PyTorch eager: {ratio:.2f}x (no goal)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tile", type=int, default=400, help="tile side (default 400)")
    p.add_argument("--batch", type=int, default=4, help="tiles per forward (default 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed batches per round (default 5)")
    p.add_argument("--checkpoint", default="demo_out/run/best.pt",
                   help="trained checkpoint for the whole-scan timing (default: make demo's)")
    p.add_argument("--scans", type=int, default=6, help="synthetic scans for the whole-scan timing (default 6)")
    p.add_argument("--skip-forward", action="store_true", help="time whole scans only")
    args = p.parse_args()
    threads = common.usable_cores()
    torch.set_num_threads(threads)
    common.print_machine()
    if not args.skip_forward:
        forward(args, threads)
    if Path(args.checkpoint).is_file():
        whole_scans(args.checkpoint, args.scans, threads)
    else:
        print(f"\nwhole scans: skipped, no checkpoint {args.checkpoint} (run make demo, or pass --checkpoint)")


def quantized(model: Path, calibration: list[np.ndarray], out: Path) -> Path:
    """``model`` quantized to int8 by ONNX Runtime (static, QDQ, per-channel), its metadata kept."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"tiles": t} for t in calibration])

        def get_next(self):
            return next(self.items, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice on every normalization weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    root.setLevel(level)
    proto, source = onnx.load(str(out)), onnx.load(str(model))
    del proto.metadata_props[:]
    proto.metadata_props.extend(source.metadata_props)
    onnx.save(proto, str(out))
    return out


def calibration_tiles(model, images: Path, count: int = 8) -> list[np.ndarray]:
    """Normalized (1, C, t, t) tiles of other scans' crust crops, as the network sees them."""
    from evaluate.predict import list_scans, load_scan, resolve_grid, tiles_of

    grid = resolve_grid(model.meta, None, None, None)
    tiles = []
    for _, path in list_scans(str(images)):
        _, resized, _ = load_scan(str(images), path, model.in_channels, grid.image_size)
        tiles += [model.normalize.normalize(t[None]).numpy() for t in tiles_of(resized, grid)[::2]]
    return tiles[:count]


def agreement(reference: Path, other: Path, n_classes: int) -> tuple[float, bool]:
    """(lowest per-class IoU pooled over the scans, same object count per class) of two predict outputs."""
    from PIL import Image
    from scipy import ndimage

    inter, union = np.zeros(n_classes), np.zeros(n_classes)
    same = True
    for path in sorted((reference / "masks").glob("*.png")):
        a, b = np.asarray(Image.open(path)), np.asarray(Image.open(other / "masks" / path.name))
        for c in range(1, n_classes):
            inter[c] += ((a == c) & (b == c)).sum()
            union[c] += ((a == c) | (b == c)).sum()
            eight = np.ones((3, 3))
            same &= ndimage.label(a == c, eight)[1] == ndimage.label(b == c, eight)[1]
    present = union > 0
    return (float((inter[present] / union[present]).min()) if present.any() else 1.0), bool(same)


def whole_scans(checkpoint: str, scans: int, threads: int) -> None:
    """``evaluate predict`` scans/s: PyTorch fp32 vs ONNX Runtime fp32, and the reduced-precision variants."""
    from evaluate import inference, predict
    from evaluate.export import export
    from evaluate.predict import PredictOptions, predict_scans
    from shardgen.synth import write_synthetic
    from trainer import precision

    predict.tqdm = lambda items, **_: items  # predict's progress bar, once per path and round
    model = inference.load_model(checkpoint, torch.device("cpu"))
    size = (model.meta.get("grid") or {}).get("image_size", 1200)
    root = Path(tempfile.mkdtemp(prefix="export_bench_"))
    try:
        write_synthetic(root / "scans", scans, SCAN_SEED, size_range=common.synth_size_range(size))
        write_synthetic(root / "calib", 2, SCAN_SEED + 1, size_range=common.synth_size_range(size))
        fp32 = Path(export(checkpoint, root / "model.onnx")["onnx"])
        int8 = quantized(fp32, calibration_tiles(model, root / "calib" / "images"), root / "model.int8.onnx")

        @contextlib.contextmanager
        def bf16():  # predict's Predictor with CPU bf16 autocast instead of fp32
            plain = inference.autocast
            inference.autocast = lambda device, amp: precision.autocast(device, "bf16")
            try:
                yield
            finally:
                inference.autocast = plain

        paths = {"PyTorch fp32": (checkpoint, contextlib.nullcontext), "ONNX Runtime fp32": (str(fp32), None)}
        if precision.cpu_bf16_native():
            paths["PyTorch bf16 autocast"] = (checkpoint, bf16)
        paths["ONNX Runtime int8 (QDQ)"] = (str(int8), None)
        best = dict.fromkeys(paths, 0.0)
        for _ in range(3):
            for label, (source, context) in paths.items():
                with (context or contextlib.nullcontext)():
                    t0 = time.perf_counter()
                    predict_scans(PredictOptions(source, str(root / "scans" / "images"), str(root / label),
                                                 device="cpu"))  # fmt: skip
                    best[label] = max(best[label], scans / (time.perf_counter() - t0))
        print(f"\nwhole scans: evaluate predict on {scans} synthetic scans (seed {SCAN_SEED}), {checkpoint}, "
              f"{threads} threads, best of 3\n")  # fmt: skip
        rows = []
        for label, value in best.items():
            iou, same = agreement(root / "PyTorch fp32", root / label, len(model.class_names))
            counts = "n/a" if label == "PyTorch fp32" else ("yes" if iou >= IOU_FLOOR and same else "no")
            rows.append([label, value, value / best["PyTorch fp32"], f"{iou:.4f}", "yes" if same else "no", counts])
        common.print_table(["path", "scans/s", "vs PyTorch fp32", "min class IoU", "same objects", "counts"], rows)
        print(f"whole scans: ONNX Runtime fp32 / PyTorch fp32: {best['ONNX Runtime fp32'] / best['PyTorch fp32']:.2f}x "
              f"(reduced precision reported apart; counts: per-class IoU >= {IOU_FLOOR} and same objects vs fp32)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
