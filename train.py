"""Losses, one training epoch, one evaluation epoch (spec 2.3 and 3)."""
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

# (config lambda key, output key of the student, loss term name)
CLS_TERMS = [("cls_all_lambda", "all", "cls_all"), ("cls_t_lambda", "t", "cls_t"),
             ("cls_a_lambda", "a", "cls_a"), ("cls_v_lambda", "v", "cls_v")]
CLS_KL_TERMS = [("t_cls_all_cls_kl_lambda", "t", "kl_t"), ("a_cls_all_cls_kl_lambda", "a", "kl_a"),
                ("v_cls_all_cls_kl_lambda", "v", "kl_v")]
CLIP_TERMS = [("t_clip_lambda", "t", "clip_t"), ("a_clip_lambda", "a", "clip_a"),
              ("v_clip_lambda", "v", "clip_v"), ("all_clip_lambda", "all", "clip_all")]
CLIP_KL_TERMS = [("t_clip_all_clip_kl_lambda", "t", "clip_kl_t"), ("a_clip_all_clip_kl_lambda", "a", "clip_kl_a"),
                 ("v_clip_all_clip_kl_lambda", "v", "clip_kl_v")]


def weighted_ce(logits, labels, class_weights):
    """Cross-entropy with fixed class weights: sum_i w_yi * nll_i / sum_i w_yi. logits (N, C), labels (N,)."""
    return F.cross_entropy(logits.float(), labels, weight=class_weights)


def distill_kl(student, teacher, temperature):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over (utterance, class) elements.

    The teacher is not detached: as in the reference, gradients reach the fused head through this term.
    """
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    p = F.softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="none").mean() * temperature * temperature


def vega_branch_on(cfg):
    return cfg.clip_loss


def compute_losses(out, batch, cfg, class_weights):
    """Every loss term by name (unweighted), the four weighted group sums and 'total'. Valid utterances only."""
    valid = ~batch.pad_mask                                                     # (B, L)
    labels = batch.labels[valid]                                                # (N,)
    rows = {k: v[valid] for k, v in out.items() if k.endswith("_logit")}       # (N, C) each
    terms, groups = {}, {}

    def group(name, spec, fn):
        total = 0.0
        for lam_key, m, term in spec:
            terms[term] = fn(m)
            total = total + getattr(cfg, lam_key) * terms[term]
        groups[name] = total

    if cfg.cls_loss:
        group("cls", CLS_TERMS, lambda m: weighted_ce(rows[f"{m}_logit"], labels, class_weights))
    if cfg.cls_all_cls_kl_loss:
        group("cls_kl", CLS_KL_TERMS,
              lambda m: distill_kl(rows[f"{m}_logit"], rows["all_logit"], out[f"{m}_cls_temp"]))
    if cfg.clip_loss and "all_clip_logit" in out:
        group("clip", CLIP_TERMS, lambda m: weighted_ce(rows[f"{m}_clip_logit"], labels, class_weights))
        if cfg.clip_all_clip_kl_loss:
            group("clip_kl", CLIP_KL_TERMS,
                  lambda m: distill_kl(rows[f"{m}_clip_logit"], rows["all_clip_logit"], out[f"{m}_clip_temp"]))
    weights = {"cls": cfg.cls_lambda, "cls_kl": cfg.cls_all_cls_kl_lambda,
               "clip": cfg.clip_lambda, "clip_kl": cfg.clip_all_clip_kl_lambda}
    if not groups:
        raise ValueError("every loss group is switched off: nothing to train")
    total = sum(weights[g] * v for g, v in groups.items())
    return {**terms, **groups, "total": total}
