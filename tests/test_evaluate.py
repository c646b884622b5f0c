"""python -m evaluate end to end on a tiny synthetic dataset and a 4-step U-Net: outputs, consistency of the
metrics with the written predictions, agreement with MONAI's sliding window, DDP, and one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from helpers import GRID, build_shards, tiny_dataset
from monai.inferers import sliding_window_inference
from PIL import Image

from evaluate.__main__ import main
from evaluate.inference import Model, Predictor, load_model
from evaluate.metrics import per_image_dice
from shardgen import schema
from shardgen.tiling import TileGrid

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def evaluated(tiny, tmp_path_factory):
    """One CLI run: batches of 16 tiles span images; one DataLoader worker decodes the shards."""
    out = tmp_path_factory.mktemp("eval")
    argv = ["--checkpoint", str(tiny.ckpt), "--data", str(tiny.shards), "--split", "test", "--out", str(out),
            "--device", "cpu", "--batch-size", "16", "--worst", "2", "--workers", "1",
            "--decision", "argmax", "--tta", "flips"]  # fmt: skip  (checked against argmax and flips here)
    assert main(argv) == 0
    return out


def _truth_from_tars(shards: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{image_id: (scan, truth)} reassembled straight from the test tars, without evaluate's reader."""
    tiles: dict[str, dict] = {}
    for tar_path in sorted(shards.glob("test-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                if ext in ("image.png", "mask.png"):
                    image_id, i, j = key.rsplit("_", 2)
                    pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())))
                    tiles.setdefault(image_id, {})[(int(i), int(j), ext)] = pixels
    out = {}
    for image_id, t in tiles.items():
        scan = np.zeros((GRID.image_size,) * 2, np.uint8)
        truth = np.zeros_like(scan)
        for i, j, y, x in GRID.positions():
            scan[y : y + GRID.tile, x : x + GRID.tile] = t[(i, j, "image.png")]
            truth[y : y + GRID.tile, x : x + GRID.tile] = t[(i, j, "mask.png")]
        out[image_id] = (scan, truth)
    return out


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_outputs(evaluated, tiny, capsys):
    manifest = schema.read_manifest(str(tiny.shards))
    ids = sorted(p.stem for p in evaluated.glob("predictions/*.png"))
    assert len(ids) == manifest["splits"]["test"]["images"] == 3
    assert sorted(p.stem for p in evaluated.glob("overlays/*.png")) == ids
    for image_id in ids:
        with Image.open(evaluated / "predictions" / f"{image_id}.png") as im:
            assert (im.mode, im.size) == ("L", (192, 192))
    metrics = json.loads((evaluated / "metrics.json").read_text())
    for key in (
        "miou",
        "per_class",
        "per_image_dice",
        "n_images",
        "confusion_matrix",
        "checkpoint",
        "config",
    ):
        assert key in metrics
    assert metrics["n_images"] == 3 and sorted(metrics["per_image_dice"]) == ids
    assert metrics["precision"] == "fp32"  # the tiny model trained with train.amp auto, on a CPU
    assert set(metrics["per_class"]) == set(manifest["classes"])
    for row in metrics["per_class"].values():
        assert {"iou", "dice", "precision", "recall", "object_recall", "object_precision"} <= set(row)
    lines = (evaluated / "per_image.csv").read_text().splitlines()
    assert lines[0].startswith("image_id,source_image,mean_dice,dice_Pinpoint")
    assert sorted(line.split(",")[0] for line in lines[1:]) == ids
    parser = _Images()
    parser.feed((evaluated / "report.html").read_text())
    files = [s for s in parser.srcs if not s.startswith("data:")]
    assert len(files) == 2  # --worst 2
    assert all((evaluated / unquote(s)).is_file() for s in files)


