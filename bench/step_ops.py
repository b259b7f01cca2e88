"""Dispatched ops and host synchronisations of one training step and one evaluation pass: the CUDA path,
emulated on the CPU, against the straightforward padded model.

    python bench/step_ops.py                 # counts (about 9 minutes on 2 cores, most of it compiling)
    python bench/step_ops.py --paths default,straightforward   # without the compiled path: about a minute
    python bench/step_ops.py --json out.json
    python bench/step_ops.py --device cuda   # on a GPU: also the measured step time of each path

On a GPU a step of the default configuration is a few milliseconds of work; what decides its speed is how many
kernels the host launches and how often it waits for the device. This script counts both without a GPU: it
runs the real training and evaluation code (train.train_epoch on a one-batch loader, train.eval_epoch) under a
TorchDispatchMode that records every non-view aten op, with every CUDA-side choice of the fast package taken
(fast.cpu_kernels.EMULATE_CUDA: one attention grid per batch, nn.Linear's own forward, torch's dropout), the C
kernels off (VEGA_CPU_KERNELS=0), fp16 autocast, fused AdamW and the sync-free step (vega_utils/runs/step_guard.py:
DeviceRecord). The `compiled` path is the same with --compile (fast/capture.py): a captured region's run counts as
one launch and the ops inside it as none (on a GPU it is a CUDA graph replay); it compiles first (minutes).

Host synchronisations are the ops that need a device value on the host: `_local_scalar_dense` (item(), float(),
bool(), int() of a tensor), `nonzero`, `masked_select`, indexing with a boolean mask, and `tolist()` / `cpu()` of a
tensor computed in the step (`numpy()` is not counted: on CUDA it needs a `cpu()` first); each is attributed to
the first line of this project's code on the stack. Work on the host-side mask before the
batch moves (the layout, the loss indices) is not counted: it
never waits for the device. The straightforward model is model.py's VEGA as it is, stepped as the reference
does (a padded fp16 forward, torch's default AdamW, the loss read every step).
"""
import argparse
import collections
import contextlib
import json
import os
import sys
import time

os.environ["VEGA_CPU_KERNELS"] = "0"   # before the fast package builds anything: CUDA has no C kernels
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from fast import capture  # noqa: E402

SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
            "aten.repeat_interleave.Tensor", "aten.unique_consecutive.default", "aten._unique2.default"}
# the innermost frame of these names decides an op's phase
PHASES = {"to_device": "host", "_engine_run_backward": "backward", "backward": "backward", "step": "optimizer",
          "optimizer_step": "optimizer", "finish": "optimizer", "compute_losses": "loss", "forward": "forward",
          "_call_impl": "forward"}


def project_frame(frame):
    """The innermost frame of this project's own code (not torch's, not this script's)."""
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(ROOT) and not path.endswith("step_ops.py") and "site-packages" not in path:
            return frame
        frame = frame.f_back
    return None


def phase_of(frame):
    while frame is not None:
        if frame.f_code.co_name in PHASES:
            return PHASES[frame.f_code.co_name]
        frame = frame.f_back
    return "other"


