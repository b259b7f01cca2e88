"""Metrics, prediction files, plots and multi-seed summaries.

Everything here takes plain numpy arrays / python lists, so training, inference and the multi-seed
aggregation share one definition of every number. Metrics are fractions in [0, 1]; only the display
helpers (console line, markdown, plot axes) turn them into percent.
"""
import os

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")  # before pyplot: the runs are headless and must never try to open a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, precision_score  # noqa: E402

from vega_utils.common import VegaError, _atomic_write, atomic_write_text  # noqa: E402

HEADLINE_METRICS = ("weighted_f1", "accuracy", "weighted_precision", "macro_f1")
METRIC_TITLES = {
    "weighted_f1": "Weighted F1",
    "accuracy": "Accuracy",
    "weighted_precision": 'Weighted precision (reference "ACC")',
    "macro_f1": "Macro F1",
}


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------

def _as_label_array(values, n_classes, what):
    arr = np.asarray(values).reshape(-1)
    # float ids (e.g. from a tensor cast) are fine as long as they are whole numbers
    if arr.size and not np.issubdtype(arr.dtype, np.integer) and not np.all(np.mod(arr, 1) == 0):
        raise VegaError(f"{what} must be integer class ids")
    arr = arr.astype(np.int64)
    if n_classes is not None and arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise VegaError(f"{what} contain class ids outside 0..{n_classes - 1}")
    return arr