def test_metrics_equal_direct_computation(evaluated, tiny):
    """The confusion matrix, IoUs and per-image Dice follow from predictions/*.png and the shards' truth."""
    metrics = json.loads((evaluated / "metrics.json").read_text())
    names = schema.read_manifest(str(tiny.shards))["classes"]
    n = len(names)
    conf = np.zeros((n, n), np.int64)
    for image_id, (_, truth) in _truth_from_tars(tiny.shards).items():
        pred = np.asarray(Image.open(evaluated / "predictions" / f"{image_id}.png"))
        keep = truth != 255
        conf += np.bincount(truth[keep].astype(np.int64) * n + pred[keep], minlength=n * n).reshape(n, n)
        assert metrics["per_image_dice"][image_id] == pytest.approx(per_image_dice(pred, truth, n))
    assert metrics["confusion_matrix"] == conf.tolist()
    ious = []
    for c, name in enumerate(names):
        union = conf[c].sum() + conf[:, c].sum() - conf[c, c]
        got = metrics["per_class"][name]["iou"]
        assert got is None if union == 0 else got == pytest.approx(conf[c, c] / union)
        if c and union:
            ious.append(conf[c, c] / union)
    assert metrics["miou"] == pytest.approx(np.mean(ious))


def test_predictions_match_monai_sliding_window(evaluated, tiny):
    """Blended tile probabilities are MONAI's sliding_window_inference (overlap 0.5, gaussian) on the scan,
    each window's probabilities averaged over its four flips (--tta flips)."""
    model = load_model(str(tiny.ckpt), torch.device("cpu"))

    def probs(x):
        x = model.normalize.normalize(x)
        views = [(), (3,), (2,), (2, 3)]  # identity, horizontal, vertical, both
        return sum(torch.softmax(model.net(x.flip(v)), dim=1).flip(v) for v in views) / 4

    for image_id, (scan, _) in _truth_from_tars(tiny.shards).items():
        x = torch.from_numpy(scan)[None, None] / 255.0  # normalize takes a float image as [0, 1]
        with torch.no_grad():
            ref = sliding_window_inference(x, (64, 64), 25, probs, overlap=0.5, mode="gaussian")[0]
        pred = torch.from_numpy(np.asarray(Image.open(evaluated / "predictions" / f"{image_id}.png")).copy())
        top2 = ref.topk(2, dim=0).values
        gap = (top2[0] - top2[1])[pred.long() != ref.argmax(0)]
        assert gap.numel() == 0 or gap.max().item() < 1e-4  # float sums in another order flip only near-ties


def test_batches_spanning_images_give_the_same_maps(tiny):
    model = load_model(str(tiny.ckpt), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (GRID.count, 1, 64, 64), dtype=torch.uint8, generator=g) for _ in range(3)
    ]
    ref = [
        m
        for m, _ in Predictor(model, GRID, batch_size=GRID.count).predict(
            (t, k) for k, t in enumerate(images)
        )
    ]
    for batch in (1, 7, 60):
        out = list(Predictor(model, GRID, batch_size=batch).predict((t, k) for k, t in enumerate(images)))
        assert [k for _, k in out] == [0, 1, 2]
        for (m, _), r in zip(out, ref, strict=True):
            assert (m == r).mean() > 0.999  # batch-dependent float order may flip near-ties


def test_binary_model_thresholds_sigmoid():
    net = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(0.0)
    from trainer.augment import AugmentConfig, GpuAugment, NormalizeConfig

    norm = GpuAugment(AugmentConfig(enabled=False), NormalizeConfig()).eval()
    model = Model(net.eval(), norm, {"classes": ["background", "defect"]}, "x.pt", torch.device("cpu"))
    grid = TileGrid(8, 4, 2)
    scan = torch.zeros(8, 8, dtype=torch.uint8)
    scan[:, 4:] = 255  # normalized to +1: sigmoid 0.73 > 0.5; 0 -> -1: 0.27
    tiles = torch.stack([scan[y : y + 4, x : x + 4][None] for _, _, y, x in grid.positions()])
    ((pred, _),) = Predictor(model, grid, batch_size=4).predict([(tiles, None)])
    assert pred.dtype == np.uint8 and (pred == (scan.numpy() > 0)).all()


