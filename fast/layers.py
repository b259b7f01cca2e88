"""Faster versions of model.py's modules. Each subclasses the plain module and overrides only its forward, so
parameters, buffers and their names stay the plain model's; `fast.accelerate` swaps them in.

What each buys (bench/README.md has the measurements):
- FastLinear / FastConv1x1: products in the compute dtype through LinearFn (a backward that writes the weight
  gradient in its own layout), oneDNN's linear for bf16 rows, and the optimizer's bf16 weight copies
  (shadow_weights.py) instead of a cast of every weight at every step.
- FastDropout, FastMLP, FastFeedForward, FastMultimodalGate: the one-pass C kernels of cpu_kernels.py
  (dropout, activation + dropout, the gate's softmax-and-mix) in bf16 on the CPU; torch's ops elsewhere.
- FastAttention: in lower-precision evaluation, torch's fused attention on the packed layout's grids.
- FastEmbedding / FastPositionalEncoding: their rows in the compute dtype, so the residual stream stays in it.
- FastVEGA: the packed layout (layout.py) of the valid utterances instead of every padded position.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (
    MAX_LEN,
    VEGA,
    MultiHeadedAttention,
    MultimodalGate,
    PositionalEncoding,
    PositionwiseFeedForward,
    gelu_tanh,
)

from . import cpu_kernels
from .cpu_kernels import torch_ops
from .layout import make_layout
from .shadow_weights import product_weight


def compute_dtype(x):
    """The dtype matrix products run in: autocast's when it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def cast(x, dtype):
    """x in dtype; skips the call when it already is (a no-op .to() still costs ~3 us: ~900 a training step)."""
    return x if x is None or x.dtype == dtype else x.to(dtype)


def _onednn_linear_available():
    try:
        x = torch.ones(2, 4, dtype=torch.bfloat16)
        torch.ops.mkldnn._linear_pointwise(x, x, x[0, :2], "none", [], "")
        return True
    except (AttributeError, RuntimeError):   # a build without oneDNN (not x86) or without this op
        return False


ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and _onednn_linear_available()


def linear(x, weight, bias):
    """x W^T + b. For rows x (N, D) in bf16 on the CPU: oneDNN's linear, which adds the bias as it writes the
    product (aten's addmm first copies the bias into the output, then accumulates into it: 7-11% slower).
    Same numbers: both round the float32 accumulation once to bf16."""
    if bias is not None and x.dim() == 2 and ONEDNN_LINEAR and x.device.type == "cpu" \
            and compute_dtype(x) == torch.bfloat16:
        bf16 = torch.bfloat16
        return torch.ops.mkldnn._linear_pointwise(cast(x, bf16), cast(weight, bf16), cast(bias, bf16), "none", [], "")
    return F.linear(x, weight, bias)


