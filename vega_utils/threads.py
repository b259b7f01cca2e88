"""CPU threads of a run: how many (--threads), and fewer while other processes keep cores busy.

torch's ops, oneDNN and the C kernels (cpu_kernels.c) run their parallel regions on one OpenMP runtime: the
kernels ask for libgomp.so.1 by soname, so the loader gives them the copy torch loaded (tests/test_threads.py),
and they use torch.get_num_threads() threads. libgomp makes a thread that has finished its part of a region spin
(~8 ms on this project's machine) before it sleeps, and a training step opens a region every ~0.1 ms, so a
process with N threads keeps N cores busy all the time. That is what makes an idle machine fast; next to another
busy process it is ruinous: spinning threads take the time slices the working ones need, and a region ends only
when all its threads have run (epochs 10-100x slower, bench/README.md "Shared machine"). Sleeping at once instead
(OMP_WAIT_POLICY=PASSIVE) fixed that but made an idle epoch up to 2x slower: a wake-up per region.

So the spinning stays, and `CoreShare` lowers the thread count to the cores the other processes leave free,
measured from /proc/stat every half second while training; it goes back up when they are free again.
"""
import os
import time

INTERVAL = 0.5       # seconds between measurements: ~100 clock ticks on two cores
MAX_WINDOW = 2.0     # a longer gap between checks (this process paused): measure afresh
DOWN_MARGIN = 0.5    # fewer threads when the free cores fall this far below the threads in use ...
UP_MARGIN = 0.75     # ... more when they rise this far above (the gap keeps it from flapping)


def cores_available():
    """CPUs this process may run on (its affinity mask, which taskset and cgroup cpusets narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        return os.cpu_count() or 1


def default_threads(jobs=1):
    """Threads per process when `jobs` worker processes are started together: the available cores split
    between them (at least one each)."""
    return max(1, cores_available() // max(1, jobs))


def resolve_threads(threads=None, jobs=1):
    """The thread count a process uses: `threads` when given, else its share of the cores."""
    return threads if threads else default_threads(jobs)


def apply_threads(threads):
    """Use `threads` threads for torch's intra-op work (OpenMP: oneDNN, aten and cpu_kernels.c, which reads
    torch.get_num_threads()) and for its inter-op pool."""
    import torch
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:   # allowed once, before any inter-op work: a second run in the same process keeps it
        pass


def read_cpu_ticks(cpus):
    """(busy clock ticks of `cpus` summed, ticks this process has used), from /proc; None where unreadable."""
    try:
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    ticks = [int(v) for v in fields[:8]]
                    busy += sum(ticks) - ticks[3] - ticks[4]   # all but idle and iowait (steal counts: not ours)
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return busy, int(own[11]) + int(own[12])   # utime + stime of every thread, past ones included
    except (OSError, ValueError, IndexError):
        return None


class CoreShare:
    """Keeps torch's thread count at the cores other processes leave free, at most `limit`.

    `check()` is cheap; call it often (main.train_run calls it before every forward pass): every INTERVAL
    seconds it measures how many cores of this process's CPU set others kept busy since the last measurement
    and sets threads to what is left (at least 1). `read`, `clock` and `set_threads` are for tests.
    """

    def __init__(self, limit, cpus=None, read=None, clock=time.monotonic, set_threads=None):
        self.limit = self.threads = limit
        self.cpus = set(cpus) if cpus is not None else set(os.sched_getaffinity(0))
        self.read = read or read_cpu_ticks
        self.clock = clock
        self.set_threads = set_threads or _torch_set_threads
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.thread_seconds = self.seconds = 0.0   # for the mean thread count of a period
        self.last = (clock(), self.read(self.cpus))
        self.enabled = self.last[1] is not None

    def check(self, min_interval=None, max_window=MAX_WINDOW):
        """Re-measure if `min_interval` seconds have passed; returns the thread count in use. A window longer
        than `max_window` (None: any) only starts a new one: what others did while this process waited (say,
        between epochs) says little about now."""
        now = self.clock()
        if not self.enabled or now - self.last[0] < (INTERVAL if min_interval is None else min_interval):
            return self.threads
        ticks = self.read(self.cpus)
        if ticks is None:
            self.enabled = False
            return self.threads
        (then, (busy0, own0)), (busy1, own1) = self.last, ticks
        self.last = (now, ticks)
        if max_window is not None and now - then > max_window:
            return self.threads
        others = ((busy1 - busy0) - (own1 - own0)) / self.tick / (now - then)
        self.thread_seconds += self.threads * (now - then)
        self.seconds += now - then
        free = len(self.cpus) - others
        wanted = self.threads
        if free < self.threads - DOWN_MARGIN:
            wanted = max(1, int(free + 0.5))
        elif free > self.threads + UP_MARGIN:
            wanted = min(self.limit, int(free + 0.25))
        if wanted != self.threads:
            self.set_threads(wanted)
            self.threads = wanted
        return self.threads

    def restart(self):
        """Start a new measuring window now (the next check decides on what others do from here on)."""
        self.last = (self.clock(), self.read(self.cpus))

    def hook(self, module, inputs):
        """As a forward pre-hook: `model.register_forward_pre_hook(share.hook)`."""
        self.check()

    def mean_threads(self):
        """Mean thread count since the last call (time-weighted over the measured intervals), then reset."""
        mean = self.thread_seconds / self.seconds if self.seconds else float(self.threads)
        self.thread_seconds = self.seconds = 0.0
        return mean


def _torch_set_threads(n):
    import torch
    torch.set_num_threads(n)