def classification_metrics(labels, preds, class_names):
    """Scores over already-filtered (valid-only) utterances.

    weighted_f1 is the paper's headline number. `accuracy` is the true accuracy; the reference's
    printed "ACC" is really weighted precision, so that value is kept too, as `weighted_precision`.
    Per-class numbers and the confusion matrix cover every class in `class_names`, so a class absent
    from this split still has a (zero) entry. macro_f1 averages over the classes that occur in the
    labels or the predictions (sklearn's default), so a class that never appears is not counted as 0.
    """
    n_classes = len(class_names)
    y_true = _as_label_array(labels, n_classes, "labels")
    y_pred = _as_label_array(preds, n_classes, "predictions")
    if y_true.shape != y_pred.shape:
        raise VegaError(f"{y_true.size} labels but {y_pred.size} predictions")
    if y_true.size == 0:
        raise VegaError("no valid utterances to score")
    all_ids = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=all_ids, zero_division=0)
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]),
               "f1": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    return {
        "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_precision": float(precision_score(y_true, y_pred, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion": confusion_matrix(y_true, y_pred, labels=all_ids).astype(int).tolist(),
        "n": int(y_true.size),
    }


def head_f1s(labels, preds_by_head):
    """Weighted F1 of each classifier head, e.g. {'all': .., 't': .., 'a': .., 'v': ..}."""
    y_true = _as_label_array(labels, None, "labels")
    scores = {}
    for head, preds in preds_by_head.items():
        y_pred = _as_label_array(preds, None, f"predictions of head {head!r}")
        if y_pred.shape != y_true.shape:
            raise VegaError(f"head {head!r}: {y_pred.size} predictions for {y_true.size} labels")
        scores[head] = float(f1_score(y_true, y_pred, average="weighted", zero_division=0))
    return scores


# ----------------------------------------------------------------------------------------------
# predictions file
# ----------------------------------------------------------------------------------------------

PREDICTION_KEY_COLUMNS = ["dialogue_id", "utterance_index", "speaker", "label", "prediction"]


def _prob_columns(class_names):
    return [f"p_{name}" for name in class_names]


def write_predictions_csv(path, dialogue_ids, utterance_index, speakers, labels, preds, probs, class_names,
                          named=None):
    """One row per scored utterance; label and prediction as class names, then one probability per class.
    An utterance without a label (id -1, the predict split) gets an empty label. named: {column: values} of
    what the data file says of each utterance (utterance_id, text), placed after utterance_index."""
    n_classes = len(class_names)
    y_true = np.asarray(labels).reshape(-1)
    y_true = np.where(y_true == -1, n_classes, _as_label_array(np.where(y_true == -1, 0, y_true), n_classes,
                                                               "labels"))   # n_classes: the empty name
    y_pred = _as_label_array(preds, n_classes, "predictions")
    probs = np.asarray(probs, dtype=np.float64)
    if probs.size == 0:
        probs = probs.reshape(0, n_classes)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise VegaError(f"probabilities have shape {probs.shape}, expected (n, {n_classes})")
    columns = [list(dialogue_ids), list(utterance_index), list(speakers), y_true, y_pred]
    lengths = {len(c) for c in columns} | {probs.shape[0]}
    if len(lengths) != 1:
        raise VegaError(f"prediction columns have different lengths: {sorted(lengths)}")
    names = np.asarray(list(class_names) + [""], dtype=object)
    frame = pd.DataFrame({
        "dialogue_id": columns[0],
        "utterance_index": np.asarray(columns[1], dtype=np.int64),
        **{k: list(v) for k, v in (named or {}).items()},
        "speaker": columns[2],
        "label": names[y_true],
        "prediction": names[y_pred],
    })
    for j, col in enumerate(_prob_columns(class_names)):
        frame[col] = probs[:, j]
    atomic_write_text(path, frame.to_csv(index=False, float_format="%.6f"))


def read_predictions_csv(path):
    if not os.path.isfile(path):
        raise VegaError(f"predictions file not found: {path}")
    try:
        # ids, speakers and class names stay text: "NA" or "001" must not turn into NaN or 1
        frame = pd.read_csv(path, keep_default_na=False,
                            dtype={"dialogue_id": str, "speaker": str, "label": str, "prediction": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise VegaError(f"cannot read predictions file {path}: {e}") from e
    missing = [c for c in PREDICTION_KEY_COLUMNS if c not in frame.columns]
    if missing:
        raise VegaError(f"predictions file {path} lacks columns: {', '.join(missing)}")
    return frame


def metrics_from_predictions_csv(path, class_names):
    frame = read_predictions_csv(path)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(frame["label"]).union(frame["prediction"]) - set(index))
    if unknown:
        raise VegaError(f"predictions file {path} has unknown class names: {', '.join(unknown)}")
    return classification_metrics(frame["label"].map(index).to_numpy(),
                                  frame["prediction"].map(index).to_numpy(), class_names)


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------

def _save_figure(fig, path):
    """Save as PNG through a temp file in the same folder (common._atomic_write): a crash never leaves half an image."""
    try:
        _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), "wb")
    finally:
        plt.close(fig)


def _series(rows, key, scale=1.0):
    """(epochs, values) of the rows that carry `key`; missing or None values are skipped."""
    points = [(r["epoch"], float(r[key]) * scale) for r in rows
              if r.get(key) is not None and r.get("epoch") is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _plot_if_present(ax, rows, key, label, scale=1.0, **style):
    epochs, values = _series(rows, key, scale)
    if epochs:
        ax.plot(epochs, values, marker="o", markersize=3, label=label, **style)


def plot_curves(metrics_rows, path, best_epoch=None):
    """Loss panel (train / test / valid) and weighted-F1 panel (four heads, valid) per epoch, best epoch marked."""
    rows = list(metrics_rows)
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (("train_loss", "train"), ("valid_loss", "valid"), ("test_loss", "test")):
        _plot_if_present(ax_loss, rows, key, label)
    ax_loss.set(title="Total loss", xlabel="epoch", ylabel="loss")
    for head, style in (("all", "-"), ("t", "--"), ("a", "--"), ("v", "--")):
        _plot_if_present(ax_f1, rows, f"test_f1_{head}", f"test {head}", scale=100.0, linestyle=style)
    _plot_if_present(ax_f1, rows, "valid_f1_all", "valid all", scale=100.0, linestyle=":", color="black")
    ax_f1.set(title="Weighted F1 (%)", xlabel="epoch", ylabel="weighted F1 (%)")
    if best_epoch is not None:
        _mark_best(ax_loss, ax_f1, rows, best_epoch)
    epochs = [r["epoch"] for r in rows if r.get("epoch") is not None]
    for ax in (ax_loss, ax_f1):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if len(set(epochs)) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)  # otherwise matplotlib zooms to 0.96..1.04
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save_figure(fig, path)


def _mark_best(ax_loss, ax_f1, rows, best_epoch):
    for ax in (ax_loss, ax_f1):
        ax.axvline(best_epoch, color="red", alpha=0.6, linewidth=1)
    best = next((r for r in rows if r.get("epoch") == best_epoch), {})
    text = f"best epoch {best_epoch}"
    if best.get("test_f1_all") is not None:
        text += f"\nF1 {100 * best['test_f1_all']:.2f}"
        ax_f1.plot([best_epoch], [100 * best["test_f1_all"]], marker="*", markersize=12, color="red")
    # axes-fraction y keeps the note inside the panel whatever the F1 range is; the box keeps it legible
    ax_f1.annotate(text, xy=(best_epoch, 0.97), xycoords=("data", "axes fraction"), va="top",
                   xytext=(4, 0), textcoords="offset points", color="red", fontsize=8,
                   bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "red", "alpha": 0.85})


