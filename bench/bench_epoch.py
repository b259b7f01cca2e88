"""Seconds per IEMOCAP-sized epoch: the reference's computation (a) against this project's default path (b).

    python bench/bench_epoch.py                  # both variants, 3 timed epochs each (about 3 minutes, 2 cores)
    python bench/bench_epoch.py --quick          # a few batches, a sanity check of the script itself
    python bench/bench_epoch.py --device cuda    # when a GPU is lent

(a) straightforward: the reference's computation written the plain way — float32, every padded utterance
    position through every layer (compute_padding=True), stock PyTorch layers (nn.Dropout, autograd's Linear
    and Conv1d, see use_stock_layers), torch.optim.AdamW with its defaults; evaluation = the same padded float32
    forward with the VEGA branch and every loss term, as the reference evaluates.
(a0) for reference only (--variants a0): the same padded float32 computation with this project's layer code
    (its cheaper dropout mask and matmul backward).
(b) default: exactly what `python run.py` runs — train.train_epoch / train.eval_epoch on the packed rows,
    resolve_amp('auto') (bf16 autocast on the CPU, fp16 + GradScaler on CUDA), main.build_optimizer.
Timing: one untimed warm-up epoch, then --reps epochs, each a training epoch followed by an evaluation pass.
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
    p.add_argument("--reps", type=int, default=3, help="timed epochs per variant (median reported)")
    p.add_argument("--quick", action="store_true", help="tiny data (a few batches), 1 rep: checks the script")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--variants", default="a,b", help="comma-separated subset of a,b,a0")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no_eval_vega", dest="eval_vega", action="store_false",
                   help="(b) evaluates without the VEGA branch (no VEGA test-loss terms; predictions unchanged)")
    p.add_argument("--variant", choices=["a", "a0", "b"], help=argparse.SUPPRESS)   # child process mode
    p.add_argument("--data_dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def data_sizes(quick):
    from vega_utils.synthetic import IEMOCAP_LIKE
    return dict(n_train=18, n_test=9, min_len=8, max_len=110) if quick else IEMOCAP_LIKE


def make_data(folder, quick):
    from vega_utils.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset
    summary = make_synthetic_dataset(os.path.join(folder, "IEMOCAP.pkl"), seed=0, **data_sizes(quick))
    make_synthetic_anchor_cache(os.path.join(folder, "anchor.pt"), clip_dim=512, seed=0)
    return summary


# ---------------------------------------------------------------- one variant (child process)
def use_stock_layers():
    """Swap this project's faster layer code for the stock PyTorch ops the reference uses (process-wide).

    model.Dropout -> nn.Dropout's forward (bernoulli mask); model.LinearFn -> F.linear / F.conv1d with
    autograd's own backward. Same parameters, same numbers up to rounding.
    """
    import torch.nn as nn
    import torch.nn.functional as F
    import model

    class StockLinearFn:
        @staticmethod
        def apply(x, weight, bias, exact_conv):
            if exact_conv:
                return F.conv1d(x.unsqueeze(-1), weight.unsqueeze(-1), bias).squeeze(-1)
            return F.linear(x, weight, bias)

    model.Dropout.forward = nn.Dropout.forward
    model.LinearFn = StockLinearFn


def straightforward_train_epoch(model, loader, optimizer, cfg, bank, class_weights, device, rng):
    """The reference's training step: padded float32 forward, every loss, backward, AdamW."""
    import train
    model.train()
    for batch in loader:
        batch = batch.to(device)
        out = model(batch, bank.pick(training=True, rand=cfg.rand, rng=rng), compute_padding=True)
        loss = train.compute_losses(out, batch, cfg, class_weights)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()   # the reference logs the loss every batch (and this synchronises a GPU)


def straightforward_eval(model, loader, cfg, bank, class_weights, device):
    """The reference's evaluation: padded float32 forward with the VEGA branch, every loss, predictions."""
    import torch
    import train
    model.eval()
    anchors = bank.pick(training=False, rand=cfg.rand)
    preds, labels = [], []
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            out = model(batch, anchors, compute_padding=True)
            float(train.compute_losses(out, batch, cfg, class_weights)["total"])
            preds.append(out["all_logit"][~batch.pad_mask].argmax(-1).cpu())
            labels.append(batch.labels[~batch.pad_mask].cpu())
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()