@pytest.mark.timeout(240)
def test_torchrun_two_ranks_equal_one(evaluated, tiny, tmp_path):
    """Images dealt round-robin to 2 gloo ranks: the same metrics, every image written once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "evaluate", "--checkpoint", str(tiny.ckpt), "--data", str(tiny.shards),
           "--out", str(tmp_path), "--device", "cpu", "--batch-size", "16", "--worst", "2",
           "--workers", "0", "--decision", "argmax", "--tta", "flips"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("defect IoU") == 1  # only rank 0 reports
    one = json.loads((evaluated / "metrics.json").read_text())
    two = json.loads((tmp_path / "metrics.json").read_text())
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert two["per_image_dice"].keys() == one["per_image_dice"].keys()
    for image_id, dice in one["per_image_dice"].items():
        assert two["per_image_dice"][image_id] == pytest.approx(dice)
    assert two["per_class"] == one["per_class"]  # the same summed counts give the same numbers
    assert two["any_defect"] == one["any_defect"] and two["object_confusion"] == one["object_confusion"]
    assert two["config"]["evaluate"]["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == sorted(
        p.name for p in (evaluated / "predictions").iterdir()
    )


# ------------------------------------------------------------------------------------------------ errors


def _fails(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]  # after the progress bar, if it started
    assert err.startswith("evaluate: error:") and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in err, err
    return err


def _argv(ckpt, data, out):
    return [
        "--checkpoint",
        str(ckpt),
        "--data",
        str(data),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--workers",
        "0",
    ]


def test_missing_and_corrupt_checkpoint(tiny, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    _fails(capsys, _argv(missing, tiny.shards, tmp_path / "o1"), str(missing), "not found")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(tiny.ckpt.read_bytes()[:3000])
    _fails(capsys, _argv(corrupt, tiny.shards, tmp_path / "o2"), str(corrupt), "not a readable checkpoint")


def test_checkpoint_for_other_classes(tiny, tmp_path, capsys):
    binary = tmp_path / "binary"
    build_shards(tiny.raw, binary, mode="binary")
    _fails(capsys, _argv(tiny.ckpt, binary, tmp_path / "o"), "11 classes (multiclass)", "2 classes (binary)")


def test_missing_manifest(tiny, tmp_path, capsys):
    _fails(capsys, _argv(tiny.ckpt, tmp_path, tmp_path / "o"), "manifest.json", "no manifest")


def _rewrite_first_test_shard(tiny, dest: Path, edit) -> str:
    """A copy of the shards whose test-000000.tar went through ``edit(key, ext, data) -> data | None``
    (None drops the member); the manifest's sample count follows. Returns the first image's id."""
    dest.mkdir()
    manifest = json.loads((tiny.shards / "manifest.json").read_text())
    for shard in tiny.shards.glob("*.tar"):
        (dest / shard.name).write_bytes(shard.read_bytes())
    keys = set()
    with (
        tarfile.open(tiny.shards / "test-000000.tar") as src,
        tarfile.open(dest / "test-000000.tar", "w") as out,
    ):
        for m in src.getmembers():
            key, _, ext = m.name.partition(".")
            data = edit(key, ext, src.extractfile(m).read())
            if data is not None:
                keys.add(key)
                m.size = len(data)
                out.addfile(m, io.BytesIO(data))
    manifest["splits"]["test"]["shards"][0]["samples"] = len(keys)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return min(keys).rsplit("_", 2)[0]


def test_incomplete_image_is_named(tiny, tmp_path, capsys):
    image_id = _rewrite_first_test_shard(
        tiny, tmp_path / "shards", lambda key, ext, data: None if key.endswith("_2_3") else data
    )
    out = tmp_path / "o"
    err = _fails(capsys, _argv(tiny.ckpt, tmp_path / "shards", out), f"image {image_id!r}", "test-000000.tar")
    assert "24 of 25 tiles" in err and "2_3" in err
    assert not (out / "metrics.json").exists()


def test_corrupt_sample_is_named(tiny, tmp_path, capsys):
    def garble(key, ext, data):
        return b"not a png" if key.endswith("_1_1") and ext == "mask.png" else data

    image_id = _rewrite_first_test_shard(tiny, tmp_path / "shards", garble)
    out = tmp_path / "o"
    _fails(
        capsys,
        _argv(tiny.ckpt, tmp_path / "shards", out),
        "test-000000.tar",
        f"{image_id}_1_1",
        "cannot decode",
    )
    assert not (out / "metrics.json").exists()
