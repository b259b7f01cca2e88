"""The flow of one training run: setup (data, anchors, model), a fresh or resumed run folder, then per epoch
train, evaluate, keep (vega_utils/runs/run_folder.py has what is written where)."""
import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import train
from dataloader import load_dialogues, make_loaders, speaker_names, split_validation, utterance_names
from fast import ShadowAdam, accelerate, cpu_kernels, is_accelerated
from fast.capture import capture
from model import VEGA
from vega_utils.anchors.build import ensure_anchor_cache
from vega_utils.common import SetupError, VegaError, git_commit, resolve_device, seed_everything
from vega_utils.data.datasets import class_weights_of, info_of
from vega_utils.insight import alignment, live, report
from vega_utils.runs import checkpoint, run_folder, step_guard, threads
from vega_utils.runs.config import load_preset, resolve

_label = ""   # what every line of the run begins with (labelled)


def log(msg):
    tqdm.write(_label + msg)  # keeps progress bars intact


@contextlib.contextmanager
def labelled(label):
    """Every line the runs inside print begins with `label` (a sweep worker's `trial 3 | `: the lines of several
    workers interleave on one console)."""
    global _label
    before, _label = _label, label
    try:
        yield
    finally:
        _label = before


# ---------------------------------------------------------------- building blocks
def build_model(cfg, device="cpu"):
    """model.py's VEGA; with cfg.fast (the default) the fast package's modules and packed layout swapped in."""
    model = VEGA(cfg)
    return (accelerate(model) if cfg.fast else model).to(device)


def build_optimizer(cfg, model, amp_dtype=None, device=None):
    """The configured optimizer. Training the fast model in bf16 on the CPU, Adam/AdamW keep bf16 weight copies
    (fast/shadow_weights.py: the same update, no per-step weight casts) when the CPU kernels are built."""
    on_cpu_bf16 = amp_dtype == torch.bfloat16 and device is not None and torch.device(device).type == "cpu"
    if on_cpu_bf16 and is_accelerated(model) and not cfg.compile and cfg.optimizer in ("AdamW", "Adam") \
            and cpu_kernels.kernel() is not None:
        return ShadowAdam(model, lr=cfg.lr, weight_decay=cfg.l2, decoupled=cfg.optimizer == "AdamW")
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernels do the same update in one pass over memory: 3x faster steps than foreach on the CPU.
    if cfg.optimizer == "AdamW":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.l2, fused=True)
    if cfg.optimizer == "Adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.l2, fused=True)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.l2, momentum=cfg.momentum)


def build_step_fn(cfg, model, device):
    """What a training step runs for its forward pass and losses: train.forward_losses, captured by torch.compile
    with --compile (fast/capture.py), else None (train_epoch's default, the same function eager)."""
    return capture(model, train.forward_losses, torch.device(device)) if cfg.compile else None


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


def save_best_outputs(run_dir, cfg, ev, metrics, epoch, class_names, model, best_path, data=None):
    f1 = metrics["weighted_f1"]
    path = os.path.join(run_dir, checkpoint.best_file_name(f1, epoch, cfg.folder_brackets))
    checkpoint.save_best(path, model, cfg, epoch, metrics)
    if cfg.clip_loss:   # the VEGA branch of the same epoch, beside it (for python -m vega_utils.insight.analyze)
        checkpoint.save_branch(os.path.join(run_dir, checkpoint.BRANCH_FILE), model, cfg, epoch)
    if best_path and best_path != path and os.path.exists(best_path):
        os.remove(best_path)  # an older, worse best: removed only after the new one is safely written
    names = speaker_names(info_of(cfg))
    report.write_predictions_csv(os.path.join(run_dir, "predictions.csv"), ev["dialogue_ids"],
                                 ev["utterance_index"], [names[s] for s in ev["speakers"]], ev["labels"],
                                 ev["preds"]["all"], ev["probs"], class_names,
                                 utterance_names(data, ev["dialogue_ids"], ev["utterance_index"]) if data else None)
    report.plot_confusion(metrics["confusion"], class_names, os.path.join(run_dir, "confusion.png"),
                          title=f"{cfg.Dataset} test, epoch {epoch}, weighted F1 {100 * f1:.2f}")
    return path


