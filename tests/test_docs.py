"""Every command README.md and docs/ show still parses: the project's own command lines (shardgen, trainer with its
config overrides, evaluate, predict), torchrun's launcher, the bench scripts and the make targets. A concrete command
is parsed whole, as its program would parse it; a synopsis (``[--flag]``, ``a|b``, ``...``) has each flag and choice
checked against the parser. A flag or config key renamed in the code fails here until the documentation follows."""

from __future__ import annotations

import argparse
import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cvat_cli_parser

from evaluate.__main__ import _evaluate_parser, _export_parser, _predict_parser, _rank_parser
from evaluate.cvat_function import create
from shardgen.__main__ import _parser as shardgen_parser
from trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OUR_MODULES = ("shardgen", "trainer", "evaluate")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`((?:python|torchrun|make) [^`]+)`")


def _commands(text: str) -> list[str]:
    """Commands in ``bash``/plain fenced blocks (continuations joined, comments dropped) and inline code spans."""
    found = []
    for lang, body in FENCE.findall(text):
        if lang not in ("", "bash"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            found += [part.strip() for part in line.split("&&")]
    text = FENCE.sub("", text)
    found += [" ".join(m.group(1).split()) for m in INLINE.finditer(text)]
    return [c for c in found if re.match(r"(\.venv/bin/)?(python|torchrun|make|cvat-cli)\b", c)]


def _doc_commands() -> list[tuple[str, str]]:
    return [(doc.relative_to(ROOT).as_posix(), cmd) for doc in DOCS for cmd in _commands(doc.read_text())]


def _is_synopsis(cmd: str) -> bool:
    return bool(re.search(r"\[|\||\.\.\.|\boptions\b", cmd))


def _parse(parser: argparse.ArgumentParser, args: list[str], cmd: str) -> argparse.Namespace:
    try:
        return parser.parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"{parser.prog} rejects: {cmd}") from e


def _check_flags(parser: argparse.ArgumentParser, tokens: list[str], cmd: str) -> None:
    """A synopsis: every flag it names exists, and every ``a|b`` after a flag lists valid choices."""
    actions = parser._option_string_actions  # argparse's own table of option strings
    for i, tok in enumerate(tokens):
        tok = tok.strip("[]")
        if not tok.startswith("--"):
            continue
        flag = tok.split("=", 1)[0]
        assert flag in actions, f"{parser.prog} has no {flag}: {cmd}"
        choices = actions[flag].choices
        if choices and i + 1 < len(tokens) and "|" in tokens[i + 1]:
            listed = tokens[i + 1].strip("[]").split("|")
            assert set(listed) <= set(choices), f"{flag} {tokens[i + 1]}: choices are {sorted(choices)} ({cmd})"


def _check_ours(module: str, args: list[str], cmd: str) -> None:
    if module == "trainer":
        parser = argparse.ArgumentParser(prog="python -m trainer")
        parser.add_argument("--config", required=True)
        parser.add_argument("overrides", nargs="*")
        ns = _parse(parser, args, cmd)
        try:
            load_config(ns.config, ns.overrides)
        except ConfigError as e:
            raise AssertionError(f"{cmd}: {e}") from e
        return
    if module == "evaluate":
        sub = args[0] if args and args[0] in ("predict", "export", "rank") else None
        parsers = {"predict": _predict_parser, "export": _export_parser, "rank": _rank_parser}
        parser = parsers.get(sub, _evaluate_parser)()
        args = args[1:] if sub else args
    else:
        parser = shardgen_parser()
        if args and args[0] in ("synth", "build", "verify"):
            sub = parser._subparsers._group_actions[0].choices[args[0]]  # the subcommand's own parser
            if _is_synopsis(cmd):
                _check_flags(sub, args[1:], cmd)
                return
    if _is_synopsis(cmd):
        _check_flags(parser, args, cmd)
    else:
        _parse(parser, args, cmd)


def _torchrun_split(tokens: list[str]) -> tuple[list[str], str, list[str]]:
    i = tokens.index("-m")
    return tokens[1:i], tokens[i + 1], tokens[i + 2 :]


@pytest.mark.parametrize("doc, cmd", _doc_commands())
def test_a_documented_command_parses(doc, cmd):
    tokens = shlex.split(cmd)
    head = tokens[0].rsplit("/", 1)[-1]
    if head == "make":
        for target in tokens[1:]:
            proc = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
            assert proc.returncode == 0, f"{doc}: make has no target {target!r}: {proc.stderr.strip()}"
        return
    if head == "cvat-cli":  # cvat-cli's own parser; its --function-module must be this project's function
        ns = _parse(cvat_cli_parser(), tokens[1:], cmd)
        assert ns.function_module == "evaluate.cvat_function", cmd
        assert set(ns.function_parameters) <= set(inspect.signature(create).parameters), cmd
        return
    if head == "torchrun":
        from torch.distributed.run import get_args_parser

        if "-m" not in tokens:  # a launcher flag named in prose: `torchrun --max-restarts=2`
            _check_flags(get_args_parser(), tokens[1:], cmd)
            return
        launcher, module, args = _torchrun_split(tokens)
        _parse(get_args_parser(), [*launcher, "-m", module, *args], cmd)
        assert module in OUR_MODULES, f"{doc}: torchrun runs {module}: {cmd}"
        _check_ours(module, args, cmd)
        return
    assert head == "python", cmd
    if tokens[1] == "-m":
        if tokens[2] in OUR_MODULES:
            _check_ours(tokens[2], tokens[3:], cmd)
        else:
            assert tokens[2] in ("venv", "pip", "pytest"), f"{doc}: unknown module {tokens[2]}: {cmd}"
        return
    script = ROOT / tokens[1]
    assert script.is_file(), f"{doc}: no script {tokens[1]}: {cmd}"
    flags = [t.split("=", 1)[0].strip("[]") for t in tokens[2:] if t.strip("[]").startswith("--")]
    helptext = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120).stdout  # fmt: skip
    for flag in flags:
        assert flag in helptext, f"{doc}: {tokens[1]} --help names no {flag}: {cmd}"


def test_the_docs_show_the_commands_a_user_needs():
    commands = [cmd for _, cmd in _doc_commands()]
    readme = _commands((ROOT / "README.md").read_text())
    assert len(commands) >= 30
    for needed in ("make demo", "make test", "python -m shardgen build", "python -m trainer --config",
                   "torchrun", "python -m evaluate --checkpoint", "python -m evaluate predict"):  # fmt: skip
        assert any(c.startswith(needed) for c in readme), needed
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_a_wrong_flag_or_config_key_is_caught():
    with pytest.raises(AssertionError, match="rejects"):
        _check_ours("shardgen", ["build", "--annotatoins", "a", "--images", "b", "--out", "c"], "x")
    with pytest.raises(AssertionError, match="has no --bland"):
        _check_ours("evaluate", ["--checkpoint", "C", "[--bland", "gaussian|mean]"], "x [")
    with pytest.raises(AssertionError, match="choices"):
        _check_ours("evaluate", ["--checkpoint", "C", "[--tta", "none|flip]"], "x [")
    with pytest.raises(AssertionError, match="unknown key 'lrr'"):
        _check_ours("trainer", ["--config", "demo", "optim.lrr=1"], "x")