def plot_confusion(confusion, class_names, path, title=None):
    """Row-normalised heat map; each cell shows the row fraction and the raw count."""
    counts = np.asarray(confusion, dtype=np.int64)
    n = len(class_names)
    if counts.shape != (n, n):
        raise VegaError(f"confusion matrix is {counts.shape}, expected {n}x{n}")
    row_sums = counts.sum(axis=1, keepdims=True)
    # a class with no utterances gets a zero row, not 0/0 = NaN
    normalised = np.divide(counts, row_sums, out=np.zeros(counts.shape, dtype=float), where=row_sums > 0)
    size = max(4.0, 0.9 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    for i in range(n):
        for j in range(n):
            colour = "white" if normalised[i, j] > 0.5 else "black"
            ax.text(j, i, f"{normalised[i, j]:.2f}\n({counts[i, j]})", ha="center", va="center",
                    fontsize=8, color=colour)
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix (row-normalised)")
    _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# multi-seed aggregation
# ----------------------------------------------------------------------------------------------

def _stats(values):
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,  # sample std; undefined for one seed
        "min": float(arr.min()),
        "max": float(arr.max()),
        "values": [float(v) for v in arr],
    }


def _seed_row(entry):
    metrics = entry["metrics"]
    row = {"seed": entry.get("seed"), "run_dir": entry.get("run_dir", "")}
    for name in HEADLINE_METRICS:
        if metrics.get(name) is not None:
            row[name] = float(metrics[name])
    for cls, scores in (metrics.get("per_class") or {}).items():
        if scores.get("f1") is not None:
            row[f"f1_{cls}"] = float(scores["f1"])
    return row


def best_test_metrics(run_dir):
    """The test metrics at a run's selected epoch, as its summary.json records them (None if it has none)."""
    import json
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return (json.load(f).get("best") or {}).get("test")
    except (OSError, ValueError):
        return None


def aggregate_runs(per_seed):
    """Mean / sample std / min / max over the seeds that finished; failed seeds are listed, not counted.

    n_seeds and seeds describe the successful seeds only. Class order follows the first seed's per_class.
    """
    ok, failed = [], []
    for entry in per_seed:
        if entry.get("metrics") is not None and not entry.get("error"):
            ok.append(entry)
        else:
            failed.append({"seed": entry.get("seed"), "error": str(entry.get("error") or "no metrics")})
    rows = [_seed_row(e) for e in ok]
    metric_names = list(HEADLINE_METRICS)
    for row in rows:
        metric_names += [k for k in row if k.startswith("f1_") and k not in metric_names]
    metrics = {}
    for name in metric_names:
        values = [row[name] for row in rows if name in row]
        if values:
            metrics[name] = _stats(values)
    return {"n_seeds": len(ok), "seeds": [e.get("seed") for e in ok], "failed": failed,
            "metrics": metrics, "per_seed": rows}


def _pct(value):
    return "–" if value is None else f"{100 * value:.2f}"


