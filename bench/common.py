"""Helpers shared by the benchmark scripts: the machine they ran on, tables, synthetic inputs, byte counts.

Importing this module also puts the repository root on ``sys.path``, so ``python bench/<script>.py`` runs
from a plain checkout without the project installed; the scripts import it before the project's packages.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Real scans are 1150-1450 px for a 1200 px crust crop: the synthetic scans keep that ratio at any size.
SCAN_TO_CROP = (1150 / 1200, 1450 / 1200)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_features() -> str:
    """The widest instruction set this CPU's flags name: one model name ("AMD EPYC") covers CPUs with
    AVX512-BF16 and without AVX512 at all, and their training steps differ by 2x. Whether bf16 runs natively
    is oneDNN's answer (``print_machine``), the one ``train.amp: bf16`` goes by."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return ""
    names = [("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2")]
    return next((label for flag, label in names if flag in flags), "")


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask), which is what worker pools compete for."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def print_machine() -> None:
    import torch  # imported here: the shardgen bench needs torch only for this line

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    from trainer.precision import cpu_bf16_native  # what train.amp: bf16 decides by (oneDNN), not the flags

    features = ", ".join(f for f in (cpu_features(), "native bf16" if cpu_bf16_native() else "no native bf16") if f)
    print(f"machine: {cpu_model()} ({features}), {usable_cores()} cores (load avg {load}), "
          f"GPU: {gpu}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")


def print_table(headers: list[str], rows: list[list]) -> None:
    """A plain-text table; floats get 3 significant digits."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[k]) for r in cells)) for k, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in cells:
        print("  ".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(row, widths, strict=True))))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def ratio_line(name: str, value: float, goal: float) -> str:
    verdict = "meets" if value >= goal else "BELOW"
    return f"{name}: {value:.2f}x  (goal >= {goal:g}x: {verdict})"


def synth_size_range(image_size: int) -> tuple[int, int]:
    """Scan sides for synthetic scans whose crust crop is resized to ``image_size``."""
    return round(image_size * SCAN_TO_CROP[0]), round(image_size * SCAN_TO_CROP[1])


def tree_bytes(root: str | Path, pattern: str = "*") -> tuple[int, int]:
    """(files, bytes) of the files under ``root`` matching ``pattern``."""
    files = [p for p in Path(root).rglob(pattern) if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def limit_line(name: str, value: float, unit: str, goal: float) -> str:
    """A figure that must stay at or below its goal (a time), in the form run_all.py parses."""
    verdict = "meets" if value <= goal else "BELOW"
    return f"{name}: {value:.3g} {unit}  (goal <= {goal:g} {unit}: {verdict})"
