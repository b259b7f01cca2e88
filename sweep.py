"""Hyperparameter sweeps on Optuna: many trials, many workers, one study in a shared storage.

    python sweep.py --study lr-search --trials 24                    # SQLite: output/<name>/optuna.db
    python sweep.py --study lr-search --trials 24 --jobs 2           # two worker processes on this machine
    python sweep.py --study s --trials 200 --storage postgresql+psycopg://user:pw@host/db   # on every machine
    python sweep.py --study lr-search --report                       # table, plots, best.json

Every run.py flag is accepted and fixes that setting for all trials, as do the settings --ablation, --demo or a
--config file set; the other settings of the search space (--space, default configs/sweep_space.json) are drawn
per trial. The objective is validation weighted F1 (--valid_ratio, default 0.1 here). Trials are run folders
output/<name>/<study>/trial_<n>/.
"""
import argparse
import os
import shlex
import signal
import subprocess
import sys

import run
import train
from vega_utils.common import PROJECT_ROOT, VegaError, exit_on_error, python_cmd
from vega_utils.runs import threads
from vega_utils.runs.config import ABLATIONS, DERIVED, Config

DEFAULT_SPACE = os.path.join(PROJECT_ROOT, "configs", "sweep_space.json")


def parser():
    p = run.parser()
    p.description = __doc__
    p.add_argument("--study", required=True,
                   help="the study's name: workers with the same name and storage share it (required)")
    p.add_argument("--trials", type=int, help="finished (complete or pruned) trials the study must hold, all "
                   "workers together (required unless --report)")
    p.add_argument("--storage", help="SQLAlchemy URL or journal:PATH (default sqlite:///<output_dir>/<name>/optuna.db)")
    p.add_argument("--space", default=DEFAULT_SPACE, help="search space JSON (default configs/sweep_space.json)")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                   help="stops trials that fall behind the others at the same epoch (default: %(default)s)")
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe",
                   help="TPE is seeded by --seed (default: %(default)s)")
    p.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a running trial's heartbeats (default: %(default)s)")
    p.add_argument("--grace", type=int, help="seconds of silence after which a running trial counts as dead "
                   "(default 2 x --heartbeat)")
    p.add_argument("--report", action="store_true", help="write the report of the study as it stands, run nothing")
    p.add_argument("--worker_index", type=int, default=0, help=argparse.SUPPRESS)   # set by --jobs, for the log
    return p


def fixed_keys(args):
    """The config keys every trial keeps as given, never drawn: those set by a flag, by --ablation, by --demo or by
    the --config file (a trial whose config.json says an ablation must run it)."""
    keys = set(vars(args))
    if args.demo:
        keys |= set(run.DEMO)
    if args.ablation:
        keys |= set(ABLATIONS[args.ablation])
    if args.config:
        from vega_utils.runs.config import read_config_file
        keys |= set(read_config_file(args.config))
    return {k for k in keys if k in Config.__dataclass_fields__ and k not in DERIVED}


def sweep_config(args):
    """The settings every trial starts from, and the keys fixed for all trials (never drawn)."""
    if args.seeds or args.resume:
        raise VegaError("sweep.py runs trials, not --seeds or --resume (run a trial's settings with "
                        "run.py --config report/best.json --seeds ...)")
    fixed = fixed_keys(args)
    if "valid_ratio" not in vars(args):
        args.valid_ratio = 0.1   # a sweep selects on validation F1; a preset file may not say 0 either (below)
        if args.config:
            from vega_utils.runs.config import read_config_file
            args.valid_ratio = read_config_file(args.config).get("valid_ratio") or 0.1
    cfg = run.build_config(args)
    if cfg.valid_ratio == 0:
        raise VegaError("--valid_ratio 0 would make the sweep select on the test set; use e.g. --valid_ratio 0.1")
    if args.demo:
        run.prepare_demo(cfg)
    return cfg, fixed


def report_folder(cfg, study):
    return os.path.join(cfg.output_dir, cfg.name, study, "report")


def storage_of(args, cfg):
    """(the study storage's URL, the storage opened): --storage, else the sweep's SQLite file."""
    from vega_utils.sweep import study as sweep_study
    url = args.storage or sweep_study.default_storage(cfg.output_dir, cfg.name)
    return url, sweep_study.open_storage(url, args.heartbeat, args.grace)


def ready_study(args, cfg):
    """Check what every trial needs (data, anchors, output folder; vega_utils/sweep/preflight.py), then open the
    storage and the study: (its URL, the storage, the study). Nothing is drawn before all of it is there."""
    from vega_utils.sweep import study as sweep_study
    from vega_utils.sweep.preflight import check_trial_needs
    from vega_utils.sweep.worker import trial_dir
    check_trial_needs(cfg, os.path.dirname(trial_dir(cfg, args.study, 0)))
    url, storage = storage_of(args, cfg)
    return url, storage, sweep_study.open_study(args.study, storage, args.sampler, args.pruner, cfg.seed, cfg.epochs)


