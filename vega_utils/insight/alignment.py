"""Anchor alignment: how close each head's projected utterance features sit to the class-centre anchors.

For a head m, cos(i, c) is the cosine similarity of utterance i's projected feature (`{m}_clip_proj`) to the
L2-normalised centre anchor of class c. Per head, overall and per class:
- `own`: mean over utterances of cos(i, y_i), the utterance's own class anchor;
- `other`: mean over utterances of the mean of cos(i, c) over the C-1 other classes;
- `nearest`: share of utterances whose nearest anchor (largest cosine) is their own class's.

During evaluation these come free from the VEGA logits: the model computes `{m}_clip_logit = 100 * cos` against
the normalised centres (model.py), so cos = logit / 100, with no second pass. `python -m vega_utils.insight.analyze`
recomputes them from the saved weights and the anchors.
"""
import numpy as np

HEADS = ("all", "t", "a", "v")
STATS = ("own", "other", "nearest")
STAT_TITLES = {"own": "cos to own anchor", "other": "mean cos to other anchors", "nearest": "nearest own (%)"}


def alignment(cos, labels, class_names):
    """cos (N, C) cosines to the class anchors, labels (N,) class ids -> {"overall": {stat: value, "n": N},
    "per_class": {name: {...}}} (a class without utterances is left out)."""
    cos = np.asarray(cos, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, c = cos.shape
    own = cos[np.arange(n), labels]                                             # (N,)
    other = (cos.sum(1) - own) / max(c - 1, 1)                                  # (N,)
    nearest = (cos.argmax(1) == labels).astype(np.float64)                      # (N,)

    def summary(mask):
        return {"own": float(own[mask].mean()), "other": float(other[mask].mean()),
                "nearest": float(nearest[mask].mean()), "n": int(mask.sum())}
    per_class = {name: summary(labels == k) for k, name in enumerate(class_names) if (labels == k).any()}
    return {"overall": summary(np.ones(n, dtype=bool)), "per_class": per_class}


def unit_rows(x):
    """Rows scaled to unit length, float64 (F.normalize's eps)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosines(features, centres):
    """features (N, K) projected utterances, centres (C, K) anchors (any norm) -> (N, C) cosines, float64."""
    return unit_rows(features) @ unit_rows(centres).T


def flat_row(split, by_head):
    """{head: alignment()} -> metrics.jsonl keys: `{split}_align_{head}_{stat}` and `..._{stat}_{class}`."""
    row = {}
    for head, result in by_head.items():
        for stat in STATS:
            row[f"{split}_align_{head}_{stat}"] = result["overall"][stat]
        for name, values in result["per_class"].items():
            for stat in STATS:
                row[f"{split}_align_{head}_{stat}_{name}"] = values[stat]
    return row


def epoch_row(split, ev, class_names):
    """The alignment keys of one evaluation (train.eval_epoch's result); empty without the VEGA branch."""
    logits = ev.get("clip_logits") or {}
    return flat_row(split, {m: alignment(logits[m] / 100.0, ev["labels"], class_names)
                            for m in HEADS if m in logits})


def from_row(row, split, class_names):
    """The inverse of flat_row for one metrics.jsonl row: {head: {"overall": ..., "per_class": ...}}."""
    out = {}
    for head in HEADS:
        if f"{split}_align_{head}_own" not in row:
            continue
        overall = {s: row[f"{split}_align_{head}_{s}"] for s in STATS}
        per_class = {c: {s: row[f"{split}_align_{head}_{s}_{c}"] for s in STATS}
                     for c in class_names if f"{split}_align_{head}_own_{c}" in row}
        out[head] = {"overall": overall, "per_class": per_class}
    return out


def markdown(by_head, class_names, title):
    """One table: a row per head and class (overall first), own / other cosine and nearest-own share."""
    lines = [f"## {title}", "", "| head | class | n | cos to own anchor | mean cos to other anchors | "
             "own - other | nearest anchor is own (%) |", "|---|---|---|---|---|---|---|"]
    for head, result in by_head.items():
        for name, v in [("overall", result["overall"])] + [(c, result["per_class"][c]) for c in class_names
                                                            if c in result["per_class"]]:
            lines.append(f"| {head} | {name} | {v.get('n', '')} | {v['own']:.4f} | {v['other']:.4f} | "
                         f"{v['own'] - v['other']:+.4f} | {100 * v['nearest']:.1f} |")
    return "\n".join(lines) + "\n"
