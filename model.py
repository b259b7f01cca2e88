"""VEGA: an SDT-style multimodal fusion transformer plus the VEGA visual-anchor branch (spec section 2).

Every per-utterance layer runs on the valid utterances only, packed into rows (N, H) (plus a few spare rows
that keep matrix shapes repeating); only attention needs dialogues side by side, in grids (layout.py).
`compute_padding=True` pushes every padded position through every layer as the reference does (same
parameters, same code), which the parity tests and the benchmark baseline use. Under autocast the products
run in the lower precision and the residual stream stays in it; float32 is exact (the parity tests).

Parameter names follow the reference exactly (`state_dict_manifest.json`): published checkpoints load strictly.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from layout import make_layout
from vega_utils import cpu_kernels
from vega_utils.shadow_weights import product_weight

MODALITIES = ("t", "a", "v")
# Encoder `s_x` builds a representation of target x attending to source s. Per target, the order
# (self, other, other) is the concatenation order of the reduce layer.
ENCODERS_BY_TARGET = {"t": ("t_t", "a_t", "v_t"), "a": ("a_a", "t_a", "v_a"), "v": ("v_v", "t_v", "a_v")}
ENCODER_NAMES = tuple(n for names in ENCODERS_BY_TARGET.values() for n in names)
INPUT_LAYERS = {"t": "textf_input", "a": "acouf_input", "v": "visuf_input"}
MAX_LEN = 512
NEG_FILL = -1e4  # padded-key score; small enough in magnitude for fp16 autocast


class Dropout(nn.Dropout):
    """nn.Dropout with a faster CPU path (same parameter-free module, so names are unchanged).

    On the CPU, torch's bernoulli_ costs about 12 ns an element. The default path is the one-pass C kernel of
    vega_utils/cpu_kernels.py. Without a compiler, the fallback compares 16 random bits per element with a
    threshold, writing the 0/1 mask straight in x's dtype. Both drop with probability p to within 8e-6 and scale
    survivors by 1/(1-p). CUDA keeps torch's fused kernel.
    """

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        if x.is_cuda or self.p >= 1.0:
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
    product (aten's addmm first copies the bias into the output, then accumulates into it: 7-11% slower here).
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


class Linear(nn.Linear):
    """nn.Linear (same parameters) whose training-time product is LinearFn.

    Without gradients it is `linear` alone. When the optimizer keeps a bf16 copy of the weight (`shadow`,
    vega_utils/shadow_weights.py), bf16 products use that copy; otherwise the weight is cast to bf16 for the
    product (once per evaluation forward pass).
    """
    shadow = None

    def forward(self, x):
        weight = product_weight(self, x)
        if not torch.is_grad_enabled():
            return linear(x, weight, self.bias)
        y = LinearFn.apply(x.reshape(-1, x.shape[-1]), weight, self.bias, False)
        return y.view(*x.shape[:-1], y.shape[-1])


def make_activation(name):
    return {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU(), "tanh": nn.Tanh(),
            "leaky_relu": nn.LeakyReLU(), "elu": nn.ELU(), "none": nn.Identity()}[name]


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def activation_then_dropout(x, activation, act_module, dropout):
    """dropout(act_module(x)): one fused bf16 CPU pass when the kernels know `activation`, else torch's ops."""
    y = cpu_kernels.activation_dropout(x, activation, dropout.p, dropout.training)
    return dropout(act_module(x)) if y is None else y


class MLP(nn.Sequential):
    """Linear layers with an activation (+ Dropout) between them; same modules and names as nn.Sequential.

    An activation the CPU kernels know (gelu, elu) followed by its Dropout runs as one fused pass in bf16.
    """

    def __init__(self, activation, *layers):
        super().__init__(*layers)
        self.activation = activation

    def forward(self, x):
        layers, i = list(self), 0
        while i < len(layers):
            if i + 1 < len(layers) and isinstance(layers[i + 1], Dropout) and not isinstance(layers[i], Linear):
                x, i = activation_then_dropout(x, self.activation, layers[i], layers[i + 1]), i + 2
            else:
                x, i = layers[i](x), i + 1
        return x


