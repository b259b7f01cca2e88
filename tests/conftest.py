import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# The reference implementation's numbers (docs/method.md, section 5), copied from ../shared/reference so that a clone
# anywhere, with nothing beside it, runs the whole suite. tests/fixtures/README.md says what they are.
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

torch.set_num_threads(min(2, torch.get_num_threads()))


def reference_file(name):
    path = os.path.join(FIXTURES, name)
    if not os.path.exists(path):
        pytest.fail(f"reference fixture {path} is missing from the repository")
    return path


def rel_err(a, b):
    """Norm of the difference over norm of the reference (docs/method.md, section 5)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def synthetic_files(root, data, anchors=None, seed=0, anchor_seed=0):
    """Generated data under root: data {file name: make_synthetic_dataset arguments}, anchors {file: CLIP width}."""
    from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset
    for name, kw in data.items():
        make_synthetic_dataset(root / name, seed=seed, **kw)
    for name, width in (anchors or {"anchor.pt": 512}).items():
        make_synthetic_anchor_cache(root / name, clip_dim=width, seed=anchor_seed)
    return root


def interrupt_at_epoch(monkeypatch, epoch):
    """Make training raise KeyboardInterrupt (a Ctrl-C) as epoch `epoch` starts; returns a function that undoes it."""
    import train
    real = train.train_epoch

    def interrupting(*args, **kw):
        if args[10] == epoch:   # train_epoch's `epoch` argument
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(train, "train_epoch", interrupting)
    return lambda: monkeypatch.setattr(train, "train_epoch", real)


@pytest.fixture(scope="module")
def iemocap_files(tmp_path_factory):
    return synthetic_files(tmp_path_factory.mktemp("iemocap"),
                           {"IEMOCAP.pkl": dict(n_train=36, n_test=10, max_len=20, signal=2.5)}, seed=3, anchor_seed=3)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A command run in-process with --threads sets torch's thread count for the whole process; every test starts
    with the suite's count again."""
    count = torch.get_num_threads()
    yield
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def sigterm_after_first_epoch(cmd, out_dir):
    """Start `cmd` (a run.py command line), send it SIGTERM once a last.pth appears below out_dir (an epoch has
    finished), and return (exit status, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not glob.glob(os.path.join(glob.escape(str(out_dir)), "IEMOCAP", "*", "last.pth")):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err
