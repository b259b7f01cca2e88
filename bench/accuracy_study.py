"""Does CPU bf16 training cost accuracy? A paired study of `run.py` against `run.py --amp off`.

    python bench/accuracy_study.py --out bench/results/precision          # 2 sets x 6 seeds x 2 precisions
    python bench/accuracy_study.py --out /tmp/q --quick                   # a check of the script (a minute)
    python bench/accuracy_study.py --out /tmp/k --variant kernels_off     # one more arm: VEGA_CPU_KERNELS=0

For each generated data set (IEMOCAP-size in the IEMOCAP layout; MELD-size with `--Dataset MELD`) and each
seed, the default command (bf16 autocast on the CPU, the C kernels, ShadowAdam) and the same command with
`--amp off` (float32) train from the same seed on the same data; the figure per run is the best test weighted
F1 over the epochs (the reference's selection rule, read from the run's summary.json). Per set the script
prints the per-seed table, the mean paired difference (bf16 - float32) with a 95% interval (paired t; a
bootstrap over seeds beside it) and the number of seeds where bf16 is lower.

Each run is its own `run.py` process, so the study measures exactly what a user runs. Finished runs are
recorded in OUT/results.jsonl as they end: a stopped study continues where it stopped when started again.
"""
import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# The generated sets: IEMOCAP-size (the real 120/31 split) and MELD-size (380 dialogues, the size of the data a
# default run was once tried on). Signal 2.0 leaves the score room to move.
SETS = {
    "iemocap": dict(dataset="IEMOCAP", data=dict(n_train=120, n_test=31, min_len=8, max_len=110, signal=2.0)),
    "meld": dict(dataset="MELD", data=dict(n_train=304, n_test=76, min_len=2, max_len=32, signal=2.0)),
}
# The MELD-size set a user found bf16 behind float32 on (380 dialogues, 6,098 utterances, 7 classes, 9 speakers;
# shared/repro/meld-nan): the study uses it when it is there, so its figures speak to that report.
SHARED_MELD = os.path.join(ROOT, "..", "shared", "repro", "meld-nan")
# Arms: name -> (extra run.py flags, extra environment). "bf16" trains in bf16, "fp32" in float32.
ARMS = {
    "bf16": (["--amp", "bf16"], {}),
    "fp32": (["--amp", "off"], {}),
    "kernels_off": ([], {"VEGA_CPU_KERNELS": "0"}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="study folder: data, run folders and results.jsonl (default: none)")
    p.add_argument("--sets", default="iemocap,meld",
                   help="comma-separated subset of iemocap,meld (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="default: %(default)s")
    p.add_argument("--epochs", type=int, default=40, help="epochs per run (default: %(default)s)")
    p.add_argument("--hidden_dim", type=int, default=256, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=5e-4, help="default: %(default)s")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default: %(default)s)")
    p.add_argument("--variant", action="append", default=[], choices=sorted(set(ARMS) - {"bf16", "fp32"}),
                   help="one more arm to run beside bf16 and fp32 (repeatable; default: none)")
    p.add_argument("--arms", default="bf16,fp32", help="the arms compared (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny sets, 2 epochs, hidden 64: checks the script")
    return p.parse_args(argv)


def make_data(out, name, quick):
    from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset
    spec = SETS[name]
    folder = os.path.join(out, "data", name)
    data_path = os.path.join(folder, f"{spec['dataset']}.pkl")
    anchor_path = os.path.join(folder, "anchor.pt")
    if name == "meld" and not quick and os.path.exists(os.path.join(SHARED_MELD, "meld_like.pkl")):
        return os.path.join(SHARED_MELD, "meld_like.pkl"), os.path.join(SHARED_MELD, "meld_like_anchor.pt")
    if not os.path.exists(data_path):
        os.makedirs(folder, exist_ok=True)
        sizes = dict(spec["data"], n_train=12, n_test=6) if quick else spec["data"]
        make_synthetic_dataset(data_path, dataset=spec["dataset"], seed=0, **sizes)
        make_synthetic_anchor_cache(anchor_path, dataset=spec["dataset"], clip_dim=512, seed=0)
    return data_path, anchor_path


def load_results(path):
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[(r["set"], r["arm"], r["seed"])] = r
    return done


def run_one(args, set_name, arm, seed, data_path, anchor_path):
    flags, env = ARMS[arm]
    name = f"{set_name}_{arm}_seed{seed}"
    cmd = [sys.executable, os.path.join(ROOT, "run.py"), "--Dataset", SETS[set_name]["dataset"],
           "--data_path", data_path, "--anchor_path", anchor_path, "--CLIP_Model", "openai/clip-vit-base-patch32",
           "--output_dir", os.path.join(args.out, "runs"), "--name", name, "--seed", str(seed),
           "--hidden_dim", str(args.hidden_dim), "--lr", str(args.lr), "--epochs", str(args.epochs),
           "--threads", str(args.threads), "--device", "cpu", "--no_progress", "--no_tensorboard", *flags]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    run_dir = [ln.split("run folder: ", 1)[1].strip() for ln in proc.stdout.splitlines() if "run folder: " in ln][-1]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    return {"set": set_name, "arm": arm, "seed": seed, "best_f1": 100 * summary["best"]["test"]["weighted_f1"],
            "best_epoch": summary["best_epoch"], "skipped_steps": summary.get("skipped_steps", 0),
            "train_precision": summary["train_precision"], "seconds": round(time.time() - start, 1),
            "run_dir": run_dir}


def paired(diffs, n_boot=20000):
    """Mean, 95% paired-t interval and 95% bootstrap interval of the paired differences."""
    from scipy import stats
    n = len(diffs)
    mean = statistics.mean(diffs)
    if n < 2:
        return mean, (float("nan"), float("nan")), (float("nan"), float("nan"))
    se = statistics.stdev(diffs) / math.sqrt(n)
    half = stats.t.ppf(0.975, n - 1) * se
    rng = random.Random(0)
    boots = sorted(statistics.mean(rng.choices(diffs, k=n)) for _ in range(n_boot))
    return mean, (mean - half, mean + half), (boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1])


