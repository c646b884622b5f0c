"""evaluate rank: every scan scored, a deterministic order, and a task folder CVAT's importer reads."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import decided_checkpoint, tiny_dataset

from evaluate.__main__ import main as evaluate_main
from evaluate.rank import deciding_probability, signals, thresholds_of
from shardgen.cvat import parse_cvat
from trainer.decision import Decision


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory):
    return decided_checkpoint(tiny, tmp_path_factory)


def _rank(capsys, ckpt, images, out, *extra) -> dict:
    assert evaluate_main(["rank", "--checkpoint", str(ckpt), "--images", str(images), "--top", "3", "--out",
                          str(out), "--device", "cpu", *extra]) == 0  # fmt: skip
    return json.loads(capsys.readouterr().out)


def _rows(out) -> list[dict]:
    with open(out / "ranking.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_rank_writes_a_task_folder_cvat_imports(tiny, ckpt, tmp_path, capsys):
    from datumaro.components.annotation import AnnotationType
    from datumaro.components.dataset import Dataset

    images = tiny.raw / "images"
    summary = _rank(capsys, ckpt, images, tmp_path / "task")
    rows = _rows(tmp_path / "task")
    assert len(rows) == summary["scans"] == 8
    assert [int(r["rank"]) for r in rows] == list(range(1, 9))
    keys = [(-float(r["score"]), r["image"]) for r in rows]
    assert keys == sorted(keys)  # best first, ties by name
    assert all(r["score"] == r["disagreement"] for r in rows)
    assert len({r["score"] for r in rows}) > 1, "every scan scored alike: the ranking says nothing"
    top = [r["image"] for r in rows[:3]]
    assert summary["task"] == top and [r["in_task"] for r in rows] == ["1"] * 3 + ["0"] * 5
    assert all(r["reasons"].startswith("flips disagree on ") for r in rows)
    task = tmp_path / "task"
    assert sorted(p.name for p in (task / "images").iterdir()) == sorted(top)
    for name in top:
        assert (task / "images" / name).read_bytes() == (images / name).read_bytes()
    xml = parse_cvat(task / "annotations.xml")
    assert [a.name for a in xml] == top and sum(len(a.shapes) for a in xml) > 0
    dataset = Dataset.import_from(str(task), "cvat")
    labels = dataset.categories()[AnnotationType.label]
    assert [labels.items[k].name for k in range(len(labels.items))] == _class_names(ckpt)[1:]
    items = {item.id: item for item in dataset}
    assert sorted(items) == sorted(n.rsplit(".", 1)[0] for n in top)
    for a in xml:
        item = items[a.name.rsplit(".", 1)[0]]
        assert item.media.size == (a.height, a.width) and item.media.has_data
        assert len(item.annotations) == len(a.shapes)

    # The same scans again: the same order, the same task (rank replaces the scans it put there).
    _rank(capsys, ckpt, images, task)
    assert _rows(task) == rows
    assert sorted(p.name for p in (task / "images").iterdir()) == sorted(top)


def test_rank_never_deletes_scans_it_did_not_write(tiny, ckpt, tmp_path, capsys):
    images = tmp_path / "batch" / "images"
    images.mkdir(parents=True)
    for scan in sorted((tiny.raw / "images").glob("*.png"))[:3]:
        (images / scan.name).write_bytes(scan.read_bytes())
    args = ["rank", "--checkpoint", str(ckpt), "--top", "2", "--device", "cpu", "--images", str(images)]
    assert evaluate_main([*args, "--out", str(tmp_path / "batch")]) == 2  # its images/ is the input folder
    assert capsys.readouterr().err.strip() == (f"evaluate: error: --out {tmp_path / 'batch'}: its images/ is the "
                                               "--images folder, whose scans rank would replace; choose another --out")
    assert len(list(images.iterdir())) == 3
    (tmp_path / "task" / "images").mkdir(parents=True)
    (tmp_path / "task" / "images" / "mine.png").write_bytes(b"kept")
    assert evaluate_main([*args, "--out", str(tmp_path / "task")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("holds 1 scans an earlier rank did not put there (mine.png): empty it or choose another --out")
    assert (tmp_path / "task" / "images" / "mine.png").read_bytes() == b"kept"


def _class_names(ckpt) -> list[str]:
    from trainer import checkpoint

    return list(checkpoint.load(str(ckpt))["meta"]["classes"])


def test_rank_by_entropy_and_bad_options(tiny, ckpt, tmp_path, capsys):
    summary = _rank(capsys, ckpt, tiny.raw / "images", tmp_path / "e", "--score", "entropy")
    rows = _rows(tmp_path / "e")
    assert summary["score"] == "entropy" and all(r["score"] == r["entropy"] for r in rows)
    assert evaluate_main(["rank", "--checkpoint", str(ckpt), "--images", str(tiny.raw / "images"), "--top", "0",
                          "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip() == "evaluate: error: --top must be >= 1, got 0"


def test_signals_measure_what_they_say():
    """Four views that agree score 0 disagreement; one view that names a defect differently scores its share."""
    probs = np.zeros((3, 20, 20), np.float32)
    probs[0] = 1.0
    probs[:, 5:10, 5:10] = np.array([0.1, 0.8, 0.1], np.float32)[:, None, None]  # a sure class-1 defect
    import torch

    view = torch.from_numpy(probs)
    decision = Decision("tuned", [0.5, 0.5], [0, 0])
    same = [decision(view)] * 4
    t = thresholds_of(decision, 2)
    s = signals([view] * 4, same, t, deciding_probability(view, decision))
    assert s["disagreement"] == 0 and s["defects"] == 1 and s["near_threshold"] == 0 and s["possible_misses"] == 0
    other = same[0].copy()
    other[5:7, 5:10] = 2  # 10 of the 25 defect pixels named otherwise by one view
    s = signals([view] * 4, [*same[:3], other], t, deciding_probability(view, decision))
    assert s["disagreement"] == pytest.approx(10 / 25)
    weak = view.clone()
    weak[:, 12:15, 12:15] = torch.tensor([0.7, 0.3, 0.0])[:, None, None]  # below 0.5, above half of it
    s = signals([weak] * 4, [decision(weak)] * 4, t, deciding_probability(weak, decision))
    assert s["possible_misses"] == 1 and s["entropy"] > 0
    unsure = view.clone()
    unsure[:, 5:10, 5:10] = torch.tensor([0.4, 0.55, 0.05])[:, None, None]  # decided, but barely
    s = signals([unsure] * 4, [decision(unsure)] * 4, t, deciding_probability(unsure, decision))
    assert s["defects"] == 1 and s["near_threshold"] == 1


def test_the_near_threshold_count_reads_what_the_decision_reads():
    """Under a ``defect`` decision a pixel split 0.35 / 0.40 between two classes (background 0.25) is compared
    on its defect probability (0.75), so that is what ranking reads near the thresholds; per class it is 0.40."""
    import torch

    probs = torch.zeros(3, 4, 4)
    probs[0] = 1.0
    probs[:, 1:3, 1:3] = torch.tensor([0.25, 0.35, 0.40])[:, None, None]
    defect = deciding_probability(probs, Decision("defect", [0.5, 0.5], [0, 0]))
    own = deciding_probability(probs, Decision("tuned", [0.5, 0.5], [0, 0]))
    assert np.allclose(defect[1:3, 1:3], 0.75) and np.allclose(own[1:3, 1:3], 0.40)
