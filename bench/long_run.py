"""Long default runs: the MELD-like NaN repro command for 60 epochs in three precision paths, one after the other.

    python bench/long_run.py                      # 3 x 60 epochs of the MELD-like repro set: ~16 min on 2 idle cores
    python bench/long_run.py --epochs 2 --json r.json   # a check of the script

Variants (each `run.py` in its own process, the same command otherwise):
- kernels bf16: the default (bf16 autocast on the CPU, the C kernels, ShadowAdam);
- torch-ops bf16: VEGA_CPU_KERNELS=0 (bf16 autocast, torch's ops, torch's fused AdamW);
- float32: --amp off.
Per variant: best test weighted F1 and its epoch, epochs run, skipped training steps (non-finite loss or
gradient, vega_utils/runs/step_guard.py), median training seconds per epoch, and why the run stopped.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REPRO = os.path.join(ROOT, "..", "shared", "repro", "meld-nan")
VARIANTS = {"kernels": ("kernels bf16", {}, []),
            "torch_ops": ("torch-ops bf16", {"VEGA_CPU_KERNELS": "0"}, []),
            "float32": ("float32", {}, ["--amp", "off"])}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=64)
    p.add_argument("--data_path", default=os.path.join(REPRO, "meld_like.pkl"))
    p.add_argument("--anchor_path", default=os.path.join(REPRO, "meld_like_anchor.pt"))
    p.add_argument("--variants", default="kernels,torch_ops,float32", help="comma-separated subset, run in order")
    p.add_argument("--output_dir", help="where the run folders go (default: a temporary folder, removed)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def run_variant(key, args, out_dir):
    label, env, flags = VARIANTS[key]
    cmd = [sys.executable, os.path.join(ROOT, "run.py"), "--Dataset", "MELD", "--data_path", args.data_path,
           "--anchor_path", args.anchor_path, "--output_dir", os.path.join(out_dir, key), "--device", "cpu",
           "--hidden_dim", "256", "--lr", "5e-4", "--epochs", str(args.epochs), "--seed", str(args.seed),
           "--no_progress", *flags]
    print(f"== {label}: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.time() - start
    runs = [os.path.join(dp, "summary.json") for dp, _, files in os.walk(os.path.join(out_dir, key))
            if "summary.json" in files]
    if not runs:
        raise RuntimeError(f"{label}: no summary.json (exit {proc.returncode}): {proc.stderr[-2000:]}")
    with open(runs[0]) as f:
        summary = json.load(f)
    with open(os.path.join(os.path.dirname(runs[0]), "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    best = (summary.get("best") or {}).get("test", {})
    result = {"variant": label, "exit_status": proc.returncode, "epochs_run": summary["epochs_run"],
              "best_weighted_f1": best.get("weighted_f1"), "best_epoch": summary["best_epoch"],
              "skipped_steps": summary.get("skipped_steps"), "stopped": summary["stopped"],
              "train_seconds_median": statistics.median(r["train_seconds"] for r in rows) if rows else None,
              "eval_seconds_median": statistics.median(r["eval_seconds"] for r in rows) if rows else None,
              "wall_seconds": wall, "skipped_per_epoch": [r.get("skipped_steps", 0) for r in rows]}
    print(f"   exit {proc.returncode}, {result['epochs_run']} epochs, best test weighted F1 "
          f"{100 * (result['best_weighted_f1'] or 0):.2f} at epoch {result['best_epoch']}, skipped steps "
          f"{result['skipped_steps']}, {wall:.0f} s; stopped: {result['stopped']}", flush=True)
    if proc.returncode:
        print(proc.stderr[-1500:], flush=True)
    return result


def table(results):
    lines = ["| variant | epochs run | best test weighted F1 | best epoch | skipped steps | train s/epoch (median) "
             "| eval s/epoch (median) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        f1 = "-" if r["best_weighted_f1"] is None else f"{100 * r['best_weighted_f1']:.2f}"
        lines.append(f"| {r['variant']} | {r['epochs_run']} | {f1} | {r['best_epoch']} | {r['skipped_steps']} | "
                     f"{r['train_seconds_median']:.2f} | {r['eval_seconds_median']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="vega-long-run-") as tmp:
        out_dir = args.output_dir or tmp
        results = [run_variant(k, args, out_dir) for k in keys]   # one at a time: each takes both cores
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r["exit_status"] == 0 and r["skipped_steps"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
