"""Paired significance of two runs scored on the same test utterances.

- Paired bootstrap of the weighted-F1 difference (B - A): the same resampled utterances (or, with
  `unit="dialogue"`, whole dialogues, which keeps the correlation within a dialogue) score both runs; the
  percentile interval at level 1 - alpha. Significant when it excludes 0.
- McNemar's test on correctness: b = A right and B wrong, c = A wrong and B right. The p-value used is the
  exact binomial one, two-sided: min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2), computed with exact
  integers (valid for any b + c). The chi-square version with continuity correction, (|b - c| - 1)^2 / (b + c)
  on 1 degree of freedom, is reported beside it for reference.
"""
import math
from fractions import Fraction

import numpy as np

CHUNK = 1000   # resamples drawn per batch: rng.integers(0, G, (CHUNK, G)) at a time, the last batch smaller


def weighted_f1_from_confusion(conf):
    """conf (..., C, C) counts, rows true, columns predicted -> (...) weighted F1 (sklearn's: per-class F1 = 0
    where it is undefined, weights the true counts)."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)                                  # (..., C)
    support, predicted = conf.sum(-1), conf.sum(-2)                             # (..., C) each
    denominator = support + predicted
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    total = support.sum(-1)
    return np.divide((support * f1).sum(-1), total, out=np.zeros_like(total), where=total > 0)


def _group_confusions(labels, preds, groups, n_classes):
    """(G, C*C) confusion counts of each resampling unit (an utterance, or a dialogue)."""
    codes = np.asarray(labels) * n_classes + np.asarray(preds)                  # (N,) cell of each utterance
    out = np.zeros((groups.max() + 1, n_classes * n_classes))
    np.add.at(out, (groups, codes), 1.0)
    return out


def paired_bootstrap(labels, pred_a, pred_b, n_classes, n_boot=10000, seed=0, alpha=0.05, groups=None):
    """Weighted-F1 difference B - A with its paired percentile bootstrap interval.

    groups: (N,) resampling unit of each utterance (dialogue index); None resamples utterances. Returns
    {"difference", "low", "high", "alpha", "n_boot", "unit_count", "differences" (the n_boot resampled values)}."""
    labels = np.asarray(labels)
    n = labels.shape[0]
    groups = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    conf_a = _group_confusions(labels, pred_a, groups, n_classes)               # (G, C*C)
    conf_b = _group_confusions(labels, pred_b, groups, n_classes)
    g = conf_a.shape[0]
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, n_boot, CHUNK):
        idx = rng.integers(0, g, size=(min(CHUNK, n_boot - start), g))         # (chunk, G) units drawn
        weights = np.zeros((idx.shape[0], g))
        np.add.at(weights, (np.arange(idx.shape[0])[:, None], idx), 1.0)        # (chunk, G) times drawn
        f1_a = weighted_f1_from_confusion((weights @ conf_a).reshape(-1, n_classes, n_classes))
        f1_b = weighted_f1_from_confusion((weights @ conf_b).reshape(-1, n_classes, n_classes))
        diffs.append(f1_b - f1_a)
    diffs = np.concatenate(diffs)
    whole = weighted_f1_from_confusion(conf_b.sum(0).reshape(n_classes, n_classes)) - \
        weighted_f1_from_confusion(conf_a.sum(0).reshape(n_classes, n_classes))
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return {"difference": float(whole), "low": float(low), "high": float(high), "alpha": alpha,
            "n_boot": int(n_boot), "unit_count": int(g), "differences": diffs}


def mcnemar(correct_a, correct_b):
    """McNemar's test of two classifiers' correctness on the same items (module docstring)."""
    a, b_ok = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    b = int((a & ~b_ok).sum())     # A right, B wrong
    c = int((~a & b_ok).sum())     # A wrong, B right
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "p_exact": 1.0, "chi2": 0.0, "p_chi2": 1.0}
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    p_exact = float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))
    chi2 = (abs(b - c) - 1) ** 2 / n if abs(b - c) >= 1 else 0.0
    p_chi2 = math.erfc(math.sqrt(chi2 / 2))     # survival function of chi-square with 1 degree of freedom
    return {"b": b, "c": c, "p_exact": p_exact, "chi2": chi2, "p_chi2": p_chi2}