class LinearFn(torch.autograd.Function):
    """y = x W^T + b for rows x (N, D), in the compute dtype, with a backward written for the CPU.

    What autocast + F.linear would do, except: the weight gradient comes out as grad^T @ x, already in the
    weight's layout (autograd's (x^T grad)^T needs a strided copy before it can be accumulated); and with
    exact_conv (the input projections, whose weights are Conv1d's) float32 goes through conv1d, which rounds
    exactly as the reference's padded Conv1d (a plain matmul differs by ~1e-7 relative, too much for the 1e-6
    parity) while lower precision uses a matmul (mkldnn's bf16 conv for this shape is ~15x slower).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, exact_conv):
        dt = compute_dtype(x)
        xc, wc, bc = cast(x, dt), cast(weight, dt), cast(bias, dt)
        if exact_conv and dt == torch.float32:
            y = F.conv1d(xc.unsqueeze(-1), wc.unsqueeze(-1), bc).squeeze(-1)       # (N, D, 1) -> (N, H)
        else:
            y = linear(xc, wc, bc)                                                 # (N, H)
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad = cast(grad, wc.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = cast(grad @ wc, x_dtype)                                      # (N, D)
        if ctx.needs_input_grad[1]:
            grad_w = cast(grad.t() @ xc, w_dtype)                                  # (H, D), contiguous
        if b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = cast(grad.sum(0), b_dtype)                                    # (H,)
        return grad_x, grad_w, grad_b, None


class FastLinear(nn.Linear):
    """Without gradients `linear` alone; in training LinearFn. With the optimizer's bf16 copy of the weight
    (`shadow`), bf16 products use it; otherwise the weight is cast for the product. On CUDA, nn.Linear's own
    forward: autocast casts each weight once per forward, and LinearFn's Python-side casts were ~330 more
    launches a step."""
    shadow = None

    def forward(self, x):
        if torch_ops(x):
            return super().forward(x)
        weight = product_weight(self, x)
        if not torch.is_grad_enabled():
            return linear(x, weight, self.bias)
        y = LinearFn.apply(x.reshape(-1, x.shape[-1]), weight, self.bias, False)  # (N, H_out)
        return y.view(*x.shape[:-1], y.shape[-1])


class FastConv1x1(nn.Conv1d):
    """The input projections: a 1x1 Conv1d over rows (R, D, 1), through LinearFn (exact conv in float32)."""
    shadow = None

    @staticmethod
    def accepts(module):
        return module.kernel_size == (1,) and module.stride == (1,) and module.padding == (0,) \
            and module.dilation == (1,) and module.groups == 1

    def forward(self, x):
        if x.dim() != 3 or x.shape[-1] != 1 or torch_ops(x):
            return super().forward(x)
        rows = x.squeeze(-1)                                                       # (R, D)
        return LinearFn.apply(rows, product_weight(self, rows), self.bias, True).unsqueeze(-1)  # (R, H, 1)


class FastDropout(nn.Dropout):
    """Training-mode dropout through the one-pass C kernel on the CPU (same rate and scaling, its own random
    stream drawn from torch's generator). Without the kernel, 16 random bits per element compared with a
    threshold (torch's bernoulli_ costs ~12 ns an element). CUDA keeps torch's fused kernel."""

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        if torch_ops(x) or self.p >= 1.0:
            return F.dropout(x, self.p, True)
        y = cpu_kernels.dropout(x, self.p)
        if y is not None:
            return y
        n = x.numel()
        # the full int64 range: plain random_() leaves the top bit 0, which would bias every fourth int16
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, 2 ** 63 - 1)
        bits = bits.view(torch.int16)[:n].view(x.shape)                           # uniform on [-2^15, 2^15)
        keep = torch.ge(bits, round(self.p * 65536) - 32768,                      # P(keep) = 1 - p
                        out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
        return x * keep.mul_(1.0 / (1.0 - self.p))


def kernel_activation(module):
    """The C kernels' name of an activation module, or None when they do not have it."""
    if type(module) is nn.GELU:
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    if type(module) is nn.ELU and module.alpha == 1.0:
        return "elu"
    return None


def activation_then_dropout(x, activation, act_fn, dropout):
    """dropout(act_fn(x)): one fused bf16 CPU pass when the kernels know `activation`, else torch's ops."""
    y = cpu_kernels.activation_dropout(x, activation, dropout.p, dropout.training)
    return dropout(act_fn(x)) if y is None else y


class FastMLP(nn.Sequential):
    """The heads' nn.Sequential; an activation the kernels know followed by its Dropout runs as one pass."""

    def forward(self, x):
        layers, i = list(self), 0
        while i < len(layers):
            act = kernel_activation(layers[i])
            if act is not None and i + 1 < len(layers) and isinstance(layers[i + 1], nn.Dropout):
                x, i = activation_then_dropout(x, act, layers[i], layers[i + 1]), i + 2
            else:
                x, i = layers[i](x), i + 1
        return x


class FastFeedForward(PositionwiseFeedForward):
    # the plain code this class stands in for, hashed (fast/fingerprint.py)
    written_against = {"forward": "331445e11c8e", "__init__": "61b58830b102", "gelu_tanh": "78b8b6e339ca"}

    def forward(self, x):
        pre = self.w_1(self.layer_norm(x))                                         # (R, d_ff)
        inter = activation_then_dropout(pre, "gelu_tanh", gelu_tanh, self.dropout_1)
        return self.dropout_2(self.w_2(inter)) + x


class FastMultimodalGate(MultimodalGate):
    written_against = {"mix": "5a0cc2bf1c0c"}

    def mix(self, logits, stacked):
        y = cpu_kernels.softmax_mix3(logits, stacked, self.training)               # CPU: one fused pass
        return super().mix(logits, stacked) if y is None else y


class FastAttention(MultiHeadedAttention):
    written_against = {"attend_grids": "0cf005a92575", "attend": "cc1209a3b8b2"}

    def attend_grids(self, q, k, v, lay):
        if torch.is_grad_enabled() or compute_dtype(q) == torch.float32:
            return super().attend_grids(q, k, v, lay)
        # Lower-precision evaluation: the fused kernel, on transposed views of reused buffers. Every query has a
        # valid key in its own dialogue, so masking with -inf instead of -1e4 gives the same weights.
        per_grid = zip(*(lay.to_grids(x, self.n_head, contiguous=False, scratch=name)
                         for name, x in zip("qkv", (q, k, v))))
        context = [F.scaled_dot_product_attention(*qkv, attn_mask=mask, scale=1.0)
                   for qkv, mask in zip(per_grid, lay.attend_masks())]
        return lay.from_grids(context)


class FastEmbedding(nn.Embedding):
    written_against = {}   # adds a cast to torch's forward

    def forward(self, x):
        y = super().forward(x)
        return cast(y, compute_dtype(y))


class FastPositionalEncoding(PositionalEncoding):
    written_against = {}   # adds a cast to the plain forward

    def forward(self, positions):
        y = super().forward(positions)
        return cast(y, compute_dtype(y))


class FastVEGA(VEGA):
    written_against = {"layout": "1ad52bc347bc"}   # everything else is the plain model's own code

    single_grid = False   # set by fast/capture.py: a captured step takes one grid per batch on the CPU too

    def layout(self, pad_mask, device=None):
        """The packed rows of the valid utterances (layout.py), for use on `device` (default: the mask's).
        On the CPU, grids of dialogues of similar lengths (fewer padded attention positions); on CUDA one grid per
        batch: each extra grid costs ~135 kernel launches a step, and launches are what a GPU step waits on."""
        device = torch.device(device or pad_mask.device)
        grouped = device.type == "cpu" and not (cpu_kernels.EMULATE_CUDA or self.single_grid)
        return make_layout(pad_mask, grouped=grouped, max_position=MAX_LEN - 1).prepare(self.n_head)


# plain module type -> its faster version
SWAPS = {VEGA: FastVEGA, nn.Linear: FastLinear, nn.Conv1d: FastConv1x1, nn.Dropout: FastDropout,
         nn.Sequential: FastMLP, PositionwiseFeedForward: FastFeedForward, MultimodalGate: FastMultimodalGate,
         MultiHeadedAttention: FastAttention, nn.Embedding: FastEmbedding, PositionalEncoding: FastPositionalEncoding}
