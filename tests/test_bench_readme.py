"""bench/run_all.py rewrites bench/README.md: a plain run replaces its own section for the machine kind and
keeps every other section (another machine's, or one written by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import run_all  # noqa: E402  (a script folder, not a package)

OLD = f"""# Benchmarks

intro

{run_all.RESULTS_HEADING}

### CPU: Old CPU, 2 cores

| old cpu table |

<details><summary>out</summary>

```
#### not a heading of its own
```
</details>

### The demo recipe, change by change

written by hand

### GPU: Some GPU

| gpu table |
"""


def test_a_run_replaces_its_own_section_and_keeps_the_others():
    new = run_all.replace_section(OLD, "### CPU: New CPU, 2 cores\n\n| new cpu table |")
    assert new.startswith("### CPU: New CPU, 2 cores\n\n| new cpu table |")
    assert "Old CPU" not in new and "old cpu table" not in new
    for kept in ("### The demo recipe, change by change\n\nwritten by hand", "### GPU: Some GPU\n\n| gpu table |"):
        assert kept in new
    gpu = run_all.replace_section(OLD, "### GPU: Other GPU\n\n| other |")
    assert "Some GPU" not in gpu and "### CPU: Old CPU" in gpu and "#### not a heading of its own" in gpu
    assert gpu.index("### CPU: Old CPU") < gpu.index("### The demo recipe") < gpu.index("### GPU: Other GPU")


def test_a_first_run_starts_the_results():
    assert run_all.replace_section("", "### CPU: A\n\n| t |") == "### CPU: A\n\n| t |"
    assert run_all.replace_section("# Benchmarks\n", "### CPU: A\n\n| t |") == "### CPU: A\n\n| t |"
