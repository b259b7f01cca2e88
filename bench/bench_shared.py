"""Training epochs on a shared machine : alone, next to a busy process, and two side by side.

    python bench/bench_shared.py                          # demo-sized epochs, variants new and old, 3 rounds
    python bench/bench_shared.py --size iemocap --reps 2  # the bench_epoch.py workload (hidden 768)
    python bench/bench_shared.py --quick                  # a few batches: checks the script

Scenarios, each timed per variant:
  alone  one training process, nothing else of ours running;
  busy   the same next to a separate process doing steady CPU-bound torch work (float32 matmuls in a loop on
         every core, torch's default settings: another researcher's job);
  pair   two training processes of the variant started on the same epoch at once (two of us).
Variants: `new` is what run.py does now (vega_utils/runs/threads.py: a thread per core, idle OpenMP threads sleep while
other processes keep the cores busy); `old` is the behaviour before the shared-machine thread handling
(torch's defaults: a thread per core,
spinning). A variant may carry modifiers after slashes: `new/threads=1` (as --threads 1),
`old/OMP_WAIT_POLICY=PASSIVE` (an upper-case name is an environment variable of the process, set before torch is
imported).
Every training process sets up and runs one untimed epoch first; then the rounds run scenario by scenario and
variant by variant, so a machine whose speed drifts weighs on all alike. For each timed epoch the script
also reports how much CPU the rest of the machine used (cores busy outside our processes, from /proc/stat),
so an epoch disturbed by another tenant shows as such. Not a test.
"""
import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCENARIOS = ("alone", "busy", "pair")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["demo", "iemocap"], default="demo",
                   help="demo: run.py --demo's data and model (hidden 128); iemocap: bench_epoch.py's (hidden 768)")
    p.add_argument("--variants", default="new,old", help="comma-separated, see above")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--reps", type=int, default=3, help="rounds (each variant: one epoch per scenario per round)")
    p.add_argument("--steps", type=int, help="time only the first STEPS batches of an epoch")
    p.add_argument("--quick", action="store_true", help="3 steps an epoch, 1 round")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)     # a training process of this variant
    p.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data_dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def split_variant(spec):
    """'new/threads=1/OMP_WAIT_POLICY=PASSIVE' -> ('new', threads or None, {env})."""
    base, *mods = spec.split("/")
    if base not in ("new", "old"):
        raise SystemExit(f"unknown variant {spec!r}: it starts with new or old")
    threads, env = None, {}
    for mod in mods:
        key, _, value = mod.partition("=")
        if key == "threads":
            threads = int(value)
        elif key.isupper():
            env[key] = value
        else:
            raise SystemExit(f"unknown modifier {mod!r} in {spec!r}")
    return base, threads, env