class Counter(TorchDispatchMode):
    """Every non-view aten op by phase; host synchronisations by source line. The "host" phase is the work on
    the host-side mask before the batch moves (train.to_device): its reads wait for nothing. host_scalars:
    data pointers of tensors that live on the host on CUDA too (torch's non-fused Adam keeps its step
    counts there), whose reads are no synchronisation either."""

    def __init__(self, host_scalars=()):
        super().__init__()
        self.ops, self.syncs, self.host_scalars = collections.Counter(), collections.Counter(), set(host_scalars)
        self.inside = 0   # > 0 while a captured region runs

    def _sync(self, what):
        if phase_of(sys._getframe(2)) == "host":
            return
        frame = project_frame(sys._getframe(2))
        where = "?" if frame is None else f"{os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno} " \
                                           f"{frame.f_code.co_name}"
        self.syncs[f"{where} ({what})"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view and not self.inside:
            self.ops[phase_of(sys._getframe(1))] += 1
        name = str(func)
        if name == "aten._local_scalar_dense.default" and args[0].data_ptr() in self.host_scalars:
            pass
        elif name in SYNC_OPS or (name == "aten.index.Tensor" and any(
                torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))):
            self._sync(name.replace("aten.", "").replace(".default", ""))
        return func(*args, **kwargs)

    # fast/capture.py's observer: a captured region's run counts as one launch in its phase, the ops inside none
    @contextlib.contextmanager
    def region(self, phase):
        self.enter(phase)
        try:
            with _disable_current_modes():   # the compiled forward runs as it does without this counter
                yield
        finally:
            self.leave(phase)

    def enter(self, phase):
        self.ops[phase] += 1
        self.inside += 1

    def leave(self, phase):
        self.inside -= 1

    def __enter__(self):
        self._patched = [(name, getattr(torch.Tensor, name)) for name in ("tolist", "cpu")]
        for name, real in self._patched:
            setattr(torch.Tensor, name, self._host_read(name, real))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._patched:
            setattr(torch.Tensor, name, real)
        return super().__exit__(*exc)

    def _host_read(self, name, real):
        def read(tensor, *a, **k):
            self._sync(f"{name}()")
            return real(tensor, *a, **k)
        return read


def setup(hidden):
    import main
    from dataloader import load_dialogues, make_loaders
    from vega_utils.anchors.bank import load_anchor_cache
    from vega_utils.data.datasets import dataset_info
    from vega_utils.data.synthetic import IEMOCAP_LIKE, make_synthetic_anchor_cache, make_synthetic_dataset
    from vega_utils.runs.config import load_preset, resolve
    folder = os.path.join(ROOT, "bench", "results", "step_ops_data")
    if not os.path.exists(os.path.join(folder, "anchor.pt")):
        make_synthetic_dataset(os.path.join(folder, "IEMOCAP.pkl"), seed=0, **IEMOCAP_LIKE)
        make_synthetic_anchor_cache(os.path.join(folder, "anchor.pt"), clip_dim=512, seed=0)
    cfg = resolve(load_preset("IEMOCAP").replace(data_path=os.path.join(folder, "IEMOCAP.pkl"), clip_dim=512,
                                                 anchor_path=os.path.join(folder, "anchor.pt"), num_workers=0,
                                                 hidden_dim=hidden))
    data = load_dialogues(cfg.data_path, cfg.Dataset)
    loaders = make_loaders(data, cfg)
    bank = load_anchor_cache(cfg.anchor_path, dataset_info(cfg.Dataset).class_names)
    weights = torch.tensor(dataset_info(cfg.Dataset).class_weights)
    return main, cfg, loaders, bank, weights


def count(fn, optimizer=None):
    fn()   # once untimed and uncounted: lazy state (optimizer moments, caches) is made here
    steps = [] if optimizer is None or optimizer.defaults.get("fused") else \
        [s["step"].data_ptr() for s in optimizer.state.values() if "step" in s]
    counter = Counter(steps)
    capture.observer = counter
    try:
        with counter:
            fn()
    finally:
        capture.observer = None
    return {"ops": sum(counter.ops.values()), "ops_by_phase": dict(counter.ops),
            "host_syncs": sum(counter.syncs.values()), "syncs_by_source": dict(counter.syncs.most_common())}