# ---------------------------------------------------------------- the run
@dataclass
class Run:
    """What one run trains with, built once (setup) and passed to each step of train_run."""
    device: torch.device
    amp_dtype: object             # training autocast dtype, None = float32
    eval_dtype: object            # evaluation autocast dtype
    precision: dict               # their names, for config.json and summary.json
    info: object                  # dataset facts (vega_utils/data/datasets.py)
    data: object
    bank: object                  # AnchorBank on the device, None without the VEGA branch
    valid_ids: list
    loaders: dict
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    class_weights: torch.Tensor
    anchor_rng: random.Random
    select_on: str                # the split whose F1 picks the best epoch
    step_fn: object = None        # --compile: the captured forward + losses (fast/capture.py)
    last: object = None           # --save_last end: the last finished epoch's last.pth, kept in memory


def setup(cfg):
    """(cfg with clip_dim settled, Run): data, anchors, model, optimizer, all seeded by cfg.seed."""
    device = resolve_device(cfg.device)
    amp_dtype, amp_why = train.amp_choice(cfg.amp, device)
    eval_dtype = train.resolve_eval_amp(cfg.eval_amp, device)
    train.exact_float32(device)
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
    run = Run(device, amp_dtype, eval_dtype,
              {"train_precision": train.precision_name(amp_dtype), "train_precision_reason": amp_why,
               "eval_precision": train.precision_name(eval_dtype)},
              info, data, bank.to(device) if bank is not None else None, valid_ids, loaders, model, optimizer,
              build_scheduler(cfg, optimizer, len(loaders["train"])),
              torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
              torch.tensor(class_weights_of(info, data), device=device), random.Random(cfg.seed),
              "valid" if valid_ids else "test",
              build_step_fn(cfg, model, device))
    return cfg, run


def fresh_state():
    return {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "bad_epochs": 0, "best_path": None, "history": []}


def resume_state(run_dir, cfg, run):
    """Load last.pth into the run; its state, or None when the run has ended already. A run stopped before its
    first epoch finished has no last.pth: it starts again from epoch 1 in its folder, with its settings."""
    path = os.path.join(run_dir, run_folder.LAST)
    if not os.path.exists(path) and not run_folder.finished_epochs(run_dir):
        log(f"no epoch of {run_dir} had finished: starting it again from epoch 1 in the same folder")
        run_folder.record_resume(run_dir, cfg, run.device, run.precision)
        return fresh_state(), None
    if not os.path.exists(path):
        why = "it ran with --save_last never" if cfg.save_last == "never" else \
            "it ran with --save_last never, or its last.pth was deleted"
        raise VegaError(f"{run_dir} has no {run_folder.LAST} ({why}): there is nothing to resume")
    last = checkpoint.read_checkpoint(path)
    run.model.load_state_dict(last["model"], strict=True)
    state = last["state"]
    if state.get("best_path"):   # the folder may have moved since: its best checkpoint is the one inside it
        state["best_path"] = os.path.join(run_dir, os.path.basename(state["best_path"]))
    if state["epoch"] >= cfg.epochs or state["bad_epochs"] >= cfg.patience:
        return None, state
    if last.get("optimizer") is not None:
        checkpoint.load_optimizer_state(run.optimizer, last["optimizer"], path)
    else:   # a run that had ended keeps last.pth without it (run_folder.last_state)
        log(f"note: {path} is a finished run's, without the optimizer state: the optimizer starts afresh")
    if run.scaler is not None and last.get("scaler"):
        run.scaler.load_state_dict(last["scaler"])
    if run.scheduler is not None and last.get("scheduler"):
        run.scheduler.load_state_dict(last["scheduler"])
    run_folder.set_rng_state(last["rng"], run.loaders["train"].generator, run.anchor_rng, run.device)
    run_folder.rewrite_metrics(run_dir, state["history"])
    run_folder.record_resume(run_dir, cfg, run.device, run.precision)
    log(f"resuming {run_dir} after epoch {state['epoch']} of {cfg.epochs}")
    return state, state


def start_folder(cfg, run, run_dir, config_extra):
    run_dir = run_folder.make_run_dir(cfg, fixed=run_dir)
    run_folder.write_config(run_dir, cfg, {"resolved_device": str(run.device), **run.precision,
                                           "resolved_threads": torch.get_num_threads(),
                                           "class_weights": run.class_weights.tolist(), **(config_extra or {})})
    if run.valid_ids:
        run_folder.write_json(os.path.join(run_dir, "valid_ids.json"), run.valid_ids)
    return run_dir


