"""evaluate export: every architecture as ONNX, equal to PyTorch in ONNX Runtime, its metadata complete."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import tiny_dataset, with_decision

from evaluate import EvaluateError
from evaluate.__main__ import main as evaluate_main
from evaluate.export import FORMAT_VERSION, Probabilities, read_metadata
from evaluate.inference import load_model
from shardgen.crust import uncrop
from trainer import checkpoint
from trainer.models import build_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def _checkpoint_of(tiny, tmp_path, name: str, kwargs: dict):
    state = checkpoint.load(str(tiny.ckpt))
    meta = state["meta"]
    torch.manual_seed(0)
    net = build_model(name, meta["in_channels"], meta["n_classes"], **kwargs)
    state["model"] = net.state_dict()
    meta["model"], meta["config"]["model"] = name, {"name": name, "kwargs": kwargs}
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("name, kwargs", [
    ("unet", {"channels": [4, 6, 8, 10, 12], "stem": 2}),
    ("u2netp", {}),
    ("u2net", {}),
    ("resnet_unet", {}),
])  # fmt: skip
def test_every_architecture_exports_and_runs_as_pytorch_does(tiny, tmp_path, capsys, name, kwargs):
    ckpt = _checkpoint_of(tiny, tmp_path, name, kwargs)
    out = tmp_path / f"{name}.onnx"
    assert evaluate_main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["onnx"] == str(out) and summary["model"] == name
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = load_model(str(ckpt), torch.device("cpu"))
    for shape in [(2, 1, 64, 64), (1, 1, 96, 128)]:  # dynamic batch, height and width
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        (ours,) = session.run(None, {"tiles": x.numpy()})
        with torch.no_grad():
            theirs = Probabilities(model.net)(x).numpy()
        assert ours.shape == theirs.shape == (shape[0], 11, *shape[2:])
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_the_metadata_is_enough_to_predict(tiny, tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    assert evaluate_main(["export", "--checkpoint", str(tiny.ckpt), "--out", str(out)]) == 0
    meta = checkpoint.load(str(tiny.ckpt))["meta"]
    got = read_metadata(out)
    assert got["format_version"] == FORMAT_VERSION and got["classes"] == meta["classes"]
    assert got["mode"] == meta["mode"] and got["in_channels"] == meta["in_channels"]
    assert got["grid"] == meta["grid"] and got["decision"] == meta["decision"]
    assert got["blend"]["mode"] == "gaussian" and len(got["blend"]["profile"]) == meta["grid"]["tile"]
    assert got["normalize"] == {k: meta["config"]["normalize"][k] for k in ("mean", "std")}
    # A version-1 export (the blend named, not stored) still predicts; an unknown version is refused.
    import onnx

    proto = onnx.load(str(out))
    for version, blend in ((1, "gaussian"), (3, "gaussian")):
        for prop in proto.metadata_props:
            if prop.key == "diamond_defects.format_version":
                prop.value = str(version)
            if prop.key == "diamond_defects.blend":
                prop.value = json.dumps(blend)
        onnx.save(proto, str(tmp_path / f"v{version}.onnx"))
    assert load_model(str(tmp_path / "v1.onnx"), torch.device("cpu")).meta["grid"] == meta["grid"]
    with pytest.raises(EvaluateError, match="export format version 3, this code reads versions 1, 2"):
        read_metadata(tmp_path / "v3.onnx")


def test_a_model_the_exporter_cannot_express_is_a_one_line_error(tiny, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::weird' to ONNX opset version 17 is not supported.\nmore")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    assert evaluate_main(["export", "--checkpoint", str(tiny.ckpt), "--out", str(tmp_path / "x.onnx")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"evaluate: error: {tiny.ckpt}: model 'unet' cannot be exported to ONNX: Exporting the operator "
                   "'aten::weird' to ONNX opset version 17 is not supported."]  # fmt: skip


def test_predict_and_evaluate_through_onnx_runtime_match_pytorch(tiny, tmp_path, capsys):
    from PIL import Image
    from scipy import ndimage

    model = tmp_path / "tiny.onnx"
    assert evaluate_main(["export", "--checkpoint", str(tiny.ckpt), "--out", str(model)]) == 0
    for flag, source, out in (("--checkpoint", tiny.ckpt, "pt"), ("--model", model, "onnx")):
        assert evaluate_main(["predict", flag, str(source), "--images", str(tiny.raw / "images"), "--out",
                              str(tmp_path / out), "--device", "cpu"]) == 0  # fmt: skip
        assert evaluate_main([flag, str(source), "--data", str(tiny.shards), "--out", str(tmp_path / f"e{out}"),
                              "--device", "cpu", "--workers", "0"]) == 0  # fmt: skip
    capsys.readouterr()
    masks = sorted((tmp_path / "pt" / "masks").glob("*.png"))
    assert masks
    for path in masks:
        a, b = np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "onnx" / "masks" / path.name))
        for c in range(1, 11):
            union = ((a == c) | (b == c)).sum()
            assert not union or ((a == c) & (b == c)).sum() / union >= 0.999, (path.name, c)
            assert ndimage.label(a == c, np.ones((3, 3)))[1] == ndimage.label(b == c, np.ones((3, 3)))[1]
    ours, theirs = (json.loads((tmp_path / f"e{o}" / "metrics.json").read_text()) for o in ("onnx", "pt"))
    assert ours["any_defect"]["pred_objects"] == theirs["any_defect"]["pred_objects"]
    assert abs((ours["miou"] or 0) - (theirs["miou"] or 0)) < 1e-3


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "onnx_predict.py"


def _with_decision(tiny, tmp_path, name: str, mode: str, decision: dict | None) -> Path:
    """The tiny checkpoint (or a seeded binary U-Net's) with ``decision`` as its stored decision, exported."""
    ckpt = with_decision(tiny.ckpt, tmp_path / f"{name}.pt", decision, binary=mode == "binary")
    assert evaluate_main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / f"{name}.onnx")]) == 0
    return tmp_path / f"{name}.onnx"


