import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
REFERENCE = os.path.join(ROOT, "..", "shared", "reference")

torch.set_num_threads(min(2, torch.get_num_threads()))


def reference_file(name):
    path = os.path.join(REFERENCE, name)
    if not os.path.exists(path):
        pytest.fail(f"reference fixture {path} is missing: the tests need ../shared/reference beside the repo")
    return path


def rel_err(a, b):
    """Norm of the difference over norm of the reference (spec section 6)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
