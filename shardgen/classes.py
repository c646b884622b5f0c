"""The class map: label text -> class id, read from ``configs/classes.yaml``.

Multiclass ids are the research code's (background 0, Pinpoint 1 ... Burn_mark 10); 255 is ignored everywhere.
Labels match case-insensitively with space and underscore treated as equal, so "twinning wisp",
"Twinning_Wisp" and "TWINNING_WISP" are one class. "<Class>_Reflection" labels resolve to their parent class
with ``is_reflection`` set; what is painted for them is the caller's policy (merge, ignore, background).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

IGNORE_INDEX = 255
# configs/: installed next to this module by a wheel (pyproject maps it to shardgen/configs), else the
# top-level folder of a source checkout or an editable install.
_INSTALLED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _INSTALLED_CONFIGS if _INSTALLED_CONFIGS.is_dir() else Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CLASSES_YAML = CONFIG_DIR / "classes.yaml"
MODES = ("multiclass", "binary")
REFLECTION_POLICIES = ("merge", "ignore", "background")


def normalize_label(label: str) -> str:
    """Canonical form for matching: lower case, runs of spaces/underscores/dashes -> one underscore."""
    out = label.strip().lower().replace("-", " ").replace("_", " ")
    return "_".join(out.split())


@dataclass(frozen=True)
class LabelInfo:
    class_id: int  # multiclass id of the parent class (1..10)
    name: str  # canonical class name, e.g. "Twinning_wisp"
    is_reflection: bool


@dataclass(frozen=True)
class ClassMap:
    """Defect classes in id order. ``names[0]`` is "background"."""

    classes: dict[str, int]  # canonical name -> multiclass id
    ignore_index: int = IGNORE_INDEX
    reflection_suffix: str = "_Reflection"

    @classmethod
    def load(cls, path: str | Path = DEFAULT_CLASSES_YAML) -> ClassMap:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        classes = {str(k): int(v) for k, v in raw["classes"].items()}
        ids = sorted(classes.values())
        if ids != list(range(1, len(ids) + 1)):
            raise ValueError(f"{path}: class ids must be 1..N without gaps, got {ids}")
        return cls(classes, int(raw.get("ignore_index", IGNORE_INDEX)), raw.get("reflection_suffix", "_Reflection"))

    @property
    def names(self) -> list[str]:
        """Class names indexed by multiclass id, background first."""
        return ["background"] + sorted(self.classes, key=self.classes.__getitem__)

    def num_classes(self, mode: str = "multiclass") -> int:
        """Number of output classes including background (binary: 2)."""
        return 2 if mode == "binary" else len(self.classes) + 1

    def class_names(self, mode: str = "multiclass") -> list[str]:
        return ["background", "defect"] if mode == "binary" else self.names

    def lookup(self, label: str) -> LabelInfo | None:
        """Resolve a CVAT label; None when it is not a known class or reflection of one."""
        key = normalize_label(label)
        suffix = normalize_label(self.reflection_suffix)
        is_reflection = key.endswith("_" + suffix)
        if is_reflection:
            key = key[: -len(suffix) - 1]
        for name, class_id in self.classes.items():
            if normalize_label(name) == key:
                return LabelInfo(class_id, name, is_reflection)
        return None

    def paint_value(self, info: LabelInfo, mode: str = "multiclass", reflections: str = "merge") -> int | None:
        """The mask value a shape with this label paints, or None when it paints nothing.

        ``reflections``: merge -> parent class, ignore -> 255, background -> 0.
        """
        if info.is_reflection and reflections == "ignore":
            return self.ignore_index
        if info.is_reflection and reflections == "background":
            return 0
        return 1 if mode == "binary" else info.class_id
