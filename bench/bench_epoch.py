"""Seconds per IEMOCAP-sized epoch: the reference's computation (a) against this project's default path (b).

    python bench/bench_epoch.py                  # both variants, 5 timed epochs each (about 4 minutes, 2 cores)
    python bench/bench_epoch.py --quick          # a few batches, a sanity check of the script itself
    python bench/bench_epoch.py --device cuda    # when a GPU is lent

(a) straightforward: model.py's plain VEGA as it is (nothing swapped or patched): the reference's computation,
    float32, every padded utterance position through every layer, stock PyTorch layers (nn.Linear, nn.Conv1d,
    nn.Dropout), torch.optim.AdamW with its defaults; evaluation = the same padded float32 forward with the VEGA
    branch and every loss term, as the reference evaluates.
(b) default: exactly what `python run.py` runs — main.build_model (the fast package's modules swapped into the
    plain model), train.train_epoch / train.eval_epoch on the packed rows,
    resolve_amp('auto') for training (bf16 autocast on the CPU, fp16 + GradScaler on CUDA), resolve_eval_amp('auto')
    for evaluation (float32 on the CPU, fp16 autocast on CUDA), main.build_optimizer, and main.train_run's
    threads (vega_utils/runs/threads.py: --threads' default; idle OpenMP threads sleep while other processes keep the
    cores busy).
(b0) for reference only (--variants a,b,b0): (b) with torch's default threads and no CoreShare, as before
    the shared-machine thread handling: on an idle machine (b) and (b0) should not differ.
(c) for reference only (--variants a,b,c): (b) with --compile (fast/capture.py: the step captured by
    torch.compile, torch's own ops, fused AdamW); its compilation happens in the untimed warm-up epoch.
(a) keeps torch's defaults, as the reference runs.
Timing: one untimed warm-up epoch, then --reps epochs, each a training epoch followed by an evaluation pass; the
variants run in their own processes, taking turns epoch by epoch (a, b, a, b, ...) so that a machine whose speed
drifts (other tenants) weighs on both alike.
Both read the same generated data (151 dialogues of 8-110 utterances, the real feature dims) through the
project's own loaders, with the default IEMOCAP config (hidden 768). Each variant runs in its own process,
so its peak resident memory is its own. Not a test: it prints a table and, with --json, writes the numbers.
"""
import argparse
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="timed epochs per variant (median reported)")
    p.add_argument("--quick", action="store_true", help="tiny data (a few batches), 1 rep: checks the script")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--variants", default="a,b", help="comma-separated subset of a,b,b0,c")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no_eval_vega", dest="eval_vega", action="store_false",
                   help="(b) evaluates without the VEGA branch (no VEGA test-loss terms; predictions unchanged)")
    p.add_argument("--eval_amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="(b)'s evaluation precision (default: run.py's, float32 on the CPU)")
    p.add_argument("--variant", choices=["a", "b", "b0", "c"], help=argparse.SUPPRESS)   # child process mode
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
    fast = args.variant in ("b", "b0", "c")
    if args.variant in ("b", "c"):   # as run.py and main.train_run
        apply_threads(default_threads())
    cfg = resolve(load_preset("IEMOCAP").replace(
        data_path=os.path.join(args.data_dir, "IEMOCAP.pkl"), anchor_path=os.path.join(args.data_dir, "anchor.pt"),
        clip_dim=512, num_workers=0, device=args.device, amp="auto" if fast else "off",
        eval_amp=args.eval_amp, compile=args.variant == "c"))
    seed_everything(cfg.seed)
    info = dataset_info(cfg.Dataset)
    data = load_dialogues(cfg.data_path, cfg.Dataset)
    bank = load_anchor_cache(cfg.anchor_path, info.class_names).to(device)
    loaders = make_loaders(data, cfg, pin_memory=device.type == "cuda")
    model = main.build_model(cfg, device) if fast else VEGA(cfg).to(device)   # (a): model.py as it is
    if args.variant in ("b", "c") and device.type == "cpu":
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
    warm = [timed(train_once), timed(eval_once)]
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
    result = {**meta, "train_s": train_s, "eval_s": eval_s, "warmup_s": warm,
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
    line = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), " \
           f"Python {platform.python_version()}"
    if device == "cuda":
        line += f", GPU {torch.cuda.get_device_name(0)}"
    return line


