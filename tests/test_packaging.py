"""What ``pip install .`` (not editable) delivers: the configs, the class map, the report template and the
licence files, usable without the source tree on the path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "NOTICE", "LICENSES", "shardgen", "trainer", "evaluate", "configs")

# Run by the installed copy, from a folder without the sources: every file it needs must come from the wheel.
PROBE = """
import sys
from pathlib import Path
site = Path(sys.argv[1]).resolve()
import evaluate.report, shardgen, trainer
for module in (shardgen, trainer, evaluate.report):
    assert Path(module.__file__).resolve().is_relative_to(site), module.__file__
from shardgen.classes import ClassMap
from trainer.config import load_config
cfg = load_config("u2net.yaml", [])
demo = load_config("demo", [])
names = ClassMap.load().names
print(cfg.model.name, demo.model.name, len(names), names[1])
"""


def test_a_wheel_install_ships_configs_template_and_licences(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building in place would leave build/ and *.egg-info in the checkout
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    for name in ("shardgen/configs/classes.yaml", "shardgen/configs/u2net.yaml", "shardgen/configs/demo.yaml",
                 "evaluate/templates/report.html", f"{dist_info}/licenses/LICENSE", f"{dist_info}/licenses/NOTICE",
                 f"{dist_info}/licenses/LICENSES/Apache-2.0.txt"):  # fmt: skip
        assert name in names, sorted(names)
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata and "Requires-Dist: jinja2" in metadata

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=300)  # fmt: skip
    run = tmp_path / "elsewhere"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(site)], cwd=run, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["u2net", "unet", "11", "Pinpoint"]


def test_licence_and_notice_name_every_derived_work():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    notice = (ROOT / "NOTICE").read_text()
    for work, licence, derived in (("U-2-Net", "Apache License, Version 2.0", "trainer/models/u2net.py"),
                                   ("pytorch-unet", "MIT License", "trainer/models/resnet_unet.py"),
                                   ("MONAI", "Apache License, Version 2.0", "evaluate/blend.py")):  # fmt: skip
        section = notice.split(work + " (https://", 1)[1].split("-----", 1)[0]
        assert licence in section and derived in section and "Copyright" in section
    assert "Apache License" in (ROOT / "LICENSES" / "Apache-2.0.txt").read_text()
