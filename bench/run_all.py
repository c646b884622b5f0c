"""Run every benchmark, one after the other on this machine, and write their ratios to ``bench/README.md``.

    python bench/run_all.py                 # CPU or GPU (each bench picks cuda when available)
    python bench/run_all.py --append        # add this machine's section below the README's existing ones
    python bench/run_all.py --only eval loader_s3 --readme /tmp/README.md

Each bench runs as its own process with its default sizes (chosen per device: modest on CPU, the real
tile and model sizes on a GPU), and its output is echoed as it runs. The README gets one section per run:
the machine line, a table with a row per comparison (the two measured figures, their ratio, the goal and
the verdict, parsed from the benches' ``common.ratio_line`` lines and tables) and every bench's full output.
Without ``--append`` the README is rewritten with this run's section only; a GPU run with ``--append``
adds its rows to the CPU figures already there.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import common

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_HEADING = "## Results"
RATIO = re.compile(r"^(?P<name>.+): (?P<ratio>[\d.]+)x  \(goal >= (?P<goal>[\d.]+)x: (?P<verdict>meets|BELOW)\)")
# common.limit_line: a figure that must stay at or below its goal, e.g. a time per batch.
LIMIT = re.compile(r"^(?P<name>.+): (?P<value>[\d.,]+) (?P<unit>\S+)  \(goal <= (?P<goal>[\d.]+) \S+: "
                   r"(?P<verdict>meets|BELOW)\)")  # fmt: skip


@dataclass(frozen=True)
class Figures:
    """Where a ratio's two figures sit in the bench's tables: row labels (regex) and the column."""

    ratio: str  # regex on the ratio line's name
    numerator: str  # "{best}" stands for the setting the bench names in its "best setting for X: S" line
    denominator: str
    column: str


@dataclass(frozen=True)
class Bench:
    key: str
    script: str
    title: str
    device_arg: bool  # takes --device
    figures: list[Figures] = field(default_factory=list)


BENCHES = [
    Bench("shardgen", "shardgen_bench.py", "shardgen build vs research tiling script", False, [
        Figures(r"per core", r"shardgen build, 1 worker$", r"baseline", "images/s"),
        Figures(r"scaling: (\d+) workers", r"shardgen build, {0} workers$", r"shardgen build, 1 worker$", "images/s"),
        Figures(r"dask: (\d+) workers / local", r"shardgen build, dask {0} workers$", r"shardgen build, {0} workers$",
                "images/s"),
    ]),
    Bench("loader_s3", "loader_s3_bench.py", "shard loader: S3 vs PNG objects, local disk vs decode", False, [
        Figures(r"S3 read \+ decode", r"S3 shards: .* \+ decode", r"S3 PNG objects: .* \+ decode", "samples/s"),
        Figures(r"S3 bytes only", r"S3 shards: .*bytes only", r"S3 PNG objects: .*bytes only", "samples/s"),
        Figures(r"(\w+): train_loader (\d+) workers? / PNG decode", r"{0} shards: train_loader, {1} workers?$",
                r"PNG decode alone", "samples/s"),
        Figures(r"(\w+): train_loader (\d+) / (\d+) workers", r"{0} shards: train_loader, {1} workers?$",
                r"{0} shards: train_loader, {2} workers?$", "samples/s"),
    ]),
    Bench("augment", "augment_bench.py", "GPU augmentation: folded single warp vs kornia chain", True, [
        Figures(r"augmentation speed", r"^folded", r"^kornia chain", "tiles/s"),
    ]),
    Bench("model_step", "model_step_bench.py", "model step: bf16, channels_last, compile, CUDA graphs vs eager fp32",
          True, [Figures(r"model step \((\w+)\)", r"^{0} {best}$", r"^{0} eager fp32$", "samples/s")]),
    Bench("train", "train_bench.py", "training input pipeline vs model step alone", True, [
        Figures(r"input pipeline", r"shard loader \(", r"model step alone", "samples/s"),
    ]),
    Bench("eval", "eval_bench.py", "evaluate vs MONAI sliding_window_inference", True, [
        Figures(r"sliding_window_inference \((.+)\)", r"^evaluate .*, {0}$", r"^MONAI .*, {0}$", "images/s"),
        Figures(r"overhead only", r"^evaluate .*, 1x1 conv$", r"^MONAI .*, 1x1 conv$", "images/s"),
    ]),
]  # fmt: skip


def run_bench(bench: Bench, device: str) -> tuple[str, int, float]:
    """(stdout and stderr, exit code, seconds); the output is echoed line by line as it comes."""
    cmd = [sys.executable, str(BENCH_DIR / bench.script)] + (["--device", device] if bench.device_arg else [])
    print(f"\n=== {bench.key}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    return "".join(lines), proc.returncode, time.perf_counter() - t0


def parse_tables(output: str) -> dict[str, dict[str, str]]:
    """Every ``common.print_table`` row in ``output``: label -> {column: cell}."""
    rows: dict[str, dict[str, str]] = {}
    lines = output.splitlines()
    for k in range(1, len(lines)):
        if not lines[k] or set(lines[k]) != {"-"}:
            continue
        headers = re.split(r"\s{2,}", lines[k - 1].strip())
        for line in lines[k + 1 :]:
            cells = re.split(r"\s{2,}", line.strip())
            if len(cells) != len(headers):
                break
            rows[cells[0]] = dict(zip(headers, cells, strict=True))
    return rows


def find_row(rows: dict[str, dict[str, str]], pattern: str) -> dict[str, str] | None:
    return next((cells for label, cells in rows.items() if re.search(pattern, label)), None)


def comparisons(bench: Bench, output: str) -> list[list[str]]:
    """Table rows: bench, comparison, numerator figure, denominator figure, ratio, goal, verdict."""
    rows = parse_tables(output)
    best = dict(re.findall(r"^best setting for (\S+): (.+)$", output, re.M))
    out = []
    for line in output.splitlines():
        limit = LIMIT.match(line)
        if limit:
            note = line[limit.end() :].strip()
            label = f"{limit['name']} {note}" if note else limit["name"]
            out.append([bench.key, label, f"{limit['value']} {limit['unit']}", "", "",
                        f"<= {limit['goal']} {limit['unit']}", limit["verdict"]])  # fmt: skip
            continue
        m = RATIO.match(line)
        if not m:
            continue
        name = m["name"]
        num = den = "?"
        for spec in bench.figures:
            found = re.search(spec.ratio, name)
            if found:
                groups = [re.escape(g) for g in found.groups()]
                setting = re.escape(best.get(found.groups()[0], "?")) if found.groups() else "?"
                a = find_row(rows, spec.numerator.format(*groups, best=setting))
                b = find_row(rows, spec.denominator.format(*groups, best=setting))
                num = a[spec.column] + f" {spec.column}" if a else "?"
                den = b[spec.column] + f" {spec.column}" if b else "?"
                break
        note = line[m.end() :].strip()  # e.g. train_bench's "[the goal is for GPU; ...]"
        label = f"{name} {note}" if note else name
        out.append([bench.key, label, num, den, f"{float(m['ratio']):.2f}x", f">= {m['goal']}x", m["verdict"]])
    return out


def machine_lines() -> list[str]:
    """common.print_machine's lines, captured."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        common.print_machine()
    return buf.getvalue().splitlines()


