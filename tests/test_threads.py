"""vega_utils/runs/threads.py and --threads: one OpenMP runtime, the thread count applied everywhere, and fewer threads
while other processes keep cores busy."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from conftest import ROOT

import inference
import main
import run
from fast import cpu_kernels
from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset
from vega_utils.runs import threads
from vega_utils.runs.config import Config, load_preset, resolve

needs_kernels = pytest.mark.skipif(os.environ.get("VEGA_CPU_KERNELS") == "0" or
                                   (shutil.which("gcc") is None and shutil.which("cc") is None),
                                   reason="no C compiler (or VEGA_CPU_KERNELS=0): no CPU kernels here")
linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc")


def python(code):
    """Run `code` in a fresh interpreter at the repository root; its stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@needs_kernels
@linux_only
def test_kernels_run_on_torchs_openmp_runtime():
    """One thread pool: the kernels' parallel regions go to the libgomp that torch's own ops use."""
    lib = cpu_kernels.kernel()
    torchs = threads.torch_openmp_library()
    assert "libgomp" in os.path.basename(torchs)
    assert threads.defining_library(lib, "GOMP_parallel") == torchs
    assert threads.defining_library(lib, "omp_get_thread_num") == torchs


@needs_kernels
@linux_only
def test_kernels_use_the_thread_count_torch_was_given():
    """With torch set to one thread, no kernel starts an OpenMP worker; with two, one appears (libgomp starts
    its workers at the first region that asks for them, so the process's thread count shows it)."""
    out = python("""
        import os
        import torch
        import torch.nn as nn
        from fast import cpu_kernels
        from fast.shadow_weights import ShadowAdam

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
            for act in cpu_kernels.KERNEL_ACTIVATIONS:
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


class Machine:
    """/proc/stat as the clock advances: `others` cores busy besides this process, which keeps `own` busy."""

    def __init__(self):
        self.now, self.busy, self.own_ticks, self.reads = 0.0, 0.0, 0.0, 0

    def run(self, seconds, others, own=1.0):
        self.now += seconds
        self.busy += (others + own) * seconds * 100
        self.own_ticks += own * seconds * 100

    def read(self, cpus):
        self.reads += 1
        return int(self.busy), int(self.own_ticks)


class Waits:
    available, on = True, False

    def __init__(self):
        self.calls = []

    def set(self, on):
        self.calls.append(on)
        self.on = on


def share_on(machine, threads_, cpus):
    waits = Waits()
    share = threads.CoreShare(threads_, cpus=range(cpus), read=machine.read, clock=lambda: machine.now, waits=waits)
    share.tick = 100
    return share, waits


def test_waits_sleep_while_the_others_leave_too_few_cores():
    machine = Machine()
    share, waits = share_on(machine, 2, cpus=2)
    steps = [(0.0, False), (1.0, True), (0.4, True), (0.3, True), (0.2, False), (0.5, False), (0.6, True),
             (2.0, True), (0.0, False)]
    for others, sleeping in steps:   # others: cores busy outside this process over the last 0.6 s
        machine.run(0.6, others)
        assert share.check() == sleeping, others
    assert waits.calls == [True, False, True, False]   # switched only on a change
    machine = Machine()
    share, waits = share_on(machine, 4, cpus=8)   # 8 cores, 2 jobs: 4 threads each
    for others, sleeping in [(4.0, False), (4.6, True), (4.3, True), (4.2, False)]:
        machine.run(0.6, others)
        assert share.check() == sleeping, others


def test_core_share_reports_the_share_of_time_spent_sleeping():
    machine = Machine()
    share, waits = share_on(machine, 2, cpus=2)
    for others in (0.0, 2.0, 2.0, 0.0):
        machine.run(0.5, others)
        share.check()
    assert share.sleeping_share() == pytest.approx(0.5)   # the 3rd and 4th windows were measured sleeping
    assert share.sleeping_share() == 0.0                   # nothing measured since: the current state
    machine.run(0.5, 2.0)
    share.check()
    share.close()
    assert waits.calls == [True, False, True, False]


def test_core_share_does_nothing_without_proc_libgomp_or_a_second_thread():
    class Never(Waits):
        def set(self, on):
            pytest.fail("switched")
    class NoGomp(Never):
        available = False
    no_proc = threads.CoreShare(2, cpus=[0, 1], read=lambda cpus: None, waits=Never())
    no_gomp = threads.CoreShare(2, cpus=[0, 1], read=lambda cpus: (0, 0), waits=NoGomp())
    one = threads.CoreShare(1, cpus=[0, 1], read=lambda cpus: (0, 0), waits=Never())
    for share in (no_proc, no_gomp, one):
        assert not share.enabled and not share.check() and share.start().watcher is None


@linux_only
def test_proc_readings_add_up():
    cpus = os.sched_getaffinity(0)
    busy0, own0 = threads.read_cpu_ticks(cpus)
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    busy1, own1 = threads.read_cpu_ticks(cpus)
    tick = os.sysconf("SC_CLK_TCK")
    assert (own1 - own0) / tick >= 0.2            # this process's own 0.3 s of CPU ...
    assert busy1 - busy0 >= own1 - own0 - 2       # ... is part of what its cores did


@linux_only
@pytest.mark.skipif(not threads.SleepingWaits().available, reason="torch without libgomp")
def test_sleeping_waits_stop_the_spinning_and_give_it_back():
    """The OpenMP worker's CPU time while the main thread does other work after each parallel region: libgomp
    spins for ~1-15 ms (CPU-dependent) after every region; with SleepingWaits on, microseconds."""
    out = python("""
        import os, time
        import torch
        from vega_utils.runs.threads import SleepingWaits

        def worker_seconds():
            me, total = os.getpid(), 0
            for tid in os.listdir("/proc/self/task"):
                if int(tid) != me:
                    with open(f"/proc/self/task/{tid}/schedstat") as f:
                        total += int(f.read().split()[0])
            return total / 1e9

        def per_region():
            x.add_(1)
            time.sleep(0.1)
            before = worker_seconds()
            for _ in range(20):
                x.add_(1)          # one parallel region, microseconds of work per thread
                time.sleep(0.05)   # the main thread busy elsewhere
            return (worker_seconds() - before) / 20

        torch.set_num_threads(2)
        x = torch.randn(1 << 16)
        waits = SleepingWaits()
        spinning = per_region()
        count = len(os.listdir("/proc/self/task"))
        waits.set(True)
        sleeping = per_region()
        waits.set(False)
        print(spinning, sleeping, per_region(), len(os.listdir("/proc/self/task")) - count)
    """)
    spinning, sleeping, again, extra_threads = out.split()
    assert float(spinning) > 5e-4 and float(again) > 5e-4
    assert float(sleeping) < 2e-4
    assert int(extra_threads) == 0   # the helper's pool is gone


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


@pytest.mark.skipif(torch.get_num_threads() < 2 or not threads.SleepingWaits().available,
                    reason="needs two threads on libgomp")
def test_training_waits_sleep_while_the_machine_is_full(files, tmp_path, monkeypatch):
    def full(cpus):   # every core busy with other processes' work, none of it this process's
        return int(time.monotonic() * 100 * len(cpus)), 0
    monkeypatch.setattr(threads, "read_cpu_ticks", full)
    monkeypatch.setattr(threads, "INTERVAL", 0.02)
    cfg = resolve(load_preset("IEMOCAP").replace(
        data_path=str(files / "IEMOCAP.pkl"), anchor_path=str(files / "anchor.pt"), output_dir=str(tmp_path),
        hidden_dim=32, clip_dim=512, epochs=2, batch_size=4))
    switches = []
    real_set = threads.SleepingWaits.set
    monkeypatch.setattr(threads.SleepingWaits, "set", lambda self, on: (switches.append(on), real_set(self, on)))
    threads_before = torch.get_num_threads()
    rows = [json.loads(line) for line in open(os.path.join(main.train_run(cfg, progress=False)["run_dir"],
                                                            "metrics.jsonl"))]
    assert switches == [True, False]   # on at the first measurement, off when the run ends
    assert 0 < rows[0]["cpu_shared"] <= 1 and rows[1]["cpu_shared"] == 1.0
    assert torch.get_num_threads() == threads_before
    assert not [t for t in threading.enumerate() if t.name.startswith("vega-")]   # watcher and helper gone


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