def fast_path(main, cfg, loaders, bank, weights, device, dtype, captured=False):
    """The default path's training step and evaluation pass, CUDA's choices (emulated on a CPU); captured: with
    --compile (its forward + losses and their backward each one region, fast/capture.py)."""
    import random

    import train
    model = main.build_model(cfg, device)
    step_fn = main.build_step_fn(cfg.replace(compile=captured), model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.l2, fused=True)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    batch = [next(iter(loaders["train"]))]
    test = train.EvalSet(loaders["test"], cfg.n_speakers)
    rng = random.Random(0)
    train_once = lambda: train.train_epoch(model, batch, optimizer, cfg, bank, weights,
                                           device, dtype, scaler, rng=rng, progress=False, sync_free=True,
                                           step_fn=step_fn)
    eval_once = lambda: train.eval_epoch(model, test, cfg, bank, weights, device, dtype,
                                         progress=False)
    return train_once, eval_once, optimizer


def plain_path(main, cfg, loaders, bank, weights, device, dtype):
    """model.py as it is, stepped and evaluated as the reference does (bench_epoch.py's straightforward code)."""
    import random

    import bench_epoch

    import train
    from model import VEGA
    model = VEGA(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.l2)
    batch = [next(iter(loaders["train"]))]
    rng = random.Random(0)

    def train_once():
        with train.autocast(device, dtype):
            bench_epoch.straightforward_train_epoch(model, batch, optimizer, cfg, bank, weights, device, rng)

    def eval_once():
        with train.autocast(device, dtype):
            bench_epoch.straightforward_eval(model, loaders["test"], cfg, bank, weights, device)
    return train_once, eval_once, optimizer


def step_seconds(step, device, reps):
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--hidden_dim", type=int, default=768)
    p.add_argument("--reps", type=int, default=20, help="timed steps per path on a GPU")
    p.add_argument("--paths", default="default,compiled,straightforward",
                   help="comma-separated: default, compiled (--compile), straightforward")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    from fast import cpu_kernels
    cpu_kernels.EMULATE_CUDA = args.device == "cpu"
    device = torch.device(args.device)
    main, cfg, loaders, bank, weights = setup(args.hidden_dim)
    bank, weights = bank.to(device), weights.to(device)   # once, not inside the counted and timed steps
    results = {}
    builders = {"default": fast_path, "straightforward": plain_path,
                "compiled": lambda *a: fast_path(*a, captured=True)}
    for name in args.paths.split(","):
        build = builders[name]
        torch.manual_seed(0)
        step, evaluate, optimizer = build(main, cfg, loaders, bank, weights, device, torch.float16)
        results[name] = {"train_step": count(step, optimizer), "eval_pass": count(evaluate)}
        if device.type == "cuda":
            results[name]["step_seconds"] = step_seconds(step, device, args.reps)
    print_report(results, args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def print_report(results, device):
    where = "CUDA" if device == "cuda" else "the CUDA path emulated on the CPU"
    print(f"One training step (one IEMOCAP-like batch of 9 dialogues) and one evaluation pass, fp16, {where}.")
    print("The step is a one-batch epoch: the default path's once-per-epoch read of its sums and flags is in it.\n")
    print("| path | step ops | host / forward / loss / backward / optimizer / other | step host syncs | eval ops | "
          "eval host syncs |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        t, e = r["train_step"], r["eval_pass"]
        phases = " / ".join(str(t["ops_by_phase"].get(k, 0)) for k in ("host", "forward", "loss", "backward",
                                                                       "optimizer", "other"))
        print(f"| {name} | {t['ops']} | {phases} | {t['host_syncs']} | {e['ops']} | {e['host_syncs']} |")
    for name, r in results.items():
        for part in ("train_step", "eval_pass"):
            if r[part]["syncs_by_source"]:
                print(f"\n{name}, {part}: host syncs by source")
                for src, n in r[part]["syncs_by_source"].items():
                    print(f"  {n:4d}  {src}")
    base = results.get("straightforward", {}).get("step_seconds")
    for name, r in results.items():
        if "step_seconds" in r:
            versus = f" ({base / r['step_seconds']:.2f}x the straightforward step)" if base else ""
            print(f"step time on CUDA, {name}: {r['step_seconds'] * 1e3:.2f} ms{versus}")


if __name__ == "__main__":
    main_cli()
