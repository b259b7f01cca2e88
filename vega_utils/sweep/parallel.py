"""Several runs at once on one machine: worker slots (a device and a thread count each) and seeds in parallel.

`run.py --seeds ... --jobs K` and `sweep.py --jobs K` start K worker processes. Each gets a device from
`--devices` in turn and its share of the CPU cores (`--threads`, default cores // K), so K processes
never ask for more threads than there are cores.
"""
import os
import signal
from concurrent.futures import CancelledError, ProcessPoolExecutor
from multiprocessing import get_context

from vega_utils.common import VegaError
from vega_utils.runs import threads


def parse_devices(text, default):
    """`cuda:0,cuda:1` -> ['cuda:0', 'cuda:1']; None -> [default]."""
    if not text:
        return [default]
    devices = [d.strip() for d in text.split(",") if d.strip()]
    for d in devices:
        if d not in ("auto", "cpu", "cuda") and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise VegaError(f"--devices: {d!r} is not auto, cpu, cuda or cuda:N")
    if not devices:
        raise VegaError("--devices names no device")
    return devices


def worker_slots(jobs, devices, thread_count=None):
    """[(device, threads)] for `jobs` workers: devices in turn; threads as given, else this machine's cores
    divided between the workers (GPU workers too: their CPU threads feed the device and would otherwise
    oversubscribe the cores)."""
    if jobs < 1:
        raise VegaError(f"--jobs {jobs} must be at least 1")
    share = threads.resolve_threads(thread_count, jobs)
    return [(devices[i % len(devices)], share) for i in range(jobs)]


def _train_seed(cfg_dict, thread_count):
    """One seed's run in a worker process; returns its run folder, with the one-line error if it failed."""
    import main
    import train
    from vega_utils.runs.config import Config
    threads.apply_threads(thread_count)
    train.stop_on_sigterm()   # the launcher passes its SIGTERM on: the run stops at the next batch, summary written
    if train.STOP.is_set():   # a seed queued behind one that SIGTERM stopped in this process
        return {"error": "not started: terminated (SIGTERM)"}
    try:
        summary = main.train_run(Config.from_dict(cfg_dict), progress=False)
        return {"run_dir": summary["run_dir"]}
    except VegaError as e:
        return {"error": str(e), "run_dir": getattr(e, "run_dir", None)}
    except main.Interrupted as e:
        when = f"after epoch {e.epoch}" if e.epoch else "before its first epoch ended"
        return {"error": f"{e.how} {when}; --resume {e.run_dir} goes on", "run_dir": e.run_dir}


def run_seeds_parallel(cfg, seeds, jobs, devices):
    """Each seed's run in one of `jobs` processes (seed i goes to worker i mod jobs, which runs its seeds one
    after another); returns [(seed, run_dir or None, error or None)] in the order of `seeds`."""
    slots = worker_slots(min(jobs, len(seeds)), devices, cfg.threads)
    # spawn, not fork: a forked child would inherit torch's OpenMP pool and the parent's thread state
    context = get_context("spawn")
    pools = [ProcessPoolExecutor(max_workers=1, mp_context=context) for _ in slots]
    futures = []

    def pass_on():   # a SIGTERM here (run.py's handler): the seeds not started are dropped, the running ones stop
        for _, future in futures:
            future.cancel()
        for pool in pools:
            for pid in list(getattr(pool, "_processes", None) or {}):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
    import train
    train.stop_on_sigterm(also=pass_on)
    try:
        for i, seed in enumerate(seeds):
            device, share = slots[i % len(slots)]
            run_cfg = cfg.replace(seed=seed, device=device, threads=share)
            futures.append((seed, pools[i % len(slots)].submit(_train_seed, run_cfg.to_dict(), share)))
        out = []
        for seed, future in futures:
            try:
                result = future.result()
            except CancelledError:
                result = {"error": "not started: terminated (SIGTERM)"}
            except Exception as e:   # the worker process died (killed, out of memory): the other seeds go on
                result = {"error": f"worker process failed: {type(e).__name__}: {e}"}
            out.append((seed, result.get("run_dir"), result.get("error")))
            print(f"===== seed {seed}: " + (f"failed: {result['error']}" if result.get("error")
                                               else f"run folder {result['run_dir']}"), flush=True)
        return out
    finally:
        train.stop_on_sigterm()
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)