def make_mlp(n_layers, d_in, d_hidden, d_out, activation, drop):
    """Linear layers d_in -> d_hidden ... -> d_out with activation (+ dropout when drop > 0) between them.

    Dropout modules exist only when drop > 0: that decides the index numbers in parameter names.
    """
    layers, d = [], d_in
    for _ in range(n_layers - 1):
        layers += [Linear(d, d_hidden), make_activation(activation)]
        if drop > 0:
            layers.append(Dropout(drop))
        d = d_hidden
    layers.append(Linear(d, d_out))
    return MLP(activation, *layers)


def is_backbone_key(name):
    """What a best-epoch checkpoint holds: everything but the VEGA branch and the unused gate logit."""
    return not ("_clip_proj." in name or name.endswith("_clip_temp") or name == "prob_gate_logit")


class PositionalEncoding(nn.Module):
    def __init__(self, dim, max_len=MAX_LEN):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float).unsqueeze(1)           # (max_len, 1)
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * -(math.log(10000.0) / dim))
        pe = torch.zeros(max_len, dim)
        pe[:, 0::2] = torch.sin(position * freq)
        pe[:, 1::2] = torch.cos(position * freq)
        self.register_buffer("pe", pe.unsqueeze(0))                                 # (1, max_len, H)

    def forward(self, positions):
        return self.pe[0].index_select(0, positions)                               # (N, H)


class MultiHeadedAttention(nn.Module):
    def __init__(self, n_head, dim, dropout):
        super().__init__()
        self.n_head, self.d_head = n_head, dim // n_head
        self.linear_k = Linear(dim, dim)
        self.linear_v = Linear(dim, dim)
        self.linear_q = Linear(dim, dim)
        self.linear = Linear(dim, dim)
        self.dropout = Dropout(dropout)

    def forward(self, source, target, lay):
        h, dh = self.n_head, self.d_head
        q = self.linear_q(target) / math.sqrt(dh)                                  # (R, H)
        k, v = self.linear_k(source), self.linear_v(source)                        # (R, H)
        if not torch.is_grad_enabled() and compute_dtype(q) != torch.float32:
            # Evaluation in lower precision: the fused kernel, on transposed views. Every query has a valid key in
            # its own dialogue, so masking with -inf instead of -1e4 gives the same weights.
            per_grid = zip(*(lay.to_grids(x, h, contiguous=False, scratch=name) for name, x in zip("qkv", (q, k, v))))
            context = [F.scaled_dot_product_attention(*qkv, attn_mask=mask, scale=1.0)
                       for qkv, mask in zip(per_grid, lay.attend_masks())]
        else:
            per_grid = zip(*(lay.to_grids(x, h) for x in (q, k, v)))               # (q, k, v) per grid
            context = [self.attend(*qkv, grid.key_pad) for qkv, grid in zip(per_grid, lay.grids)]
        return self.linear(lay.from_grids(context))                                # (R, H)

    def attend(self, q, k, v, key_pad):
        """One grid: q, k, v (Bg, h, Lg, dh), key_pad (Bg, Lg) True = padding -> context (Bg, h, Lg, dh)."""
        scores = q @ k.transpose(-2, -1)                                           # (Bg, h, Lg, Lg)
        scores.masked_fill_(key_pad[:, None, None, :], NEG_FILL)                   # matmul's backward keeps q, k
        return self.dropout(torch.softmax(scores, dim=-1)) @ v


class PositionwiseFeedForward(nn.Module):
    """Pre-norm feed-forward with a residual: x + drop(W2(drop(gelu_tanh(W1(LN(x))))))."""

    def __init__(self, dim, d_ff, dropout):
        super().__init__()
        self.w_1 = Linear(dim, d_ff)
        self.w_2 = Linear(d_ff, dim)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout_1 = Dropout(dropout)
        self.dropout_2 = Dropout(dropout)

    def forward(self, x):
        pre = self.w_1(self.layer_norm(x))                                         # (N, d_ff)
        inter = activation_then_dropout(pre, "gelu_tanh", gelu_tanh, self.dropout_1)
        return self.dropout_2(self.w_2(inter)) + x


