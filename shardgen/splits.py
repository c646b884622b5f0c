"""Split assignment by stone: a stable hash of the stone id, so adding stones never moves existing ones."""

from __future__ import annotations

import hashlib
import re

SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = {"train": 0.6, "val": 0.1, "test": 0.3}  # the write-up's 6:1:3


def unit_hash(stone_id: str) -> float:
    """A uniform number in [0, 1) that depends on the stone id alone."""
    digest = hashlib.sha256(stone_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(stone_id: str, ratios: dict[str, float] = DEFAULT_RATIOS) -> str:
    h, edge = unit_hash(stone_id), 0.0
    for split in SPLITS:
        edge += ratios[split]
        if h < edge:
            return split
    return SPLITS[-1]  # guards against ratios summing to 1 - epsilon


def parse_ratios(text: str) -> dict[str, float]:
    """'train=0.6,val=0.1,test=0.3' -> dict; must name all three splits and sum to 1."""
    error = f"--split-ratios must give train, val and test, non-negative, summing to 1: {text!r}"
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(error) from None
    # Written so that NaN fails too (every comparison with NaN is False).
    if set(out) != set(SPLITS) or not abs(sum(out.values()) - 1.0) <= 1e-6 or not all(v >= 0 for v in out.values()):
        raise ValueError(error)
    return out


def stone_id_of(image_id: str, regex: str | None) -> str:
    """The stone id is the image id, or the first group (else whole match) of ``regex`` searched in it."""
    if not regex:
        return image_id
    try:
        m = re.search(regex, image_id)
    except re.error as e:  # re.error is not a ValueError: without this the CLI would show a traceback
        raise ValueError(f"--stone-id-regex {regex!r} is not a valid regular expression: {e}") from None
    if not m:
        raise ValueError(f"--stone-id-regex {regex!r} does not match image id {image_id!r}")
    stone = m.group(1) if m.groups() else m.group(0)
    if not stone:  # an optional group that did not take part, or an empty match: every such image would be one stone
        raise ValueError(f"--stone-id-regex {regex!r} gives an empty stone id for image id {image_id!r}")
    return stone
