"""vega_utils/threads.py and --threads: one OpenMP runtime, the thread count applied everywhere, no spinning."""
import ctypes
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import inference
import run
from conftest import ROOT
from vega_utils import cpu_kernels, threads
from vega_utils.config import Config, load_preset
from vega_utils.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset

needs_kernels = pytest.mark.skipif(os.environ.get("VEGA_CPU_KERNELS") == "0" or
                                   (shutil.which("gcc") is None and shutil.which("cc") is None),
                                   reason="no C compiler (or VEGA_CPU_KERNELS=0): no CPU kernels here")
linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc")


def python(code, env=None):
    """Run `code` in a fresh interpreter at the repository root; its stdout."""
    full_env = {k: v for k, v in os.environ.items() if k not in threads.OMP_WAIT_VARIABLES}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


class DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def library_defining(handle, symbol):
    """The file that defines `symbol` as seen from the library `handle` (dlsym searches its dependencies)."""
    address = ctypes.cast(getattr(handle, symbol), ctypes.c_void_p).value
    info = DlInfo()
    libdl = ctypes.CDLL(None)
    libdl.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
    assert libdl.dladdr(address, ctypes.byref(info))
    return os.path.realpath(info.dli_fname.decode())


@needs_kernels
@linux_only
def test_kernels_run_on_torchs_openmp_runtime():
    """One thread pool: the kernels' parallel regions go to the libgomp that torch's own ops use."""
    lib = cpu_kernels.kernel()
    torch_cpu = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    torchs = library_defining(torch_cpu, "GOMP_parallel")
    assert "libgomp" in os.path.basename(torchs)
    assert library_defining(lib, "GOMP_parallel") == torchs
    assert library_defining(lib, "omp_get_thread_num") == torchs


@needs_kernels
@linux_only
def test_kernels_use_the_thread_count_torch_was_given():
    """With torch set to one thread, no kernel starts an OpenMP worker; with two, one appears (libgomp starts
    its workers at the first region that asks for them, so the process's thread count shows it)."""
    out = python("""
        import os
        import torch
        import torch.nn as nn
        from vega_utils import cpu_kernels
        from vega_utils.shadow_weights import ShadowAdam

        torch.set_num_threads(1)
        assert cpu_kernels.kernel() is not None
        torch.manual_seed(0)
        rows, width = 2048, 768
        x = torch.randn(rows, width)
        logits, stacked = torch.randn(rows, 3, width).bfloat16(), torch.randn(rows, 3, width).bfloat16()
        index = torch.randperm(2 * rows)[:rows]
        zero_rows = torch.tensor(sorted(set(range(2 * rows)) - set(index.tolist())))
        model = nn.Linear(width, width)
        opt = ShadowAdam(model, lr=1e-3, weight_decay=0.01, decoupled=True)

        def every_kernel():
            for t in (x, x.bfloat16()):
                cpu_kernels.dropout(t.requires_grad_(), 0.3).backward(torch.ones_like(t))
            z = x.bfloat16().requires_grad_()
            for act in cpu_kernels.ACTIVATIONS:
                cpu_kernels.activation_dropout(z, act, 0.3, True).backward(torch.ones_like(z))
            l, s = logits.clone().requires_grad_(), stacked.clone().requires_grad_()
            cpu_kernels.softmax_mix3(l, s).backward(torch.ones(rows, width, dtype=torch.bfloat16))
            cpu_kernels.scatter_rows(x, index, zero_rows, 2 * rows)
            model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
            opt.step()

        count = lambda: len(os.listdir("/proc/self/task"))
        before = count()
        every_kernel()
        one = count()
        torch.set_num_threads(2)
        every_kernel()
        print(before, one, count())
    """)
    before, one, two = map(int, out.split())
    assert one == before
    assert two == before + 1


