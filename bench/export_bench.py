"""Benchmark: the network's forward in ONNX Runtime (fp32, CPU provider) against eager PyTorch fp32, side by side.

    python bench/export_bench.py                     # demo model and research U-Net, 400 px tiles, batch 4
    python bench/export_bench.py --tile 256 --batch 8 --repeats 10

Both models get random weights (speed does not depend on them) and are exported the way ``evaluate export``
exports a checkpoint (``evaluate.export.Probabilities``: the probabilities are the output, dynamic batch and
size, opset 17). Both runtimes use the same number of threads (every usable core) and see the same tiles;
each path is timed over ``--repeats`` batches after two warm-up batches, best of 3 rounds, round-robin, so
load on a shared machine falls on both. Goal (issue 25): ONNX Runtime >= 1.3x PyTorch on the research U-Net.
Whole ``evaluate predict`` scans per second are not timed here yet.
"""

from __future__ import annotations

import argparse
import io
import sys
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tile", type=int, default=400, help="tile side (default 400)")
    p.add_argument("--batch", type=int, default=4, help="tiles per forward (default 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed batches per round (default 5)")
    args = p.parse_args()
    threads = common.usable_cores()
    torch.set_num_threads(threads)
    common.print_machine()
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


if __name__ == "__main__":
    main()
