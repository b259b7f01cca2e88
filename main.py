"""The flow of one training run: data, anchors, model, the epoch loop, and everything written to the run folder.

Run folder `<output_dir>/<name>/[MMDD-HHMM]/` (UK time, as the reference; `-2`, `-3` ... when taken):
config.json, metrics.jsonl, summary.json, BEST_cls_f1_[<f1>]_epoch<n>.pth, last.pth, predictions.csv,
curves.png, confusion.png (and valid_ids.json with a validation split).
"""
import datetime
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import train
from dataloader import load_dialogues, make_loaders, speaker_names, split_validation
from fast import ShadowAdam, accelerate, cpu_kernels, is_accelerated
from model import VEGA
from vega_utils import alignment, checkpoint, live, report, step_guard, threads
from vega_utils.anchor_utils import ensure_anchor_cache
from vega_utils.common import VegaError, atomic_torch_save, atomic_write_text, git_commit, resolve_device, \
    seed_everything
from vega_utils.datasets import class_weights_of, info_of
from vega_utils.config import Config, load_preset, resolve

LAST = "last.pth"


def log(msg):
    tqdm.write(msg)  # keeps progress bars intact


# ---------------------------------------------------------------- run folder
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
    base = os.path.join(cfg.output_dir, cfg.name, run_folder_name(cfg, now))
    try:
        os.makedirs(os.path.dirname(base), exist_ok=True)
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
            raise VegaError(f"cannot create run folder {path}: {e.strerror or e}") from None
    raise VegaError(f"too many runs in {base}*")


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


# ---------------------------------------------------------------- building blocks
def build_model(cfg, device="cpu"):
    """model.py's VEGA; with cfg.fast (the default) the fast package's modules and packed layout swapped in."""
    model = VEGA(cfg)
    return (accelerate(model) if cfg.fast else model).to(device)


def build_optimizer(cfg, model, amp_dtype=None, device=None):
    """The configured optimizer. Training the fast model in bf16 on the CPU, Adam/AdamW keep bf16 weight copies
    (fast/shadow_weights.py: the same update, no per-step weight casts) when the CPU kernels are built."""
    on_cpu_bf16 = amp_dtype == torch.bfloat16 and device is not None and torch.device(device).type == "cpu"
    if on_cpu_bf16 and is_accelerated(model) and cfg.optimizer in ("AdamW", "Adam") \
            and cpu_kernels.kernel() is not None:
        return ShadowAdam(model, lr=cfg.lr, weight_decay=cfg.l2, decoupled=cfg.optimizer == "AdamW")
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernels do the same update in one pass over memory: 3x faster steps than foreach on the CPU.
    if cfg.optimizer == "AdamW":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.l2, fused=True)
    if cfg.optimizer == "Adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.l2, fused=True)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.l2, momentum=cfg.momentum)


def build_scheduler(cfg, optimizer, steps_per_epoch):
    """Cosine decay with a 1% linear warm-up, stepped every batch (off by default, as the reference)."""
    if not cfg.scheduler:
        return None
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = max(1, int(0.01 * total))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_anchors(cfg):
    """The anchor bank when the VEGA branch is on, and cfg with clip_dim settled."""
    if not cfg.clip_loss:
        return None, cfg.replace(clip_dim=cfg.clip_dim or 512)
    bank = ensure_anchor_cache(cfg, device=cfg.device)
    if cfg.clip_dim is not None and bank.clip_dim != cfg.clip_dim:
        raise VegaError(f"anchor cache {cfg.anchor_path} has CLIP width {bank.clip_dim} but "
                        f"{cfg.CLIP_Model} expects {cfg.clip_dim}")
    return bank, cfg.replace(clip_dim=bank.clip_dim)


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


# ---------------------------------------------------------------- metrics of one evaluation
def eval_metrics(prefix, ev, class_names):
    m = report.classification_metrics(ev["labels"], ev["preds"]["all"], class_names)
    heads = report.head_f1s(ev["labels"], ev["preds"])
    row = {f"{prefix}_{k}": v for k, v in ev["losses"].items() if k != "total"}
    if "total" in ev["losses"]:
        row[f"{prefix}_loss"] = ev["losses"]["total"]
    row.update({f"{prefix}_f1_{h}": heads[h] for h in ("all", "t", "a", "v")})
    row.update({f"{prefix}_accuracy": m["accuracy"], f"{prefix}_weighted_precision": m["weighted_precision"],
                f"{prefix}_macro_f1": m["macro_f1"]})
    row.update(alignment.epoch_row(prefix, ev, class_names))   # anchor alignment (with the VEGA branch)
    return row, m


