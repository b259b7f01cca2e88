"""A run folder on disk: its name, creation, config.json, metrics.jsonl, last.pth and the generators it saves.

`<output_dir>/<name>/[MMDD-HHMM]_seed<seed>[_<ablation>]/` (UK time, as the reference; `-2`, `-3` ... when
taken; no brackets in either name with --no_folder_brackets): config.json, metrics.jsonl, summary.json,
BEST_cls_f1_[<f1>]_epoch<n>.pth (checkpoint.best_file_name), best_vega_branch.pth, last.pth (as cfg.save_last
says), predictions.csv, curves.png, confusion.png, TensorBoard event files (and valid_ids.json with a validation
split); docs/run-folder.md has each file's size. Every file that matters is written to a temporary file and renamed
(common._atomic_write).
"""
import copy
import datetime
import json
import os
import random
import sys

import numpy as np
import torch

from vega_utils.common import VegaError, atomic_torch_save, atomic_write_text, git_commit, read_json
from vega_utils.runs import checkpoint
from vega_utils.runs.config import Config, resolve

LAST = "last.pth"


def run_folder_name(cfg, now):
    """`[MMDD-HHMM]_seed<seed>[_<ablation>]`: the reference's time stamp (UK time), then what tells runs of one
    minute apart (the seeds of one --seeds call); without brackets when cfg.folder_brackets is off."""
    stamp = now.strftime("[%m%d-%H%M]" if cfg.folder_brackets else "%m%d-%H%M")
    return f"{stamp}_seed{cfg.seed}" + (f"_{cfg.ablation}" if cfg.ablation else "")


def make_run_dir(cfg, fixed=None):
    """Claim a fresh folder; two runs of one name started in the same minute get `-2`, `-3`, ... (mkdir is
    atomic). `fixed`: this exact folder (a sweep's trial_<n>), which must not exist yet."""
    if fixed:
        try:
            os.makedirs(fixed)
            return fixed
        except FileExistsError:
            raise VegaError(f"run folder {fixed} exists already; it is never overwritten") from None
        except OSError as e:
            raise VegaError(f"cannot create run folder {fixed}: {e.strerror or e}") from None
    try:
        import pytz
        now = datetime.datetime.now(pytz.timezone("Europe/London"))
    except ImportError:
        now = datetime.datetime.now()
    return fresh_folder(os.path.join(cfg.output_dir, cfg.name, run_folder_name(cfg, now)))


def fresh_folder(base):
    """Create `base`, or `base-2`, `base-3`, ... when taken (mkdir is atomic: two processes never share one)."""
    try:
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    except OSError as e:
        raise VegaError(f"cannot create output folder {os.path.dirname(base)}: {e.strerror or e}") from None
    for i in range(1, 1000):
        path = base if i == 1 else f"{base}-{i}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise VegaError(f"cannot create folder {path}: {e.strerror or e}") from None
    raise VegaError(f"too many folders {base}*")


def append_jsonl(path, row):
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise VegaError(f"cannot write {path}: {e.strerror or e}") from None


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_config(run_dir, cfg, record):
    """config.json: every setting, plus what this run resolved (`record`: device, precision, commit, ...)."""
    write_json(os.path.join(run_dir, "config.json"), {**cfg.to_dict(), "git_commit": git_commit(),
                                                      "torch_version": torch.__version__, **record,
                                                      "command": " ".join(sys.argv)})


def record_resume(run_dir, cfg, device, precision):
    """config.json keeps the settings the run goes on with (a resume may change epochs, patience, device)
    and a line per resume."""
    path = os.path.join(run_dir, "config.json")
    saved = read_json(path, "the run settings")
    resumes = saved.pop("resumes", []) + [{"command": " ".join(sys.argv), "git_commit": git_commit(),
                                            "resolved_device": str(device), **precision}]
    write_json(path, {**saved, **cfg.to_dict(), "resumes": resumes})


def config_of_run(run_dir, what="the run settings"):
    """The resolved config a run was trained with: config.json's config keys (it also holds resolved extras)."""
    saved = read_json(os.path.join(run_dir, "config.json"), what)
    try:
        return resolve(Config.from_dict({k: v for k, v in saved.items() if k in Config.__dataclass_fields__}))
    except TypeError as e:
        raise VegaError(f"{run_dir}/config.json is not a run config: {e}") from None


def finished_epochs(run_dir):
    """How many epochs of the run are in its metrics.jsonl (0 when it has none)."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def rewrite_metrics(run_dir, history):
    """metrics.jsonl as last.pth knows it: rows of an epoch that finished after the last save (a crash between
    the two writes) are dropped."""
    atomic_write_text(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(row) + "\n" for row in history))


def last_state(run, state, cfg, optimizer=True):
    """What last.pth holds: everything --resume needs to go on as if never stopped (`run`: main.Run). A run that
    has ended keeps it without the optimizer state (optimizer=False): Adam's two moments are twice the weights."""
    return {"format": checkpoint.FORMAT, "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict() if optimizer else None,
            "scaler": run.scaler.state_dict() if run.scaler else None,
            "scheduler": run.scheduler.state_dict() if run.scheduler else None,
            "config": cfg.to_dict(), "state": state,
            "rng": rng_state(run.loaders["train"].generator, run.anchor_rng, run.device)}


def save_last(run_dir, obj):
    """Write last.pth (a last_state, or a snapshot of one) atomically."""
    atomic_torch_save(obj, os.path.join(run_dir, LAST))


def snapshot(obj):
    """A copy of a last_state that later training steps cannot change (tensors copied to the CPU): what
    --save_last end writes when the run is interrupted, the state of the last finished epoch."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


def rng_state(loader_generator, anchor_rng, device):
    """Every generator a run draws from. Of the GPUs, only the run's own: a run resumed where fewer GPUs are
    visible must still load, and a CPU run must never initialise CUDA."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate(), "anchor": anchor_rng.getstate(),
            "loader": loader_generator.get_state()}


def set_rng_state(state, loader_generator, anchor_rng, device):
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):   # files written before: every visible GPU's state, in device order
        index = device.index if device.index is not None else 0
        cuda = cuda[index] if device.type == "cuda" and index < len(cuda) else None
    if cuda is not None and device.type == "cuda":   # a CPU run's state resumed on a GPU: that GPU starts fresh
        torch.cuda.set_rng_state(cuda, device)
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate(state["python"])
    anchor_rng.setstate(state["anchor"])
    loader_generator.set_state(state["loader"])
