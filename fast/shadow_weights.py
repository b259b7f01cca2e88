"""bf16 weight copies kept by the optimizer, for CPU training under bf16 autocast.

Under autocast, every training step cast each weight matrix to bf16 for the forward products, and each bf16
weight gradient back to float32 for the optimizer: two extra passes over 54 M weights, ~12% of a step on 2
cores. Here each Linear (and input Conv1d) holds a bf16 copy of its weight, its "shadow": a leaf tensor the
products use directly, so the weight gradient stays the bf16 tensor the product made. The optimizer step
(cpu_kernels.c: adam_step) reads it, updates the float32 weight and float32 moments as torch's fused
Adam/AdamW does, and writes the new bf16 copy in the same pass.

The numbers are autocast's: the products see the same bf16-rounded weights, and the weight gradients are the
same bf16 values (autocast's products also returned bf16 before the cast); weights and moments stay float32.
A copy is refreshed when its weight changes any other way (load_state_dict, an edit): torch counts in-place
changes in `_version`, and the kernel's own update, which writes the copy itself, leaves that count alone.
"""
import ctypes
import math

import torch
import torch.nn as nn

from . import cpu_kernels


class ShadowWeight:
    """The bf16 copy of one weight, as the 2-D matrix the products use."""

    def __init__(self, param):
        self.param = param
        self.tensor = torch.empty(param.shape[:2], dtype=torch.bfloat16).requires_grad_()   # (H_out, H_in)
        self.seen = None   # (version, address) of the weight the copy was made from

    def current(self):
        """The copy, refreshed first if the weight has changed since it was made."""
        if self.seen != (self.param._version, self.param.data_ptr()):
            with torch.no_grad():
                self.tensor.copy_(self.param.detach().view(self.tensor.shape))
            self.seen = (self.param._version, self.param.data_ptr())
        return self.tensor


def product_weight(module, x):
    """The weight a product with x uses: the module's bf16 copy when one is kept and x multiplies in bf16."""
    shadow = getattr(module, "shadow", None)
    if shadow is not None and x.device.type == "cpu" and torch.is_autocast_enabled("cpu") \
            and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return shadow.current()
    return module.weight if module.weight.dim() == 2 else module.weight.squeeze(-1)


class ShadowAdam(torch.optim.Optimizer):
    """Adam (decoupled=False) or AdamW (decoupled=True) over float32 parameters, keeping bf16 copies of the
    Linear/Conv1d weights of `model`. Its state_dict is torch.optim.Adam/AdamW's: runs resume across both."""

    def __init__(self, model, lr, weight_decay, decoupled, betas=(0.9, 0.999), eps=1e-8):
        if cpu_kernels.kernel() is None:
            raise RuntimeError("ShadowAdam needs the CPU kernels (fast/cpu_kernels.py)")
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.decoupled = decoupled
        self.shadows = {}
        for module in model.modules():
            is_product = isinstance(module, nn.Linear) or (isinstance(module, nn.Conv1d) and module.kernel_size == (1,))
            if is_product and module.weight.requires_grad:
                module.shadow = self.shadows[module.weight] = ShadowWeight(module.weight)

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none=set_to_none)
        for shadow in self.shadows.values():
            shadow.tensor.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ShadowAdam takes no closure")
        for group in self.param_groups:
            self._group_step(group)
        return None

    def _group_step(self, group):
        """One kernel call for every parameter of the group that has a gradient."""
        beta1, beta2 = group["betas"]
        keep, updated = [], []   # tensors whose addresses the kernel gets (alive until it returns); copies it writes
        cols = {k: [] for k in ("p", "m", "v", "g32", "g16", "shadow", "n", "step_size", "bias2_sqrt")}
        for p in group["params"]:
            shadow = self.shadows.get(p)
            g16 = None if shadow is None else shadow.tensor.grad
            g32 = p.grad
            if g16 is None and g32 is None:
                continue
            if g16 is not None and g32 is not None:   # a product ran outside bf16 autocast too: add up
                g32, g16 = g32 + g16.view(p.shape).float(), None
            if p.dtype != torch.float32 or not p.is_contiguous():
                raise RuntimeError("ShadowAdam needs contiguous float32 parameters")
            state = self.state[p]
            if not state:   # the layout of torch's Adam/AdamW state
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["step"] += 1
            t = float(state["step"])
            grads = [None if g is None else g.contiguous() for g in (g32, g16)]
            keep += grads
            for key, x in (("p", p), ("m", state["exp_avg"]), ("v", state["exp_avg_sq"]), ("g32", grads[0]),
                           ("g16", grads[1]), ("shadow", None if shadow is None else shadow.tensor)):
                cols[key].append(None if x is None else x.data_ptr())
            cols["n"].append(p.numel())
            if shadow is not None:
                updated.append(p)
            cols["step_size"].append(group["lr"] / (1 - beta1 ** t))
            cols["bias2_sqrt"].append(math.sqrt(1 - beta2 ** t))
        count = len(cols["p"])
        if not count:
            return
        pointers = [(ctypes.c_void_p * count)(*cols[k]) for k in ("p", "m", "v", "g32", "g16", "shadow")]
        cpu_kernels.kernel().adam_step(
            count, *pointers, (ctypes.c_int64 * count)(*cols["n"]), (ctypes.c_float * count)(*cols["step_size"]),
            (ctypes.c_float * count)(*cols["bias2_sqrt"]), group["lr"], 1 - beta1, beta2, 1 - beta2, group["eps"],
            group["weight_decay"], int(self.decoupled), torch.get_num_threads())
        for p in updated:   # the kernel wrote each copy from its new weight
            self.shadows[p].seen = (p._version, p.data_ptr())
