import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def find_reference():
    """../shared/reference beside the repository (CI's layout); for a clone of a local checkout that has none
    beside it (`git clone . /tmp/x`), the one beside the repository it was cloned from."""
    places = [os.path.join(ROOT, "..", "shared", "reference")]
    try:
        origin = subprocess.run(["git", "-C", ROOT, "config", "--get", "remote.origin.url"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin and os.path.isdir(origin):
        places.append(os.path.join(origin, "..", "shared", "reference"))
    return next((p for p in places if os.path.isdir(p)), places[0])


REFERENCE = find_reference()

torch.set_num_threads(min(2, torch.get_num_threads()))


def reference_file(name):
    path = os.path.join(REFERENCE, name)
    if not os.path.exists(path):
        pytest.fail(f"reference fixture {path} is missing: the tests need ../shared/reference beside the repo "
                    "(or beside the local repository it was cloned from)")
    return path


def rel_err(a, b):
    """Norm of the difference over norm of the reference (spec section 6)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