def run_variant(args):
    import random

    import torch
    import main
    import train
    from dataloader import load_dialogues, make_loaders
    from model import VEGA
    from vega_utils.anchor_utils import load_anchor_cache
    from vega_utils.common import dataset_info, seed_everything
    from vega_utils.config import load_preset, resolve

    device = torch.device(args.device)
    fast = args.variant == "b"
    if args.variant == "a":
        use_stock_layers()
    cfg = resolve(load_preset("IEMOCAP").replace(
        data_path=os.path.join(args.data_dir, "IEMOCAP.pkl"), anchor_path=os.path.join(args.data_dir, "anchor.pt"),
        clip_dim=512, num_workers=0, device=args.device, amp="auto" if fast else "off"))
    seed_everything(cfg.seed)
    info = dataset_info(cfg.Dataset)
    data = load_dialogues(cfg.data_path, cfg.Dataset)
    bank = load_anchor_cache(cfg.anchor_path, info.class_names).to(device)
    loaders = make_loaders(data, cfg, pin_memory=device.type == "cuda")
    model = VEGA(cfg).to(device)
    class_weights = torch.tensor(info.class_weights, device=device)
    rng = random.Random(cfg.seed)
    amp_dtype = train.resolve_amp(cfg.amp, device)
    if fast:
        optimizer = main.build_optimizer(cfg, model, amp_dtype, device)
        test_set = train.EvalSet(loaders["test"], cfg.n_speakers)   # once per run, as main.train_run does
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

        def train_once():
            train.train_epoch(model, loaders["train"], optimizer, cfg, bank, class_weights, device, amp_dtype,
                              scaler, rng=rng, progress=False)

        def eval_once():
            train.eval_epoch(model, test_set, cfg, bank, class_weights, device, amp_dtype, progress=False,
                             vega_branch=args.eval_vega)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.l2)

        def train_once():
            straightforward_train_epoch(model, loaders["train"], optimizer, cfg, bank, class_weights, device, rng)

        def eval_once():
            straightforward_eval(model, loaders["test"], cfg, bank, class_weights, device)

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
    warm = [timed(train_once), timed(eval_once)]
    train_s, eval_s = [], []
    for _ in range(args.reps):
        train_s.append(timed(train_once))
        eval_s.append(timed(eval_once))
    count = {split: sum(len(data.records[i]) for i in ids)
             for split, ids in (("train", data.train_ids), ("test", data.test_ids))}
    result = {"variant": args.variant, "train_s": train_s, "eval_s": eval_s, "warmup_s": warm,
              "train_utterances": count["train"], "test_utterances": count["test"],
              "amp": str(amp_dtype), "optimizer": type(optimizer).__name__,
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
    names = {"a": "(a) straightforward", "a0": "(a0) padded fp32, project layers", "b": "(b) default fast path"}
    mem = "peak CUDA MB" if device == "cuda" else "peak RSS MB"
    print(f"| variant | train s/epoch (median) | train utt/s | eval s/pass (median) | eval utt/s | {mem} |")
    print("|---|---|---|---|---|---|")
    for v, r in results.items():
        peak = r["peak_cuda_mb"] if device == "cuda" else r["peak_rss_mb"]
        print(f"| {names[v]} | {r['train_median_s']:.2f} | {r['train_utt_per_s']:.0f} | "
              f"{r['eval_median_s']:.3f} | {r['eval_utt_per_s']:.0f} | {peak:.0f} |")
    for v, r in results.items():
        print(f"{v}: train runs {', '.join(f'{s:.2f}' for s in r['train_s'])} s; "
              f"eval runs {', '.join(f'{s:.3f}' for s in r['eval_s'])} s; amp {r['amp']}, {r['optimizer']}")
    if "a" in results and "b" in results:
        a, b = results["a"], results["b"]
        print(f"ratio (a)/(b): training {a['train_median_s'] / b['train_median_s']:.2f}x, "
              f"evaluation {a['eval_median_s'] / b['eval_median_s']:.2f}x, "
              f"peak memory (b)/(a) {(b['peak_rss_mb'] / a['peak_rss_mb']):.2f}")


def main_cli(argv=None):
    args = parse_args(argv)
    if args.variant:
        return run_variant(args)
    reps = 1 if args.quick else args.reps
    with tempfile.TemporaryDirectory(prefix="vega-bench-") as folder:
        summary = make_data(folder, args.quick)
        print(f"data: {summary['n_train']} train + {summary['n_test']} test dialogues, "
              f"{summary['n_utterances']} utterances; {reps} timed epoch(s) per variant after one warm-up")
        results = {}
        for v in args.variants.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", v, "--data_dir", folder,
                   "--reps", str(reps), "--device", args.device] + ([] if args.eval_vega else ["--no_eval_vega"])
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                raise SystemExit(f"variant {v} failed (exit {proc.returncode})")
            results[v] = summarise(json.loads(lines[-1][len("RESULT "):]))
            print(f"variant {v} done: train median {results[v]['train_median_s']:.2f} s", flush=True)
    print(f"machine: {machine_line(args.device)}; {time.strftime('%Y-%m-%d')}")
    print_table(results, args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(args.device), "date": time.strftime("%Y-%m-%d"),
                       "argv": sys.argv, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
