"""Seconds per IEMOCAP-sized epoch: the reference's computation (a) against this project's paths, per CPU setting,
each beside its floor (its matrix products at the measured matmul rates).

    python bench/bench_epoch.py                  # (a), (o), (b), natively and narrowed to AVX2 (~20 min, 2 cores)
    python bench/bench_epoch.py --cpu native --variants a,b --reps 5
    python bench/bench_epoch.py --quick          # a few batches, a sanity check of the script itself
    python bench/bench_epoch.py --device cuda    # when a GPU is lent

(a) straightforward: model.py's plain VEGA as it is (nothing swapped or patched): the reference's computation,
    float32, every padded utterance position through every layer, stock PyTorch layers (nn.Linear, nn.Conv1d,
    nn.Dropout), torch.optim.AdamW with its defaults; evaluation = the same padded float32 forward with the VEGA
    branch and every loss term, as the reference evaluates.
(o) `python run.py --amp off`: the fast path in float32.
(b) default: exactly what `python run.py` runs — main.build_model (the fast package's modules swapped into the
    plain model), train.train_epoch / train.eval_epoch on the packed rows, resolve_amp('auto') for training (bf16
    autocast where the CPU multiplies bf16 natively, float32 on other CPUs; fp16 + GradScaler on CUDA),
    resolve_eval_amp('auto') for evaluation (float32 on the CPU, fp16 autocast on CUDA), main.build_optimizer, and
    main.train_run's threads (vega_utils/runs/threads.py).
(f) for reference only: `--amp bf16` forced (on a CPU without native bf16, what the default used to be: slow).
(b0) for reference only: (b) with torch's default threads and no CoreShare (shared-machine thread handling off).
(c) for reference only: (b) with --compile (fast/capture.py); its compilation happens in the untimed warm-up.
(g) for reference only: (o) with attention on one grid per batch instead of grids of dialogues of similar length.

CPU settings (--cpu): `native`, and `avx2`: the children run with ONEDNN_MAX_CPU_ISA=AVX2 and
ATEN_CPU_CAPABILITY=avx2, so oneDNN and ATen behave as on an AVX2-only CPU (most laptops; no native bf16).

Floors: the warm-up epoch of each variant counts its matrix-product FLOPs (torch's FlopCounterMode; bf16 products
counted through aten's linear); each setting's float32 and bf16 matmul rates are measured at the model's product
shapes in a process of that setting. An epoch's floor is its FLOPs at the rate of its own precision: what the
products alone would take at the speed a plain large matmul reaches.

Timing: one untimed warm-up epoch, then --reps epochs, each a training epoch followed by an evaluation pass; the
variants of a setting run in their own processes, taking turns epoch by epoch (a, o, b, a, o, b, ...) so that a
machine whose speed drifts (other tenants) weighs on all alike. All read the same generated data (151 dialogues
of 8-110 utterances, the real feature dims) through the project's own loaders, with the default IEMOCAP config
(hidden 768, or --hidden_dim). Each variant's peak resident memory is its own. Not a test: it prints a table and,
with --json, writes the numbers.
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VARIANTS = {"a": "(a) straightforward", "o": "(o) --amp off", "b": "(b) default", "f": "(f) --amp bf16 forced",
            "b0": "(b0) (b), torch's threads", "c": "(c) (b) with --compile", "g": "(g) (o), one grid a batch"}
AMP = {"o": "off", "f": "bf16", "g": "off"}   # the fast variants' --amp; the others take the default, auto
SETTINGS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="timed epochs per variant (median reported)")
    p.add_argument("--quick", action="store_true", help="tiny data (a few batches), 1 rep: checks the script")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--variants", default="a,o,b", help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--cpu", default="native,avx2", help="CPU settings, comma-separated: native, avx2")
    p.add_argument("--hidden_dim", type=int, help="the model width (default: the IEMOCAP preset's 768)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no_eval_vega", dest="eval_vega", action="store_false",
                   help="(b) evaluates without the VEGA branch (no VEGA test-loss terms; predictions unchanged)")
    p.add_argument("--eval_amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="(b)'s evaluation precision (default: run.py's, float32 on the CPU)")
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)   # child process mode
    p.add_argument("--rates", action="store_true", help=argparse.SUPPRESS)          # child: matmul rates
    p.add_argument("--data_dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def data_sizes(quick):
    from vega_utils.data.synthetic import IEMOCAP_LIKE
    return dict(n_train=18, n_test=9, min_len=8, max_len=110) if quick else IEMOCAP_LIKE


def make_data(folder, quick):
    from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset
    summary = make_synthetic_dataset(os.path.join(folder, "IEMOCAP.pkl"), seed=0, **data_sizes(quick))
    make_synthetic_anchor_cache(os.path.join(folder, "anchor.pt"), clip_dim=512, seed=0)
    return summary


# ---------------------------------------------------------------- one variant (child process)
def straightforward_train_epoch(model, loader, optimizer, cfg, bank, class_weights, device, rng):
    """The reference's training step: padded float32 forward, every loss, backward, AdamW."""
    from model import compute_losses, pick_anchors
    model.train()
    for batch in loader:
        batch = batch.to(device)
        out = model(batch, pick_anchors(bank, training=True, rand=cfg.rand, rng=rng))
        loss = compute_losses(out, batch, cfg, class_weights)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()   # the reference logs the loss every batch (and this synchronises a GPU)


