"""Train VEGA. Flags carry the reference's names; every config key has a flag (see configs/).

    python run.py --Dataset IEMOCAP --CLIP_Model openai/clip-vit-base-patch32 --cls_loss --clip_loss \
        --clip_all_clip_kl_loss --cls_all_cls_kl_loss
    python run.py --demo                      # synthetic data, about a minute on a laptop CPU
    python run.py --seeds 1 2 3 4 5           # one run per seed plus an aggregate folder
    python run.py --seeds 1 2 3 4 5 --jobs 2  # the same, two seeds at a time in two processes
    python run.py --config best.json          # a preset (sweep.py writes the best trial's); flags still win
    python run.py --valid_ratio 0.1           # select the epoch on held-out training dialogues
    python run.py --ablation no_vega          # the paper's ablations, see ABLATIONS
    python run.py --resume "output/IEMOCAP/[1125-1952]"
"""
import argparse
import datetime
import os
import shlex
import sys

from vega_utils.common import OneLineParser, VegaError, as_typed, atomic_write_text, exit_on_error, script_cmd
from vega_utils.runs import run_folder, threads
from vega_utils.runs.config import ABLATIONS, add_config_flags, config_from_args, resolve
from vega_utils.runs.keep import KEEP_CHOICES

# The demo trains the full method on a small synthetic set; a smaller model and a 10x learning rate let
# it learn within a minute on a laptop CPU (the paper's rate needs hundreds of epochs).
DEMO = {"name": "demo", "epochs": 10, "hidden_dim": 128, "lr": 1e-3, "data_path": "data/demo/IEMOCAP.pkl",
        "anchor_path": "data/demo/demo_anchor.pt", "clip_dim": 512}
DEMO_DATA = dict(n_train=100, n_test=25, min_len=8, max_len=30, signal=2.5, seed=0)


def parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, skip=("ablation",))   # --ablation below: it sets other flags too
    p.add_argument("--demo", action="store_true",
                   help="generate a small synthetic IEMOCAP-layout set and train on it (default: off)")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="one complete run per seed, then aggregate statistics (default: one run with --seed)")
    p.add_argument("--config", metavar="FILE", help="a preset JSON (e.g. a sweep's best trial): its keys override "
                   "the dataset's defaults, explicit flags still win (default: none)")
    p.add_argument("--jobs", type=int, default=1, help="--seeds: run this many seeds at a time, each in its own "
                   "process (CPU threads divided between them unless --threads is given; default: %(default)s)")
    p.add_argument("--devices", metavar="DEV,DEV", help="--jobs: devices given to the worker processes in turn, "
                   "e.g. cuda:0,cuda:1 (default: --device)")
    p.add_argument("--keep", choices=KEEP_CHOICES, help="--seeds (and sweep.py): the .pth files each run keeps once "
                   "all have ended: all, best (only the best run's best checkpoint), none; config.json, "
                   "metrics.jsonl, summary.json and the plots always stay (default: all)")
    p.add_argument("--ablation", choices=sorted(ABLATIONS),
                   help="set the flags of one of the paper's ablations (default: none, the full method)")
    p.add_argument("--resume", metavar="RUN_FOLDER",
                   help="continue an interrupted run from its last.pth (default: start a new run)")
    p.add_argument("--no_progress", action="store_true",
                   help="no progress bars (epoch lines still print; default: bars on a terminal)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def build_config(args):
    overrides = {}
    if args.demo:
        overrides.update(DEMO)
    if args.ablation:
        overrides.update(ABLATIONS[args.ablation])
    if getattr(args, "config", None):   # weaker than demo / ablation settings, stronger than the dataset's
        from vega_utils.runs.config import read_config_file
        overrides.update({k: v for k, v in read_config_file(args.config).items() if k not in overrides})
    given = {k: v for k, v in vars(args).items()}
    for k, v in overrides.items():
        given.setdefault(k, v)   # explicit flags win over demo / ablation / preset-file settings
    return config_from_args(argparse.Namespace(**given))


def prepare_demo(cfg):
    from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset
    if not os.path.exists(cfg.data_path):
        summary = make_synthetic_dataset(cfg.data_path, dataset=cfg.Dataset, **DEMO_DATA)
        print(f"demo: wrote synthetic {cfg.Dataset}-layout data to {cfg.data_path}: {summary}")
    if not os.path.exists(cfg.anchor_path):
        make_synthetic_anchor_cache(cfg.anchor_path, dataset=cfg.Dataset, clip_dim=cfg.clip_dim or 512, seed=0)
        print(f"demo: wrote a synthetic anchor cache to {cfg.anchor_path}")


def print_demo_end(summary):
    """The demo's F1 next to always answering the most frequent class; what it wrote; what to try next."""
    import numpy as np
    import pandas as pd

    from vega_utils.insight import report
    run_dir = summary["run_dir"]
    labels = pd.read_csv(os.path.join(run_dir, "predictions.csv"))["label"].to_numpy()
    names, ids = np.unique(labels, return_inverse=True)
    majority = np.full_like(ids, np.bincount(ids).argmax())
    base = report.classification_metrics(ids, majority, list(names))["weighted_f1"]
    print(f"demo: test weighted F1 {100 * summary['best']['test']['weighted_f1']:.2f} against "
          f"{100 * base:.2f} for always predicting the most frequent class")
    print(f"demo: wrote {', '.join(sorted(os.listdir(run_dir)))} in {run_dir}")
    print(f"next: {script_cmd('inference.py')} --checkpoint {shlex.quote(summary['best_checkpoint'])}")


def run_seeds(cfg, seeds, progress, jobs=1, devices=None, keep="all"):
    """One run per seed (in `jobs` processes when jobs > 1); a failed seed is reported and the others go on.
    The aggregate is read back from the run folders either way, so serial and parallel give the same one."""
    import main
    import train
    from vega_utils.data.datasets import info_of
    from vega_utils.insight import report
    from vega_utils.runs.keep import keep_seed_runs
    from vega_utils.sweep import parallel
    from vega_utils.sweep.preflight import check_trial_needs
    check_trial_needs(cfg, os.path.join(cfg.output_dir, cfg.name))   # what every seed needs: one line, no seed run
    if jobs > 1:
        done = parallel.run_seeds_parallel(cfg, seeds, jobs, parallel.parse_devices(devices, cfg.device))
    else:
        if devices:   # one worker: the first device named
            cfg = cfg.replace(device=parallel.parse_devices(devices, cfg.device)[0])
        done = []
        for i, seed in enumerate(seeds):
            print(f"===== seed {seed} ({i + 1}/{len(seeds)})")
            try:
                done.append((seed, main.train_run(cfg.replace(seed=seed), progress=progress)["run_dir"], None))
            except VegaError as e:   # a run that failed after some epochs still has a folder (--keep tidies it)
                done.append((seed, getattr(e, "run_dir", None), str(e)))
    keep_seed_runs(keep or "all", [run_dir for _, run_dir, error in done if run_dir and not error],
                   failed=[run_dir for _, run_dir, error in done if run_dir and error])
    per_seed = []
    for seed, run_dir, error in done:
        if error:
            print(f"error: seed {seed} failed: {error}", file=sys.stderr)
            per_seed.append({"seed": seed, "error": error})
        else:
            per_seed.append({"seed": seed, "run_dir": run_dir, "metrics": report.best_test_metrics(run_dir)})
    agg = report.aggregate_runs(per_seed)
    class_names = list(info_of(cfg).class_names)
    stamp = datetime.datetime.now().strftime("%m%d-%H%M%S")
    folder = run_folder.fresh_folder(os.path.join(cfg.output_dir, cfg.name, f"aggregate-{stamp}"))   # never shared
    run_folder.write_json(os.path.join(folder, "aggregate.json"), agg)
    markdown = report.aggregate_markdown(agg, class_names)
    atomic_write_text(os.path.join(folder, "aggregate.md"), markdown)
    if agg["n_seeds"]:
        report.plot_per_class_f1(agg, class_names, os.path.join(folder, "per_class_f1.png"))
    print(markdown)
    print(f"aggregate folder: {folder}")
    if train.STOP.is_set():
        return 143   # the shell's code for SIGTERM: the seeds that had not ended are listed as failed above
    return 0 if agg["n_seeds"] == len(seeds) else 1


# What may change when a run is resumed: how long it goes on, and where it runs. Anything else would make the
# resumed run a different experiment than the one its folder records.
RESUME_FLAGS = ("epochs", "patience", "device", "max_bad_steps", "threads", "tensorboard", "save_last")


def resume_config(args):
    from vega_utils.runs.config import Config
    given = sorted(k for k in Config.__dataclass_fields__ if k != "ablation" and hasattr(args, k))
    fixed = [k for k in given if k not in RESUME_FLAGS]
    several = ("demo", "seeds", "ablation", "config", "keep", "devices")   # and --jobs: flags of new runs
    if fixed or any(getattr(args, n) for n in several) or args.jobs != 1:
        names = [as_typed(args, n) for n in fixed + [n for n in several if getattr(args, n)]
                 + (["jobs"] if args.jobs != 1 else [])]
        raise VegaError(f"--resume continues {args.resume} with its own settings; {', '.join(names)} "
                        f"cannot change there (only --{', --'.join(RESUME_FLAGS)} can)")
    cfg = run_folder.config_of_run(args.resume, f"cannot resume from {args.resume}: its settings")
    return resolve(cfg.replace(**{k: getattr(args, k) for k in given}))


def run(argv=None):
    args = parser().parse_args(argv)
    import main
    import train
    train.stop_on_sigterm()
    try:
        return exit_on_error(lambda: run_command(args, progress=not args.no_progress and sys.stderr.isatty()),
                             args.debug)
    except KeyboardInterrupt as e:
        how = e.how if isinstance(e, main.Interrupted) else str(e) or "interrupted"
        resume = f"{script_cmd('run.py')} --resume {shlex.quote(e.run_dir)}" if isinstance(e, main.Interrupted) else ""
        if isinstance(e, main.Interrupted) and e.epoch == 0:
            print(f"{how} during epoch 1: no epoch finished, so {e.run_dir} holds only its settings; {resume} "
                  f"starts the run again from epoch 1 in that folder", file=sys.stderr)
        elif isinstance(e, main.Interrupted) and not os.path.exists(os.path.join(e.run_dir, run_folder.LAST)):
            print(f"{how} after epoch {e.epoch}: {e.run_dir} keeps the best checkpoint and the metrics; no "
                  f"last.pth (--save_last never), so it cannot be resumed", file=sys.stderr)
        elif isinstance(e, main.Interrupted):
            print(f"{how} after epoch {e.epoch}: {e.run_dir} keeps last.pth, the best checkpoint and the "
                  f"metrics; continue with: {resume}", file=sys.stderr)
        else:
            print(how, file=sys.stderr)
        return 143 if how.startswith("terminated") else 130   # the shell's codes for SIGTERM and SIGINT


def run_command(args, progress):
    import main
    if args.resume:
        cfg = resume_config(args)
        threads.apply_threads(threads.resolve_threads(cfg.threads))
        summary = main.train_run(cfg, resume_dir=args.resume, progress=progress)
        return 0 if summary else 1
    cfg = build_config(args)
    threads.apply_threads(threads.resolve_threads(cfg.threads))
    if args.demo:
        prepare_demo(cfg)
        cfg = resolve(cfg)
    if args.jobs < 1:
        raise VegaError(f"--jobs {args.jobs}: give 1 or more")
    if args.seeds:
        return run_seeds(cfg, args.seeds, progress, args.jobs, args.devices, args.keep)
    if args.jobs != 1 or args.devices or args.keep:
        raise VegaError("--jobs, --devices and --keep are for several seeds: give --seeds too "
                        "(a sweep's workers: sweep.py --jobs)")
    summary = main.train_run(cfg, progress=progress)
    if args.demo:
        print_demo_end(summary)
    return 0


if __name__ == "__main__":
    sys.exit(run())