def summarise(r):
    med_train, med_eval = statistics.median(r["train_s"]), statistics.median(r["eval_s"])
    return {**r, "train_median_s": med_train, "eval_median_s": med_eval,
            "train_utt_per_s": r["train_utterances"] / med_train, "eval_utt_per_s": r["test_utterances"] / med_eval}


def print_table(results, device):
    names = {"a": "(a) straightforward", "b": "(b) default fast path",
             "b0": "(b0) (b) before the shared-machine thread handling", "c": "(c) (b) with --compile"}
    mem = "peak CUDA MB" if device == "cuda" else "peak RSS MB"
    print(f"| variant | train s/epoch (median) | train utt/s | eval s/pass (median) | eval utt/s | {mem} |")
    print("|---|---|---|---|---|---|")
    for v, r in results.items():
        peak = r["peak_cuda_mb"] if device == "cuda" else r["peak_rss_mb"]
        print(f"| {names[v]} | {r['train_median_s']:.2f} | {r['train_utt_per_s']:.0f} | "
              f"{r['eval_median_s']:.3f} | {r['eval_utt_per_s']:.0f} | {peak:.0f} |")
    for v, r in results.items():
        print(f"{v}: train runs {', '.join(f'{s:.2f}' for s in r['train_s'])} s; "
              f"eval runs {', '.join(f'{s:.3f}' for s in r['eval_s'])} s; training amp {r['amp']}, "
              f"evaluation amp {r.get('eval_amp', r['amp'])}, {r['optimizer']}")
    if "a" in results and "b" in results:
        a, b = results["a"], results["b"]
        print(f"ratio (a)/(b): training {a['train_median_s'] / b['train_median_s']:.2f}x, "
              f"evaluation {a['eval_median_s'] / b['eval_median_s']:.2f}x, "
              f"peak memory (b)/(a) {(b['peak_rss_mb'] / a['peak_rss_mb']):.2f}")
    # the reference-only variants against (b): above 1, (b) is faster
    for v, meaning in (("c", "the compiled step is slower"), ("b0", "the shared-machine thread handling is faster")):
        if v in results and "b" in results:
            other, b = results[v], results["b"]
            print(f"ratio ({v})/(b) (above 1: {meaning}): training "
                  f"{other['train_median_s'] / b['train_median_s']:.3f}x, "
                  f"evaluation {other['eval_median_s'] / b['eval_median_s']:.3f}x")


def run_children(args, folder, reps):
    """One process per variant (so each has its own peak memory), all started and warmed up first; then the
    timed epochs in turns, a, b, a, b, ...: a machine that slows down or speeds up during the run (other
    tenants) affects every variant alike instead of whichever ran last."""
    variants = args.variants.split(",")
    procs = {}
    try:
        for v in variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", v, "--data_dir", folder,
                   "--reps", str(reps), "--device", args.device, "--eval_amp", args.eval_amp] + \
                ([] if args.eval_vega else ["--no_eval_vega"])
            procs[v] = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            expect(procs[v], v, "READY")   # set up and warmed up before the next one starts
            print(f"variant {v} ready", flush=True)
        for rep in range(reps):
            for v in variants:
                procs[v].stdin.write("go\n")
                procs[v].stdin.flush()
                seconds = expect(procs[v], v, "EPOCH").split()
                print(f"epoch {rep + 1}/{reps} {v}: train {seconds[1]} s, eval {seconds[2]} s", flush=True)
        results = {}
        for v in variants:
            procs[v].stdin.write("finish\n")
            procs[v].stdin.flush()
            results[v] = summarise(json.loads(expect(procs[v], v, "RESULT")[len("RESULT "):]))
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
    if args.variant:
        return run_variant(args)
    reps = 1 if args.quick else args.reps
    with tempfile.TemporaryDirectory(prefix="vega-bench-") as folder:
        summary = make_data(folder, args.quick)
        print(f"data: {summary['n_train']} train + {summary['n_test']} test dialogues, "
              f"{summary['n_utterances']} utterances; {reps} timed epoch(s) per variant after one warm-up")
        results = run_children(args, folder, reps)
    print(f"machine: {machine_line(args.device)}; {time.strftime('%Y-%m-%d')}")
    print_table(results, args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(args.device), "date": time.strftime("%Y-%m-%d"),
                       "argv": sys.argv, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