def aggregate_markdown(agg, class_names):
    metrics = agg.get("metrics", {})
    lines = ["# Multi-seed summary", "",
             f"Seeds finished: {agg.get('n_seeds', 0)} ({', '.join(str(s) for s in agg.get('seeds', []))}); "
             f"failed: {len(agg.get('failed', []))}. Values in percent; std is the sample std over seeds.", "",
             "| metric | mean ± std | min | max |", "|---|---|---|---|"]
    names = [(m, METRIC_TITLES[m]) for m in HEADLINE_METRICS]
    names += [(f"f1_{c}", f"F1 {c}") for c in class_names]
    for key, title in names:
        s = metrics.get(key)
        if s is None:
            lines.append(f"| {title} | – | – | – |")
        else:
            lines.append(f"| {title} | {_pct(s['mean'])} ± {_pct(s['std'])} | {_pct(s['min'])} | {_pct(s['max'])} |")
    lines += ["", "## Per seed", "",
              "| seed | weighted F1 | accuracy | weighted precision | macro F1 | run folder |",
              "|---|---|---|---|---|---|"]
    for row in agg.get("per_seed", []):
        cells = [_pct(row.get(m)) for m in HEADLINE_METRICS]
        lines.append(f"| {row.get('seed')} | {' | '.join(cells)} | {row.get('run_dir', '')} |")
    if agg.get("failed"):
        lines += ["", "## Failed seeds", ""]
        lines += [f"- seed {f.get('seed')}: {f.get('error')}" for f in agg["failed"]]
    return "\n".join(lines) + "\n"


def plot_per_class_f1(agg, class_names, path):
    """Per-class F1 mean with std error bars over seeds; each seed's value drawn as a dot."""
    metrics = agg.get("metrics", {})
    x = np.arange(len(class_names))
    stats = [metrics.get(f"f1_{c}") for c in class_names]
    means = [100 * s["mean"] if s else 0.0 for s in stats]
    stds = [100 * s["std"] if s else 0.0 for s in stats]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(class_names) + 2), 4.5))
    ax.bar(x, means, yerr=stds, capsize=4, color="#8fb4d9", edgecolor="#3b6a98", label="mean ± std")
    for i, s in enumerate(stats):
        values = s["values"] if s else []
        # fixed small horizontal spread so dots of equal value stay visible without randomness
        offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(len(values))
        ax.scatter(x[i] + offsets, [100 * v for v in values], color="black", s=12, zorder=3,
                   label="seed" if i == 0 and values else None)
    ax.set_xticks(x, labels=class_names, rotation=30, ha="right")
    ax.set(ylabel="F1 (%)", ylim=(0, 100), title=f"Per-class F1 over {agg.get('n_seeds', 0)} seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# console
# ----------------------------------------------------------------------------------------------

def format_epoch_line(row):
    """One console line per epoch; F1 and accuracy in percent, '*' marks a new best epoch."""
    parts = [f"epoch {row.get('epoch', '?'):>3}"]
    for key, label in (("train_loss", "train loss"), ("valid_loss", "valid loss"), ("test_loss", "test loss")):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.3f}")
    heads = [f"{h} {100 * row[f'test_f1_{h}']:.2f}" for h in ("all", "t", "a", "v")
             if row.get(f"test_f1_{h}") is not None]
    if heads:
        parts.append("F1 " + " ".join(heads))
    if row.get("valid_f1_all") is not None:
        parts.append(f"valid F1 {100 * row['valid_f1_all']:.2f}")
    if row.get("test_accuracy") is not None:
        parts.append(f"acc {100 * row['test_accuracy']:.2f}")
    if row.get("train_seconds") is not None or row.get("eval_seconds") is not None:
        parts.append(f"{row.get('train_seconds') or 0:.1f}s+{row.get('eval_seconds') or 0:.1f}s")
    if row.get("skipped_steps"):
        parts.append(f"{row['skipped_steps']} steps skipped")
    line = " | ".join(parts)
    return line + " *" if row.get("is_best") else line
