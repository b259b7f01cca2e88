"""One training epoch and one evaluation epoch (docs/method.md, section 3); the losses are model.py's
(docs/method.md, section 2.3)."""
import contextlib
import random
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import compute_losses, pick_anchors, valid_indices
from vega_utils.cpu import cpu_dtype
from vega_utils.runs.step_guard import DeviceRecord, StepGuard, optimizer_step, sync_free_steps


# ---------------------------------------------------------------- precision
def resolve_amp(amp, device):
    """Autocast dtype (or None) for --amp on this device. On CUDA `auto` is the reference's fp16 + GradScaler; on
    the CPU `auto` is bf16 where the CPU multiplies bf16 natively and float32 elsewhere (vega_utils/cpu.py)."""
    return amp_choice(amp, device)[0]


def amp_choice(amp, device):
    """(autocast dtype or None, why in words) for --amp on this device: the run's first line and config.json."""
    if amp == "off":
        return None, "--amp off"
    if device.type == "cuda":
        return (torch.bfloat16, "--amp bf16") if amp == "bf16" else (torch.float16, f"--amp {amp} on CUDA")
    if amp == "fp16":
        from vega_utils.common import VegaError
        raise VegaError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or --amp off")
    return cpu_dtype(amp)


def resolve_eval_amp(eval_amp, device):
    """Autocast dtype (or None = float32) for evaluation and scoring (--eval_amp). `auto` is float32 on the CPU,
    whatever training used: the reference scores in float32 there, and bf16's 8-bit mantissa moved class
    probabilities by up to 2e-2 and changed 0.5% of predictions. On CUDA `auto` is the reference's fp16 autocast."""
    if eval_amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    return resolve_amp(eval_amp, device)


def precision_name(dtype):
    """How config.json, summary.json and the inference report name a precision."""
    return "float32" if dtype is None else str(dtype).replace("torch.", "")


def exact_float32(device):
    """One rule on CUDA: float32 means float32, so TF32 is off for matrix products and for the cuDNN convolutions
    of the input projections, in training and scoring alike (autocast's fp16/bf16 work is unaffected)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def autocast(device, dtype):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster job's time limit, `kill`): the run stops at the next batch as on Ctrl-C."""


# Set by run.py's SIGTERM handler, checked between batches: an exception raised inside the handler itself can
# land in a weakref callback or a destructor, where Python only prints it and goes on.
STOP = threading.Event()


def check_stop():
    if STOP.is_set():
        raise Terminated("terminated (SIGTERM)")


def stop_on_sigterm(also=None):
    """SIGTERM (a cluster job's time limit, `kill`) stops the run at the next batch as Ctrl-C does: summary.json
    is written and the resume command printed. also(): called too (a launcher passes the signal on)."""
    def stop(signum, frame):
        STOP.set()
        if also is not None:
            also()
    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:   # not the main thread (run() called from a thread): keep the default
        pass


@contextlib.contextmanager
def ctrl_c_waits():
    """A Ctrl-C while an epoch is being saved waits until the epoch's files and last.pth are all written, then
    stops the run: a run folder never holds half an epoch (a summary naming a best epoch that last.pth lacks).
    Signal handlers belong to the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


# ---------------------------------------------------------------- epochs
def _accumulate(sums, losses):
    for k, v in losses.items():
        sums[k] = sums.get(k, 0.0) + float(v)


def to_device(model, batch, device, amp_dtype):
    """(batch, layout, valid_index) on the device. The layout and the loss's row-major indices of the valid
    utterances are built from the host-side mask first and go over with the batch (in one copy), so nothing in
    the step has to wait for the device (a boolean mask or `nonzero` on a device tensor would)."""
    with autocast(device, amp_dtype):   # the fast layout depends on the precision
        lay = model.layout(batch.pad_mask, device)
    lay, moved = lay.to(device, extra=[valid_indices(batch.pad_mask)])
    return batch.to(device, non_blocking=True), lay, moved[0]


def forward_losses(model, batch, anchors, lay, valid_index, cfg, class_weights, device, amp_dtype):
    """A training step's forward pass and every loss term (what `--compile` captures: fast/capture.py)."""
    with autocast(device, amp_dtype):
        out = model(batch, anchors, features=False, layout=lay)   # the losses read the logits only
    return compute_losses(out, batch, cfg, class_weights, valid_index)