class TransformerEncoderLayer(nn.Module):
    def __init__(self, dim, n_head, d_ff, dropout):
        super().__init__()
        self.self_attn = MultiHeadedAttention(n_head, dim, dropout)
        self.feed_forward = PositionwiseFeedForward(dim, d_ff, dropout)
        # The reference normalises the target here only in layers after the first; with its single layer
        # this norm is never used, but its weights are part of every checkpoint.
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = Dropout(dropout)

    def forward(self, source, target, lay):
        x = self.dropout(self.self_attn(source, target, lay)) + target
        return self.feed_forward(x)


class TransformerEncoder(nn.Module):
    """One cross-modal encoder: target attends to source (both (N, H) rows).

    The reference adds positions and speakers inside every encoder. All nine hold the same sinusoid table, so
    the backbone makes each modality's (x + pos) + speaker sum once and passes it in; each encoder still
    applies its own dropout to it. Its pos_emb stays for the checkpoint's buffer names.
    """

    def __init__(self, dim, n_head, dropout):
        super().__init__()
        self.pos_emb = PositionalEncoding(dim)
        self.transformer_inter = nn.ModuleList([TransformerEncoderLayer(dim, n_head, dim, dropout)])
        self.dropout = Dropout(dropout)

    def forward(self, source, target, lay):
        if source is target:   # self-attention: dropout applied once
            target = source = self.dropout(target)
        else:                  # cross-attention: each side gets its own dropout
            source, target = self.dropout(source), self.dropout(target)
        return self.transformer_inter[0](source, target, lay)