def report(done, sets, seeds, base="fp32", other="bf16"):
    lines = []
    for s in sets:
        rows = [(seed, done.get((s, other, seed)), done.get((s, base, seed))) for seed in seeds]
        rows = [(seed, b, f) for seed, b, f in rows if b and f]
        if not rows:
            continue
        lines += [f"\n{s}: {other} against {base}, best test weighted F1 (%)",
                  f"| seed | {other} | {base} | difference | {other} epoch | {base} epoch | {other} s | {base} s |",
                  "|---|---|---|---|---|---|---|---|"]
        for seed, b, f in rows:
            lines.append(f"| {seed} | {b['best_f1']:.2f} | {f['best_f1']:.2f} | {b['best_f1'] - f['best_f1']:+.2f} | "
                         f"{b['best_epoch']} | {f['best_epoch']} | {b['seconds']:.0f} | {f['seconds']:.0f} |")
        diffs = [b["best_f1"] - f["best_f1"] for _, b, f in rows]
        mean, t_ci, boot_ci = paired(diffs)
        lower = sum(d < 0 for d in diffs)
        lines.append(f"mean {other} {statistics.mean(b['best_f1'] for _, b, _ in rows):.2f}, "
                     f"{base} {statistics.mean(f['best_f1'] for _, _, f in rows):.2f}; paired difference "
                     f"{mean:+.2f} points, 95% interval (paired t) [{t_ci[0]:+.2f}, {t_ci[1]:+.2f}], bootstrap "
                     f"[{boot_ci[0]:+.2f}, {boot_ci[1]:+.2f}]; {other} lower on {lower} of {len(diffs)} seeds")
    return "\n".join(lines)


def main_cli(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.epochs, args.hidden_dim, args.seeds = 2, 64, args.seeds[:2]
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.jsonl")
    done = load_results(results_path)
    arms = args.arms.split(",") + args.variant
    sets = args.sets.split(",")
    paths = {s: make_data(args.out, s, args.quick) for s in sets}
    for seed in args.seeds:            # seed outermost: a stopped study still holds whole pairs of both sets
        for s in sets:
            for arm in arms:
                if (s, arm, seed) in done:
                    continue
                r = run_one(args, s, arm, seed, *paths[s])
                done[(s, arm, seed)] = r
                with open(results_path, "a") as f:
                    f.write(json.dumps(r) + "\n")
                print(f"{s} {arm} seed {seed}: best F1 {r['best_f1']:.2f} at epoch {r['best_epoch']} "
                      f"({r['seconds']:.0f} s)", flush=True)
    print(report(done, sets, args.seeds))
    for arm in args.variant:
        print(report(done, sets, args.seeds, base="bf16", other=arm))
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