def train_epoch(model, loader, optimizer, cfg, anchor_bank, class_weights, device, amp_dtype, scaler=None,
                scheduler=None, epoch=0, rng=None, progress=True, guard=None, sync_free=None, step_fn=None):
    """One pass over the training loader. Returns {term: mean over batches with a finite loss} and 'seconds'.

    A step with a non-finite loss or gradient is skipped (see StepGuard); `guard` carries the counts between
    epochs (a fresh one with cfg.max_bad_steps when not given). sync_free (default: sync_free_steps): no host
    synchronisation in a step; skips are then found on the device and reported at the end of the epoch, and a
    skipped step still advances the learning-rate schedule. step_fn: forward_losses, or its captured version."""
    model.train()
    guard = guard or StepGuard(cfg.max_bad_steps)
    guard.new_epoch()
    sync_free = sync_free_steps(device, optimizer) if sync_free is None else sync_free
    record = DeviceRecord(model, optimizer) if sync_free else None
    start, sums, n_finite = time.perf_counter(), {}, 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress, dynamic_ncols=True)
    for batch_number, host_batch in enumerate(bar, 1):
        check_stop()
        batch, lay, valid_index = to_device(model, host_batch, device, amp_dtype)
        anchors = None
        if anchor_bank is not None and cfg.clip_loss:
            anchors = pick_anchors(anchor_bank, training=True, rand=cfg.rand, rng=rng or random)
        losses = (step_fn or forward_losses)(model, batch, anchors, lay, valid_index, cfg, class_weights, device,
                                             amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        if sync_free:
            record.step(losses, scaler)
            if scheduler is not None:
                scheduler.step()
            continue
        if not torch.isfinite(losses["total"]):   # no backward: nothing in it could be used
            bad = next(k for k, v in losses.items() if not torch.isfinite(torch.as_tensor(v)))
            guard.skipped(epoch, batch_number, f"loss (term {bad})")
            continue
        broken = optimizer_step(model, optimizer, losses["total"], scaler)
        if broken is None:
            guard.applied()
            if scheduler is not None:   # the schedule follows the steps taken
                scheduler.step()
        else:
            guard.skipped(epoch, batch_number, broken)
        _accumulate(sums, {k: v.detach() for k, v in losses.items()})
        n_finite += 1
        bar.set_postfix(loss=f"{sums['total'] / n_finite:.3f}")
    result = record.finish(guard, epoch) if sync_free else {k: v / max(n_finite, 1) for k, v in sums.items()}
    result["seconds"] = time.perf_counter() - start
    result["skipped_steps"] = guard.epoch_skipped
    return result


EVAL_ROWS = 4096  # evaluation runs several loader batches as one forward pass, up to this many utterances


def merge_batches(batches, n_speakers):
    """Several collated batches as one, padded to the longest (padding as in dataloader.collate)."""
    L = max(b.pad_mask.shape[1] for b in batches)

    def cat(name, value):
        parts = [getattr(b, name) for b in batches]
        pads = [(0, 0) * (p.dim() - 2) + (0, L - p.shape[1]) for p in parts]    # pad dim 1 to L
        return torch.cat([F.pad(p, pad, value=value) for p, pad in zip(parts, pads)])

    return type(batches[0])(text=cat("text", 0.0), audio=cat("audio", 0.0), visual=cat("visual", 0.0),
                            speakers=cat("speakers", n_speakers), pad_mask=cat("pad_mask", True),
                            labels=cat("labels", -1), dialogue_ids=[d for b in batches for d in b.dialogue_ids])


def eval_groups(batches, max_rows):
    """Batches (a loader or any iterable of them) in groups of at most max_rows utterances; a batch larger than
    that goes alone."""
    group, rows = [], 0
    for batch in batches:
        n = int((~batch.pad_mask).sum())
        if group and rows + n > max_rows:
            yield group
            group, rows = [], 0
        group.append(batch)
        rows += n
    if group:
        yield group


class EvalSet:
    """A fixed evaluation split (no augmentation, no shuffling) merged into forward-pass groups once.

    Every evaluation epoch sees the same batches, so merging them (padding and copying every feature) is done
    here once instead of once per epoch, and so is moving them to the device with their layouts (`on`).
    Each group: (merged batch, the loader's own batches in it).
    """

    def __init__(self, loader, n_speakers, max_rows=EVAL_ROWS):
        # collated here, not by iterating the loader: that draws a worker seed from torch's global generator,
        # which would shift every later dropout mask (a resumed run must see the same masks)
        batches = (loader.collate_fn([loader.dataset[i] for i in idx]) for idx in loader.batch_sampler)
        self.groups = [(merge_batches(g, n_speakers), g) for g in eval_groups(batches, max_rows)]
        self.placed = (None, None)   # (key, [EvalGroup]): the groups on one device, for one model and precision

    def __len__(self):
        return len(self.groups)

    def on(self, model, device, amp_dtype):
        """The groups on `device`, laid out for `model`: uploaded at the first evaluation, kept for the next."""
        key = (str(device), amp_dtype, type(model), model.n_head)
        if self.placed[0] != key:
            self.placed = (key, [place_group(model, merged, group, device, amp_dtype) for merged, group in self.groups])
        return self.placed[1]


@dataclass
class EvalGroup:
    """One forward pass of an evaluation, on the device, with what its results need from the host side."""
    batch: object                 # the merged dataloader.Batch, on the device
    layout: object
    valid_index: torch.Tensor     # (N,) row-major indices of its valid utterances, on the device
    parts: list                   # per loader batch: (n0, n1), its utterances' span of valid_index
    labels: np.ndarray            # (N,) from the host-side batch
    speakers: np.ndarray          # (N,)
    dialogue_ids: list            # (N,) one per utterance
    utterance_index: list         # (N,)


def place_group(model, merged, group, device, amp_dtype):
    valid = ~merged.pad_mask                                                    # (B, L), host side
    batch, lay, valid_index = to_device(model, merged, device, amp_dtype)
    # each loader batch is a block of whole rows of the merged batch, so its utterances are one span of the
    # merged row-major valid_index, in their own row-major order
    bounds = np.cumsum([0] + [int((~part.pad_mask).sum()) for part in group]).tolist()
    parts = list(zip(bounds[:-1], bounds[1:]))
    lengths = valid.sum(1).tolist()
    return EvalGroup(batch, lay, valid_index, parts, merged.labels[valid].numpy(), merged.speakers[valid].numpy(),
                     [d for d, n in zip(merged.dialogue_ids, lengths) for _ in range(n)],
                     [i for n in lengths for i in range(n)])


@torch.no_grad()  # not inference_mode: autocast does not cache weight casts there (4x the casts)
def eval_epoch(model, data, cfg, anchor_bank, class_weights, device, amp_dtype, with_losses=True,
               desc="eval", progress=True, vega_branch=True):
    """Evaluate with centre anchors on `data`, an EvalSet (merged and moved once, reused every epoch) or a
    DataLoader. Returns mean loss terms (if with_losses), per-utterance predictions of every head, `all`-head
    probabilities, labels and ids, and 'seconds'.

    The VEGA branch never changes predictions: it runs only for its loss terms (with_losses and vega_branch).
    Several loader batches go through the model as one (fewer, larger matrix products; every utterance gets
    the same result); losses are still computed per loader batch, so they stay means over the same batches.
    Results stay on the device until the pass ends, then come back in one go.
    """
    model.eval()
    start, sums, n_batches = time.perf_counter(), {}, 0
    anchors = None
    if with_losses and vega_branch and anchor_bank is not None and cfg.clip_loss:
        anchors = pick_anchors(anchor_bank, training=False, rand=cfg.rand)
    heads = ("all", "t", "a", "v")
    kept = {}   # output key -> [(N_group, C) rows on the device]
    groups = []
    # One autocast region for the whole pass: autocast then casts each weight it handles once per pass, not once
    # per batch (its weight cache lives until the outermost region ends, and the weights do not change here).
    with autocast(device, amp_dtype):
        placed = data.on(model, device, amp_dtype) if isinstance(data, EvalSet) else (
            place_group(model, merge_batches(g, cfg.n_speakers), g, device, amp_dtype)
            for g in eval_groups(data, EVAL_ROWS))
        for g in tqdm(placed, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            out = model(g.batch, anchors, features=False, layout=g.layout)
            if with_losses:
                for n0, n1 in g.parts:   # the loader's own batches: their utterances of the merged output
                    with autocast(device, None):   # losses in float32, as in training
                        losses = compute_losses(out, g.batch, cfg, class_weights, g.valid_index[n0:n1])
                    sums = {k: sums.get(k, 0.0) + v.detach().float() for k, v in losses.items()}
                n_batches += len(g.parts)
            for key in [f"{m}_logit" for m in heads] + [f"{m}_clip_logit" for m in heads if "all_clip_logit" in out]:
                kept.setdefault(key, []).append(out[key].flatten(0, 1).index_select(0, g.valid_index).float())
            groups.append(g)
    keys = list(kept)
    widths = [kept[k][0].shape[1] for k in keys]
    host = torch.cat([torch.cat(kept[k]) for k in keys], dim=1).cpu() if keys else None   # (N, sum C): one read
    rows = dict(zip(keys, host.split(widths, dim=1))) if keys else {}
    losses = dict(zip(sums, torch.stack(list(sums.values())).tolist())) if sums else {}
    return {
        "losses": {k: v / max(n_batches, 1) for k, v in losses.items()},
        "preds": {m: rows[f"{m}_logit"].argmax(-1).numpy() for m in heads},
        "probs": torch.softmax(rows["all_logit"], -1).numpy(),
        "clip_logits": {m: rows[f"{m}_clip_logit"].numpy() for m in heads if f"{m}_clip_logit" in rows},
        "labels": np.concatenate([g.labels for g in groups]),
        "speakers": np.concatenate([g.speakers for g in groups]),
        "dialogue_ids": [d for g in groups for d in g.dialogue_ids],
        "utterance_index": np.asarray([i for g in groups for i in g.utterance_index]),
        "seconds": time.perf_counter() - start,
    }
