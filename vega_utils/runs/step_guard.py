"""Skipping a training step whose loss or gradient is not finite, as CUDA's GradScaler skips an overflowed fp16
step: weights, optimizer state and schedule untouched, the skip counted, the run stopped only by --max_bad_steps
skips in a row. Two ways to find them: on the host after every step (the CPU, where reading a value waits for
nothing), or on the device with one read per epoch (CUDA: DeviceRecord, no host synchronisation in a step)."""
import torch


class NonFiniteLoss(Exception):
    pass


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


def named_gradients(optimizer, names=None):
    """[(name, gradient)] of every gradient the optimizer will read: its parameters' and, for ShadowAdam, the bf16
    copies'. names: {parameter: name} (model.named_parameters()), else names are None."""
    names = names or {}
    named = [(names.get(p), p.grad) for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    shadows = getattr(optimizer, "shadows", {})
    return named + [(f"{names.get(p)} (bf16 copy)", s.tensor.grad) for p, s in shadows.items()
                    if s.tensor.grad is not None]


def gradients(optimizer):
    return [g for _, g in named_gradients(optimizer)]


def norms(tensors):
    """(P,) float32 2-norms of the tensors, in their order: one fused read-only pass per dtype and device (6-8 ms
    for the default model's 54 M gradients on 2 cores; torch's max-norm takes 10x that)."""
    groups = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    parts = [torch.stack(torch._foreach_norm([tensors[i] for i in idx], 2)).float() for idx in groups.values()]
    order = [i for idx in groups.values() for i in idx]
    flat = torch.cat([n.to(parts[0].device) for n in parts])                  # (P,) in group order
    if len(parts) == 1:   # already in order (CUDA's float32 gradients): no index to build or upload
        return flat
    # built on the host and sent in a non-blocking copy: a plain torch.tensor(..., device=cuda) would wait
    inverse = torch.tensor(order).argsort()
    return flat[(inverse.pin_memory() if flat.is_cuda else inverse).to(flat.device, non_blocking=True)]


def all_finite(tensors):
    """Whether every tensor's 2-norm is finite, with one host sync.

    A 2-norm is finite iff every element is finite and the squares' sum fits float32, so a gradient with an
    element beyond ~1.8e19 counts as non-finite too: Adam's second moment (g^2) would overflow to inf there and
    freeze that weight for good (its updates m / sqrt(v) would be 0 from then on)."""
    return not tensors or bool(torch.isfinite(norms(tensors)).all())


def first_nonfinite(named_tensors):
    """The name of the first tensor all_finite rejects (for the one report)."""
    finite = torch.isfinite(norms([t for _, t in named_tensors])).tolist() if named_tensors else []
    return next((n for (n, _), ok in zip(named_tensors, finite) if not ok), "unknown")


def _nonfinite_gradient(model, optimizer):
    """Which gradient is non-finite, by parameter name (only when a step is skipped)."""
    return first_nonfinite(named_gradients(optimizer, {p: n for n, p in model.named_parameters()}))


def optimizer_step(model, optimizer, loss, scaler):
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
        named = named_gradients(self.optimizer, self.names)
        names, grads = [n for n, _ in named], [g for _, g in named]
        bad = ~torch.isfinite(torch.cat([terms] + ([norms(grads)] if grads else [])))   # (T + P,)
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