def log_start(cfg, run, run_dir):
    log(f"training in {run.precision['train_precision']}: {run.precision['train_precision_reason']}")
    log(f"config: {describe_config(cfg)}; every setting in {os.path.join(run_dir, 'config.json')}")
    log(f"git commit {git_commit()}, torch {torch.__version__}, device {run.device}, training in "
        f"{run.precision['train_precision']}, evaluating in {run.precision['eval_precision']}, "
        f"{torch.get_num_threads()} CPU threads, {len(run.loaders['train'].dataset)} train / "
        f"{len(run.valid_ids)} valid / {len(run.data.test_ids)} test dialogues, selecting on {run.select_on}")


def run_epoch(cfg, run, epoch, eval_sets, guard, share, progress):
    """Train one epoch and evaluate it: (its metrics.jsonl row, {split: (evaluation, metrics)})."""
    tr = train.train_epoch(run.model, run.loaders["train"], run.optimizer, cfg, run.bank, run.class_weights,
                           run.device, run.amp_dtype, run.scaler, run.scheduler, epoch, run.anchor_rng, progress,
                           guard, step_fn=run.step_fn)
    row = {"epoch": epoch, "train_seconds": tr.pop("seconds"), "lr": run.optimizer.param_groups[0]["lr"],
           "skipped_steps": tr.pop("skipped_steps")}
    row["train_loss"] = tr.pop("total", float("nan"))   # nan: every step of the epoch was skipped
    row.update({f"train_{k}": v for k, v in tr.items()})
    row["eval_seconds"], evals = 0.0, {}
    for split in ["valid", "test"] if run.valid_ids else ["test"]:
        ev = train.eval_epoch(run.model, eval_sets[split], cfg, run.bank, run.class_weights, run.device,
                              run.eval_dtype, desc=f"epoch {epoch} {split}", progress=progress)
        row["eval_seconds"] += ev["seconds"]
        split_row, split_metrics = eval_metrics(split, ev, run.info.class_names)
        row.update(split_row)
        evals[split] = (ev, split_metrics)
    if share is not None:   # share of the epoch the machine was shared (waits slept)
        row["cpu_shared"] = round(share.sleeping_share(), 2)
    return row, evals


def keep_epoch(cfg, run, run_dir, state, row, evals, curves):
    """Best-epoch outputs when it is the best, then metrics.jsonl, TensorBoard, last.pth, curves.png."""
    selected_f1 = row[f"{run.select_on}_f1_all"]
    row["is_best"] = selected_f1 > state["best_f1"]
    if row["is_best"]:
        ev, test_metrics = evals["test"]
        state.update(best_f1=selected_f1, best_epoch=row["epoch"], bad_epochs=0)
        state["best_metrics"] = {"test": test_metrics, "selected_f1": selected_f1,
                                 **({"valid": evals["valid"][1]} if run.valid_ids else {})}
        state["best_path"] = save_best_outputs(run_dir, cfg, ev, test_metrics, row["epoch"], run.info.class_names,
                                               run.model, state["best_path"], run.data)
    else:
        state["bad_epochs"] += 1
    state["epoch"] = row["epoch"]
    state["history"].append(row)
    run_folder.append_jsonl(os.path.join(run_dir, "metrics.jsonl"), row)
    curves.epoch(row)
    if cfg.save_last == "every":
        run_folder.save_last(run_dir, run_folder.last_state(run, state, cfg))
    elif cfg.save_last == "end":   # written if the run is interrupted (train_run); a finished run's at its end
        run.last = run_folder.snapshot(run_folder.last_state(run, state, cfg))
    elif os.path.exists(os.path.join(run_dir, run_folder.LAST)):   # never, on a resumed run: an older epoch's
        os.remove(os.path.join(run_dir, run_folder.LAST))          # last.pth would send --resume back to it
    report.plot_curves(state["history"], os.path.join(run_dir, "curves.png"), state["best_epoch"])
    log(report.format_epoch_line(row))
    return selected_f1


def open_run(cfg, resume_dir, run_dir, config_extra):
    """setup and the run folder, fresh or resumed: (cfg, Run, state, run_dir, ended state). What goes wrong here
    (a missing file, a folder that cannot be written) goes wrong again for the next run: a SetupError."""
    try:
        cfg, run = setup(cfg)
        if resume_dir:
            state, ended = resume_state(resume_dir, cfg, run)
            return cfg, run, state, resume_dir, ended
        return cfg, run, fresh_state(), start_folder(cfg, run, run_dir, config_extra), None
    except SetupError:
        raise
    except VegaError as e:
        raise SetupError(str(e)) from None