def save_best_outputs(run_dir, cfg, ev, metrics, epoch, class_names, model, best_path):
    f1 = metrics["weighted_f1"]
    path = os.path.join(run_dir, f"BEST_cls_f1_[{100 * f1:.2f}]_epoch{epoch}.pth")
    checkpoint.save_best(path, model, cfg, epoch, metrics)
    if cfg.clip_loss:   # the VEGA branch of the same epoch, beside it (for python -m vega_utils.analyze)
        checkpoint.save_branch(os.path.join(run_dir, checkpoint.BRANCH_FILE), model, cfg, epoch)
    if best_path and best_path != path and os.path.exists(best_path):
        os.remove(best_path)  # an older, worse best: removed only after the new one is safely written
    names = speaker_names(info_of(cfg))
    report.write_predictions_csv(os.path.join(run_dir, "predictions.csv"), ev["dialogue_ids"],
                                 ev["utterance_index"], [names[s] for s in ev["speakers"]], ev["labels"],
                                 ev["preds"]["all"], ev["probs"], class_names)
    report.plot_confusion(metrics["confusion"], class_names, os.path.join(run_dir, "confusion.png"),
                          title=f"{cfg.Dataset} test, epoch {epoch}, weighted F1 {100 * f1:.2f}")
    return path


# ---------------------------------------------------------------- the run
def train_run(cfg, resume_dir=None, progress=True, run_dir=None, on_epoch=None, config_extra=None):
    """Train one model; returns the summary dict (also written to summary.json).

    run_dir: the folder to create (default: a fresh `[MMDD-HHMM]_seed<seed>` one). on_epoch(epoch, selected_f1)
    is called after each epoch is saved; a string it returns stops the run with that reason (a sweep's
    pruner). config_extra: more keys for config.json (a sweep trial's study, number and parameters)."""
    started = time.time()
    device = resolve_device(cfg.device)
    amp_dtype = train.resolve_amp(cfg.amp, device)
    eval_dtype = train.resolve_eval_amp(cfg.eval_amp, device)
    train.exact_float32(device)
    precision = {"train_precision": train.precision_name(amp_dtype), "eval_precision": train.precision_name(eval_dtype)}
    seed_everything(cfg.seed)
    info = info_of(cfg)
    data = load_dialogues(cfg.data_path, info)
    if data.describe_dropped():
        log(data.describe_dropped())
    bank, cfg = load_anchors(cfg)
    _, valid_ids = split_validation(data.train_ids, cfg.valid_ratio, cfg.seed)
    if not valid_ids and data.valid_ids:   # the file's own validation split (open format)
        valid_ids = list(data.valid_ids)
    loaders = make_loaders(data, cfg, valid_ids=valid_ids, pin_memory=device.type == "cuda")
    model = build_model(cfg, device)
    optimizer = build_optimizer(cfg, model, amp_dtype, device)
    scheduler = build_scheduler(cfg, optimizer, len(loaders["train"]))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    class_weights = torch.tensor(class_weights_of(info, data), device=device)
    anchor_rng = random.Random(cfg.seed)
    bank = bank.to(device) if bank is not None else None
    select_on = "valid" if valid_ids else "test"

    state = {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "bad_epochs": 0, "best_path": None, "history": []}
    if resume_dir:
        run_dir = resume_dir
        last = checkpoint.read_checkpoint(os.path.join(run_dir, LAST))
        model.load_state_dict(last["model"], strict=True)
        checkpoint.load_optimizer_state(optimizer, last["optimizer"], os.path.join(run_dir, LAST))
        if scaler is not None and last.get("scaler"):
            scaler.load_state_dict(last["scaler"])
        if scheduler is not None and last.get("scheduler"):
            scheduler.load_state_dict(last["scheduler"])
        state = last["state"]
        if state["epoch"] >= cfg.epochs or state["bad_epochs"] >= cfg.patience:
            return already_finished(run_dir, cfg, state)
        set_rng_state(last["rng"], loaders["train"].generator, anchor_rng, device)
        # Rows of an epoch that finished after the last save (a crash between the two writes) are dropped.
        atomic_write_text(os.path.join(run_dir, "metrics.jsonl"),
                          "".join(json.dumps(row) + "\n" for row in state["history"]))
        record_resume(run_dir, cfg, device, precision)
        log(f"resuming {run_dir} after epoch {state['epoch']} of {cfg.epochs}")
    else:
        run_dir = make_run_dir(cfg, fixed=run_dir)
        write_json(os.path.join(run_dir, "config.json"), {
            **cfg.to_dict(), "git_commit": git_commit(), "torch_version": torch.__version__,
            "resolved_device": str(device), **precision, "resolved_threads": torch.get_num_threads(),
            "class_weights": class_weights.tolist(),
            "command": " ".join(sys.argv), **(config_extra or {})})
        if valid_ids:
            write_json(os.path.join(run_dir, "valid_ids.json"), valid_ids)
    log(f"config: {describe_config(cfg)}; every setting in {os.path.join(run_dir, 'config.json')}")
    log(f"git commit {git_commit()}, torch {torch.__version__}, device {device}, training in "
        f"{precision['train_precision']}, evaluating in {precision['eval_precision']}, "
        f"{torch.get_num_threads()} CPU threads, "
        f"{len(loaders['train'].dataset)} train / {len(valid_ids)} valid / {len(data.test_ids)} test "
        f"dialogues, selecting on {select_on}")

    eval_sets = {split: train.EvalSet(loaders[split], cfg.n_speakers) for split in loaders if split != "train"}
    summary = {"run_dir": run_dir, "selected_on": select_on, "stopped": "max_epochs", **precision}
    # skipped training steps (a non-finite loss or gradient), counted on from the epochs already done
    guard = step_guard.StepGuard(cfg.max_bad_steps, total=sum(r.get("skipped_steps", 0) for r in state["history"]),
                            log=log)
    # idle OpenMP threads sleep while other processes keep the cores busy
    share = threads.CoreShare(torch.get_num_threads()).start() if device.type == "cpu" else None
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    curves = live.LiveLog(run_dir, cfg.tensorboard, state["epoch"] + 1, info.class_names, log)   # TensorBoard
    try:
        while state["epoch"] < cfg.epochs:
            train.check_stop()
            epoch = state["epoch"] + 1
            tr = train.train_epoch(model, loaders["train"], optimizer, cfg, bank, class_weights, device,
                                   amp_dtype, scaler, scheduler, epoch, anchor_rng, progress, guard)
            row = {"epoch": epoch, "train_seconds": tr.pop("seconds"), "lr": optimizer.param_groups[0]["lr"],
                   "skipped_steps": tr.pop("skipped_steps")}
            row["train_loss"] = tr.pop("total", float("nan"))   # nan: every step of the epoch was skipped
            row.update({f"train_{k}": v for k, v in tr.items()})
            eval_seconds = 0.0
            evals = {}
            for split in ["valid", "test"] if valid_ids else ["test"]:
                ev = train.eval_epoch(model, eval_sets[split], cfg, bank, class_weights, device, eval_dtype,
                                      desc=f"epoch {epoch} {split}", progress=progress)
                eval_seconds += ev["seconds"]
                split_row, split_metrics = eval_metrics(split, ev, info.class_names)
                row.update(split_row)
                evals[split] = (ev, split_metrics)
            row["eval_seconds"] = eval_seconds
            if share is not None:   # share of the epoch the machine was shared (waits slept)
                row["cpu_shared"] = round(share.sleeping_share(), 2)
            selected_f1 = row[f"{select_on}_f1_all"]
            row["is_best"] = selected_f1 > state["best_f1"]
            if row["is_best"]:
                ev, test_metrics = evals["test"]
                state.update(best_f1=selected_f1, best_epoch=epoch, bad_epochs=0)
                state["best_metrics"] = {"test": test_metrics, "selected_f1": selected_f1,
                                         **({"valid": evals["valid"][1]} if valid_ids else {})}
                state["best_path"] = save_best_outputs(run_dir, cfg, ev, test_metrics, epoch, info.class_names,
                                                       model, state["best_path"])
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            state["history"].append(row)
            append_jsonl(metrics_path, row)
            curves.epoch(row)
            atomic_torch_save({"format": checkpoint.FORMAT, "model": model.state_dict(),
                               "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict() if scaler else None,
                               "scheduler": scheduler.state_dict() if scheduler else None,
                               "config": cfg.to_dict(), "state": state,
                               "rng": rng_state(loaders["train"].generator, anchor_rng, device)},
                              os.path.join(run_dir, LAST))
            report.plot_curves(state["history"], os.path.join(run_dir, "curves.png"), state["best_epoch"])
            log(report.format_epoch_line(row))
            stop = on_epoch(epoch, selected_f1) if on_epoch else None
            if stop:
                summary["stopped"] = stop
                break
            if state["bad_epochs"] >= cfg.patience:
                summary["stopped"] = f"early stop: {cfg.patience} epochs without a better {select_on} F1"
                break
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM (a cluster job's time limit; run.py's handler)
        summary["stopped"] = "terminated (SIGTERM)" if isinstance(e, train.Terminated) else "interrupted"
        raise Interrupted(run_dir, state["epoch"], summary["stopped"]) from None
    except step_guard.NonFiniteLoss as e:
        summary["stopped"] = f"non-finite loss: {e}"
        if state["epoch"] == 0 and not resume_dir:   # nothing to keep: the folder must not pass for a run's
            os.replace(run_dir, run_dir + "-failed")
            run_dir = summary["run_dir"] = run_dir + "-failed"
            raise VegaError(f"{e} No epoch finished; the folder is now {run_dir}") from None
        raise VegaError(f"{e} Run folder {run_dir} keeps the epochs before it.") from None
    finally:
        curves.close()
        if share is not None:
            share.close()
        summary.update(best_epoch=state["best_epoch"], best_checkpoint=state["best_path"],
                       epochs_run=state["epoch"], skipped_steps=guard.total, best=state.get("best_metrics"),
                       total_seconds=time.time() - started)
        if os.path.isdir(run_dir):
            write_json(os.path.join(run_dir, "summary.json"), summary)
    best = state.get("best_metrics", {}).get("test", {})
    log(f"best epoch {state['best_epoch']} (selected on {select_on}): test weighted F1 "
        f"{100 * best.get('weighted_f1', 0):.2f}, accuracy {100 * best.get('accuracy', 0):.2f}, "
        f"weighted precision {100 * best.get('weighted_precision', 0):.2f}")
    log(f"run folder: {run_dir}")
    return summary


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after `epoch` finished epochs, its folder kept for --resume."""

    def __init__(self, run_dir, epoch, how):
        super().__init__(how)
        self.run_dir, self.epoch, self.how = run_dir, epoch, how


def describe_config(cfg):
    """The settings that differ from the dataset's preset (configs/<Dataset>.json), as key=value."""
    preset = resolve(load_preset(cfg.Dataset, cfg.dataset_spec))
    changed = [f"{k}={v}" for k, v in cfg.to_dict().items() if getattr(preset, k) != v]
    return f"{cfg.Dataset} preset" + (f" with {', '.join(changed)}" if changed else "")