def test_default_threads_split_the_cores_between_jobs(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert threads.cores_available() == 8
    assert [threads.default_threads(jobs) for jobs in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert threads.resolve_threads(None) == 8
    assert threads.resolve_threads(None, jobs=4) == 2
    assert threads.resolve_threads(3, jobs=4) == 3


def test_wait_policy_is_set_only_before_torch_and_never_over_the_users():
    environ = {}
    assert "torch" in sys.modules   # imported by this test module: too late to change libgomp
    assert threads.configure_openmp_wait(environ) == {} and environ == {}
    out = python("""
        import os, sys
        from vega_utils import threads
        user = {"GOMP_SPINCOUNT": "5"}
        print(threads.configure_openmp_wait(user) == {} and user == {"GOMP_SPINCOUNT": "5"})
        import run   # the entry points configure before they import torch
        print("torch" in sys.modules, os.environ.get("OMP_WAIT_POLICY"))
    """)
    assert out.split() == ["True", "True", threads.WAIT_SETTINGS["OMP_WAIT_POLICY"]]
    out = python("import inference, os; print(os.environ.get('OMP_WAIT_POLICY'))", env={"OMP_WAIT_POLICY": "ACTIVE"})
    assert out.strip() == "ACTIVE"


@linux_only
@pytest.mark.skipif(torch.__config__.parallel_info().find("OpenMP") < 0, reason="torch without OpenMP")
def test_idle_openmp_threads_sleep_instead_of_spinning():
    """After a parallel region, the worker of a process started through run.py uses (almost) no CPU while
    the main thread does other work; with libgomp's defaults it spins for milliseconds after every region."""
    code = """
        import os, sys, time
        if sys.argv[-1] == "run":
            import run
        import torch

        def worker_cpu_seconds():
            total = 0
            for tid in os.listdir("/proc/self/task"):
                if int(tid) != os.getpid():
                    with open(f"/proc/self/task/{tid}/schedstat") as f:
                        total += int(f.read().split()[0])
            return total / 1e9

        torch.set_num_threads(2)
        x = torch.randn(1 << 16)
        x.add_(1)
        time.sleep(0.1)
        before = worker_cpu_seconds()
        for _ in range(20):
            x.add_(1)          # one parallel region, a few microseconds of work per thread
            time.sleep(0.02)   # the main thread busy elsewhere
        print(worker_cpu_seconds() - before)
    """
    polite = float(python(code.replace("sys.argv[-1]", "'run'")))
    default = float(python(code.replace("sys.argv[-1]", "'plain'")))
    assert polite < 0.005, f"the OpenMP worker used {polite:.4f} s of CPU while idle"
    assert default > 0.005   # the measurement sees spinning (libgomp: ~0.5-10 ms a region, CPU-dependent)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    make_synthetic_dataset(root / "IEMOCAP.pkl", n_train=8, n_test=4, max_len=10, seed=5)
    make_synthetic_anchor_cache(root / "anchor.pt", clip_dim=512)
    return root


@pytest.mark.parametrize("given", [None, 1])
def test_threads_flag_is_applied_and_saved(files, tmp_path, given):
    argv = ["--data_path", str(files / "IEMOCAP.pkl"), "--anchor_path", str(files / "anchor.pt"),
            "--output_dir", str(tmp_path), "--hidden_dim", "32", "--clip_dim", "512", "--epochs", "1",
            "--batch-size", "4", "--no_progress"] + ([] if given is None else ["--threads", str(given)])
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(3)   # neither the default nor the flag: the run must set it
        assert run.run(argv) == 0
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)
    expected = given or threads.default_threads()
    assert used == expected
    (config_file,) = tmp_path.glob("*/*/config.json")
    config = json.loads(config_file.read_text())
    assert config["threads"] == given and config["resolved_threads"] == expected


def test_bad_thread_counts_are_one_line_errors(capsys, monkeypatch):
    assert run.run(["--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: invalid setting: threads 0 must be at least 1"
    assert inference.main(["--threads", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --threads -1 must be at least 1"


def test_inference_applies_threads_before_scoring(monkeypatch):
    saved = torch.get_num_threads()
    monkeypatch.setattr(inference, "score", lambda args: torch.get_num_threads())
    try:
        assert inference.main(["--threads", "1"]) == 1
        assert inference.main([]) == threads.default_threads()
    finally:
        torch.set_num_threads(saved)


def test_configs_without_threads_still_load():
    """Configs saved before --threads existed (checkpoints, run folders) lack the key."""
    saved = load_preset("IEMOCAP").to_dict()
    del saved["threads"]
    assert Config.from_dict(saved).threads is None