def train_run(cfg, resume_dir=None, progress=True, run_dir=None, on_epoch=None, config_extra=None):
    """Train one model; returns the summary dict (also written to summary.json).

    run_dir: the folder to create (default: a fresh `[MMDD-HHMM]_seed<seed>` one). on_epoch(epoch, selected_f1)
    is called after each epoch is saved; a string it returns stops the run with that reason (a sweep's
    pruner). config_extra: more keys for config.json (a sweep trial's study, number and parameters)."""
    started = time.time()
    cfg, run, state, run_dir, ended = open_run(cfg, resume_dir, run_dir, config_extra)
    if state is None:
        return already_finished(run_dir, cfg, ended)
    summary = {"run_dir": run_dir, "selected_on": run.select_on, "stopped": "max_epochs", **run.precision}
    # skipped training steps (a non-finite loss or gradient), counted on from the epochs already done
    guard = step_guard.StepGuard(cfg.max_bad_steps, total=sum(r.get("skipped_steps", 0) for r in state["history"]),
                                 log=log)
    share = curves = None
    try:   # from here on the folder exists: a Ctrl-C at any point leaves summary.json and the resume hint
        log_start(cfg, run, run_dir)
        eval_sets = {split: train.EvalSet(run.loaders[split], cfg.n_speakers) for split in run.loaders
                     if split != "train"}
        # idle OpenMP threads sleep while other processes keep the cores busy
        share = threads.CoreShare(torch.get_num_threads()).start() if run.device.type == "cpu" else None
        curves = live.LiveLog(run_dir, cfg.tensorboard, state["epoch"] + 1, run.info.class_names, log)   # TensorBoard
        while state["epoch"] < cfg.epochs:
            train.check_stop()
            row, evals = run_epoch(cfg, run, state["epoch"] + 1, eval_sets, guard, share, progress)
            with train.ctrl_c_waits():   # an epoch is saved whole or not at all
                selected_f1 = keep_epoch(cfg, run, run_dir, state, row, evals, curves)
            stop = on_epoch(state["epoch"], selected_f1) if on_epoch else None
            if stop or state["bad_epochs"] >= cfg.patience:
                summary["stopped"] = stop or f"early stop: {cfg.patience} epochs without a better {run.select_on} F1"
                break
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM (a cluster job's time limit; run.py's handler)
        summary["stopped"] = "terminated (SIGTERM)" if isinstance(e, train.Terminated) else "interrupted"
        if run.last is not None:   # --save_last end: the last finished epoch, so that --resume goes on from it
            run_folder.save_last(run_dir, run.last)
        raise Interrupted(run_dir, state["epoch"], summary["stopped"]) from None
    except step_guard.NonFiniteLoss as e:
        summary["stopped"] = f"non-finite loss: {e}"
        if state["epoch"] == 0 and not resume_dir:   # nothing to keep: the folder must not pass for a run's
            failed = run_folder.fresh_folder(run_dir + "-failed")   # made empty, then replaced by the run's
            os.replace(run_dir, failed)
            run_dir = summary["run_dir"] = failed
            raise RunFailed(f"{e} No epoch finished; the folder is now {run_dir}", run_dir) from None
        raise RunFailed(f"{e} Run folder {run_dir} keeps the epochs before it.", run_dir) from None
    finally:
        if curves is not None:
            curves.close()
        if share is not None:
            share.close()
        summary.update(best_epoch=state["best_epoch"], best_checkpoint=state["best_path"],
                       epochs_run=state["epoch"], skipped_steps=guard.total, best=state.get("best_metrics"),
                       total_seconds=time.time() - started)
        if os.path.isdir(run_dir):
            run_folder.write_json(os.path.join(run_dir, "summary.json"), summary)
    if cfg.save_last != "never" and state["epoch"]:   # ended: what --resume of a larger --epochs needs, no more
        run_folder.save_last(run_dir, run_folder.last_state(run, state, cfg, optimizer=False))
    return finish(summary, state, run.select_on, run_dir)


def finish(summary, state, select_on, run_dir):
    best = state.get("best_metrics", {}).get("test", {})
    log(f"best epoch {state['best_epoch']} (selected on {select_on}): test weighted F1 "
        f"{100 * best.get('weighted_f1', 0):.2f}, accuracy {100 * best.get('accuracy', 0):.2f}, "
        f"weighted precision {100 * best.get('weighted_precision', 0):.2f}")
    log(f"run folder: {run_dir}")
    return summary


class RunFailed(VegaError):
    """A run that failed once its folder existed; run_dir is that folder (what --keep tidies)."""

    def __init__(self, message, run_dir):
        super().__init__(message)
        self.run_dir = run_dir


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
