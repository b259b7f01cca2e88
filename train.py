"""One training epoch and one evaluation epoch (spec section 3); the losses are model.py's (spec 2.3)."""
import random
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import compute_losses, pick_anchors


# ---------------------------------------------------------------- precision
def resolve_amp(amp, device):
    """Autocast dtype (or None) for --amp on this device. On CUDA `auto` is the reference's fp16 + GradScaler."""
    if amp == "off":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if amp == "fp16":
        from vega_utils.common import VegaError
        raise VegaError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or --amp off")
    return torch.bfloat16  # CPU `auto`: see bench/README.md for the accuracy study behind this default


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


class NonFiniteLoss(Exception):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster job's time limit, `kill`): the run stops at the next batch as on Ctrl-C."""


# Set by run.py's SIGTERM handler, checked between batches: an exception raised inside the handler itself can
# land in a weakref callback or a destructor, where Python only prints it and goes on.
STOP = threading.Event()


def check_stop():
    if STOP.is_set():
        raise Terminated("terminated (SIGTERM)")


class StepGuard:
    """Skips a training step whose loss or any gradient is non-finite, as CUDA's GradScaler skips an overflowed
    fp16 step: weights, optimizer state and the scheduler are left untouched. Under a GradScaler the scaler
    decides (its skips are seen as a drop of its scale) and is counted the same way.

    Counts per epoch (`epoch_skipped`) and in all (`total`); the first skip is reported once, naming the first
    loss term (or gradient) that broke. `max_bad_steps` consecutive skips raise NonFiniteLoss: a run that keeps
    producing them is broken, not unlucky.
    """

    def __init__(self, max_bad_steps, total=0, log=print):
        self.max_bad_steps, self.total, self.log = max_bad_steps, total, log
        self.epoch_skipped = self.streak = 0
        self.first = None   # where the first skip of this run happened, for the stop message

    def new_epoch(self):
        self.epoch_skipped = 0

    def applied(self):
        self.streak = 0

    def skipped(self, epoch, batch, what):
        """Record one skipped step; `what`: the loss term or gradient that was non-finite."""
        self.epoch_skipped += 1
        self.total += 1
        self.streak += 1
        where = f"epoch {epoch}, batch {batch}"
        if self.first is None:
            self.first = f"{where}: {what}"
            self.log(f"warning: skipped a training step with a non-finite {what} at {where} (weights and "
                     f"optimizer state unchanged; later skips are counted as skipped_steps in metrics.jsonl)")
        if self.streak >= self.max_bad_steps:
            raise NonFiniteLoss(f"{self.streak} consecutive training steps skipped for a non-finite loss or "
                                f"gradient (the last at {where}: {what}; the first of the run at {self.first}); "
                                f"stopping. Try a lower --lr or --amp off.")


