"""One command for the day a GPU is at hand: does the CUDA path work, agree with the CPU, and how fast is it?

    python bench/gpu_check.py --out gpu_check.json          # under 5 minutes on one GPU
    python bench/gpu_check.py --device cpu --quick           # checks this script's plumbing on a CPU machine

(a) the parity tests in float32 on CUDA against tests/fixtures, and the CUDA tests (tests/test_cuda.py);
(b) three timed training epochs (after one warm-up) of an IEMOCAP-size generated set: the default settings
    against the padded float32 reference computation (bench/bench_epoch.py), with peak GPU memory;
(c) a checkpoint scored by inference.py on CUDA in float32 and in the default fp16, against the CPU's float32
    scores: largest probability difference, predictions that differ, weighted F1 of each;
(d) a run interrupted after epoch 2 and resumed on CUDA against the uninterrupted run: largest relative
    difference over every per-epoch metric.
Step (d) runs inside this process with the CPU-only code (C kernels, ShadowAdam, oneDNN's linear) replaced by
a trap, and the JSON says how often it was reached (it must be 0); tests/test_cuda.py sets the same trap around
the CUDA parity tests and runs. Every figure goes to --out.
"""
import argparse
import contextlib
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def sh(cmd, timeout):
    """Run a command from the repository root; (exit code, its output)."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def step_tests(device):
    if device != "cuda":
        return {"skipped": "no CUDA device"}
    rc, out = sh([sys.executable, "-m", "pytest", "-q", "tests/test_parity.py", "tests/test_cuda.py"], 600)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out.splitlines()[-1])}
    return {"exit_code": rc, **counts, "tail": out[-2000:] if rc else ""}


def step_speed(device, quick, folder):
    path = os.path.join(folder, "bench.json")
    cmd = [sys.executable, "bench/bench_epoch.py", "--device", device, "--json", path] + \
        (["--quick"] if quick else ["--reps", "3"])
    rc, out = sh(cmd, 900)
    if rc:
        return {"exit_code": rc, "tail": out[-2000:]}
    with open(path) as f:
        results = json.load(f)["results"]
    keep = ("train_s", "eval_s", "train_median_s", "eval_median_s", "peak_cuda_mb", "peak_rss_mb", "amp")
    figures = {v: {k: r[k] for k in keep if k in r} for v, r in results.items()}
    a, b = results["a"], results["b"]
    figures["ratio_train"] = a["train_median_s"] / b["train_median_s"]
    figures["ratio_eval"] = a["eval_median_s"] / b["eval_median_s"]
    return figures


class Trap:
    """Replaces the CPU-only entry points with counters that raise: any use in a CUDA step is a finding."""

    def __init__(self):
        self.reached = 0

    @contextlib.contextmanager
    def armed(self, on):
        from fast import cpu_kernels, layers, shadow_weights
        saved = [(cpu_kernels, "kernel", cpu_kernels.kernel),
                 (shadow_weights.ShadowAdam, "__init__", shadow_weights.ShadowAdam.__init__),
                 (layers, "ONEDNN_LINEAR", layers.ONEDNN_LINEAR)]

        def trap(*a, **k):
            self.reached += 1
            raise AssertionError("CPU-only code reached in a CUDA step")
        if on:
            cpu_kernels.kernel = trap
            shadow_weights.ShadowAdam.__init__ = trap
            layers.ONEDNN_LINEAR = False   # the oneDNN branch is then never taken; kernel() traps the rest
        try:
            yield
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)


def small_config(files, out, device, epochs):
    from test_training import small_cfg
    return small_cfg(files, out, device=device, epochs=epochs)


def step_scores(device, folder, files):
    """Train a small model on the CPU, then score its checkpoint on the CPU (float32) and on the device."""
    import pandas as pd

    import main
    summary = main.train_run(small_config(files, os.path.join(folder, "scores"), "cpu", 3), progress=False)
    scored = {}
    runs = [("cpu_float32", ["--device", "cpu"])]
    if device == "cuda":
        runs += [("cuda_float32", ["--device", "cuda", "--eval_amp", "off"]), ("cuda_fp16", ["--device", "cuda"])]
    for name, extra in runs:
        csv, js = os.path.join(folder, f"{name}.csv"), os.path.join(folder, f"{name}.json")
        rc, out = sh([sys.executable, "inference.py", "--checkpoint", summary["best_checkpoint"], "--no_progress",
                      "--predictions_out", csv, "--json", js, *extra], 300)
        if rc:
            return {"failed": name, "tail": out[-2000:]}
        with open(js) as f:
            scored[name] = (pd.read_csv(csv), json.load(f))
    base, base_scores = scored["cpu_float32"]
    probs = [c for c in base.columns if c.startswith("p_")]
    figures = {"run_weighted_f1": summary["best"]["test"]["weighted_f1"]}
    for name, (frame, scores) in scored.items():
        figures[name] = {"weighted_f1": scores["metrics"]["weighted_f1"], "precision": scores["precision"],
                         "max_abs_prob_diff_vs_cpu": float((frame[probs] - base[probs]).abs().to_numpy().max()),
                         "predictions_differing_vs_cpu": int((frame["prediction"] != base["prediction"]).sum()),
                         "utterances": len(frame)}
    return figures


def step_resume(device, folder, files, trap):
    import torch

    import main
    import run
    import train
    cfg = small_config(files, os.path.join(folder, "full"), device, 4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with trap.armed(device == "cuda"):
        full = main.train_run(cfg, progress=False)
        real = train.train_epoch

        def interrupt_at_3(*args, **kw):
            if args[10] == 3:
                raise KeyboardInterrupt
            return real(*args, **kw)
        train.train_epoch = interrupt_at_3
        try:
            main.train_run(cfg.replace(output_dir=os.path.join(folder, "cut")), progress=False)
        except KeyboardInterrupt:
            pass
        finally:
            train.train_epoch = real
        run_dir = glob.glob(os.path.join(folder, "cut", "*", "*"))[0]
        rc = run.run(["--resume", run_dir, "--no_progress"])

    def rows(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]
    a, b = rows(full["run_dir"]), rows(run_dir)
    worst = 0.0
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if k.endswith("_seconds") or not isinstance(v, float):
                continue
            worst = max(worst, abs(v - rb[k]) / max(abs(v), 1e-12))
    figures = {"exit_code": rc, "epochs": [len(a), len(b)], "max_rel_diff_per_epoch_metrics": worst,
               "same_best_epoch": full["best_epoch"] == json.load(open(os.path.join(run_dir, "summary.json")))[
                   "best_epoch"]}
    if device == "cuda":
        figures["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return figures


def main_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny benchmark data (plumbing check)")
    p.add_argument("--out", default="gpu_check.json")
    args = p.parse_args(argv)
    import torch

    from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device is visible (use --device cpu to check the script itself)")
    report = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "trap_reached": 0}
    trap = Trap()
    with tempfile.TemporaryDirectory(prefix="vega-gpu-check-") as folder:
        files = os.path.join(folder, "data")
        os.makedirs(files)
        make_synthetic_dataset(os.path.join(files, "IEMOCAP.pkl"), n_train=36, n_test=10, max_len=20, signal=2.5,
                               seed=3)
        make_synthetic_anchor_cache(os.path.join(files, "anchor.pt"), clip_dim=512, seed=3)
        from pathlib import Path
        files = Path(files)
        for name, step in (("a_tests", lambda: step_tests(args.device)),
                           ("b_speed", lambda: step_speed(args.device, args.quick, folder)),
                           ("c_scores", lambda: step_scores(args.device, folder, files)),
                           ("d_resume", lambda: step_resume(args.device, folder, files, trap))):
            start = time.perf_counter()
            try:
                report[name] = step()
            except Exception as e:   # one failing step must not hide the others' figures
                report[name] = {"error": f"{type(e).__name__}: {e}"}
            report[name]["seconds"] = round(time.perf_counter() - start, 1)
            print(f"{name}: {json.dumps(report[name])[:600]}", flush=True)
    report["trap_reached"] = trap.reached
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}; CPU-only code reached in CUDA steps: {trap.reached} time(s)")
    failed = [k for k, v in report.items() if isinstance(v, dict) and ("error" in v or v.get("exit_code"))]
    return 1 if failed or trap.reached else 0


if __name__ == "__main__":
    sys.exit(main_cli())