def straightforward_eval(model, loader, cfg, bank, class_weights, device):
    """The reference's evaluation: padded float32 forward with the VEGA branch, every loss, predictions."""
    import torch

    from model import compute_losses, pick_anchors
    model.eval()
    anchors = pick_anchors(bank, training=False, rand=cfg.rand)
    preds, labels = [], []
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            out = model(batch, anchors)
            float(compute_losses(out, batch, cfg, class_weights)["total"])
            preds.append(out["all_logit"][~batch.pad_mask].argmax(-1).cpu())
            labels.append(batch.labels[~batch.pad_mask].cpu())
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()


def build_variant(args):
    """(train_once, eval_once, info for the result) of one variant, set up as run.py would."""
    import random

    import torch

    import main
    import train
    from dataloader import load_dialogues, make_loaders
    from model import VEGA
    from vega_utils.anchors.bank import load_anchor_cache
    from vega_utils.common import seed_everything
    from vega_utils.data.datasets import dataset_info
    from vega_utils.runs.config import load_preset, resolve
    from vega_utils.runs.threads import CoreShare, apply_threads, default_threads

    device = torch.device(args.device)
    fast = args.variant != "a"
    if fast and args.variant != "b0":   # as run.py and main.train_run; (a) keeps torch's defaults
        apply_threads(default_threads())
    preset = load_preset("IEMOCAP")
    cfg = resolve(preset.replace(
        data_path=os.path.join(args.data_dir, "IEMOCAP.pkl"), anchor_path=os.path.join(args.data_dir, "anchor.pt"),
        clip_dim=512, num_workers=0, device=args.device, amp=AMP.get(args.variant, "auto") if fast else "off",
        eval_amp=args.eval_amp, compile=args.variant == "c", hidden_dim=args.hidden_dim or preset.hidden_dim))
    seed_everything(cfg.seed)
    info = dataset_info(cfg.Dataset)
    data = load_dialogues(cfg.data_path, cfg.Dataset)
    bank = load_anchor_cache(cfg.anchor_path, info.class_names).to(device)
    loaders = make_loaders(data, cfg, pin_memory=device.type == "cuda")
    model = main.build_model(cfg, device) if fast else VEGA(cfg).to(device)   # (a): model.py as it is
    model.single_grid = args.variant == "g"
    if args.variant != "b0" and fast and device.type == "cpu":
        CoreShare(torch.get_num_threads()).start()   # for the life of the process, as main.train_run's run
    class_weights = torch.tensor(info.class_weights, device=device)
    rng = random.Random(cfg.seed)
    amp_dtype = train.resolve_amp(cfg.amp, device)
    eval_dtype = train.resolve_eval_amp(cfg.eval_amp, device) if fast else None
    train.exact_float32(device)
    if fast:
        optimizer = main.build_optimizer(cfg, model, amp_dtype, device)
        test_set = train.EvalSet(loaders["test"], cfg.n_speakers)   # once per run, as main.train_run does
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        step_fn = main.build_step_fn(cfg, model, device)
        train_once = lambda: train.train_epoch(model, loaders["train"], optimizer, cfg, bank, class_weights, device,
                                               amp_dtype, scaler, rng=rng, progress=False, step_fn=step_fn)
        eval_once = lambda: train.eval_epoch(model, test_set, cfg, bank, class_weights, device, eval_dtype,
                                             progress=False, vega_branch=args.eval_vega)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.l2)
        train_once = lambda: straightforward_train_epoch(model, loaders["train"], optimizer, cfg, bank,
                                                         class_weights, device, rng)
        eval_once = lambda: straightforward_eval(model, loaders["test"], cfg, bank, class_weights, device)
    count = {split: sum(len(data.records[i]) for i in ids)
             for split, ids in (("train", data.train_ids), ("test", data.test_ids))}
    meta = {"variant": args.variant, "train_utterances": count["train"], "test_utterances": count["test"],
            "amp": str(amp_dtype), "eval_amp": str(eval_dtype), "optimizer": type(optimizer).__name__}
    return train_once, eval_once, meta


