"""CPU threads of a run: how many (--threads), and how idle OpenMP threads wait.

Imports nothing heavy: `configure_openmp_wait` must run before torch is imported (see its docstring).
"""
import os
import sys

# How idle OpenMP threads wait, chosen in issue 17 (bench/README.md, "Shared machine").
WAIT_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE"}
OMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


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


def configure_openmp_wait(environ=None):
    """Make idle OpenMP threads sleep soon instead of spinning for milliseconds. Returns the variables set.

    libgomp reads GOMP_SPINCOUNT once, when it is loaded (by `import torch`), so this only acts before that; a
    value the user set (or OMP_WAIT_POLICY) is left alone.
    """
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules or any(name in environ for name in OMP_WAIT_VARIABLES):
        return {}
    environ.update(WAIT_SETTINGS)
    return dict(WAIT_SETTINGS)


def apply_threads(threads):
    """Use `threads` threads for torch's intra-op work (OpenMP: oneDNN, MKL, aten and cpu_kernels.c, which
    reads torch.get_num_threads()) and for its inter-op pool."""
    import torch
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:   # allowed once, before any inter-op work: a second run in the same process keeps it
        pass