def gradients(optimizer):
    """Every gradient the optimizer will read: its parameters' and, for ShadowAdam, the bf16 copies'."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    shadows = getattr(optimizer, "shadows", {}).values()
    return grads + [s.tensor.grad for s in shadows if s.tensor.grad is not None]


def all_finite(tensors):
    """Whether every tensor's 2-norm is finite, with one host sync: one fused read-only pass per dtype (6-8 ms
    for the default model's 54 M gradients on 2 cores, ~2% of its training step; torch's max-norm takes 10x that).

    A 2-norm is finite iff every element is finite and the squares' sum fits float32, so a gradient with an
    element beyond ~1.8e19 counts as non-finite too: Adam's second moment (g^2) would overflow to inf there and
    freeze that weight for good (its updates m / sqrt(v) would be 0 from then on)."""
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    if not by_dtype:
        return True
    norms = [torch.stack(torch._foreach_norm(ts, 2)).float().amax() for ts in by_dtype.values()]
    return bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all())


def first_nonfinite(named_tensors):
    """The name of the first tensor all_finite rejects (for the one report; checks them one by one)."""
    return next((n for n, t in named_tensors if not all_finite([t])), "unknown")


# ---------------------------------------------------------------- epochs
def _accumulate(sums, losses):
    for k, v in losses.items():
        sums[k] = sums.get(k, 0.0) + float(v)


def _nonfinite_gradient(model, optimizer):
    """Which gradient is non-finite, by parameter name (checked one by one: only when a step is skipped)."""
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    shadows = getattr(optimizer, "shadows", {})
    names = {p: n for n, p in model.named_parameters()}
    named += [(f"{names[p]} (bf16 copy)", s.tensor.grad) for p, s in shadows.items() if s.tensor.grad is not None]
    return first_nonfinite(named)


def _optimizer_step(model, optimizer, loss, scaler):
    """Backward and, when every gradient is finite, the optimizer step. Returns None when the step was applied,
    else what was non-finite."""
    if scaler is not None:   # the scaler finds overflows and skips the step itself; its scale drops when it does
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return "gradient (GradScaler found an overflow)" if scaler.get_scale() < scale else None
    loss.backward()
    if not all_finite(gradients(optimizer)):
        return f"gradient of {_nonfinite_gradient(model, optimizer)}"
    optimizer.step()
    return None


def to_device(model, batch, device, amp_dtype):
    """(batch, layout, valid_index) on the device. The layout and the loss's row-major indices of the valid
    utterances are built from the host-side mask first and go over with the batch, so nothing in the step has
    to wait for the device (a boolean mask or `nonzero` on a device tensor would)."""
    valid_index = (~batch.pad_mask).flatten().nonzero().squeeze(1)               # (N,)
    with autocast(device, amp_dtype):   # the fast layout depends on the precision
        lay = model.layout(batch.pad_mask, device)
    lay, (valid_index,) = lay.to(device, extra=[valid_index])
    return batch.to(device, non_blocking=True), lay, valid_index


def sync_free_steps(device, optimizer):
    """Whether steps run without host synchronisation: on CUDA, with an optimizer that can skip a step on the
    device (torch's fused Adam/AdamW; GradScaler's fp16 steps too). On the CPU a host check costs nothing."""
    return device.type == "cuda" and getattr(optimizer, "_step_supports_amp_scaling", False)


class DeviceRecord:
    """A sync-free epoch's loss sums and non-finite flags, kept on the device and read once at its end."""

    def __init__(self, model, optimizer):
        self.names = {p: n for n, p in model.named_parameters()}
        self.optimizer, self.steps, self.sums, self.n_finite = optimizer, [], 0.0, 0

    def step(self, losses, scaler):
        """Backward and optimizer step; a step with a non-finite loss or gradient is skipped on the device."""
        terms = torch.stack([v.detach().float() for v in losses.values()])       # (T,), the total last
        (losses["total"] if scaler is None else scaler.scale(losses["total"])).backward()
        names, grads = named_gradients(self.names, self.optimizer)
        bad = ~torch.isfinite(torch.cat([terms, _norms(grads)]))                  # (T + P,)
        if scaler is not None:   # the scaler's own found-inf skips an overflowed step
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.found_inf = bad.any().float()
            self.optimizer.step()
        finite = ~bad[terms.shape[0] - 1]
        self.sums = self.sums + torch.where(finite, terms, 0.0)
        self.n_finite = self.n_finite + finite.float()
        self.steps.append((list(losses), names, bad))

    def finish(self, guard, epoch):
        """Read everything back (the epoch's one sync), replay the steps through the guard, return the means."""
        if not self.steps:
            return {}
        values = torch.cat([bad.float() for _, _, bad in self.steps] + [self.sums, self.n_finite.view(1)]).tolist()
        start = 0
        for number, (keys, names, bad) in enumerate(self.steps, 1):
            flags, start = values[start:start + bad.shape[0]], start + bad.shape[0]
            first = next((i for i, f in enumerate(flags) if f), None)
            if first is None:
                guard.applied()
            elif first < len(keys):
                guard.skipped(epoch, number, f"loss (term {keys[first]})")
            else:
                guard.skipped(epoch, number, f"gradient of {names[first - len(keys)]}")
        keys = self.steps[0][0]
        sums, n = values[start:start + len(keys)], max(values[-1], 1.0)
        return {k: v / n for k, v in zip(keys, sums)}


def _norms(grads):
    """(P,) float32 2-norms of the gradients in their order, one fused pass per dtype."""
    by_dtype = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(i)
    norms = [None] * len(grads)
    for idx in by_dtype.values():
        for i, n in zip(idx, torch._foreach_norm([grads[i] for i in idx], 2)):
            norms[i] = n.float()
    return torch.stack(norms)


