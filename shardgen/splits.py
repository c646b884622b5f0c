"""Split assignment by stone.

``hash`` (the default) splits by a stable hash of the stone id alone, so adding stones never moves existing
ones; on a few dozen stones its shares wander far from the ratios (40 stones: 29/5/6 instead of 24/4/12)
and a split can even be empty. ``exact`` orders the stones by the same hash and cuts that order at the
requested proportions: exact shares on any dataset, but adding stones can move a few existing ones.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable

SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = {"train": 0.6, "val": 0.1, "test": 0.3}  # the write-up's 6:1:3
SPLIT_METHODS = ("hash", "exact")
# A split whose share of the stones is further than this from its ratio is warned about in the build summary.
SHARE_TOLERANCE = 0.05


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


def exact_counts(n: int, ratios: dict[str, float]) -> dict[str, int]:
    """Stones per split for ``n`` stones: the largest-remainder rounding of ``n * ratio``; then every split
    with a positive ratio gets at least one stone when there are enough, taken from the split furthest above
    its quota (10 stones at 0.6/0.1/0.3: 6/1/3; 40: 24/4/12; 5: 3/1/1)."""
    quotas = {s: n * ratios[s] for s in SPLITS}
    counts = {s: math.floor(quotas[s] + 1e-9) for s in SPLITS}  # 1e-9: 0.3 * 10 is 3.0000000000000004
    by_remainder = sorted(SPLITS, key=lambda s: counts[s] - quotas[s])  # stable: ties go in split order
    for split in by_remainder[: n - sum(counts.values())]:
        counts[split] += 1
    wanted = [s for s in SPLITS if ratios[s] > 0]
    if n >= len(wanted):
        for split in wanted:
            if counts[split] == 0:
                donor = max((s for s in wanted if counts[s] > 1), key=lambda s: counts[s] - quotas[s])
                counts[donor] -= 1
                counts[split] += 1
    return counts


def assign_splits(stones: Iterable[str], ratios: dict[str, float], method: str = "hash") -> dict[str, str]:
    """The split of every stone; ``hash`` looks at each stone alone, ``exact`` at all of them together."""
    if method not in SPLIT_METHODS:
        raise ValueError(f"--split-method must be one of {', '.join(SPLIT_METHODS)}; got {method!r}")
    stones = sorted(set(stones))
    if method == "hash":
        return {s: assign_split(s, ratios) for s in stones}
    order = sorted(stones, key=lambda s: (unit_hash(s), s))
    out, start = {}, 0
    for split, count in exact_counts(len(order), ratios).items():
        out |= {s: split for s in order[start : start + count]}
        start += count
    return out


def share_warnings(stones: dict[str, int], ratios: dict[str, float], method: str) -> list[str]:
    """What the build summary warns about: empty splits and shares further than SHARE_TOLERANCE from the
    ratios, then what to do about it. ``stones`` is the stone count per split."""
    n = sum(stones.values())
    warnings = []
    for split in SPLITS:
        if n and ratios[split] > 0 and stones[split] == 0:
            needs = {"val": ": the trainer validates on it", "test": ": evaluate scores it"}.get(split, "")
            warnings.append(f"split {split!r} is empty (0 of {n} stones, asked {ratios[split]:.1%}){needs}")
    off = [s for s in SPLITS if stones[s] and abs(stones[s] / n - ratios[s]) > SHARE_TOLERANCE]
    if off:
        shares = ", ".join(f"{s} {stones[s] / n:.1%} (asked {ratios[s]:.1%})" for s in off)
        warnings.append(f"split shares differ from --split-ratios by more than "
                        f"{SHARE_TOLERANCE * 100:.0f} percentage points: {shares}")  # fmt: skip
    if warnings and method == "hash":
        warnings.append(
            f"the stable hash is uneven on {n} stones: rebuild with --split-method exact to cut them at the "
            "requested proportions (adding stones can then move a few existing ones)"
        )
    elif warnings:
        warnings.append(f"{n} stones are too few for these ratios: add scans or change --split-ratios")
    return warnings


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
