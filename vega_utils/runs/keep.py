"""What the runs of a sweep or of `run.py --seeds` keep on disk once they have ended (`--keep`).

Every run keeps its small files whatever the policy: config.json, metrics.jsonl and summary.json (what a sweep's
report, best.json and the seeds' aggregate are made from), predictions.csv, the plots and TensorBoard files.
The policies differ in the .pth files (docs/run-folder.md has their sizes):
- all: every run keeps them (as a single run does);
- best: the best run keeps its best checkpoint and best_vega_branch.pth, no run keeps any other .pth;
- none: no run keeps a .pth file.
"""
import glob
import json
import os

KEEP_CHOICES = ("all", "best", "none")
BEST_FILES = ("BEST_cls_f1_*.pth", "best_vega_branch.pth")   # what `best` leaves in the best run's folder


def drop_checkpoints(run_dir, keep_best=False):
    """Delete the .pth files of a run folder (but its best checkpoint and VEGA branch with keep_best); returns
    the bytes freed. A folder of another machine (not here) or a file already gone is skipped."""
    kept = {p for pattern in BEST_FILES for p in glob.glob(os.path.join(glob.escape(run_dir), pattern))}
    freed = 0
    for path in glob.glob(os.path.join(glob.escape(run_dir), "*.pth")):
        if keep_best and path in kept:
            continue
        try:
            size = os.path.getsize(path)
            os.remove(path)
            freed += size
        except FileNotFoundError:   # another worker removed it first
            pass
    return freed


def apply_policy(policy, ended_runs, best_run=None):
    """Apply `policy` to the folders of runs that have ended; best_run: the best of them (None: none is complete
    yet, so `best` deletes nothing). Returns the bytes freed."""
    if policy == "all" or (policy == "best" and best_run is None):
        return 0
    return sum(drop_checkpoints(d, keep_best=policy == "best" and d == best_run) for d in ended_runs
               if d and os.path.isdir(d))


def selected_f1(run_dir):
    """The F1 that selected a run's best epoch (summary.json), -1 when it has none."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return (json.load(f).get("best") or {}).get("selected_f1") or -1.0
    except (OSError, ValueError):
        return -1.0


def keep_seed_runs(policy, run_dirs, log=print, failed=()):
    """run.py --seeds: apply the policy once every seed has ended; the best seed is the one whose selected F1
    (validation F1 with --valid_ratio, else test F1) is highest. failed: the folders of seeds that failed after
    some epochs, tidied too and never the best."""
    if policy == "all" or not (run_dirs or failed):
        return 0
    best = max(run_dirs, key=selected_f1) if run_dirs else None
    freed = apply_policy(policy, run_dirs, best) + apply_policy("none", failed)   # a failed seed keeps no .pth
    log(f"--keep {policy}: {freed / 1e6:.0f} MB of .pth files removed"
        + (f"; the best checkpoint kept is {best}'s" if policy == "best" else ""))
    return freed
