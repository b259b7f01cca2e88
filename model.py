"""VEGA (docs/method.md, section 2) in plain PyTorch: an SDT-style multimodal fusion transformer, the VEGA visual-anchor
branch and the losses.

This file computes what the reference computes, the straightforward way: every (dialogue, position) of the
padded (B, L) batch is a row, and attention sees the whole batch as one grid (`PaddedLayout`). The fast
package (`fast/`) swaps in faster modules with the same parameter names and a packed layout of the valid
utterances; this file never imports it.

Parameter names follow the reference exactly (tests/fixtures/state_dict_manifest.json): published checkpoints
load strictly. Mask convention everywhere: pad_mask (B, L) bool, True = padding.
"""
import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

MODALITIES = ("t", "a", "v")
HEADS = MODALITIES + ("all",)   # the four classifier heads (and the four VEGA projections)
# Encoder `s_x` builds a representation of target x attending to source s. Per target, the order
# (self, other, other) is the concatenation order of the reduce layer.
ENCODERS_BY_TARGET = {"t": ("t_t", "a_t", "v_t"), "a": ("a_a", "t_a", "v_a"), "v": ("v_v", "t_v", "a_v")}
ENCODER_NAMES = tuple(n for names in ENCODERS_BY_TARGET.values() for n in names)
INPUT_LAYERS = {"t": "textf_input", "a": "acouf_input", "v": "visuf_input"}
MAX_LEN = 512               # positional table length
NEG_FILL = -1e4             # score at padded keys (the reference's; small enough in magnitude for fp16)
ANCHOR_LOGIT_SCALE = 100.0  # anchor logits are 100 x cosine(projection, anchor), as CLIP scales its logits
ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
               "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "none": nn.Identity}


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def make_mlp(n_layers, d_in, d_hidden, d_out, activation, drop):
    """Linear layers d_in -> d_hidden ... -> d_out with activation (+ dropout when drop > 0) between them.
    Dropout modules exist only when drop > 0: that decides the index numbers in parameter names
    (docs/method.md, section 2.1, item 7)."""
    layers, d = [], d_in
    for _ in range(n_layers - 1):
        layers += [nn.Linear(d, d_hidden), ACTIVATION_MODULES[activation]()]
        if drop > 0:
            layers.append(nn.Dropout(drop))
        d = d_hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class PaddedLayout:
    """Where each utterance of a batch is computed. Here, the reference's way: all B*L positions are rows (R, H),
    padding included, and attention takes the batch as one grid (B, h, L, dh). The fast package's packed
    layout has the same methods and computes the valid utterances only."""

    def __init__(self, pad_mask):
        self.B, self.L = pad_mask.shape
        self.key_pads = [pad_mask]                                                  # one grid: (B, L)
        self.positions = torch.arange(self.L, device=pad_mask.device).repeat(self.B)  # (B*L,)

    def to(self, device, extra=()):
        """(this layout on `device`, the `extra` tensors there too)."""
        moved = self.key_pads[0].to(device, non_blocking=True), *(t.to(device, non_blocking=True) for t in extra)
        return PaddedLayout(moved[0]), list(moved[1:])

    def to_rows(self, x, fill=0):
        return x.flatten(0, 1)                                                      # (B, L, ...) -> (B*L, ...)

    def to_padded(self, x):
        return x.view(self.B, self.L, *x.shape[1:])                                 # (B*L, ...) -> (B, L, ...)

    def to_grids(self, x, n_head):
        return [x.view(self.B, self.L, n_head, -1).transpose(1, 2).contiguous()]    # (B, h, L, dh)

    def from_grids(self, grids):
        B, h, L, dh = grids[0].shape
        return grids[0].transpose(1, 2).reshape(B * L, h * dh)                      # (B*L, H)


# ---------------------------------------------------------------- 2.1 backbone
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
        return self.pe[0].index_select(0, positions)                               # (R, H)