@contextlib.contextmanager
def product_counter():
    """torch's FlopCounterMode over the block, with bf16 products sent through aten's linear (which it counts)
    instead of oneDNN's (which it does not): the same products, counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from fast import layers
    saved, layers.ONEDNN_LINEAR = layers.ONEDNN_LINEAR, False
    try:
        with FlopCounterMode(display=False) as counter:
            yield counter
    finally:
        layers.ONEDNN_LINEAR = saved


def matmul_rates(hidden):
    """FLOP/s of a float32 and a bf16 product at the model's shapes ((R, H) @ (H, 4H), R = 2048 rows), each timed
    for at least a second after a warm-up: the rate the products of an epoch could reach at best."""
    import torch
    rates = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        x, w = torch.randn(2048, hidden, dtype=dtype), torch.randn(hidden, 4 * hidden, dtype=dtype)
        x @ w
        count, start = 0, time.perf_counter()
        while count < 2 or time.perf_counter() - start < 1.0:
            x @ w
            count += 1
        rates[name] = count * 2 * 2048 * hidden * 4 * hidden / (time.perf_counter() - start)
    from vega_utils.cpu import native_bf16
    return {**rates, "native_bf16": native_bf16()[1]}


def run_variant(args):
    import torch
    train_once, eval_once, meta = build_variant(args)
    device = torch.device(args.device)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # One untimed epoch warms kernels, allocator and caches; then epochs as a run has them, each training
    # epoch followed by its evaluation pass (which so starts with caches full of training data, as in a run).
    # Each timed epoch waits for the parent's "go" on stdin, so the variants take turns (see main_cli), and the
    # process reports and exits only on "finish", after every variant's timed epochs.
    # The warm-up epoch also counts the products' FLOPs (not with --compile: the counter cannot see inside)
    flops = {}
    if args.variant == "c":
        warm = [timed(train_once), timed(eval_once)]
    else:
        with product_counter() as train_count:
            warm = [timed(train_once)]
        with product_counter() as eval_count:
            warm.append(timed(eval_once))
        flops = {"train_flops": train_count.get_total_flops(), "eval_flops": eval_count.get_total_flops()}
    print("READY", flush=True)
    train_s, eval_s = [], []
    for _ in range(args.reps):
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("bench child: expected 'go' on stdin")
        # CoreShare saw the other variant's epoch: as in a run, where nothing alternates, let it see this one
        time.sleep(0.6)
        train_s.append(timed(train_once))
        eval_s.append(timed(eval_once))
        print(f"EPOCH {train_s[-1]:.3f} {eval_s[-1]:.3f}", flush=True)
    # Wait until every variant has finished its timed epochs: exiting frees this process's gigabytes, work the
    # kernel would otherwise do during another variant's last timed epoch (it made that epoch ~20% slower).
    if sys.stdin.readline().strip() != "finish":
        raise SystemExit("bench child: expected 'finish' on stdin")
    result = {**meta, **flops, "train_s": train_s, "eval_s": eval_s, "warmup_s": warm,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the parent: data, children, table
def machine_line(device):
    import platform

    import torch
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from vega_utils.cpu import X86_BF16, cpu_flags
    flags = cpu_flags()
    bf16 = ", ".join(f for f in (*X86_BF16, "bf16") if f in flags) or "no bf16 or AMX flags"
    isa = "avx512f" if "avx512f" in flags else ("avx2" if "avx2" in flags else platform.machine())
    line = f"{cpu} ({isa}; {bf16}), {os.cpu_count()} cores, torch {torch.__version__} " \
           f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    if device == "cuda":
        line += f", GPU {torch.cuda.get_device_name(0)}"
    return line


def summarise(r, rates):
    """A variant's medians, utterances per second and floors (its FLOPs at the setting's matmul rates)."""
    med_train, med_eval = statistics.median(r["train_s"]), statistics.median(r["eval_s"])
    out = {**r, "train_median_s": med_train, "eval_median_s": med_eval,
           "train_utt_per_s": r["train_utterances"] / med_train, "eval_utt_per_s": r["test_utterances"] / med_eval}
    if rates and r.get("train_flops"):
        own = "bfloat16" if "bfloat16" in r["amp"] else "float32"
        for name in ("float32", "bfloat16"):
            out[f"train_floor_{name}_s"] = r["train_flops"] / rates[name]
        out["train_floor_s"] = out[f"train_floor_{own}_s"]
    return out


def print_table(results, device, rates):
    """One table for every setting: times, floors and the ratios the goals are stated in."""
    mem = "peak CUDA MB" if device == "cuda" else "peak RSS MB"
    print(f"| CPU setting | variant | train s/epoch | eval s/pass | train TFLOP | floor f32 / bf16 s | "
          f"train / own floor | (a) / this | {mem} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setting, by_variant in results.items():
        a = by_variant.get("a")
        for v, r in by_variant.items():
            peak = r["peak_cuda_mb"] if device == "cuda" else r["peak_rss_mb"]
            floors = f"{r['train_floor_float32_s']:.2f} / {r['train_floor_bfloat16_s']:.2f}" \
                if "train_floor_s" in r else "-"
            to_floor = f"{r['train_median_s'] / r['train_floor_s']:.2f}x" if "train_floor_s" in r else "-"
            speedup = f"{a['train_median_s'] / r['train_median_s']:.2f}x" if a else "-"
            tflop = f"{r['train_flops'] / 1e12:.2f}" if r.get("train_flops") else "-"
            print(f"| {setting} | {VARIANTS[v]} | {r['train_median_s']:.2f} | {r['eval_median_s']:.3f} | {tflop} | "
                  f"{floors} | {to_floor} | {speedup} | {peak:.0f} |")
    for setting, by_variant in results.items():
        if setting in rates:
            rate = rates[setting]
            print(f"{setting}: matmul float32 {rate['float32'] / 1e9:.1f} GFLOP/s, bf16 {rate['bfloat16'] / 1e9:.1f} "
                  f"GFLOP/s; --amp auto: {rate['native_bf16']}")
        for v, r in by_variant.items():
            print(f"{setting} {v}: train runs {', '.join(f'{s:.2f}' for s in r['train_s'])} s; "
                  f"eval runs {', '.join(f'{s:.3f}' for s in r['eval_s'])} s; training amp {r['amp']}, "
                  f"evaluation amp {r.get('eval_amp', r['amp'])}, {r['optimizer']}")
        if "o" in by_variant and "b" in by_variant:
            o, b = by_variant["o"], by_variant["b"]
            print(f"{setting}: (o)/(b) training {o['train_median_s'] / b['train_median_s']:.2f}x "
                  f"(at least 1: the default is no slower than --amp off)")


def child_env(setting):
    return {**os.environ, **SETTINGS[setting]}


def measure_rates(args, setting):
    """The setting's matmul rates, measured in a process of its own (the variables act at torch's start)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--rates", "--hidden_dim", str(hidden_of(args))]
    out = subprocess.run(cmd, cwd=ROOT, env=child_env(setting), capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def hidden_of(args):
    from vega_utils.runs.config import load_preset
    return args.hidden_dim or load_preset("IEMOCAP").hidden_dim


def run_children(args, folder, reps, setting):
    """One process per variant (so each has its own peak memory), all started and warmed up first; then the
    timed epochs in turns, a, o, b, a, o, b, ...: a machine that slows down or speeds up during the run (other
    tenants) affects every variant alike instead of whichever ran last."""
    variants = args.variants.split(",")
    procs = {}
    try:
        for v in variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", v, "--data_dir", folder,
                   "--reps", str(reps), "--device", args.device, "--eval_amp", args.eval_amp] + \
                ([] if args.eval_vega else ["--no_eval_vega"]) + \
                (["--hidden_dim", str(args.hidden_dim)] if args.hidden_dim else [])
            procs[v] = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=child_env(setting))
            expect(procs[v], v, "READY")   # set up and warmed up before the next one starts
            print(f"{setting}: variant {v} ready", flush=True)
        for rep in range(reps):
            for v in variants:
                procs[v].stdin.write("go\n")
                procs[v].stdin.flush()
                seconds = expect(procs[v], v, "EPOCH").split()
                print(f"{setting}: epoch {rep + 1}/{reps} {v}: train {seconds[1]} s, eval {seconds[2]} s", flush=True)
        results = {}
        for v in variants:
            procs[v].stdin.write("finish\n")
            procs[v].stdin.flush()
            results[v] = json.loads(expect(procs[v], v, "RESULT")[len("RESULT "):])
            procs[v].wait()
        return results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def expect(proc, variant, tag):
    """The child's next line starting with tag (other lines pass through); exit with its output if it died."""
    for line in proc.stdout:
        if line.startswith(tag):
            return line.strip()
        print(f"[{variant}] {line}", end="", file=sys.stderr)
    proc.wait()
    raise SystemExit(f"variant {variant} failed (exit {proc.returncode}) before printing {tag}")