def already_finished(run_dir, cfg, state):
    """Resuming a run that has ended: say so (a re-queued cluster job must not fail) and return its summary."""
    why = f"all {cfg.epochs} epochs" if state["epoch"] >= cfg.epochs else \
        f"early stop: {state['bad_epochs']} epochs without a better F1 (patience {cfg.patience})"
    log(f"{run_dir} has finished ({why}, after epoch {state['epoch']}): nothing to train. To go on, resume with "
        f"a larger --epochs (now {cfg.epochs}) or --patience (now {cfg.patience})")
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {"run_dir": run_dir, "best_epoch": state["best_epoch"], "best": state.get("best_metrics")}


def record_resume(run_dir, cfg, device, precision):
    """config.json keeps the settings the run goes on with (a resume may change epochs, patience, device)
    and a line per resume."""
    path = os.path.join(run_dir, "config.json")
    with open(path) as f:
        saved = json.load(f)
    resumes = saved.pop("resumes", []) + [{"command": " ".join(sys.argv), "git_commit": git_commit(),
                                            "resolved_device": str(device), **precision}]
    write_json(path, {**saved, **cfg.to_dict(), "resumes": resumes})


def config_of_run(run_dir):
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise VegaError(f"cannot resume from {run_dir}: {path} is missing or unreadable ({e})") from None
    keys = set(Config.__dataclass_fields__)
    return resolve(Config.from_dict({k: v for k, v in saved.items() if k in keys}))