class MultiHeadedAttention(nn.Module):
    def __init__(self, n_head, dim, dropout):
        super().__init__()
        self.n_head, self.d_head = n_head, dim // n_head
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_q = nn.Linear(dim, dim)
        self.linear = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, source, target, lay):
        q = self.linear_q(target) / math.sqrt(self.d_head)                         # (R, H)
        k, v = self.linear_k(source), self.linear_v(source)                        # (R, H)
        return self.linear(self.attend_grids(q, k, v, lay))                        # (R, H)

    def attend_grids(self, q, k, v, lay):
        per_grid = zip(*(lay.to_grids(x, self.n_head) for x in (q, k, v)))         # (q, k, v) per grid
        return lay.from_grids([self.attend(*qkv, key_pad) for qkv, key_pad in zip(per_grid, lay.key_pads)])

    def attend(self, q, k, v, key_pad):
        """One grid: q, k, v (Bg, h, Lg, dh), key_pad (Bg, Lg) -> context (Bg, h, Lg, dh)."""
        scores = q @ k.transpose(-2, -1)                                           # (Bg, h, Lg, Lg)
        scores.masked_fill_(key_pad[:, None, None, :], NEG_FILL)                   # matmul's backward keeps q, k
        return self.dropout(torch.softmax(scores, dim=-1)) @ v


class PositionwiseFeedForward(nn.Module):
    """Pre-norm feed-forward with a residual: x + drop(W2(drop(gelu_tanh(W1(LN(x))))))."""

    def __init__(self, dim, d_ff, dropout):
        super().__init__()
        self.w_1 = nn.Linear(dim, d_ff)
        self.w_2 = nn.Linear(d_ff, dim)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout_1 = nn.Dropout(dropout)
        self.dropout_2 = nn.Dropout(dropout)

    def forward(self, x):
        inter = self.dropout_1(gelu_tanh(self.w_1(self.layer_norm(x))))           # (R, d_ff)
        return self.dropout_2(self.w_2(inter)) + x


class TransformerEncoderLayer(nn.Module):
    def __init__(self, dim, n_head, d_ff, dropout):
        super().__init__()
        self.self_attn = MultiHeadedAttention(n_head, dim, dropout)
        self.feed_forward = PositionwiseFeedForward(dim, d_ff, dropout)
        # The reference normalises the target here only in layers after the first; with its single layer
        # this norm is never used, but its weights are part of every checkpoint.
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, source, target, lay):
        x = self.dropout(self.self_attn(source, target, lay)) + target
        return self.feed_forward(x)