def main_cli(argv=None):
    args = parse_args(argv)
    if args.rates:
        print(json.dumps(matmul_rates(args.hidden_dim)))
        return 0
    if args.variant:
        return run_variant(args)
    for v in args.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}")
    settings = ["native"] if args.device == "cuda" else args.cpu.split(",")
    for setting in settings:
        if setting not in SETTINGS:
            raise SystemExit(f"unknown CPU setting {setting!r}: choose from {', '.join(SETTINGS)}")
    reps = 1 if args.quick else args.reps
    results, rates = {}, {}
    with tempfile.TemporaryDirectory(prefix="vega-bench-") as folder:
        summary = make_data(folder, args.quick)
        print(f"data: {summary['n_train']} train + {summary['n_test']} test dialogues, "
              f"{summary['n_utterances']} utterances; {reps} timed epoch(s) per variant after one warm-up")
        for setting in settings:
            if args.device == "cpu":
                rates[setting] = measure_rates(args, setting)
            raw = run_children(args, folder, reps, setting)
            results[setting] = {v: summarise(r, rates.get(setting)) for v, r in raw.items()}
    print(f"machine: {machine_line(args.device)}; {time.strftime('%Y-%m-%d')}")
    print_table(results, args.device, rates)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(args.device), "date": time.strftime("%Y-%m-%d"), "argv": sys.argv,
                       "rates": rates, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