class UnimodalGate(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = Linear(dim, dim, bias=False)

    def forward(self, x):
        return torch.sigmoid(self.fc(x)) * x


class MultimodalGate(nn.Module):
    """Per channel, softmax over the modalities of W h_m, then the weighted sum of the h_m."""

    def __init__(self, dim):
        super().__init__()
        self.fc = Linear(dim, dim, bias=False)

    def forward(self, *hs):
        stacked = torch.stack(hs, dim=-2)                                          # (N, 3, H)
        logits = self.fc(stacked)                                                  # (N, 3, H)
        y = cpu_kernels.softmax_mix3(logits, stacked)                              # bf16 CPU: one fused pass
        if y is None:
            y = (torch.softmax(logits, dim=-2) * stacked).sum(dim=-2)             # (N, H)
        return y


class VEGA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, C = cfg.hidden_dim, cfg.n_classes
        self.n_speakers, self.n_classes = cfg.n_speakers, C
        for m in ("a", "v", "t"):
            self.register_parameter(f"{m}_cls_temp", nn.Parameter(torch.tensor(math.log(2.0))))
        for m in ("a", "v", "t"):
            self.register_parameter(f"{m}_clip_temp", nn.Parameter(torch.tensor(math.log(2.0))))
        self.prob_gate_logit = nn.Parameter(torch.tensor(0.0))  # kept for checkpoint compatibility
        self.speaker_embeddings = nn.Embedding(cfg.n_speakers + 1, H, padding_idx=cfg.n_speakers)
        for name in ENCODER_NAMES:
            self.add_module(name, TransformerEncoder(H, cfg.n_head, cfg.dropout))
        for name in ENCODER_NAMES:
            self.add_module(f"{name}_gate", UnimodalGate(H))
        for m in MODALITIES:
            self.add_module(f"features_reduce_{m}", Linear(3 * H, H))
        self.last_gate = MultimodalGate(H)
        dims = {"t": cfg.text_dim, "a": cfg.audio_dim, "v": cfg.visual_dim}
        for m in MODALITIES:
            self.add_module(INPUT_LAYERS[m], nn.Conv1d(dims[m], H, kernel_size=1, bias=False))
        self.clip_dim = cfg.clip_dim
        for m in ("all",) + MODALITIES:
            self.add_module(f"{m}_clip_proj", make_mlp(cfg.clip_proj_layer_num, H, H, cfg.clip_dim,
                                                       cfg.clip_proj_activation_fn, cfg.clip_proj_drop))
        for m in MODALITIES + ("all",):
            self.add_module(f"{m}_output_layer", make_mlp(cfg.outlayer_num, H, H, C,
                                                          cfg.outlayer_activation_fn, cfg.outlayer_drop))

    def layout(self, pad_mask, compute_padding):
        if pad_mask.shape[1] > MAX_LEN:
            raise ValueError(f"a dialogue of {pad_mask.shape[1]} utterances exceeds the positional table ({MAX_LEN})")
        return make_layout(pad_mask, compute_padding, grouped=torch.is_autocast_enabled(pad_mask.device.type))

    def backbone(self, batch, lay):
        """Fused features per modality and overall, as rows: {'t','a','v','all'} -> (N, H)."""
        feats = {"t": batch.text, "a": batch.audio, "v": batch.visual}
        x = {}
        for m in MODALITIES:
            rows = lay.to_rows(feats[m])                                           # (R, D)
            x[m] = LinearFn.apply(rows, product_weight(getattr(self, INPUT_LAYERS[m]), rows), None, True)  # (R, H)
        # Under autocast the residual stream stays in the compute dtype; in float32 these casts do nothing.
        speakers = lay.to_rows(batch.speakers, fill=self.n_speakers)              # spare rows: padding id
        speaker_emb = self.speaker_embeddings(speakers).to(x["t"].dtype)           # (R, H)
        # every encoder holds the same table; spare rows past it (batches near MAX_LEN) reuse its last row
        pos = self.t_t.pos_emb(lay.positions.clamp(max=MAX_LEN - 1)).to(x["t"].dtype)  # (R, H)
        # (x + pos) + speaker, in this order: float addition is not associative and parity is checked to 1e-6.
        x = {m: x[m] + pos + speaker_emb for m in MODALITIES}
        h = {}
        for target, names in ENCODERS_BY_TARGET.items():
            gated = []
            for name in names:
                y = getattr(self, name)(x[name.split("_")[0]], x[target], lay)     # (N, H)
                gated.append(getattr(self, f"{name}_gate")(y))
            h[target] = getattr(self, f"features_reduce_{target}")(torch.cat(gated, dim=-1))  # (N, 3H) -> (N, H)
        h["all"] = self.last_gate(h["t"], h["a"], h["v"])
        return h

    def forward(self, batch, anchors=None, compute_padding=False, features=True):
        """batch: dataloader.Batch. anchors: (C, K) L2-normalised, or None to skip the VEGA branch
        (it never changes predictions). features=False leaves out `all_transformer_out` (the fused features,
        which evaluation does not use). Returns a dict of (B, L, ...) tensors, zero where not computed."""
        lay = self.layout(batch.pad_mask, compute_padding)
        h = self.backbone(batch, lay)
        rows = {f"{m}_logit": getattr(self, f"{m}_output_layer")(h[m]) for m in MODALITIES + ("all",)}  # (N, C)
        if features:
            rows["all_transformer_out"] = h["all"]                                  # (N, H)
        if anchors is not None:
            anchors = anchors.float()
            for m in MODALITIES + ("all",):
                proj = getattr(self, f"{m}_clip_proj")(h[m])                       # (N, K)
                # In float32 even under autocast: logits near +-100 in fp16 would be rounded to steps of
                # 1/32-1/16 before the CE and KL terms (the reference's autocast does; this small product is cheap).
                with torch.autocast(proj.device.type, enabled=False):
                    proj = F.normalize(proj.float(), dim=-1)
                    rows[f"{m}_clip_logit"] = 100.0 * proj @ anchors.t()            # (N, C)
            rows.update(self.probability_mixes(rows["all_logit"], rows["all_clip_logit"]))
        out = {k: lay.to_padded(v) for k, v in rows.items()}                        # (B, L, ...)
        temps = ("cls", "clip") if anchors is not None else ("cls",)
        for kind in temps:
            for m in ("a", "v", "t"):
                out[f"{m}_{kind}_temp"] = getattr(self, f"{m}_{kind}_temp").exp()
        return out

    def probability_mixes(self, cls_logit, clip_logit):
        """The reference's two unused outputs (spec 2.2), kept so its outputs can be compared."""
        p, q = torch.softmax(cls_logit.float(), -1), torch.softmax(clip_logit.float(), -1)  # (N, C)
        g = torch.sigmoid(self.prob_gate_logit)
        average = g * p + (1 - g) * q
        p_wins = p.max(-1, keepdim=True).values > q.max(-1, keepdim=True).values   # Q on a tie
        return {"average_prob": average, "max_prob": torch.where(p_wins, p, q)}

    def backbone_state_dict(self):
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if is_backbone_key(k)}