class TransformerEncoder(nn.Module):
    """One cross-modal encoder: target attends to source (both rows (R, H)).

    The reference adds positions and speakers inside every encoder. All nine hold the same sinusoid table, so
    the backbone makes each modality's (x + pos) + speaker sum once and passes it in; each encoder still
    applies its own dropout to it. Its pos_emb stays for the checkpoint's buffer names.
    """

    def __init__(self, dim, n_head, dropout):
        super().__init__()
        self.pos_emb = PositionalEncoding(dim)
        self.transformer_inter = nn.ModuleList([TransformerEncoderLayer(dim, n_head, dim, dropout)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, source, target, lay):
        if source is target:   # self-attention: dropout applied once
            target = source = self.dropout(target)
        else:                  # cross-attention: each side gets its own dropout
            source, target = self.dropout(source), self.dropout(target)
        return self.transformer_inter[0](source, target, lay)


class UnimodalGate(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return torch.sigmoid(self.fc(x)) * x


class MultimodalGate(nn.Module):
    """Per channel, softmax over the modalities of W h_m, then the weighted sum of the h_m."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)

    def forward(self, *hs):
        stacked = torch.stack(hs, dim=-2)                                          # (R, 3, H)
        return self.mix(self.fc(stacked), stacked)                                 # (R, H)

    def mix(self, logits, stacked):
        return (torch.softmax(logits, dim=-2) * stacked).sum(dim=-2)


# ---------------------------------------------------------------- the model
class VEGA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, C = cfg.hidden_dim, cfg.n_classes
        self.n_speakers, self.n_classes, self.n_head = cfg.n_speakers, C, cfg.n_head
        for m in ("a", "v", "t"):
            self.register_parameter(f"{m}_cls_temp", nn.Parameter(torch.tensor(math.log(2.0))))
        for m in ("a", "v", "t"):
            self.register_parameter(f"{m}_clip_temp", nn.Parameter(torch.tensor(math.log(2.0))))
        self.prob_gate_logit = nn.Parameter(torch.tensor(0.0))  # unused by predictions, kept for checkpoints
        self.speaker_embeddings = nn.Embedding(cfg.n_speakers + 1, H, padding_idx=cfg.n_speakers)
        for name in ENCODER_NAMES:
            self.add_module(name, TransformerEncoder(H, cfg.n_head, cfg.dropout))
        for name in ENCODER_NAMES:
            self.add_module(f"{name}_gate", UnimodalGate(H))
        for m in MODALITIES:
            self.add_module(f"features_reduce_{m}", nn.Linear(3 * H, H))
        self.last_gate = MultimodalGate(H)
        dims = {"t": cfg.text_dim, "a": cfg.audio_dim, "v": cfg.visual_dim}
        for m in MODALITIES:
            self.add_module(INPUT_LAYERS[m], nn.Conv1d(dims[m], H, kernel_size=1, bias=False))
        self.clip_dim = cfg.clip_dim
        for m in ("all",) + MODALITIES:
            self.add_module(f"{m}_clip_proj", make_mlp(cfg.clip_proj_layer_num, H, H, cfg.clip_dim,
                                                       cfg.clip_proj_activation_fn, cfg.clip_proj_drop))
        for m in HEADS:
            self.add_module(f"{m}_output_layer", make_mlp(cfg.outlayer_num, H, H, C,
                                                          cfg.outlayer_activation_fn, cfg.outlayer_drop))

    def layout(self, pad_mask, device=None):
        """Where each utterance is computed (device: where the layout will be used; the fast model tunes for it)."""
        return PaddedLayout(pad_mask)

    def backbone(self, batch, lay):
        """Fused features per modality and overall, as rows: {'t','a','v','all'} -> (R, H). Spec 2.1.1-6."""
        feats = {"t": batch.text, "a": batch.audio, "v": batch.visual}
        speaker = self.speaker_embeddings(lay.to_rows(batch.speakers, fill=self.n_speakers))    # (R, H)
        pos = self.t_t.pos_emb(lay.positions)                                       # (R, H)
        x = {}
        for m in MODALITIES:
            rows = lay.to_rows(feats[m]).unsqueeze(-1)                              # (R, D_m, 1)
            # the 1x1 Conv1d maps each utterance alone; (x + pos) + speaker in this order: float addition
            # is not associative and parity is checked to 1e-6
            x[m] = getattr(self, INPUT_LAYERS[m])(rows).squeeze(-1) + pos + speaker  # (R, H)
        h = {}
        for target, names in ENCODERS_BY_TARGET.items():
            gated = [getattr(self, f"{name}_gate")(getattr(self, name)(x[name.split("_")[0]], x[target], lay))
                     for name in names]                                             # 3 x (R, H)
            h[target] = getattr(self, f"features_reduce_{target}")(torch.cat(gated, dim=-1))  # (R, 3H) -> (R, H)
        h["all"] = self.last_gate(h["t"], h["a"], h["v"])
        return h

    def forward(self, batch, anchors=None, features=True, layout=None):
        """batch: dataloader.Batch. anchors: (C, K) from pick_anchors, or None to skip the VEGA branch (it never
        changes predictions). features=False leaves out `all_transformer_out` (the fused features) and
        the two probability mixes: what the reference returns beyond the logits, which training and evaluation
        do not use. layout: self.layout(pad_mask) made beforehand (train.py makes it from the
        host-side mask), else made here. Returns a dict of (B, L, ...) tensors, zero where not computed."""
        if batch.pad_mask.shape[1] > MAX_LEN:
            raise ValueError(f"a dialogue of {batch.pad_mask.shape[1]} utterances exceeds the positional table "
                             f"({MAX_LEN})")
        lay = self.layout(batch.pad_mask) if layout is None else layout
        h = self.backbone(batch, lay)
        rows = {f"{m}_logit": getattr(self, f"{m}_output_layer")(h[m]) for m in HEADS}  # (R, C)
        if features:
            rows["all_transformer_out"] = h["all"]                                  # (R, H)
        if anchors is not None:
            rows.update(self.anchor_logits(h, anchors))
            if features:
                rows.update(self.probability_mixes(rows["all_logit"], rows["all_clip_logit"]))
        out = {k: lay.to_padded(v) for k, v in rows.items()}                        # (B, L, ...)
        temps = ("cls", "clip") if anchors is not None else ("cls",)
        for kind in temps:
            for m in ("a", "v", "t"):
                out[f"{m}_{kind}_temp"] = getattr(self, f"{m}_{kind}_temp").exp()
        return out

    # ------------------------------------------------------------ 2.2 VEGA branch
    def anchor_logits(self, h, anchors):
        """Per head, 100 x cosine(projection of its features, each class anchor): {'<m>_clip_logit': (R, C)}.

        In float32 even under autocast: logits near +-100 in fp16 would be rounded to steps of 1/32-1/16 before
        the CE and KL terms (the reference's autocast does; README lists it among the deliberate differences)."""
        logits = {}
        for m in HEADS:
            proj = getattr(self, f"{m}_clip_proj")(h[m])                           # (R, K)
            with torch.autocast(proj.device.type, enabled=False):
                proj = F.normalize(proj.float(), dim=-1)
                logits[f"{m}_clip_logit"] = ANCHOR_LOGIT_SCALE * proj @ anchors.float().t()  # (R, C)
        return logits

    def probability_mixes(self, cls_logit, clip_logit):
        """The reference's two unused outputs (docs/method.md, section 2.2), kept so its outputs can be compared."""
        p, q = torch.softmax(cls_logit.float(), -1), torch.softmax(clip_logit.float(), -1)  # (R, C)
        g = torch.sigmoid(self.prob_gate_logit)
        average = g * p + (1 - g) * q
        p_wins = p.max(-1, keepdim=True).values > q.max(-1, keepdim=True).values   # Q on a tie
        return {"average_prob": average, "max_prob": torch.where(p_wins, p, q)}


def pick_anchors(bank, training, rand, rng=random):
    """The (C, K) anchors of one forward pass, L2-normalised (docs/method.md, section 2.2).
    bank: vega_utils.anchors.bank.AnchorBank.

    Training: with probability `rand` one uniformly drawn image per class, otherwise the class centres.
    Evaluation always uses the centres (the reference also draws there; see README).
    """
    if training and rng.random() < rand:
        chosen = torch.stack([b[rng.randrange(b.shape[0])] for b in bank.banks])   # (C, K)
    else:
        chosen = bank.centers
    return F.normalize(chosen.float(), dim=-1)


# ---------------------------------------------------------------- 2.3 losses
# (config lambda key, head, loss term name), per loss group
LOSS_GROUPS = {
    "cls": [("cls_all_lambda", "all", "cls_all"), ("cls_t_lambda", "t", "cls_t"),
            ("cls_a_lambda", "a", "cls_a"), ("cls_v_lambda", "v", "cls_v")],
    "cls_kl": [("t_cls_all_cls_kl_lambda", "t", "kl_t"), ("a_cls_all_cls_kl_lambda", "a", "kl_a"),
               ("v_cls_all_cls_kl_lambda", "v", "kl_v")],
    "clip": [("t_clip_lambda", "t", "clip_t"), ("a_clip_lambda", "a", "clip_a"),
             ("v_clip_lambda", "v", "clip_v"), ("all_clip_lambda", "all", "clip_all")],
    "clip_kl": [("t_clip_all_clip_kl_lambda", "t", "clip_kl_t"), ("a_clip_all_clip_kl_lambda", "a", "clip_kl_a"),
                ("v_clip_all_clip_kl_lambda", "v", "clip_kl_v")],
}
GROUP_LAMBDAS = {"cls": "cls_lambda", "cls_kl": "cls_all_cls_kl_lambda", "clip": "clip_lambda",
                 "clip_kl": "clip_all_clip_kl_lambda"}


def valid_indices(pad_mask):
    """(N,) row-major flat indices into (B, L) of the valid utterances (pad_mask True = padding)."""
    return (~pad_mask).flatten().nonzero().squeeze(1)


def weighted_ce(logits, labels, class_weights):
    """Cross-entropy with fixed class weights: sum_i w_yi * nll_i / sum_i w_yi. logits (N, C), labels (N,)."""
    return F.cross_entropy(logits.float(), labels, weight=class_weights)


def distill_kl(student, teacher, temperature):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over (utterance, class) elements.

    The teacher is not detached: as in the reference, gradients reach the fused head through this term.
    Computed as F.kl_div(log q, p) does, p log p - p log q with p log p = xlogy(p, p), except that the log's
    argument has 1 where p is 0. Same values (xlogy(0, y) = 0), but kl_div's gradient of xlogy(p, p) in its
    second p is p / p: NaN where p underflows to 0, as it does once a teacher logit gap exceeds ~104 T
    (confident late training: a MELD-like run died of it at epoch 60). With 1 there, those entries pass
    gradient 0, the true limit.
    """
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    p = F.softmax(teacher.float() / temperature, dim=-1)
    kl = torch.xlogy(p, torch.where(p > 0, p, 1.0)) - p * log_q
    return kl.mean() * temperature * temperature


def compute_losses(out, batch, cfg, class_weights, valid_index=None):
    """Every loss term by name (unweighted), the four weighted group sums and 'total'. Valid utterances only:
    valid_index (N,), their row-major flat indices into (B, L) (train.py makes it on the host), else from the mask.

        cls     = sum_m l_m CE(m)                     cls_kl  = sum_m l'_m KL(m, all, T_m^cls)
        clip    = sum_m l''_m CE(m_clip)              clip_kl = sum_m l'''_m KL(m_clip, all_clip, T_m^clip)
        total   = cls_lambda cls + cls_all_cls_kl_lambda cls_kl + clip_lambda clip + clip_all_clip_kl_lambda clip_kl
    """
    if valid_index is None:
        valid_index = valid_indices(batch.pad_mask)
    labels = batch.labels.flatten().index_select(0, valid_index)                # (N,)
    rows = {k: v.flatten(0, 1).index_select(0, valid_index) for k, v in out.items() if k.endswith("_logit")}  # (N, C)
    term_fns = {
        "cls": lambda m: weighted_ce(rows[f"{m}_logit"], labels, class_weights),
        "cls_kl": lambda m: distill_kl(rows[f"{m}_logit"], rows["all_logit"], out[f"{m}_cls_temp"]),
        "clip": lambda m: weighted_ce(rows[f"{m}_clip_logit"], labels, class_weights),
        "clip_kl": lambda m: distill_kl(rows[f"{m}_clip_logit"], rows["all_clip_logit"], out[f"{m}_clip_temp"]),
    }
    vega = "all_clip_logit" in out
    switched_on = {"cls": cfg.cls_loss, "cls_kl": cfg.cls_all_cls_kl_loss, "clip": cfg.clip_loss and vega,
                   "clip_kl": cfg.clip_loss and vega and cfg.clip_all_clip_kl_loss}
    terms, groups = {}, {}
    for group, spec in LOSS_GROUPS.items():
        if not switched_on[group]:
            continue
        groups[group] = 0.0
        for lambda_key, m, term in spec:
            terms[term] = term_fns[group](m)
            groups[group] = groups[group] + getattr(cfg, lambda_key) * terms[term]
    if not groups:
        raise ValueError("every loss group is switched off: nothing to train")
    total = sum(getattr(cfg, GROUP_LAMBDAS[g]) * v for g, v in groups.items())
    return {**terms, **groups, "total": total}
