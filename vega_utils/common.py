"""Things every module needs: the user-facing error type and its exit, one-line argument errors, devices, seeds,
atomic writes."""
import argparse
import difflib
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import traceback

import numpy as np
import torch

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class VegaError(Exception):
    """A problem the user can fix (bad file, bad flag). Entry points print it as one line and exit 2."""


class SetupError(VegaError):
    """A VegaError before a run's first epoch (a missing data file, an unwritable folder): it would recur for every
    run of these settings, so a sweep worker stops instead of drawing the next trial."""


def exit_on_error(command, debug=False):
    """Every command's way out: command() -> its exit code (0 for None); a VegaError -> `error: <message>` on
    stderr (the traceback too with --debug) and exit code 2."""
    try:
        code = command()
        return 0 if code is None else code
    except VegaError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2


def python_cmd():
    """How to call this interpreter in a printed command: `python` when that is what the shell finds first, else the
    path (relative inside the project, e.g. `.venv/bin/python` after `make demo`, which does not activate it)."""
    import shutil
    found = shutil.which("python")
    if found and os.path.realpath(found) == os.path.realpath(sys.executable) and \
            os.path.dirname(os.path.abspath(found)) == os.path.dirname(os.path.abspath(sys.executable)):
        return "python"
    exe = os.path.abspath(sys.executable)
    inside = os.path.commonpath([exe, PROJECT_ROOT]) == PROJECT_ROOT and os.path.abspath(os.getcwd()) == PROJECT_ROOT
    return os.path.relpath(exe, PROJECT_ROOT) if inside else exe


def script_cmd(name):
    """A printed command that runs the project's script `name` (run.py, inference.py) as pasted in this shell: the
    interpreter, then the script's name inside the project folder, or its full path from anywhere else."""
    here = os.path.abspath(os.getcwd()) == PROJECT_ROOT
    return f"{python_cmd()} {name if here else shlex.quote(os.path.join(PROJECT_ROOT, name))}"


def read_json(path, what):
    """A JSON file's content; a missing or unreadable file is one line naming `what` and the path."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise VegaError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise VegaError(f"{what} {path} is a folder; give the JSON file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VegaError(f"{what} {path}: cannot read it as JSON ({e})") from None


# What a failed or interrupted download (Google Drive's virus-scan warning, a login page) saves under the file's
# name; the checkpoint and data readers both say so instead of an unpickling error.
HTML_PAGE = "an HTML page (a failed or interrupted download saves the web page instead of the file)"


def is_html_page(path):
    """Whether the file at `path` starts as an HTML page (False for an unreadable one: its reader reports that)."""
    try:
        with open(path, "rb") as f:
            text = f.read(512).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    except OSError:
        return False
    return text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:200]


def resolve_device(name="auto"):
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise VegaError("--device cuda was asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise VegaError(f"unknown device {name!r}: use auto, cpu or cuda")
    if name.startswith("cuda:"):
        index = name[5:]
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not index.isdigit() or int(index) >= count:
            raise VegaError(f"--device {name}: " + (f"this machine has CUDA devices cuda:0 to cuda:{count - 1}"
                                                    if count else "no CUDA device is available"))
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path, write_fn, mode):
    """Write through a temporary file in the same folder, then rename: a crash never leaves half a file.

    mkstemp makes the file 0600; it gets the mode any new file gets (0644 under the usual umask) so that
    colleagues on a shared server can read the results."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError as e:
        raise VegaError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise VegaError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text), "w")


def as_typed(args, dest):
    """The flag of `dest` as the user typed it (`--Dataset` or `--dataset`); `--<dest>` when not known."""
    return getattr(args, "flags_as_typed", {}).get(dest, f"--{dest}")


class OneLineParser(argparse.ArgumentParser):
    """Bad flags end in one `error: ...` line and exit status 2 (argparse would print the usage too).

    No abbreviations (argparse's default took `--epoch 1` as `--epochs 1` silently); an unknown flag gets the
    closest known ones as suggestions."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        """argparse's, plus `flags_as_typed` in the result: {dest: the option string the user typed last for it},
        so that an error names `--batch-size` or `--learning_rate` as given, not the config key (see as_typed)."""
        argv = sys.argv[1:] if args is None else list(args)
        parsed, extras = super().parse_known_args(argv, namespace)
        typed = {}
        for word in argv:
            if word == "--":
                break
            action = self._option_string_actions.get(str(word).split("=", 1)[0])
            if action is not None:
                typed[action.dest] = str(word).split("=", 1)[0]
        parsed.flags_as_typed = typed
        return parsed, extras

    def error(self, message):
        hint = ""
        if message.startswith("unrecognized arguments:"):
            known = [f for f in self._option_string_actions if f.startswith("--")]
            guesses = []
            for flag in (w for w in message.split(":", 1)[1].split() if w.startswith("--")):
                name = flag.split("=", 1)[0]
                guesses += [g for g in difflib.get_close_matches(name, known, n=1, cutoff=0.6) if g not in guesses]
            if guesses:
                hint = f"; did you mean {' or '.join(guesses)}?"
        self.exit(2, f"error: {message}{hint} (see --help)\n")