def drawn_space(args, fixed):
    """The search space less the fixed keys; a sweep with nothing left to draw is refused."""
    from vega_utils.sweep.space import load_space
    space = {k: v for k, v in load_space(args.space).items() if k not in fixed}
    if not space:
        raise VegaError(f"every key of the search space {args.space} is fixed (by flags, --ablation, --demo or "
                        f"--config): nothing to draw; leave some out of the --config file or use another --space")
    return space


def work_here(args, cfg, fixed):
    """This process is one worker."""
    import optuna

    from vega_utils.sweep import report as sweep_report
    from vega_utils.sweep import worker as sweep_worker
    space = drawn_space(args, fixed)
    url, storage, study = ready_study(args, cfg)
    threads.apply_threads(threads.resolve_threads(cfg.threads))
    # Optuna logs a failed trial with its traceback (a Ctrl-C too): this worker says it in one line instead
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print(f"sweep worker {args.worker_index} (pid {os.getpid()}): study {args.study} in {url}, "
          f"{args.trials} trials, drawing {', '.join(space)}; "
          f"--save_last {cfg.save_last}, --keep {args.keep or 'all'}",
          flush=True)
    objective = sweep_worker.Objective(cfg, space, fixed, args.study, args.trials,
                                       progress=not args.no_progress and sys.stderr.isatty(), keep=args.keep or "all")
    sweep_worker.work(study, objective, args.trials, heartbeat=isinstance(storage, optuna.storages.RDBStorage))
    # the whole table once, by the worker that ran the study's last trial to end; the others say one line
    sweep_report.write_report(study, report_folder(cfg, args.study), full=sweep_worker.ran_the_last(study, objective))
    return 0


# what start_workers sets for each worker (each takes one value): left out of the command it passes on
WORKER_FLAGS = ("--jobs", "--devices", "--device", "--threads", "--worker_index")


def without_worker_flags(argv):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in WORKER_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in WORKER_FLAGS)):
            out.append(a)
    return out


def start_workers(argv, args, cfg):
    """--jobs K: K copies of this command, each one worker with its device and its share of the threads."""
    from vega_utils.sweep import parallel
    slots = parallel.worker_slots(args.jobs, parallel.parse_devices(args.devices, cfg.device), cfg.threads)
    # the trials' needs are there and the study (and its tables) exists before the workers start: no worker
    # starts for nothing, and they never race to create the tables
    ready_study(args, cfg)
    procs = []
    for i, (device, share) in enumerate(slots):
        extra = ["--device", device, "--threads", str(share), "--worker_index", str(i)]
        cmd = [sys.executable, os.path.abspath(__file__), *without_worker_flags(argv), *extra]
        # a command that can be pasted to start this worker again by hand
        print(f"sweep: worker {i}: {shlex.join([python_cmd(), *cmd[1:]])}", flush=True)
        procs.append(subprocess.Popen(cmd))

    def pass_on(signum, frame):   # a scheduler's SIGTERM reaches this process only: each worker stops its trial
        for p in procs:
            p.send_signal(signum)
    signal.signal(signal.SIGTERM, pass_on)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        # A Ctrl-C at a terminal reaches the workers too (same process group); a SIGINT sent to this process
        # alone does not: a worker still running after a moment is passed it.
        for p in procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        return 130
    return max(codes, key=abs)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    train.stop_on_sigterm()
    try:
        return exit_on_error(lambda: sweep_command(argv, args), args.debug)
    except KeyboardInterrupt as e:
        from vega_utils.sweep.worker import BetweenTrials
        what = "no trial of its was running" if isinstance(e, BetweenTrials) else "its trial is marked failed"
        print(f"sweep worker {args.worker_index} stopped ({e or 'interrupted'}); {what}, "
              f"the study goes on when a worker is started again", file=sys.stderr)
        return 143 if "terminated" in str(e) else 130


def sweep_command(argv, args):
    cfg, fixed = sweep_config(args)
    if args.report:
        from vega_utils.sweep import report as sweep_report
        from vega_utils.sweep import study as sweep_study
        study = sweep_study.load_study(args.study, storage_of(args, cfg)[1])
        sweep_report.write_report(study, report_folder(cfg, args.study))
        return 0
    if not args.trials or args.trials < 1:
        raise VegaError("--trials N (at least 1) says how many finished trials the study must hold")
    drawn_space(args, fixed)   # a bad space file or nothing to draw: refused before any worker starts
    if args.jobs > 1:
        return start_workers(argv, args, cfg)
    if args.devices and "device" not in vars(args):   # one worker: the first device named
        from vega_utils.sweep.parallel import parse_devices
        cfg = cfg.replace(device=parse_devices(args.devices, cfg.device)[0])
    return work_here(args, cfg, fixed)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
