"""CPU threads of a run: how many (--threads), and how they wait while other processes keep cores busy.

torch's ops, oneDNN and the C kernels (cpu_kernels.c) run their parallel regions on one OpenMP runtime: the
kernels ask for libgomp.so.1 by soname, so the loader gives them the copy torch loaded (tests/test_threads.py),
and they use torch.get_num_threads() threads. libgomp makes a thread that has finished its part of a region spin
(~8 ms on this project's machine) before it sleeps, and a training step opens a region every ~0.1 ms, so a
process with N threads keeps N cores busy all the time. On an idle machine that is what makes it fast (sleeping
at once, OMP_WAIT_POLICY=PASSIVE, made an idle demo epoch 2x slower: a wake-up per region). Next to another busy
process it is ruinous: spinning threads take the time slices the working ones need, and a region ends only when
all its threads have run (epochs 8-80x slower). Figures: bench/README.md, "Shared machine".

libgomp reads its wait policy once, at load; but it spins only 100 times (microseconds) "if there are more
OpenMP threads than available CPUs" (its documentation of GOMP_SPINCOUNT), counting every thread pool of the
process. So `CoreShare` measures, four times a second on a watcher thread, how many cores of this process's CPU
set other processes keep busy; when ours would not all have a core, `SleepingWaits` starts an idle pool of
cores + 1 threads on a helper thread, and every wait of ours turns short; when the cores are free again, it ends
that pool and the threads spin as before. The thread count itself never changes (results do not depend on the
load).
"""
import ctypes
import os
import threading
import time

INTERVAL = 0.25      # seconds between measurements: ~50 clock ticks on two cores
SLEEP_ABOVE = 0.5    # sleeping waits once the others leave fewer than threads - 0.5 cores free ...
SPIN_BELOW = 0.25    # ... spinning again once they leave threads - 0.25 (the gap keeps it from flapping)


def allowed_cpus():
    """CPUs this process may run on (its affinity mask, which taskset and cgroup cpusets narrow)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        return set(range(os.cpu_count() or 1))


def cores_available():
    return len(allowed_cpus())


def default_threads(jobs=1):
    """Threads per process when `jobs` worker processes are started together: the available cores split
    between them (at least one each)."""
    return max(1, cores_available() // max(1, jobs))


def resolve_threads(threads=None, jobs=1):
    """The thread count a process uses: `threads` when given, else its share of the cores."""
    if threads is not None and threads < 1:
        from vega_utils.common import VegaError
        raise VegaError(f"--threads {threads} must be at least 1")
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


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def defining_library(handle, symbol):
    """Path of the file that defines `symbol` as the library `handle` sees it (its dependencies searched)."""
    address = ctypes.cast(getattr(handle, symbol), ctypes.c_void_p).value
    info, libc = _DlInfo(), ctypes.CDLL(None)
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    if not libc.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        raise OSError(f"dladdr found no library for {symbol}")
    return os.path.realpath(info.dli_fname.decode())


def torch_openmp_library():
    """The OpenMP runtime torch's CPU library calls (a libgomp, whatever its file name), or None."""
    import torch
    try:
        torch_cpu = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"),
                                mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        return defining_library(torch_cpu, "GOMP_parallel")
    except (OSError, AttributeError):   # not loaded under that name, not libgomp, or no dladdr
        return None


class SleepingWaits:
    """Switches the libgomp torch uses between its spinning waits and short ones, at run time (see above)."""

    def __init__(self):
        path = torch_openmp_library()
        try:   # RTLD_NOLOAD: only the copy already loaded (torch's), never a new one
            self.gomp = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY) if path else None
        except OSError:
            self.gomp = None
        if self.gomp is not None:
            self.gomp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            self.gomp.GOMP_parallel.restype = None
            # the region's body: free(NULL), which does nothing, in C (no Python, no GIL, in libgomp's threads)
            self.body = ctypes.cast(ctypes.CDLL(None).free, ctypes.c_void_p)
        self.helper = self.release = None

    @property
    def available(self):
        return self.gomp is not None

    @property
    def on(self):
        return self.helper is not None

    def set(self, on):
        if not self.available or on == self.on:
            return
        if on:
            started, self.release = threading.Event(), threading.Event()
            self.helper = threading.Thread(target=self._hold_pool, args=(started,), daemon=True,
                                           name="vega-omp-sleep")
            self.helper.start()
            started.wait()
        else:
            self.release.set()
            self.helper.join()   # the thread's exit frees its pool: the count drops, spinning resumes
            self.helper = self.release = None

    def _hold_pool(self, started):
        # one empty region with more threads than the process may use cores; its pool lives as long as this
        # thread, sleeping (it is past the CPU count itself)
        self.gomp.GOMP_parallel(self.body, None, cores_available() + 1, 0)
        started.set()
        self.release.wait()


class CoreShare:
    """Makes idle OpenMP threads sleep while other processes leave fewer free cores than this one has threads.

    `start()` runs `check()` every INTERVAL seconds on a watcher thread (the waits are process-wide, so any
    thread may switch them; the training loop is left alone); `close()` stops it and restores spinning.
    `check()` measures how many cores of this process's CPU set the others kept busy since the last check and
    switches the waits. `read`, `clock` and `waits` are for tests (`waits`: anything with available, on and
    set(bool)).
    """

    def __init__(self, threads, cpus=None, read=None, clock=time.monotonic, waits=None):
        self.threads = threads
        self.cpus = set(cpus) if cpus is not None else allowed_cpus()
        self.read = read or read_cpu_ticks
        self.clock = clock
        self.waits = waits or SleepingWaits()
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.sleeping_seconds = self.seconds = 0.0   # for the share of a period spent sleeping
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.watcher = None
        self.last = (clock(), self.read(self.cpus))
        # one thread never waits for another
        self.enabled = self.last[1] is not None and self.waits.available and threads > 1

    def start(self):
        if self.enabled and self.watcher is None:
            self.watcher = threading.Thread(target=self._watch, daemon=True, name="vega-core-share")
            self.watcher.start()
        return self

    def _watch(self):
        while not self.stop.wait(INTERVAL):
            self.check()

    def check(self):
        """Measure since the last check and switch the waits; returns whether they sleep now."""
        ticks = self.read(self.cpus) if self.enabled else None
        now = self.clock()
        with self.lock:
            (then, before), self.last = self.last, (now, ticks)
            if ticks is None or before is None or now <= then:
                return self.waits.on
            (busy0, own0), (busy1, own1) = before, ticks
            others = ((busy1 - busy0) - (own1 - own0)) / self.tick / (now - then)
            self.sleeping_seconds += (now - then) * self.waits.on
            self.seconds += now - then
            free = len(self.cpus) - others
            if not self.waits.on and free < self.threads - SLEEP_ABOVE:
                self.waits.set(True)
            elif self.waits.on and free > self.threads - SPIN_BELOW:
                self.waits.set(False)
            return self.waits.on

    def sleeping_share(self):
        """Share of the time measured since the last call during which waits slept, then reset."""
        with self.lock:
            share = self.sleeping_seconds / self.seconds if self.seconds else float(self.waits.on)
            self.sleeping_seconds = self.seconds = 0.0
        return share

    def close(self):
        self.stop.set()
        if self.watcher is not None:
            self.watcher.join()
            self.watcher = None
        with self.lock:
            self.waits.set(False)
