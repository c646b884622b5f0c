"""The Makefile's demos stay consistent with the configs they name: each trainer command reads the dataset its
build wrote, crops no larger than that build's tiles, and evaluate reads the checkpoint the trainer wrote.
A config change that breaks a demo (``make s3-demo`` trains on 64 px tiles with the demo config) fails here in
a second rather than in a two-minute demo run."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from trainer.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TILE = 400  # shardgen build's --tile default


def commands(target: str) -> list[list[str]]:
    """The python -m commands ``make -n TARGET`` would run, split into words (continuation lines joined)."""
    out = subprocess.run(["make", "-n", "--no-print-directory", target], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    lines = out.replace("\\\n", " ").splitlines()
    return [shlex.split(line)[1:] for line in lines if " -m " in line and "pip" not in line]


def module_args(cmds: list[list[str]], module: str) -> list[str]:
    """The words after ``-m MODULE`` in the first command that runs it (directly or under torchrun)."""
    for c in cmds:
        for i in range(len(c) - 1):
            if c[i : i + 2] == ["-m", module]:
                return c[i + 2 :]
    raise AssertionError(f"no python -m {module} command")


def option(words: list[str], name: str, default: str | None = None) -> str | None:
    return words[words.index(name) + 1] if name in words else default


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target", ["demo", "s3-demo-steps"])
def test_demo_steps_fit_together(target):
    cmds = commands(target)
    build = module_args([c for c in cmds if "build" in c], "shardgen")
    train, evaluate = module_args(cmds, "trainer"), module_args(cmds, "evaluate")
    overrides = [w for w in train[train.index("--config") + 2 :] if "=" in w]
    cfg = load_config(option(train, "--config"), overrides)
    tile = int(option(build, "--tile", str(DEFAULT_TILE)))
    assert cfg.data.crop <= tile, f"{target}: data.crop={cfg.data.crop} but the build cuts {tile} px tiles"
    assert cfg.data.train.removesuffix("/manifest.json") == option(build, "--out")
    assert option(evaluate, "--checkpoint") == f"{cfg.train.out_dir}/best.pt"
    assert option(evaluate, "--data") == option(build, "--out")