def section(results: list[tuple[Bench, str, int, float]], machine: list[str], device: str) -> str:
    kind = "GPU" if any("GPU: none" not in line and line.startswith("machine:") for line in machine) else "CPU"
    out = [f"### {kind}: {machine[0].removeprefix('machine: ')}", "",
           f"{machine[1]}; {time.strftime('%Y-%m-%d')}; `python bench/run_all.py` (device {device}); "
           "each ratio is measured side by side in that bench's run.", "",
           "| bench | comparison | measured | baseline | ratio | goal | verdict |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for bench, output, code, _ in results:
        rows = comparisons(bench, output)
        if code != 0:
            out.append(f"| {bench.key} | **failed** (exit code {code}), see its output below | | | | | |")
        for row in rows:
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    out.append("")
    for bench, output, _, seconds in results:
        out += [f"<details><summary>{bench.key}: {bench.title} ({seconds:.0f} s)</summary>", "", "```",
                output.rstrip(), "```", "</details>", ""]  # fmt: skip
    return "\n".join(out)


def header() -> str:
    rows = "\n".join(f"| `{b.script}` | {b.title} |" for b in BENCHES)
    return f"""# Benchmarks

Speed comparisons, each measured side by side in one run on one machine; they are never tests. Every
script prints the machine, a table of the paths it times and one line per ratio with its goal
(`common.ratio_line`). `python bench/<script> --help` says exactly what each path does and which sizes a
CPU and a GPU run use; `python bench/run_all.py` (or `make bench`) runs them all and replaces this file's
section for the same kind of machine (CPU or GPU), keeping the others (`--append` adds a section instead).

| script | compares |
|---|---|
{rows}

"measured" is the first path of a comparison, "baseline" the one it is divided by; a row with a limit
("<= 3 ms") has no baseline. CPU figures come from a small shared machine, where concurrent load moves every
number: compare ratios within one run only.

On a GPU machine, one command runs every GPU comparison at the real sizes (400 px tiles, batch 16, the
research models) and adds its section below the CPU one:

```bash
python bench/run_all.py --append --only augment model_step train eval shardgen
```

`model_step` compiles each model twice (Inductor, and Inductor with CUDA graphs): allow 10-15 minutes for
the whole command on an H100/H200 (`--only model_step` alone, or `model_step_bench.py --models unet`, is shorter).

{RESULTS_HEADING}
"""


def replace_section(readme: str, text: str) -> str:
    """The results of ``readme`` with its first section of the same kind ("### CPU: ..." or "### GPU: ...",
    as run_all writes them) replaced by ``text``, or ``text`` put first; every other section (another
    machine's, or one written by hand) is kept as it is."""
    results = readme.split(RESULTS_HEADING, 1)[1] if RESULTS_HEADING in readme else ""
    sections = [s for s in ("\n" + results).split("\n### ") if s.strip()]
    kind = text.split(":", 1)[0] + ":"  # "### CPU:"
    bodies = ["### " + s.strip() for s in sections]
    same = next((i for i, b in enumerate(bodies) if b.startswith(kind)), None)
    if same is None:
        bodies.insert(0, text.strip())
    else:
        bodies[same] = text.strip()
    return "\n\n".join(bodies)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=[b.key for b in BENCHES], help="run only these benches")
    p.add_argument("--device", default="auto", help="for the train and eval benches: auto | cpu | cuda[:N]")
    p.add_argument("--readme", type=Path, default=BENCH_DIR / "README.md", help="file written (bench/README.md)")
    p.add_argument("--append", action="store_true", help="add this run's section to the existing README")
    args = p.parse_args(argv)
    if args.append and not (args.readme.is_file() and RESULTS_HEADING in args.readme.read_text()):
        p.error(f"--append: {args.readme} has no '{RESULTS_HEADING}' section to append to")

    machine = machine_lines()
    print("\n".join(machine))
    results = []
    for bench in BENCHES:
        if args.only is None or bench.key in args.only:
            results.append((bench, *run_bench(bench, args.device)))
    text = section(results, machine, args.device)
    old = args.readme.read_text() if args.readme.is_file() else ""
    if args.append:
        args.readme.write_text(old.rstrip() + "\n\n" + text + "\n")
    else:
        args.readme.write_text(header() + "\n" + replace_section(old, text) + "\n")
    print(f"\nwrote {args.readme}")
    failed = [bench.key for bench, _, code, _ in results if code != 0]
    if failed:
        raise SystemExit(f"benches failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
