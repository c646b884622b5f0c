"""bench/quality_bench.py --retune re-tunes kept runs only when they would train exactly as the arm asks."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality_bench  # noqa: E402  (a script folder, not a package)

DEMO = yaml.safe_load((Path(quality_bench.ROOT) / "configs" / "demo.yaml").read_text())


def test_a_decision_setting_or_a_moved_folder_is_no_training_change():
    new = copy.deepcopy(DEMO)
    new["train"].update(decision_beta=9.0, class_decision="object", out_dir="/elsewhere/run")
    new["data"]["train"] = "/elsewhere/shards"
    assert quality_bench.training_changes(DEMO, new) == []


def test_a_training_setting_is_named():
    new = copy.deepcopy(DEMO)
    new["optim"]["lr"] = 1e-3
    new["train"]["amp"] = "off"
    new["train"]["decision_beta"] = 9.0
    new["loss"] = {"object_window": 0}  # a section the kept run did not have
    assert quality_bench.training_changes(DEMO, new) == ["loss.object_window", "optim.lr", "train.amp"]
    assert DEMO["optim"]["lr"] != 1e-3  # the copy, not the demo config, changed


def test_retune_to_a_setting_the_trainer_refuses_is_one_line(tmp_path):
    """--retune --set train.class_decision=object on the demo (which grows its kept defects): the trainer's own
    message, not a traceback, before any model is loaded."""
    out = tmp_path / "demo-seed0"
    out.with_suffix(".yaml").write_text(yaml.safe_dump(DEMO))
    new = copy.deepcopy(DEMO)
    new["train"]["class_decision"] = "object"
    with pytest.raises(SystemExit, match=r"^quality_bench: --retune: config.train: decision_grow grows") as e:
        quality_bench.retune(out, new)
    assert "\n" not in str(e.value)
