"""evaluate export: every architecture as ONNX, equal to PyTorch in ONNX Runtime, its metadata complete."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import tiny_dataset

from evaluate.__main__ import main as evaluate_main
from evaluate.export import FORMAT_VERSION, Probabilities, read_metadata
from evaluate.inference import load_model
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
    assert got["grid"] == meta["grid"] and got["decision"] == meta["decision"] and got["blend"] == "gaussian"
    assert got["normalize"] == {k: meta["config"]["normalize"][k] for k in ("mean", "std")}


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