def test_the_standalone_example_reproduces_predict(tiny, tmp_path, capsys):
    """examples/onnx_predict.py (numpy, Pillow, scipy, onnxruntime only) gives predict's class map of each saved
    crop, under every kind of stored decision."""
    from PIL import Image
    from scipy import ndimage

    from evaluate.predict import load_scan

    tree = ast.walk(ast.parse(EXAMPLE.read_text()))
    imports = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
               for n in tree if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}  # fmt: skip
    assert imports <= {"json", "sys", "numpy", "onnxruntime", "PIL", "scipy"}, imports
    assert len(EXAMPLE.read_text().splitlines()) <= 80
    spec = importlib.util.spec_from_file_location("onnx_predict", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cases = {  # the tiny model is 4 steps old: thresholds and areas that leave it something to find and to drop
        "tuned": ("multiclass", {"kind": "tuned", "thresholds": [0.12, 0.2, 0.15, 0.13, 0.12, 0.14, 0.13, 0.13, 0.15,
                                                                0.12],
                                 "min_area": [3, 0, 40] + [9] * 7, "min_peak": [0.0, 0.0, 0.2] + [0.13] * 7}),
        "defect": ("multiclass", {"kind": "defect", "thresholds": [0.905, 0.91, 0.9] + [0.905] * 7,
                                  "min_area": [3, 0, 40] + [9] * 7, "min_peak": [0.0, 0.0, 0.91] + [0.915] * 7}),
        "objects": ("multiclass", {"kind": "objects", "thresholds": [0.905] * 10, "min_area": [3] * 10,
                                   "min_peak": [0.915] * 10}),
        "argmax": ("multiclass", None),
        "older": ("multiclass", {"kind": "tuned", "thresholds": [0.13] * 10, "min_area": [9] * 10}),  # no min_peak
        "binary-argmax": ("binary", None),
        "binary": ("binary", {"kind": "tuned", "thresholds": [0.47], "min_area": [4], "min_peak": [0.55]}),
    }  # fmt: skip
    for name, (mode, decision) in cases.items():
        model = _with_decision(tiny, tmp_path, name, mode, decision)
        out, size = tmp_path / f"p_{name}", read_metadata(model)["grid"]["image_size"]
        assert evaluate_main(["predict", "--model", str(model), "--images", str(tiny.raw / "images"), "--out",
                              str(out), "--device", "cpu", "--save-crops"]) == 0  # fmt: skip
        crops = sorted((out / "crops").glob("*.png"))
        assert len(crops) == len(list((out / "masks").glob("*.png"))) == 8
        found = 0
        for crop in crops:
            scan = next((tiny.raw / "images").glob(crop.stem + ".*"))
            _, resized, geom = load_scan(str(tiny.raw / "images"), str(scan), 1, size)
            assert np.array_equal(np.asarray(Image.open(crop)), resized)  # the crop is what the model saw
            ours = uncrop(example.predict(str(model), resized), geom)
            theirs = np.asarray(Image.open(out / "masks" / crop.name))
            for c in range(1, int(max(ours.max(), theirs.max())) + 1):
                union = ((ours == c) | (theirs == c)).sum()
                assert not union or ((ours == c) & (theirs == c)).sum() / union >= 0.999, (name, crop.name, c)
                n = ndimage.label(theirs == c, np.ones((3, 3)))[1]
                assert ndimage.label(ours == c, np.ones((3, 3)))[1] == n, (name, crop.name, c)
                found += n
        assert found, f"{name}: nothing predicted, nothing compared"
    classes = tmp_path / "classes.png"  # and from the command line
    subprocess.run([sys.executable, str(EXAMPLE), str(model), str(crops[0]), str(classes)], check=True)
    expected = example.predict(str(model), np.asarray(Image.open(crops[0])))
    assert np.array_equal(np.asarray(Image.open(classes)), expected)
