"""The docs are tested: every command in README.md and docs/*.md uses only flags its program has; the worked
example of docs/own-data.md and the README's extraction walk-through run top to bottom as pasted."""
import argparse
import glob
import os
import re
import runpy
import shlex
import subprocess
import sys
from unittest import mock

import pytest
from conftest import ROOT

DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
PYTHONS = ("python", "python3", ".venv/bin/python")
MARKS = ("<!-- worked example -->", "<!-- walk-through -->")


# ---------------------------------------------------------------- reading the docs
def code_blocks(text):
    """[(language, code, marked)] of a markdown text: fenced blocks and indented (4-space) blocks; `marked` when the
    line before the block is the worked-example mark."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        line = lines[i]
        marked = i > 0 and lines[i - 1].strip() in MARKS
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if fence:
            j = i + 1
            while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
                j += 1
            blocks.append((fence.group(1) or "sh", "\n".join(lines[i + 1:j]), marked))
            i = j + 1
            continue
        if line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            body = [ln for ln in lines[i:j]]
            indent = min(len(ln) - len(ln.lstrip()) for ln in body if ln.strip())
            blocks.append(("sh", "\n".join(ln[indent:] for ln in body).strip("\n"), marked))
            i = j
            continue
        i += 1
    return blocks


def shell_commands(code):
    """The commands of a shell block, each as a token list: continuation lines joined, comments dropped, split
    at ;, && and |."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.split("\n"):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError:        # not shell (a line of printed output with an odd quote)
            continue
        current = []
        for t in tokens + [";"]:
            if t and set(t) <= set(";&|"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(t)
    return commands


def program_of(tokens):
    """("script", path) or ("module", name) of a project command, else None (make, tensorboard, python -c ...)."""
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):      # VAR=value before the command
        tokens = tokens[1:]
    if len(tokens) < 2 or tokens[0] not in PYTHONS:
        return None, []
    if tokens[1] == "-m" and len(tokens) > 2 and tokens[2].split(".")[0] in ("vega_utils", "fast"):
        return ("module", tokens[2]), tokens[3:]
    if tokens[1].endswith(".py") and os.path.exists(os.path.join(ROOT, tokens[1])):
        return ("script", tokens[1]), tokens[2:]
    return None, []


def documented_commands():
    found = []
    for doc in DOCS:
        for language, code, _ in code_blocks(open(os.path.join(ROOT, doc)).read()):
            if language not in ("sh", "bash", "shell", "console"):
                continue
            for tokens in shell_commands(code):
                program, args = program_of(tokens)
                if program:
                    found.append((doc, program, args))
    return found


# ---------------------------------------------------------------- a program's flags
class _Parsed(Exception):
    pass


_PARSERS = {}


def parser_of(program):
    """The argument parser a program builds, caught as it is about to parse (the program runs up to there)."""
    if program not in _PARSERS:
        caught = []

        def catch(self, *args, **kwargs):
            caught.append(self)
            raise _Parsed

        kind, name = program
        with mock.patch.object(argparse.ArgumentParser, "parse_args", catch), \
                mock.patch.object(argparse.ArgumentParser, "parse_known_args", catch), \
                mock.patch.object(sys, "argv", [name]):
            try:
                if kind == "script":
                    runpy.run_path(os.path.join(ROOT, name), run_name="__main__")
                else:
                    runpy.run_module(name, run_name="__main__", alter_sys=False)
            except (_Parsed, SystemExit):
                pass
        _PARSERS[program] = caught[0] if caught else None
    return _PARSERS[program]


def unknown_flags(program, args):
    parser = parser_of(program)
    known = set(parser._option_string_actions) if parser else set()
    flags = [a.strip("[]").split("=", 1)[0] for a in args if a.strip("[").startswith("--")]
    return [f for f in flags if f not in known and f != "--"]


# ---------------------------------------------------------------- the tests
COMMANDS = documented_commands()


def test_the_docs_hold_commands_of_every_program():
    programs = {name for _, (_, name), _ in COMMANDS}
    assert {"run.py", "inference.py", "sweep.py", "extract.py", "vega_utils.anchors.build",
            "vega_utils.data.convert", "vega_utils.insight.analyze", "vega_utils.insight.compare"} <= programs


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")   # runpy re-running a module
@pytest.mark.parametrize("doc,program,args", COMMANDS, ids=[f"{d}:{p[1]}:{i}" for i, (d, p, _) in enumerate(COMMANDS)])
def test_documented_command_uses_real_flags(doc, program, args):
    assert parser_of(program) is not None or not any(a.startswith("--") for a in args), \
        f"{doc}: {program[1]} parses no flags"
    bad = unknown_flags(program, args)
    assert not bad, f"{doc}: `{program[1]}` has no flag {', '.join(bad)}"


def test_a_renamed_flag_is_caught():
    doc = "Run it:\n\n    python run.py --epochs 3 \\\n        --hidden_dimension 64   # a flag that does not exist\n"
    (language, code, _), = code_blocks(doc)
    (tokens,) = shell_commands(code)
    program, args = program_of(tokens)
    assert program == ("script", "run.py") and unknown_flags(program, args) == ["--hidden_dimension"]


def run_marked_steps(doc, tmp_path):
    """The marked blocks of a doc, in order, in a scratch copy of the project (links to its files), with `python`
    the interpreter of this test; returns the scratch folder."""
    for entry in os.listdir(ROOT):
        if entry not in ("output", "mydata", "demo", ".git") and not entry.startswith(".pytest"):
            os.symlink(os.path.join(ROOT, entry), tmp_path / entry)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')   # the venv stays the venv
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    steps = [(lang, code) for lang, code, marked in code_blocks(open(os.path.join(ROOT, doc)).read()) if marked]
    for lang, code in steps:
        cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-e", "-c", code]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{lang} step failed:\n{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return [lang for lang, _ in steps]


def test_worked_example_runs_as_pasted(tmp_path):
    """docs/own-data.md: a data file, faces and a CLIP made by the example itself, anchors, training, predictions."""
    assert run_marked_steps(os.path.join("docs", "own-data.md"), tmp_path) == ["python", "python", "sh", "sh"]
    predictions = (tmp_path / "mydata" / "predictions.csv").read_text().splitlines()
    assert predictions[0].startswith("dialogue_id,utterance_index,speaker,label,prediction,p_joy")
    assert len(predictions) > 50


def test_extraction_walk_through_runs_as_pasted(tmp_path):
    """README.md: generated MELD release -> extract.py -> run.py -> extract.py --like -> inference.py."""
    assert run_marked_steps("README.md", tmp_path) == ["sh"]
    predictions = (tmp_path / "demo" / "new_predictions.csv").read_text().splitlines()
    assert predictions[0].startswith("dialogue_id,utterance_index,utterance_id,text,speaker,label,prediction")
    assert len(predictions) == 1 + 8 and "excuse me" in predictions[1]
    talk = tmp_path / "demo" / "talk"
    emotions = (talk / "emotions.vtt").read_text()
    assert emotions.startswith("WEBVTT") and emotions.count(" --> ") == 12 and "Ross: excuse me" in emotions
    assert (talk / "timeline.png").read_bytes()[:4] == b"\x89PNG"