# ---------------------------------------------------------------- child processes
def run_child(args):
    base, threads, _ = split_variant(args.child)
    import random

    import torch

    import main
    import train
    from dataloader import load_dialogues, make_loaders
    from run import DEMO
    from vega_utils.anchors.bank import load_anchor_cache
    from vega_utils.common import seed_everything
    from vega_utils.data.datasets import dataset_info
    from vega_utils.runs.config import load_preset, resolve
    from vega_utils.runs.threads import CoreShare, apply_threads, default_threads

    if base == "new" or threads:   # as run.py
        apply_threads(threads or default_threads())
    paths = dict(data_path=os.path.join(args.data_dir, "IEMOCAP.pkl"),
                 anchor_path=os.path.join(args.data_dir, "anchor.pt"))
    cfg = load_preset("IEMOCAP").replace(**({**DEMO, **paths} if args.size == "demo" else paths))
    cfg = resolve(cfg.replace(clip_dim=512, num_workers=0, device="cpu", amp="auto"))
    seed_everything(cfg.seed)
    data = load_dialogues(cfg.data_path, cfg.Dataset)
    info = dataset_info(cfg.Dataset)
    bank = load_anchor_cache(cfg.anchor_path, info.class_names)
    loader = make_loaders(data, cfg)["train"]
    model = main.build_model(cfg)
    share = CoreShare(torch.get_num_threads()).start() if base == "new" else None   # as main.train_run
    device = torch.device("cpu")
    amp_dtype = train.resolve_amp(cfg.amp, device)
    optimizer = main.build_optimizer(cfg, model, amp_dtype, device)
    class_weights = torch.tensor(info.class_weights)
    rng = random.Random(cfg.seed)
    batches = FirstBatches(loader, args.steps)

    def epoch():
        wall, cpu = time.perf_counter(), time.process_time()
        train.train_epoch(model, batches, optimizer, cfg, bank, class_weights, device, amp_dtype, rng=rng,
                          progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return wall, cpu, share.sleeping_share() if share else -1.0   # -1: no CoreShare

    warm = epoch()
    print("READY " + json.dumps({"warmup_s": warm[0], "steps": len(batches), **runtime_facts()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        time.sleep(0.6)   # as in a long run: CoreShare has seen what the other processes do now
        if share:
            share.sleeping_share()
        print("EPOCH %.4f %.4f %.2f" % epoch(), flush=True)


class FirstBatches:
    """The loader's first `steps` batches (all without a limit); a fresh shuffle each epoch, as the loader."""

    def __init__(self, loader, steps):
        self.loader, self.steps = loader, steps

    def __len__(self):
        return len(self.loader) if self.steps is None else min(self.steps, len(self.loader))

    def __iter__(self):
        return itertools.islice(iter(self.loader), len(self))


def runtime_facts():
    """Threads and OpenMP runtimes of this process (the diagnosis of the shared-machine slowdown)."""
    import torch
    with open("/proc/self/maps") as f:
        gomp = sorted({line.split()[-1] for line in f if "libgomp" in line})
    return {"torch_threads": torch.get_num_threads(), "os_threads": len(os.listdir("/proc/self/task")),
            "libgomp": gomp, "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}


def run_busy():
    """Steady CPU-bound torch work with torch's defaults until killed: float32 matmuls on every core."""
    import torch
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    print("READY", flush=True)
    while True:
        torch.mm(a, b)


# ---------------------------------------------------------------- the parent
def cpu_jiffies(pids):
    """(busy jiffies of the whole machine, jiffies used by `pids`) so far."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    machine = sum(fields[:8]) - fields[3] - fields[4]   # everything but idle and iowait
    ours = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            ours += int(parts[11]) + int(parts[12])
        except OSError:
            pass
    return machine, ours


def start(cmd, env_extra, tag):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    return proc, json.loads(expect(proc, tag, "READY")[5:] or "{}")


def expect(proc, tag, prefix):
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
        print(f"[{tag}] {line}", end="", file=sys.stderr)
    raise SystemExit(f"{tag} exited ({proc.wait()}) before printing {prefix}")


def timed_epochs(children, watched):
    """Send 'go' to every child at once; (seconds, CPU seconds, share of the epoch with sleeping waits) of each,
    and the cores the rest of the machine kept busy meanwhile (outside `watched` processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    m0, o0 = cpu_jiffies(watched)
    t0 = time.perf_counter()
    for proc in children:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = [tuple(float(v) for v in expect(proc, "child", "EPOCH").split()[1:]) for proc in children]
    m1, o1 = cpu_jiffies(watched)
    return results, ((m1 - m0) - (o1 - o0)) / tick / (time.perf_counter() - t0)


def main_cli(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    if args.busy:
        return run_busy()
    variants, scenarios = args.variants.split(","), args.scenarios.split(",")
    for v in variants:
        split_variant(v)
    reps, steps = (1, 3) if args.quick else (args.reps, args.steps)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} cores", flush=True)
    procs, facts, rows, busy = {}, {}, [], None
    with tempfile.TemporaryDirectory(prefix="vega-shared-") as folder:
        make_data(folder, args.size, args.quick)
        try:
            me = [sys.executable, os.path.abspath(__file__), "--data_dir", folder, "--size", args.size]
            me += ["--steps", str(steps)] if steps else []
            for v in variants:
                for k in range(2 if "pair" in scenarios else 1):
                    procs[v, k], facts[v, k] = start(me + ["--child", v], split_variant(v)[2], f"{v}#{k}")
                    print(f"{v}#{k} ready: {json.dumps(facts[v, k])}", flush=True)
            if "busy" in scenarios:
                busy, _ = start(me + ["--busy"], {}, "busy")
                os.kill(busy.pid, signal.SIGSTOP)
            watched = [p.pid for p in procs.values()] + ([busy.pid] if busy else [])
            for rep in range(reps):
                for scenario in scenarios:
                    for v in variants:
                        if busy and scenario == "busy":
                            os.kill(busy.pid, signal.SIGCONT)
                            time.sleep(0.5)   # its threads at work before the epoch starts
                        group = [procs[v, 0]] + ([procs[v, 1]] if scenario == "pair" else [])
                        times, outside = timed_epochs(group, watched)
                        if busy and scenario == "busy":
                            os.kill(busy.pid, signal.SIGSTOP)
                        rows.append({"rep": rep, "scenario": scenario, "variant": v, "seconds": [t[0] for t in times],
                                     "cpu_seconds": [t[1] for t in times], "sleeping": [t[2] for t in times],
                                     "outside_cores": outside})
                        each = [f"{t[0]:.2f} s (CPU {t[1]:.2f} s, waits sleeping {percent(t[2])})" for t in times]
                        print(f"round {rep + 1}/{reps} {scenario:5s} {v}: " + ", ".join(each) +
                              f"; other tenants {outside:.2f} cores", flush=True)
        finally:
            for proc in list(procs.values()) + ([busy] if busy else []):
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.kill()
                    proc.wait()
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    summary = summarise(rows, variants, scenarios)
    print_table(summary, variants, scenarios)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "facts": {
                f"{v}#{k}": fact for (v, k), fact in facts.items()}, "rows": rows, "summary": summary}, f, indent=2)
    return 0


def make_data(folder, size, quick):
    from run import DEMO_DATA
    from vega_utils.data.synthetic import IEMOCAP_LIKE, make_synthetic_anchor_cache, make_synthetic_dataset
    sizes = DEMO_DATA if size == "demo" else {**IEMOCAP_LIKE, "seed": 0}
    if quick:
        sizes = {**sizes, "n_train": 27, "n_test": 9}
    make_synthetic_dataset(os.path.join(folder, "IEMOCAP.pkl"), **sizes)
    make_synthetic_anchor_cache(os.path.join(folder, "anchor.pt"), clip_dim=512, seed=0)


def percent(share):
    return "-" if share < 0 else f"{share:.0%}"


def summarise(rows, variants, scenarios):
    """Per (variant, scenario): median seconds over rounds (pair: the slower process of each round), the share
    of each epoch with sleeping waits, and the cores other tenants used meanwhile."""
    out = {}
    for v in variants:
        for s in scenarios:
            mine = [r for r in rows if r["variant"] == v and r["scenario"] == s]
            if mine:
                worst = [max(r["seconds"]) for r in mine]
                out[f"{v} {s}"] = {"median_s": statistics.median(worst), "runs": worst,
                                   "sleeping": [t for r in mine for t in r["sleeping"]],
                                   "outside_cores": [r["outside_cores"] for r in mine]}
    return out


def print_table(summary, variants, scenarios):
    """Seconds an epoch (median), and for busy / pair the ratio to the same variant alone."""
    idle = summary.get(f"{variants[0]} alone", {}).get("median_s")
    print("\n| variant | " + " | ".join(f"{s} s" + (" (x alone)" if s != "alone" else "") for s in scenarios) +
          (f" | alone / {variants[0]} alone |" if idle else " |"))
    print("|---|" + "---|" * (len(scenarios) + (1 if idle else 0)))
    for v in variants:
        alone = summary.get(f"{v} alone", {}).get("median_s")
        cells = []
        for s in scenarios:
            m = summary[f"{v} {s}"]["median_s"]
            cells.append(f"{m:.2f}" + (f" ({m / alone:.2f}x)" if alone and s != "alone" else ""))
        extra = f" | {alone / idle:.2f}x" if idle and alone else ""
        print(f"| {v} | " + " | ".join(cells) + extra + " |")
    for key, s in summary.items():
        print(f"{key}: " + ", ".join(f"{t:.2f}" for t in s["runs"]) + " s; waits sleeping " +
              ", ".join(percent(t) for t in s["sleeping"]) + "; other tenants " +
              ", ".join(f"{c:.2f}" for c in s["outside_cores"]) + " cores")


if __name__ == "__main__":
    sys.exit(main_cli())