def named_gradients(names, optimizer):
    """(names, gradients) of what the optimizer will read, in gradients()'s order."""
    grads = gradients(optimizer)
    named = [names.get(p, "?") for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    shadows = getattr(optimizer, "shadows", {})
    named += [f"{names.get(p, '?')} (bf16 copy)" for p, s in shadows.items() if s.tensor.grad is not None]
    return named, grads


def train_epoch(model, loader, optimizer, cfg, anchor_bank, class_weights, device, amp_dtype, scaler=None,
                scheduler=None, epoch=0, rng=None, progress=True, guard=None, sync_free=None):
    """One pass over the training loader. Returns {term: mean over batches with a finite loss} and 'seconds'.

    A step with a non-finite loss or gradient is skipped (see StepGuard); `guard` carries the counts between
    epochs (a fresh one with cfg.max_bad_steps when not given). sync_free (default: sync_free_steps): no host
    synchronisation in a step; skips are then found on the device and reported at the end of the epoch, and a
    skipped step still advances the learning-rate schedule."""
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
        with autocast(device, amp_dtype):
            out = model(batch, anchors, layout=lay)
        losses = compute_losses(out, batch, cfg, class_weights, valid_index)
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
        broken = _optimizer_step(model, optimizer, losses["total"], scaler)
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
    here once instead of once per epoch. Each group: (merged batch, the loader's own batches in it).
    """

    def __init__(self, loader, n_speakers, max_rows=EVAL_ROWS):
        # collated here, not by iterating the loader: that draws a worker seed from torch's global generator,
        # which would shift every later dropout mask (a resumed run must see the same masks)
        batches = (loader.collate_fn([loader.dataset[i] for i in idx]) for idx in loader.batch_sampler)
        self.groups = [(merge_batches(g, n_speakers), g) for g in eval_groups(batches, max_rows)]

    def __len__(self):
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)


@torch.no_grad()  # not inference_mode: autocast does not cache weight casts there (4x the casts)
def eval_epoch(model, data, cfg, anchor_bank, class_weights, device, amp_dtype, with_losses=True,
               desc="eval", progress=True, vega_branch=True):
    """Evaluate with centre anchors on `data`, an EvalSet (merged once, reused every epoch) or a DataLoader.
    Returns mean loss terms (if with_losses), per-utterance predictions of every head, `all`-head
    probabilities, labels and ids, and 'seconds'.

    The VEGA branch never changes predictions: it runs only for its loss terms (with_losses and vega_branch).
    Several loader batches go through the model as one (fewer, larger matrix products; every utterance gets
    the same result); losses are still computed per loader batch, so they stay means over the same batches.
    """
    model.eval()
    start, sums, n_batches = time.perf_counter(), {}, 0
    anchors = None
    if with_losses and vega_branch and anchor_bank is not None and cfg.clip_loss:
        anchors = pick_anchors(anchor_bank, training=False, rand=cfg.rand)
    preds = {m: [] for m in ("all", "t", "a", "v")}
    clip = {m: [] for m in preds}   # VEGA logits 100 * cos(projection, centre anchor): anchor alignment
    probs, labels, dialogue_ids, utt_index, speakers = [], [], [], [], []
    # One autocast region for the whole pass: autocast then casts each weight it handles once per pass, not once
    # per batch (its weight cache lives until the outermost region ends, and the weights do not change here).
    with autocast(device, amp_dtype):
        if not isinstance(data, EvalSet):
            data = ((merge_batches(g, cfg.n_speakers), g) for g in eval_groups(data, EVAL_ROWS))
        for merged, group in tqdm(data, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            batch = merged.to(device, non_blocking=True)
            out = model(batch, anchors, features=False)
            if with_losses:
                b0 = 0
                for part in group:   # the loader's own batches, cut back out of the merged output
                    b1, L = b0 + part.pad_mask.shape[0], part.pad_mask.shape[1]
                    part_out = {k: v[b0:b1, :L] if v.dim() >= 2 else v for k, v in out.items()}
                    with autocast(device, None):   # losses in float32, as in training
                        _accumulate(sums, compute_losses(part_out, part.to(device), cfg, class_weights))
                    b0 = b1
            valid = ~batch.pad_mask                                             # (B, L)
            for m in preds:
                preds[m].append(out[f"{m}_logit"][valid].argmax(-1).cpu())
            probs.append(torch.softmax(out["all_logit"][valid].float(), -1).cpu())
            for m in clip if "all_clip_logit" in out else ():
                clip[m].append(out[f"{m}_clip_logit"][valid].float().cpu())
            labels.append(batch.labels[valid].cpu())
            speakers.append(batch.speakers[valid].cpu())
            lengths = valid.sum(1).tolist()
            for did, n in zip(batch.dialogue_ids, lengths):
                dialogue_ids += [did] * n
                utt_index += list(range(n))
            n_batches += len(group)
    result = {
        "losses": {k: v / max(n_batches, 1) for k, v in sums.items()},
        "preds": {m: torch.cat(v).numpy() for m, v in preds.items()},
        "probs": torch.cat(probs).numpy(),
        "clip_logits": {m: torch.cat(v).numpy() for m, v in clip.items() if v},   # (N, C) each
        "labels": torch.cat(labels).numpy(),
        "speakers": torch.cat(speakers).numpy(),
        "dialogue_ids": dialogue_ids,
        "utterance_index": np.asarray(utt_index),
        "seconds": time.perf_counter() - start,
    }
    return result
